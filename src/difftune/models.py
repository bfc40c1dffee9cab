"""Loading the frozen base model (tokenizer, text encoder, VAE, UNet, noise scheduler).

One loader for every source: a diffusers-layout folder or a Hub id. Offline, a Hub id that
is not cached fails with a message that says so and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .hub_cache import BASE_FOLDER_ADVICE, cached_folder, complete_snapshot, hub_hint, hub_snapshot, looks_like_hub_id
from .model_folders import (SINGLE_FILE_HINT, check_local_folder, damaged_weights, note_local_folder, part_variants,
                            pickle_only)

log = logging.getLogger("difftune")


class _NoEmptyFp32Notice(logging.Filter):
    """diffusers' ModelMixin.to(dtype) warns "modules ... that should be kept in float32: []" for every model
    and every cast, the list empty: a notice with nothing in it to act on, repeated through a bf16 run. One
    that names modules still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Notice())


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion model: SD 1.x/2.x, or SDXL (``family="sdxl"``).

    SDXL adds a second tokenizer and text encoder (OpenCLIP bigG with projection); what a
    family does with them is in ``difftune.families``.
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    source: str
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    family: str = "sd"
    # The stock SDXL VAE overflows in fp16: it stays in fp32 under mixed precision unless a
    # separate (fp16-safe) VAE was given, as diffusers' SDXL scripts do.
    vae_in_fp32: bool = False
    variant: str | None = None  # the weight files' variant the UNet was read from ("fp16": *.fp16.safetensors)

    def frozen_modules(self) -> list[torch.nn.Module]:
        encoders = [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])
        return [*encoders, self.vae, self.unet]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD): each VAE block after the first halves the size."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def native_resolution(self) -> int:
        """The image size the UNet was configured for (512 for SD 1.5, 64 for tiny-shapes)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def default_resolution(family_default: int, base: BaseModel) -> int:
    """Training resolution without --resolution: the family's (diffusers' 512 for SD, 1024 for SDXL), or the
    base's own size where that is smaller (64 for tiny-shapes: 512 would upscale its 64-px world 8x)."""
    return min(family_default, base.native_resolution)


def training_resolution(name_or_path: str) -> int:
    """``default_resolution`` read from a base model's configs, without loading any weights (for ``difftune data
    check``): a folder's, or a Hub model's (fetched, or from the cache offline). A base whose UNet config cannot
    be read is refused, saying why: training would fail on it at once, and its size is unknown."""
    import contextlib
    import json

    from .families import FAMILIES, detect_family

    name_or_path = resolve_builtin(name_or_path)
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        if not looks_like_hub_id(name_or_path):
            raise ModelLoadError(f"--pretrained_model_name_or_path {name_or_path}: there is no such folder.")
        folder = hub_snapshot(name_or_path, None, None) or folder  # (a Hub id neither reachable nor cached: refused)
        from huggingface_hub import hf_hub_download

        for config in ("unet/config.json", "vae/config.json"):  # into that snapshot (offline: where cached)
            with contextlib.suppress(Exception):  # a missing UNet config is said below
                hf_hub_download(name_or_path, config)
    family = FAMILIES[detect_family(str(folder))] if folder.is_dir() else FAMILIES["sd"]
    unet_config = folder / "unet" / "config.json"
    try:
        native = int(json.loads(unet_config.read_text(encoding="utf-8"))["sample_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = "it is missing" if isinstance(e, OSError) and not unet_config.exists() else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"--pretrained_model_name_or_path {name_or_path}: the UNet's config {unet_config} cannot "
                             f"be read ({why}), so training could not load this base, and the resolution it would "
                             f"train at is unknown. Give a complete diffusers-layout base folder.") from None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        scale = 8  # every SD and SDXL VAE's (a base without its own VAE trains with --pretrained_vae_model_name_or_path)
    return min(family.default_resolution, native * scale)


BUILTIN_MODELS = {"tiny-shapes": "assets/tiny-shapes"}
DEFAULT_MODEL = "tiny-shapes"


def resolve_builtin(name_or_path: str) -> str:
    """A short built-in name ("tiny-shapes") becomes the folder shipped inside the package."""
    if name_or_path in BUILTIN_MODELS and not Path(name_or_path).exists():
        from importlib.resources import files

        folder = Path(str(files("difftune") / BUILTIN_MODELS[name_or_path]))
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"The built-in model '{name_or_path}' is missing from this install ({folder}).")
        return str(folder)
    return name_or_path


def base_in_code(name_or_path: str) -> tuple[list[str], str]:
    """How a model card's Python names a base: (import lines, expression). A built-in name is no Hub id, so
    the card finds its folder in the installed difftune; anything else is the string it was given as."""
    if name_or_path in BUILTIN_MODELS and not Path(name_or_path).exists():
        return [f"from difftune.models import resolve_builtin  # {name_or_path} ships inside difftune"], \
            f'resolve_builtin("{name_or_path}")'
    return [], f'"{name_or_path}"'


REDOWNLOAD = "re-download the model, or write the folder again with `save_pretrained(DIR)`"


def load_base_model(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    tokenizer_name: str | None = None,
    cache_dir: str | None = None,
    family: str = "auto",
    vae_name_or_path: str | None = None,
    stand_ins: tuple[str, ...] = ("vae", "tokenizer"),
) -> BaseModel:
    """Load the frozen components of an SD 1.x/2.x or SDXL model in fp32 on the CPU.

    ``family`` "auto" reads it from the folder (``difftune.families.detect_family``);
    ``vae_name_or_path`` replaces the base's VAE (a folder with the VAE at its root or in ``vae/``).
    ``stand_ins``: the parts the calling command has a flag to give instead (named when missing).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, CLIPTextModel

    from .families import FAMILIES, check_unet_family, detect_family

    name_or_path = resolve_builtin(name_or_path)
    local = Path(name_or_path).expanduser()
    if family not in ("auto", *FAMILIES):
        raise ModelLoadError(f"--model_family {family!r}: choose auto, {', '.join(FAMILIES)}.")
    hub_id = None if local.exists() else name_or_path
    if hub_id is not None:
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise ModelLoadError(f"Model folder {name_or_path} does not exist.")
        # (first: offline, each part would fail the same way, one network timeout after another)
        local = hub_snapshot(hub_id, revision, cache_dir) or local
    given = family
    if family == "auto":
        family = detect_family(str(local)) if local.exists() else "sd"  # (a Hub repository without model_index.json)
    fam = FAMILIES[family]
    needed = ("unet", *(() if vae_name_or_path else ("vae",)), "text_encoder",
              *(() if tokenizer_name else ("tokenizer",)), "scheduler", *fam.extra_subfolders)
    if hub_id is not None and local.exists():  # the cache's snapshot: read as a local folder, when it holds it all
        local = complete_snapshot(hub_id, local, needed, variant) or Path(hub_id)
    variants: dict[str, str | None] = {}
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"--pretrained_model_name_or_path {local} is a file; give the model folder"
                                 f"{SINGLE_FILE_HINT if local.suffix in ('.safetensors', '.ckpt') else ''}.")
        lacking = [name for name in fam.extra_subfolders if not (local / name).is_dir()]
        if given != "auto" and lacking and (local / "unet").is_dir():
            raise ModelLoadError(f"--model_family {given}: {local} has no {' or '.join(lacking)}, so it is not an "
                                 f"{given} model — use --model_family auto.")
        check_local_folder(local, needed, stand_ins)
        if hub_id is None:
            note_local_folder(local, revision)
        name_or_path = str(local)
        weights = ("text_encoder", "unet", *(("vae",) if vae_name_or_path is None else ()),
                   *(p for p in fam.extra_subfolders if p.startswith("text_encoder")))
        variants = part_variants(local, weights, variant)
    common = dict(revision=revision, cache_dir=cache_dir)
    if tokenizer_name:
        tokenizer = _load_tokenizer(tokenizer_name, common)
    part = "text_encoder"  # what is being read: a library's message names the model folder, not the part
    try:
        if not tokenizer_name:
            part = "tokenizer"
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **common)
        part = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder",
                                                     variant=variants.get("text_encoder", variant),
                                                     use_safetensors=True, **common)
        part = " / ".join(fam.extra_subfolders)
        extra = fam.load_extra_encoders(name_or_path, variants.get("text_encoder_2", variant), common)
        part = "vae"
        if vae_name_or_path is None:
            vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variants.get("vae", variant),
                                                use_safetensors=True, **common)
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet",
                                                    variant=variants.get("unet", variant), use_safetensors=True,
                                                    **common)
        part = "scheduler"
        noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **common)
    except (OSError, ValueError, SafetensorError) as e:  # (transformers lets a damaged file's error through)
        if local.exists():
            damaged = next(filter(None, (damaged_weights(local / sub, REDOWNLOAD) for sub in part.split(" / "))), "")
            raise ModelLoadError(f"Could not load {part} of the model in {local}: "
                                 f"{damaged or e}{pickle_only(local / part)}") from None
        if isinstance(e, SafetensorError):
            raise ModelLoadError(f"Could not load {part} of {name_or_path}: a weight file of it in the Hugging Face "
                                 f"cache is damaged ({e}); remove it (`hf cache rm model/{name_or_path}`) and download "
                                 "it again.") from None
        raise hub_hint(name_or_path, e) from None
    if vae_name_or_path is not None:
        vae = load_vae(vae_name_or_path, revision, cache_dir)
    name_or_path = hub_id or name_or_path  # (the messages below name a Hub model by its id, not its cache folder)
    check_unet_family(unet, family, name_or_path)
    latent = int(vae.config.latent_channels)
    if int(unet.config.in_channels) != latent and vae_name_or_path is not None:
        raise ModelLoadError(f"--pretrained_vae_model_name_or_path {vae_name_or_path} makes {latent}-channel latents, "
                             f"and the UNet of {name_or_path} takes {unet.config.in_channels}: give a VAE of this "
                             "base's kind (or leave the flag out for its own).")
    if int(unet.config.in_channels) != latent:
        raise ModelLoadError(
            f"{name_or_path}: its UNet takes {unet.config.in_channels} input channels and its VAE makes {latent}-channel "
            "latents: an inpainting (or other image-conditioned) model, whose UNet also reads a mask and a masked "
            "image. difftune trains and samples on text-to-image bases: give one (e.g. the text-to-image model this "
            "one was made from).")
    for module in (text_encoder, vae, unet, *extra.values()):
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return BaseModel(tokenizer, text_encoder, vae, unet, noise_scheduler, source=name_or_path, family=family,
                     vae_in_fp32=fam.vae_needs_fp32 and vae_name_or_path is None,
                     variant=variants.get("unet", variant), **extra)


def with_prediction_type(base: BaseModel, prediction_type: str | None, recorded: bool = False) -> BaseModel:
    """The base with ``prediction_type`` in its scheduler, when that differs from the scheduler's own (a shallow
    copy; else ``base`` itself): training, validation and sampling then agree on what the UNet predicts.
    ``recorded``: it is what an adapter's run trained with (said as a note, not a training warning)."""
    own = base.noise_scheduler.config.prediction_type
    if prediction_type is None or prediction_type == own:
        return base
    if recorded:
        print(f"prediction type: {prediction_type} (the adapter's run trained with it; the base's scheduler says "
              f"{own})", file=sys.stderr)
    else:
        log.warning("--prediction_type %s: the base's scheduler says %s, and its frozen UNet predicts what it was "
                    "trained to predict. Override it only when the scheduler's config is wrong (e.g. a v-prediction "
                    "model saved with an epsilon scheduler); validation and `difftune generate` sample with %s too.",
                    prediction_type, own, prediction_type)
    scheduler = type(base.noise_scheduler).from_config(base.noise_scheduler.config, prediction_type=prediction_type)
    return dataclasses.replace(base, noise_scheduler=scheduler)


def _load_tokenizer(name_or_path: str, common: dict):
    """``--tokenizer_name``: a tokenizer folder (or hub id) to use instead of the base model's (the first
    one, CLIP ViT-L, of an SDXL model)."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if not local.exists() and (not looks_like_hub_id(name_or_path) or local.parent.is_dir()):
        raise ModelLoadError(f"--tokenizer_name {name_or_path}: there is no such folder.")
    advice = "Pass a local tokenizer folder instead (e.g. a model's tokenizer/)."
    local = cached_folder(name_or_path, common.get("revision"), common.get("cache_dir"), "tokenizer_config.json",
                           advice, kind="tokenizer")
    if (local / "tokenizer").is_dir() and not (local / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"--tokenizer_name {local} is a model folder: give its tokenizer, "
                             f"--tokenizer_name {local / 'tokenizer'}.")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else name_or_path, **common)
    except (OSError, ValueError) as e:
        if local.exists():
            raise ModelLoadError(f"--tokenizer_name {local}: no tokenizer could be read there ({e}). Give a "
                                 f"folder holding tokenizer files (e.g. a model's tokenizer/ folder).") from None
        raise hub_hint(name_or_path, e, advice) from None


def load_vae(name_or_path: str, revision: str | None = None, cache_dir: str | None = None):
    """A separate VAE (``--pretrained_vae_model_name_or_path``): its files at the root, or in ``vae/``."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path).expanduser()
    if not local.exists() and not looks_like_hub_id(name_or_path):
        raise ModelLoadError(f"--pretrained_vae_model_name_or_path {name_or_path}: there is no such folder.")
    local = cached_folder(name_or_path, revision, cache_dir, "config.json", VAE_FOLDER_ADVICE, kind="model")
    subfolder = "vae" if (local / "vae" / "config.json").is_file() else None
    config = local / (subfolder or "") / "config.json"
    kind = _config_class(config) if config.is_file() else None
    if kind is not None and kind != "AutoencoderKL":
        raise ModelLoadError(f"--pretrained_vae_model_name_or_path {local} is a {kind} folder, not a VAE. "
                             f"{VAE_FOLDER_ADVICE}")
    try:
        return AutoencoderKL.from_pretrained(str(local) if local.exists() else name_or_path, subfolder=subfolder,
                                             revision=revision, cache_dir=cache_dir, use_safetensors=True)
    except (OSError, ValueError) as e:
        if local.exists():
            folder = local / (subfolder or "")
            raise ModelLoadError(f"Could not load the VAE in {local}: {damaged_weights(folder, REDOWNLOAD) or e}"
                                 f"{pickle_only(folder)}") from None
        raise hub_hint(name_or_path, e, VAE_FOLDER_ADVICE) from None


VAE_FOLDER_ADVICE = ("Pass a local VAE folder instead: an AutoencoderKL's config.json and "
                     "diffusion_pytorch_model.safetensors, at its root or in a vae/ sub-folder.")


GIVE_CONTROLNET = ("give a ControlNet folder: config.json + diffusion_pytorch_model.safetensors, as a finished "
                   "`difftune train controlnet` run writes them in its --output_dir (or a diffusers ControlNetModel's "
                   "save_pretrained())")
CONTROLNET_FLAG = "--controlnet_model_name_or_path"  # training's flag; generate and eval call it --controlnet


def _config_class(config: Path) -> str | None:
    """The model class a ``config.json`` describes: diffusers' ``_class_name``, or a transformers architecture."""
    import json

    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config} is not readable JSON ({e}); re-export the model folder.") from None
    if not isinstance(cfg, dict):
        return None
    return cfg.get("_class_name") or next(iter(cfg.get("architectures") or []), None)


def check_controlnet_source(name_or_path: str, flag: str = CONTROLNET_FLAG) -> None:
    """Refuse, before anything loads, a ``flag`` value that cannot be a ControlNet, saying what to pass.

    diffusers reads any config.json into a ControlNetModel (a UNet's half loads, then fails on meta
    tensors with a traceback) and, for a folder without one, says only "no file named config.json";
    the usual mix-ups (a training checkpoint, the base model, a UNet) each get their own advice.
    """
    local = Path(name_or_path).expanduser()
    if not local.exists():
        if not looks_like_hub_id(name_or_path):
            raise ModelLoadError(f"{flag} {name_or_path} does not exist; {GIVE_CONTROLNET}.")
        return  # a Hub id: the loader tries the Hub
    if not local.is_dir():
        named = local.read_text(errors="replace").strip() if local.name == "latest" and local.stat().st_size < 200 else ""
        if named and (local.parent / named).is_dir():  # a run's checkpoints/latest: the checkpoint it names
            raise ModelLoadError(f"{flag} {local} is a file naming the newest checkpoint: give that checkpoint, "
                                 f"{flag} {local.parent / named}.")
        raise ModelLoadError(f"{flag} {local} is a file; {GIVE_CONTROLNET}.")
    config = local / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{flag} {local} is not a ControlNet: {_what_folder_instead(local, flag)}")
    kind = _config_class(config)
    if kind is not None and kind != "ControlNetModel":
        where = (" (the base model's; the base goes to --pretrained_model_name_or_path)"
                 if (local.parent / "model_index.json").is_file() else "")
        raise ModelLoadError(f"{flag} {local} is a {kind} folder{where}, not a ControlNet; {GIVE_CONTROLNET}.")


def _what_folder_instead(local: Path, flag: str) -> str:
    """For a folder without config.json: what it is (a checkpoint, a base model) and what to pass instead."""
    if (local / "trainable.safetensors").is_file():
        run = local.parent.parent if local.parent.name == "checkpoints" else None
        output = f"the run's output folder {run}" if run is not None else "the run's --output_dir"
        unfinished = (" It has no ControlNet yet: finish the run (the same command with --resume_from_checkpoint "
                      "latest), which exports it there."
                      if run is not None and not (run / "config.json").is_file() else "")
        return (f"it is a training checkpoint, whose trainable.safetensors holds the trained weights without the "
                f"architecture. Give {output} instead, whose config.json describes the architecture.{unfinished}")
    if (local / "model_index.json").is_file() or (local / "unet").is_dir():
        start = (" (or leave the flag out to start from a copy of the base UNet's encoder)"
                 if flag == CONTROLNET_FLAG else "")
        return (f"it is a base model folder (model_index.json, unet/, vae/, ...), which goes to "
                f"--pretrained_model_name_or_path{start}; {GIVE_CONTROLNET}.")
    from .checkpoint import list_checkpoints

    if (local / "custom_diffusion.json").is_file():
        return (f"it is a Custom Diffusion folder (custom_diffusion.json), which goes to --custom_diffusion "
                f"(`difftune eval custom-diffusion`, `difftune generate --custom_diffusion`); {GIVE_CONTROLNET}.")
    inside = [p for p in list_checkpoints(local) if (p / "config.json").is_file()]
    if inside:  # the checkpoints/ folder itself
        return f"it is a run's checkpoints/ folder: give one checkpoint in it, e.g. {inside[-1]} (the latest)."
    done = [p for p in list_checkpoints(local / "checkpoints") if (p / "config.json").is_file()]
    if done:
        return (f"it is the output folder of a run that has not finished (no ControlNet exported yet), but each "
                f"checkpoint loads as one: give {done[-1]} (the latest), or finish the run with "
                "--resume_from_checkpoint latest.")
    return f"it has no config.json; {GIVE_CONTROLNET}."


def load_controlnet(name_or_path: str, revision: str | None = None, cache_dir: str | None = None,
                    flag: str = CONTROLNET_FLAG, unet: Any = None):
    """An existing ControlNet (folder or hub id): to continue training from, or to sample and evaluate with.

    ``flag`` names the option it came from in the messages (``--controlnet`` for generate and eval);
    given the base's ``unet``, a ControlNet built for another base is refused (``check_controlnet_fits``).
    """
    from diffusers import ControlNetModel

    check_controlnet_source(name_or_path, flag)
    local = cached_folder(name_or_path, revision, cache_dir, "config.json", f"For {flag}, {GIVE_CONTROLNET}.",
                           kind="model")
    try:
        controlnet = ControlNetModel.from_pretrained(
            str(local) if local.exists() else name_or_path, revision=revision, cache_dir=cache_dir,
            torch_dtype=torch.float32, use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        if local.exists():
            damaged = damaged_weights(local, "restore or re-download it, or export the ControlNet again (each "
                                             "checkpoints/checkpoint-N folder of a difftune run loads as one too)")
            if damaged:  # (the folder is the right kind: the advice on what to give would mislead)
                raise ModelLoadError(f"{flag} {name_or_path}: could not load the ControlNet: {damaged}") from None
            raise ModelLoadError(f"{flag} {name_or_path}: could not load the ControlNet ({e}); "
                                 f"{GIVE_CONTROLNET}.{pickle_only(local)}") from None
        raise hub_hint(name_or_path, e, f"For {flag}, {GIVE_CONTROLNET}.") from None
    if unet is not None:
        check_controlnet_fits(controlnet.config, unet.config, f"{flag} {name_or_path}")
    return controlnet


# the settings a ControlNet shares with the UNet it steers: any difference fails at the first step
# (not in_channels: a 4-channel ControlNet may steer a 9-channel inpainting UNet)
_SHARED_WITH_UNET = ("block_out_channels", "cross_attention_dim", "addition_embed_type",
                     "projection_class_embeddings_input_dim")


def check_controlnet_fits(controlnet_config: Any, unet_config: Any, what: str) -> None:
    """Refuse a ControlNet made for another base (an SD 1.5 one on SDXL, ...), naming the differences,
    before its residuals fail to add up with the UNet's inside diffusers."""
    def norm(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    differ = [f"{key} {norm(controlnet_config.get(key))} in the ControlNet, {norm(unet_config.get(key))} in the base"
              for key in _SHARED_WITH_UNET if norm(controlnet_config.get(key)) != norm(unet_config.get(key))]
    if differ:
        mine, base = family_name(controlnet_config), family_name(unet_config)
        kinds = f"an {mine} ControlNet on an {base} base" if mine != base else "another model of the same family"
        raise ModelLoadError(
            f"{what} was made for another base model: {kinds} ({'; '.join(differ)}). Give the base it was trained on "
            "(--pretrained_model_name_or_path), or train a new ControlNet on this one."
        )


def family_name(config: Any) -> str:
    """'SDXL' or 'SD 1.x/2.x', from a UNet's or ControlNet's config (SDXL's adds its time ids to the embedding)."""
    return "SDXL" if config.get("addition_embed_type") == "text_time" else "SD 1.x/2.x"


def load_tokenizer(name_or_path: str, revision: str | None = None, cache_dir: str | None = None):
    """The base model's tokenizer alone (for data checks)."""
    from transformers import AutoTokenizer

    name_or_path = resolve_builtin(name_or_path)
    folder = cached_folder(name_or_path, revision, cache_dir, "model_index.json", BASE_FOLDER_ADVICE,
                            parts=("tokenizer",))
    try:
        return AutoTokenizer.from_pretrained(str(folder) if folder.exists() else name_or_path, subfolder="tokenizer",
                                             revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        if folder.exists():
            raise ModelLoadError(f"Could not load the tokenizer in {folder}/tokenizer: {e}") from None
        raise hub_hint(name_or_path, e) from None
