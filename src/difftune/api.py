"""The Python API; the CLI is a thin translation of flags into these calls."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .config import CONTROL_GUIDANCE, ControlNetConfig
from .errors import ConfigError, UserError
from .guards import quiet_other_processes
from .trackers import requested_trackers


def resolve_seed(cfg: Any) -> Any:
    """A run config whose seed is set (a random one if unset), so the saved config reproduces it. Also the
    first thing a training call does: what can be refused before any model loads is refused here."""
    from .optim import check_optimizer_available

    check_optimizer_available(cfg.optim)
    if cfg.train.seed is not None:
        return cfg
    seed = _checkpoint_seed(cfg.train)
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, seed=_shared_random_seed() if seed is None else seed))


def _checkpoint_seed(train: Any) -> int | None:
    """The seed of the checkpoint a run resumes from: it picked the run's samples (--max_train_samples, a
    stream's cache) and their order, so a resume without --seed must not draw another."""
    from . import checkpoint as ckpt

    if not train.resume_from_checkpoint:
        return None
    resume_from = ckpt.resolve_resume(Path(train.output_dir) / "checkpoints", train.resume_from_checkpoint)
    if resume_from is None:
        return None
    import json

    try:
        seed = json.loads((resume_from / ckpt.STATE_FILE).read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        return None  # (the trainer names a damaged checkpoint)
    return seed if isinstance(seed, int) else None


def _shared_random_seed() -> int:
    """A random seed, the same in every process of a multi-process launch (process 0's): the seed picks the
    samples and their order, and processes with different ones would each train on their own selection."""
    seed = random.randrange(2**31)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list, parse_flag_from_env

        # (the state the run's Accelerator then joins; it reads ACCELERATE_USE_CPU itself, PartialState does not)
        if PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes > 1:
            seed = broadcast_object_list([seed], from_process=0)[0]
    return seed


def _callers_random_state_kept():
    """Training seeds torch's global generator (for its own reproducibility); a library call gives the
    caller's CPU random state back as it found it. (CUDA generators are not forked: that would touch every
    GPU from every process of a multi-GPU launch.)"""
    return torch.random.fork_rng(devices=[])


def _check_run_config(cfg: Any, cfg_cls: type, call: str) -> None:
    """A run config of the method's own class: a dict, a file name or the other method's config would otherwise
    fail as an AttributeError deep in the call."""
    from .config_io import METHODS

    if isinstance(cfg, cfg_cls):
        return
    if type(cfg).__name__ in METHODS:  # the other method's run config
        other = type(cfg).__name__
        raise TypeError(f"{call} takes a difftune.{cfg_cls.__name__}, got a {other}: train that with "
                        f"difftune.train_{METHODS[other][0].lower().replace(' ', '_')}.")
    hint = (f"from_dict({cfg_cls.__name__}, read_config_file(path)) reads a config file"
            if isinstance(cfg, (str, os.PathLike)) else f"from_dict({cfg_cls.__name__}, {{...}}) builds one from a "
            "flat or sectioned dict of flag names")
    raise TypeError(f"{call} takes a difftune.{cfg_cls.__name__}, got {type(cfg).__name__}: "
                    f"{hint} (from difftune.config import from_dict, read_config_file).")


def train_controlnet(cfg: ControlNetConfig, base: Any = None) -> dict:
    """Train a ControlNet as configured; returns the run summary (also in OUTPUT_DIR/train_summary.json).

    ``base`` may pass an already loaded ``BaseModel`` (tests, notebooks) instead of loading
    ``cfg.model.pretrained_model_name_or_path``.
    """
    from .methods.controlnet import ControlNetMethod
    from .trainer import Trainer

    _check_run_config(cfg, ControlNetConfig, "train_controlnet")
    cfg = resolve_seed(cfg)
    quiet_other_processes()
    data = check_before_loading(cfg, ControlNetMethod.check_data)
    with _callers_random_state_kept():
        method = ControlNetMethod(cfg, base=base, data=data)
        return Trainer(method, method.cfg).fit()  # method.cfg: family and resolution resolved


def check_before_loading(cfg: Any, check_data: Any = None) -> Any:
    """What fails without the models, said before minutes of loading them (the trainer checks again): a
    tracker package missing, an --output_dir holding another run, a --validation_image that is not there; the
    method's training data (``check_data(cfg)``, returned for the method to train on, not read twice); last,
    with --push_to_hub, the Hub repo, created at the start as diffusers' scripts do (a bad --hub_model_id, token
    or network stops the run here) once the rest has passed (no repo is made for a run that would not start)."""
    from .guards import claim_output_dir
    from .validation import load_validation_images

    requested_trackers(cfg.train.report_to)
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file: give a folder (a new one, or a run's to resume).")
    if not cfg.train.resume_from_checkpoint:
        claim_output_dir(out, out / "checkpoints", cfg.train.overwrite_output_dir)
    load_validation_images(cfg.validation)
    data = check_data(cfg) if check_data is not None else None
    if cfg.train.push_to_hub and os.environ.get("RANK", "0") == "0":  # (once: the launch's first process)
        from . import hub

        hub.ensure_repo(out, cfg.train.hub_model_id, cfg.train.hub_token)
    return data


def train_custom_diffusion(cfg: Any, base: Any = None) -> dict:
    """Train Custom Diffusion concept(s) as configured (a ``CustomDiffusionConfig``); returns the run summary.

    ``--scale_lr`` multiplies the learning rate by GPUs x batch x accumulation, and by 2 more
    with prior preservation (each example then carries a class image too), as diffusers does
    (``CustomDiffusionMethod.lr_scale``).
    """
    from .config_custom_diffusion import CustomDiffusionConfig
    from .methods.custom_diffusion import CustomDiffusionMethod
    from .trainer import Trainer

    _check_run_config(cfg, CustomDiffusionConfig, "train_custom_diffusion")
    cfg = resolve_seed(cfg)
    quiet_other_processes()
    data = check_before_loading(cfg, CustomDiffusionMethod.check_data)
    with _callers_random_state_kept():
        method = CustomDiffusionMethod(cfg, base=base, data=data)
        return Trainer(method, method.cfg).fit()  # method.cfg: resolution resolved


def _open_condition(path: str | Path) -> Image.Image:
    from .data.images import read_image_file

    return read_image_file(path, "--image")


def _check_latent_multiple(resolution: int, vae_scale_factor: int) -> None:
    """A size the base's VAE maps to whole latent pixels: the pipeline would otherwise round it down without
    a word (--resolution 60 gave 56x56 images), where training refuses it."""
    if resolution % vae_scale_factor:
        lower = resolution // vae_scale_factor * vae_scale_factor
        raise ConfigError(f"--resolution {resolution} is not a multiple of {vae_scale_factor}, the base model's VAE "
                          f"scale factor: use {lower or vae_scale_factor} or {lower + vae_scale_factor}.")


def warn_unknown_tokens(prompt: str | list[str], tokens: list[str], folder: str | Path) -> list[str]:
    """Name the ``<...>`` tokens of a prompt that the Custom Diffusion folder does not define: the
    tokenizer reads such a token as plain characters, so it means nothing learned (a typo, or the
    token of another folder)."""
    from .custom_diffusion.concepts import PROMPT_TOKEN

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    unknown = sorted({t for p in prompts for t in PROMPT_TOKEN.findall(p) if t not in tokens})
    if unknown:
        logging.getLogger("difftune").warning(
            "the prompt uses %s, which %s does not define (its tokens: %s): it is read as plain characters",
            ", ".join(unknown), folder, ", ".join(tokens) or "none")
    return unknown


def _check_generate_arguments(prompt, image, controlnet, steps, num_images, guidance, scale, seed) -> None:
    """What the CLI's argument types check, for a call from Python (the pipeline would fail with a reshape
    error, or quietly decode noise for 0 steps)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"generate: prompt must be a string, got {prompt!r} (one prompt per call; num_images "
                          "sets how many images).")
    for name, value in (("num_inference_steps", steps), ("num_images", num_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"generate: {name} must be an integer >= 1, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"generate: seed must be an integer, got {seed!r}.")
    if seed < 0:
        raise ConfigError(f"generate: seed must be >= 0, got {seed}.")
    for name, value in (("guidance_scale", guidance), ("controlnet_conditioning_scale", scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"generate: {name} must be a finite number, got {value!r}.")
    if controlnet is not None and image is None:
        raise ConfigError("generate: a ControlNet needs a conditioning image (image=PATH or a PIL image).")


def _conditioner(condition: str | None, settings: dict | None) -> Any:
    """The conditioner ``condition`` (and its ``condition_settings``) name, built before any warning or model:
    an unknown condition or setting was said only after the base had loaded."""
    from .data.conditions import conditioner_from_settings

    if condition is None:
        if settings:
            raise ConfigError(f"generate: condition_settings {settings!r} without a condition: give condition= "
                              "(e.g. 'canny'), or leave them out.")
        return None
    return conditioner_from_settings({**(settings or {}), "condition": condition})


def _warn_other_condition(controlnet: str | Path, condition: str | None) -> None:
    """--condition of another kind than the ControlNet's run trained on (depth maps for a canny ControlNet)."""
    from .eval.run import trained_condition

    trained = trained_condition(controlnet) if condition is not None else None
    if trained is not None and trained[0] in ("canny", "depth") and trained[0] != condition:
        import logging

        logging.getLogger("difftune").warning(
            "--condition %s: this ControlNet was trained on %s conditions (its training data's "
            "difftune_dataset.json); it follows %s ones poorly, if at all. Use --condition %s.", condition,
            trained[0], condition, trained[0])


def generate(
    pretrained_model_name_or_path: str | None = None,
    controlnet: str | Path | None = None,
    image: str | Path | Image.Image | None = None,
    prompt: str | None = None,
    num_inference_steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 7.5,
    controlnet_conditioning_scale: float = 1.0,
    num_images: int = 1,
    resolution: int | None = None,
    negative_prompt: str | None = None,
    device: str | None = None,
    cpu_offload: bool = False,
    enable_xformers_memory_efficient_attention: bool = False,
    custom_diffusion: str | Path | None = None,
    weight_name: str | None = None,
    condition: str | None = None,
    condition_settings: dict | None = None,
    condition_out: str | Path | None = None,
    control_guidance: str = "both",
    vae: str | None = None,
    tokenizer_name: str | None = None,
    on_image: Any = None,
    keep: bool = True,
) -> list[Image.Image]:
    """Images for ``prompt`` conditioned on ``image`` with a trained ControlNet (UniPC sampler),
    or, with ``custom_diffusion``, with a Custom Diffusion folder's processors and tokens (several
    concepts together when the folder holds several): text-to-image alone, or under the ControlNet's
    control when both are given (the concept drawn where the condition puts it).

    ``condition`` (e.g. ``"canny"``, settings such as thresholds in ``condition_settings``) makes
    ``image`` a plain picture: it is resized to the output size (its own aspect ratio, the shorter
    side at the resolution, as a ready-made condition is sampled) and its condition computed there;
    the computed condition is saved to ``condition_out`` when given.

    ``control_guidance``: ``both`` (diffusers' default) or ``cond``: the ControlNet on the
    conditional half of classifier-free guidance only, so guidance amplifies the control too
    (``pipelines.controlnet_in_guidance``).

    ``pretrained_model_name_or_path`` None: the base the adapter was trained on (as recorded in its folder),
    else tiny-shapes; ``vae`` and ``tokenizer_name`` None with it, or with that base given by name (its folder or
    Hub id): the VAE and tokenizer that run trained with (and its prediction type; a ControlNet and a concept
    trained with different ones are refused). Another base is read with its own (warned about where the run's
    differ). So ``generate(prompt="a <new1> star", custom_diffusion="cd1")`` is a whole call.

    fp16 on CUDA, fp32 on the CPU; the same seed gives the same images: image i of ``num_images`` is drawn
    from ``seed + i`` (four per pipeline call), so image 0 is the one ``num_images=1`` gives.
    ``on_image(i, image)`` is called as each image is made; ``keep=False`` returns none (many images, saved
    by ``on_image``, without holding them all).
    """
    from .data.transforms import check_resolution
    from .models import check_controlnet_source, load_base_model, load_controlnet, with_prediction_type
    from .recorded import (check_default_base_fits, check_one_base, one_prediction_type, recorded_base_name,
                           recorded_concept_loading, recorded_loading, resolve_base, resolve_vae, warn_unused_records)
    from .pipelines import controlnet_pipeline, run_controlnet_pipeline
    from .pretrain import resolve_device

    if control_guidance not in CONTROL_GUIDANCE:
        raise ConfigError(f"--control_guidance {control_guidance!r} is not one of {', '.join(CONTROL_GUIDANCE)}.")
    if control_guidance != "both" and controlnet is None:
        raise UserError("--control_guidance sets how a ControlNet enters guidance: it needs --controlnet.")
    if controlnet is None and custom_diffusion is None:
        raise UserError("generate needs a ControlNet (--controlnet), a Custom Diffusion folder (--custom_diffusion), "
                        "or both.")
    if prompt is None and isinstance(pretrained_model_name_or_path, str) and " " in pretrained_model_name_or_path \
            and not Path(pretrained_model_name_or_path).expanduser().exists():
        raise ConfigError(f"generate: {pretrained_model_name_or_path!r} was given as the base model, and no prompt: "
                          "the first argument is the base model; pass the prompt as prompt=....")
    _check_generate_arguments(prompt, image, controlnet, num_inference_steps, num_images, guidance_scale,
                              controlnet_conditioning_scale, seed)
    conditioner = _conditioner(condition, condition_settings)  # an unknown condition or setting: said first
    given_base = pretrained_model_name_or_path
    if controlnet is not None and custom_diffusion is not None:
        check_one_base({f"--controlnet {controlnet}": recorded_base_name(controlnet=controlnet),
                        f"--custom_diffusion {custom_diffusion}": recorded_base_name(custom_diffusion=custom_diffusion)},
                       given_base, "--controlnet and --custom_diffusion", "both steer one base model")
    pretrained_model_name_or_path = resolve_base(given_base, controlnet, custom_diffusion)
    warn_unused_records(given_base, controlnet, custom_diffusion, {"vae": vae, "tokenizer_name": tokenizer_name})
    vae = resolve_vae(vae, given_base, controlnet)  # (the recorded base's, also when it is given by name)
    loading = recorded_loading(given_base, controlnet, tokenizer_name)  # the run's tokenizer, prediction type
    concept = recorded_concept_loading(given_base, custom_diffusion,  # (and the concept's run's, said once)
                                       None if controlnet is not None else tokenizer_name)
    tokenizer_name = tokenizer_name or loading.get("tokenizer_name") or concept.get("tokenizer_name")
    device = resolve_device(device or "auto")  # (a device torch cannot use is said before any model loads)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if resolution is not None:
        check_resolution(resolution)  # as training does: the pipeline would quietly round it down
    if cpu_offload and not device.startswith("cuda"):  # (said before any model loads)
        raise UserError("--cpu_offload only makes sense with a CUDA device.")
    if custom_diffusion is not None:  # an unfinished or damaged folder is said before the base model loads
        from .custom_diffusion.export import read_meta

        read_meta(custom_diffusion)
    if controlnet is not None:
        check_controlnet_source(str(controlnet), "--controlnet")  # before the base model loads
        if given_base is None and recorded_base_name(controlnet=controlnet, custom_diffusion=custom_diffusion) is None:
            check_default_base_fits(controlnet)  # (the default base taken, as nothing records one: said as such)
        _warn_other_condition(controlnet, condition)
    base = load_base_model(pretrained_model_name_or_path, vae_name_or_path=vae, tokenizer_name=tokenizer_name)
    trained = {**({f"--controlnet {controlnet}": loading["prediction_type"]} if loading.get("prediction_type") else {}),
               # (a concept sampled on its recorded base takes part; its key is there then, None for a folder
               # that predates the record)
               **({f"--custom_diffusion {custom_diffusion}": concept["prediction_type"]}
                  if "prediction_type" in concept else {})}
    base = with_prediction_type(base, one_prediction_type(trained, base.noise_scheduler.config.prediction_type),
                                recorded=True)
    res = resolution or base.native_resolution
    _check_latent_multiple(res, base.vae_scale_factor)
    if controlnet is None:
        from .custom_diffusion.class_images import text2image_pipeline

        pipe = text2image_pipeline(base)
    else:
        pipe = controlnet_pipeline(base, load_controlnet(str(controlnet), flag="--controlnet", unet=base.unet))
    if custom_diffusion is not None:  # (with a ControlNet too: the concept, placed by the condition)
        from .custom_diffusion.export import load_custom_diffusion

        tokens = load_custom_diffusion(pipe, custom_diffusion, weight_name)
        warn_unknown_tokens(prompt, tokens, custom_diffusion)
    if cpu_offload:
        pipe.to(dtype=dtype)
        pipe.enable_model_cpu_offload()
    elif dtype == torch.float32:
        pipe.to(device)
    else:
        pipe.to(device, dtype=dtype)
    if enable_xformers_memory_efficient_attention:
        pipe.enable_xformers_memory_efficient_attention()
    if controlnet is None:
        from .pipelines import sample_in_chunks

        return sample_in_chunks(pipe, num_images, seed, lambda n, generators: pipe(
            prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=res, width=res, num_images_per_prompt=n,
            generator=generators).images, on_image, keep)
    cond = image if isinstance(image, Image.Image) else _open_condition(image)
    if conditioner is not None:  # computed at the size it is sampled at: the picture's own aspect ratio
        from .pipelines import output_size

        height, width = output_size(cond, res, max(8, base.vae_scale_factor))
        cond = conditioner(cond.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
        if condition_out is not None:
            cond.save(condition_out)
    return run_controlnet_pipeline(
        pipe, [prompt], [cond], num_images, seed, num_inference_steps, res, guidance_scale,
        controlnet_conditioning_scale, negative_prompt, control_guidance, on_image, keep,
    )[0]
