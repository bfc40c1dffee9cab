"""``difftune eval``: measured quality of a base model and of a trained ControlNet."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..pipelines import controlnet_in_guidance, text2image_pipeline
from ..data.conditions import CONDITIONERS
from .metrics import CONDITION_METRICS, score_all, shape_scores
from .targets import check_eval_request, condition_targets


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _base_resolution(base) -> int:
    return base.native_resolution


def note_guidance(guidance_scale: float) -> None:
    """diffusers samples without classifier-free guidance at a scale of 1 or less: said, as a score taken so
    is not the guided one (a negative scale gives exactly the scale-1 images)."""
    if guidance_scale <= 1:
        logging.getLogger("difftune").warning(
            "--guidance_scale %g: classifier-free guidance is off at 1 or less (the conditional prediction "
            "alone); the scores are unguided ones.", guidance_scale)


def generate_batched(pipe, prompts: list[str], seed: int, steps: int, resolution: int, guidance_scale: float,
                     conditions: list | None = None, batch: int = 25, desc: str = "sampling",
                     control_guidance: str = "both", conditioning_scale: float = 1.0) -> list[np.ndarray]:
    """Images for each prompt; image i uses a generator seeded ``seed + i`` (so batching never changes it).

    ``control_guidance``: how a ControlNet pipeline's ControlNet enters guidance
    (``pipelines.controlnet_in_guidance``).
    """
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch"):
        kw = dict(prompt=prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                  height=resolution, width=resolution, generator=_generators(seed + i, len(prompts[i : i + batch])),
                  output_type="np")
        if conditions is not None:
            kw["image"] = conditions[i : i + batch]
            kw["controlnet_conditioning_scale"] = conditioning_scale
        with controlnet_in_guidance(pipe, control_guidance):
            images = pipe(**kw).images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    return out


def _is_training_data(data: str | Path, controlnet: str | Path) -> bool:
    """Whether ``data`` is the folder the ControlNet trained on (its run records it): said as a warning, since
    scores on training conditions measure how well it learned them, not how it does on new ones."""
    from ..recorded import recorded_train_data

    trained = recorded_train_data(controlnet)
    if trained is None or Path(data).resolve() != trained.resolve():
        return False
    logging.getLogger("difftune").warning(
        "--data %s is the data set this ControlNet was trained on (its difftune_config.json says so): its scores "
        "are on training conditions, not held-out ones. Leave out --data for fresh conditions, or give a folder "
        "made apart from the training data (e.g. `difftune data fill50k --seed 1`).", data)
    return True


def trained_condition(controlnet: str | Path) -> tuple[str, dict, str] | None:
    """(metric, detector settings, the file they are from) of the condition a ControlNet's run trained on,
    as its training data's ``difftune_dataset.json`` records it; None when nothing records it (a
    downloaded ControlNet)."""
    from ..data.conditions import MANIFEST, read_manifest, recorded_settings
    from ..errors import DataError
    from ..recorded import recorded_train_data

    data = recorded_train_data(controlnet)
    try:
        manifest = read_manifest(data) if data is not None else {}
    except DataError:
        return None
    condition = "fill50k" if manifest.get("kind") == "fill50k" else manifest.get("condition")
    if condition not in CONDITION_METRICS:
        return None
    settings = recorded_settings(manifest, data) if condition != "fill50k" else {}
    settings.pop("condition", None)
    return condition, settings, str(Path(data) / MANIFEST)


def _warn_other_condition(trained: str, metric: str, data) -> None:
    logging.getLogger("difftune").warning(
        "this ControlNet was trained on %s conditions (its training data's difftune_dataset.json), and is scored "
        "here with the %s metric on %s: the scores say how it follows conditions of another kind. Leave out "
        "--metric%s to score it on its own kind.", trained, metric, data if data is not None else "fresh conditions",
        " and --data" if data is not None else "")


def save_atomically(out: Path, files: dict[str, Any]) -> None:
    """An evaluation's JSON and grid into ``out``, each written to a temporary file and renamed, the JSON
    last: a run killed while writing leaves the earlier pair or a new grid beside the earlier JSON, never
    a half-written file."""
    from ..checkpoint import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, Image.Image):
            atomic_write(out / name, lambda p, im=content: im.save(p, format="PNG"))
        else:
            atomic_write(out / name, lambda p, c=content: p.write_text(json.dumps(c, indent=2) + "\n",
                                                                        encoding="utf-8"))


def _summary(scores: list[dict]) -> dict:
    keys = scores[0].keys() if scores else []
    return {k: float(np.nanmean([s[k] for s in scores])) for k in keys}


def eval_controlnet(pretrained_model_name_or_path: str | None, controlnet, data: str | Path | None = None,
                    n: int = 200, steps: int = 20, seed: int = 0, guidance_scale: float = 7.5,
                    out: str | Path | None = None, metric: str | None = None, baseline: bool = True,
                    condition_settings: dict | None = None,
                    control_guidance: str | tuple[str, ...] = "both", conditioning_scale: float = 1.0,
                    vae: str | None = None, loading: dict | None = None, tokenizer_name: str | None = None) -> dict:
    """Condition fidelity of a ControlNet (folder or module) on held-out conditions, with the base alone as baseline.

    ``pretrained_model_name_or_path`` None (or that base by name): the base the ControlNet's run recorded (else
    tiny-shapes), read as that run read it: ``vae`` None means the recorded VAE, ``loading`` None the recorded
    tokenizer and prediction type (``difftune.recorded``), as ``difftune.generate`` does. ``loading``:
    ``{"tokenizer_name": ..., "prediction_type": ...}``, how to read a base given here. The JSON's ``vae`` is the
    VAE used (null: the base's own). ``tokenizer_name``: a tokenizer over the recorded or the base's own.

    ``metric``: ``fill50k`` (circle IoU), ``canny`` (edge F1) or ``depth`` (depth correlation);
    by default the condition ``data``'s ``difftune_dataset.json`` names, else fill50k.
    ``condition_settings`` override the detector settings the data set records.
    ``control_guidance``: one or more of ``both`` (row ``controlnet``) and ``cond`` (row
    ``controlnet_cond``: the ControlNet on the conditional half of guidance only), each
    sampled from the same seeds (``pipelines.controlnet_in_guidance``). ``conditioning_scale``:
    the pipeline's ``controlnet_conditioning_scale`` (the ControlNet's residuals times it; 0 gives
    the base alone's images).
    """
    from ..models import DEFAULT_MODEL, check_controlnet_source, load_base_model, load_controlnet, with_prediction_type
    from ..pipelines import controlnet_pipeline
    from ..recorded import controlnet_base
    from ..validation import image_grid

    modes = (control_guidance,) if isinstance(control_guidance, str) else tuple(dict.fromkeys(control_guidance))
    unknown = [m for m in modes if m not in CONTROL_ROWS]
    if unknown or not modes:
        raise ConfigError(f"--control_guidance {' '.join(unknown) or '(none)'}: choose from {', '.join(CONTROL_ROWS)}.")
    training_data, trained, recorded = False, None, None
    if not isinstance(controlnet, torch.nn.Module):
        check_controlnet_source(str(controlnet), "--controlnet")
        trained = trained_condition(controlnet)
        if trained and metric is None and data is None:  # fresh conditions of the kind it was trained on
            metric = trained[0]
            if trained[0] != "fill50k":  # the detector's settings of the training data, --low_threshold etc. over them
                known = {f.name for f in fields(CONDITIONERS[metric])}
                recorded = {k: v for k, v in trained[1].items() if k in known}, trained[2]
    metric, _ = check_eval_request(metric, n, data, condition_settings)  # before minutes of loading and sampling
    note_guidance(guidance_scale)
    if trained and trained[0] != metric:
        _warn_other_condition(trained[0], metric, data)
    if not isinstance(controlnet, torch.nn.Module):
        training_data = data is not None and _is_training_data(data, controlnet)
        pretrained_model_name_or_path, vae, loading = controlnet_base(pretrained_model_name_or_path, controlnet,
                                                                      vae, loading, tokenizer_name)
    pretrained_model_name_or_path = pretrained_model_name_or_path or DEFAULT_MODEL  # (an in-memory ControlNet)
    loading = {**(loading or {}), **({"tokenizer_name": tokenizer_name} if tokenizer_name else {})}
    base = with_prediction_type(load_base_model(pretrained_model_name_or_path, vae_name_or_path=vae,
                                                tokenizer_name=loading.get("tokenizer_name")),
                                loading.get("prediction_type"), recorded=True)
    res = _base_resolution(base)
    scorer, targets = condition_targets(metric, n, res, seed, data, condition_settings, recorded)
    if len(targets) < n:
        logging.getLogger("difftune").warning("--n %d: %s holds %d usable conditions; evaluating those", n, data,
                                              len(targets))
    prompts = [t["prompt"] for t in targets]
    net = (controlnet if isinstance(controlnet, torch.nn.Module)
           else load_controlnet(str(controlnet), flag="--controlnet", unet=base.unet))
    pipe = controlnet_pipeline(base, net)
    scores, generated = {}, {}
    for mode in modes:
        name = CONTROL_ROWS[mode]
        generated[name] = generate_batched(pipe, prompts, seed, steps, res, guidance_scale,
                                           [t["condition"] for t in targets], desc=name,
                                           control_guidance=mode, conditioning_scale=conditioning_scale)
        scores[name] = score_all(scorer, generated[name], targets)
    if baseline:
        alone = generate_batched(text2image_pipeline(base), prompts, seed, steps, res, guidance_scale,
                                 desc="base alone")
        scores["base_alone"] = score_all(scorer, alone, targets)
    # the true images through the VAE: what the VAE keeps of the targets. Generation decodes through
    # the same VAE, so this is a practical ceiling, though not a strict one: a denoiser may produce
    # latents the encoder never does that decode closer to the truth (tiny circles, for example).
    truth_rt = vae_round_trip(base, np.stack([np.asarray(t["image"]) for t in targets]))
    scores["vae_ceiling"] = score_all(scorer, list(truth_rt), targets)
    result = {"n": len(targets), "metric": scorer.name, "base_model": str(pretrained_model_name_or_path),
              "vae": str(vae) if vae else None,  # (None: the base's own)
              "controlnet_path": str(controlnet) if not isinstance(controlnet, torch.nn.Module) else "(in memory)",
              "data": str(data) if data is not None else None, "data_is_training_data": training_data,
              "num_inference_steps": steps, "seed": seed, "control_guidance": list(modes),
              "condition_settings": (scorer.conditioner.settings() if hasattr(scorer, "conditioner")
                                     else condition_settings or {}), "guidance_scale": guidance_scale,
              "controlnet_conditioning_scale": conditioning_scale, **{k: _summary(v) for k, v in scores.items()}}
    if "r" in targets[0]:
        result["by_radius"] = by_radius(scores, targets, res)
    if out is not None:
        columns = [*generated.values(), *([alone] if baseline else [])]  # one per row of the table but vae_ceiling
        rows = [[t["condition"], *(Image.fromarray(c[i]) for c in columns)] for i, t in enumerate(targets[:16])]
        save_atomically(Path(out), {"eval_controlnet.png": image_grid(rows), "eval_controlnet.json": result})
    return result


CONTROL_ROWS = {"both": "controlnet", "cond": "controlnet_cond"}  # each --control_guidance mode's result row
RADIUS_BINS = (0.0, 0.085, 0.15, 0.225, 1.0)  # radius / image size: 3-5, 6-9, 10-14, 15-19 px at 64 px


def by_radius(scores: dict[str, list[dict]], targets: list[dict], resolution: int) -> dict:
    """The same summaries per circle-radius bin (the smallest circles are what a VAE loses first)."""
    from ..data.fill50k import radius_range

    r_low, r_high = radius_range(resolution)
    out = {}
    radii = np.array([t["r"] for t in targets], dtype=float)
    for lo, hi in zip(RADIUS_BINS[:-1], RADIUS_BINS[1:]):
        picked = np.flatnonzero((radii >= lo * resolution) & (radii < hi * resolution))
        if len(picked):  # named by the bin's bounds (the same keys in every run at one resolution)
            first, last = max(math.ceil(lo * resolution), r_low), min(math.ceil(hi * resolution) - 1, r_high)
            name = f"r {first}-{last} px"
            out[name] = {"n": len(picked), **{k: _summary([v[i] for i in picked]) for k, v in scores.items()}}
    return out


def eval_base(pretrained_model_name_or_path: str, n_prompts: int = 30, per_prompt: int = 8, steps: int = 20,
              seed: int = 0, guidance_scale: float = 7.5, out: str | Path | None = None,
              shapes: tuple[str, ...] | None = None) -> dict:
    """How often the base model draws the prompt's shape kind, shape colour and background colour."""
    from ..data.shapes import BASE_SHAPES, sample_shapes
    from ..models import load_base_model
    from ..validation import image_grid

    note_guidance(guidance_scale)
    base = load_base_model(pretrained_model_name_or_path)
    res = _base_resolution(base)
    specs = sample_shapes(n_prompts, res, 20_000 + seed, shapes or BASE_SHAPES)
    prompts = [s.prompt for s in specs for _ in range(per_prompt)]
    images = generate_batched(text2image_pipeline(base), prompts, seed, steps, res, guidance_scale, desc="base")
    scores = [shape_scores(im, s.shape, s.color, s.background)
              for im, s in zip(images, (s for s in specs for _ in range(per_prompt)))]
    result = {"base_model": str(pretrained_model_name_or_path), "n_images": len(images), "n_prompts": n_prompts,
              "per_prompt": per_prompt, "num_inference_steps": steps, "seed": seed, "guidance_scale": guidance_scale,
              **_summary(scores), "by_shape": {}}
    for kind in sorted({s.shape for s in specs}):
        picked = [sc for sc, s in zip(scores, (s for s in specs for _ in range(per_prompt))) if s.shape == kind]
        result["by_shape"][kind] = _summary(picked)
    # the ceiling is cheap (no sampling): measure it on more prompts than were sampled, same sequence
    result["n_vae_ceiling"] = max(200, n_prompts)
    result["vae_ceiling"] = vae_ceiling(base, sample_shapes(result["n_vae_ceiling"], res, 20_000 + seed,
                                                            shapes or BASE_SHAPES), res)
    if out is not None:
        rows = [[Image.fromarray(im) for im in images[i * per_prompt : (i + 1) * per_prompt]] for i in range(min(12, n_prompts))]
        save_atomically(Path(out), {"eval_base.png": image_grid(rows), "eval_base.json": result})
    return result


@torch.no_grad()
def vae_ceiling(base, specs: list, resolution: int, batch: int = 32) -> dict:
    """The same scores on the prompts' true images passed through the VAE (encode, decode the mean).

    The base model generates through its VAE decoder, so it cannot score better than its
    VAE reproduces the truth: this is the ceiling of the numbers above, and tells a weak
    VAE from a weak UNet.
    """
    from ..data.shapes import render_batch

    images = vae_round_trip(base, render_batch(specs, resolution), batch)
    return _summary([shape_scores(im, s.shape, s.color, s.background) for im, s in zip(images, specs)])


@torch.no_grad()
def vae_round_trip(base, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images encoded by the base's VAE and decoded from the latent mean."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(base.vae.dtype) / 127.5 - 1.0
    decoded = []
    for i in range(0, len(x), batch):
        mean = base.vae.encode(x[i : i + batch].to(base.vae.device)).latent_dist.mean
        decoded.append(base.vae.decode(mean).sample.float().cpu())
    return ((torch.cat(decoded).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def format_table(result: dict) -> str:
    """A readable table of an eval result."""
    lines = []
    if "metric" in result:
        names = [k for k in (*CONTROL_ROWS.values(), "base_alone", "vae_ceiling") if k in result]
        cols = list(result[names[0]])
        lines.append(f"{'':16s}" + "".join(f"{c:>20s}" for c in cols))
        for name in names:
            lines.append(f"{name:16s}" + "".join(f"{result[name][c]:20.3f}" for c in cols))
        cond = ("; controlnet_cond: the ControlNet on the conditional half of guidance only"
                if "controlnet_cond" in result else "")
        sampling = "".join(f", {label} {result[key]:g}" for key, label, default in (
            ("guidance_scale", "guidance", 7.5), ("controlnet_conditioning_scale", "controlnet_conditioning_scale", 1.0))
            if result.get(key, default) != default)  # named only where not the defaults
        held_out = "training-set" if result.get("data_is_training_data") else "held-out"
        vae = f"the VAE {result['vae']}" if result.get("vae") else "the base's VAE"
        lines.append(f"({result['n']} {held_out} conditions, metric {result['metric']}{sampling}{cond}; vae_ceiling: "
                     f"the true images encoded and decoded by {vae}, what it keeps of the targets)")
    else:
        cols = ["background_ok", "shape_color_ok", "shape_kind_ok", "background_delta_e", "shape_delta_e"]
        lines.append(f"{'':10s}" + "".join(f"{c:>20s}" for c in cols))
        lines.append(f"{'all':10s}" + "".join(f"{result[c]:20.3f}" for c in cols))
        for kind, vals in result["by_shape"].items():
            lines.append(f"{kind:10s}" + "".join(f"{vals[c]:20.3f}" for c in cols))
        if "vae_ceiling" in result:  # the true images through the VAE: the best the base could score
            lines.append(f"{'VAE only':10s}" + "".join(f"{result['vae_ceiling'][c]:20.3f}" for c in cols))
        ceiling = (f"; VAE only: {result['n_vae_ceiling']} true images encoded and decoded"
                   if "vae_ceiling" in result else "")
        count = lambda n, what: f"{n} {what}{'' if n == 1 else 's'}"  # noqa: E731
        lines.append(f"({count(result['n_images'], 'image')}, {count(result['n_prompts'], 'prompt')}{ceiling})")
    return "\n".join(lines)
