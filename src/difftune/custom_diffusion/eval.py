"""``difftune eval custom-diffusion``: concept fidelity and prior drift, measured.

- Concept fidelity: images of "<token> <class word>" are read (``eval.metrics.read_shape``, all six kinds)
  and compared with the concept's own instance images: is the shape of the same kind, is its
  colour within ``COLOR_TOLERANCE`` (CIELAB Delta E) of theirs? ``concept_ok`` needs both.
  The base model alone on "<class word>" is the baseline (what the class prompt gives anyway).
- Prior drift: for the class prompts and for unrelated prompts (base shapes with colours),
  the adapted model and the base model draw from the same seeds; drift is the mean per-pixel
  Delta E between the two images (0 = unchanged), and for the unrelated prompts we also report
  whether the prompt's shape and colours are still drawn (accuracy, base vs adapted).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.shapes import ALL_SHAPES, BASE_SHAPES, sample_shapes, srgb_to_lab
from ..eval.metrics import COLOR_TOLERANCE, delta_e, read_shape, shape_scores
from .concepts import list_images


def _load(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR))


def concept_reference(instance_dir: str | Path, resolution: int) -> dict:
    """Shape kind (majority) and median shape/background colours of a concept's instance images."""
    readings = [read_shape(_load(p, resolution), ALL_SHAPES) for p in list_images(instance_dir, "instance_data_dir")]
    kinds = [r.kind for r in readings if r.kind]
    fg = [r.foreground_lab for r in readings if r.foreground_lab is not None]
    return {"kind": max(set(kinds), key=kinds.count) if kinds else None,
            "foreground_lab": np.median(fg, axis=0) if fg else None,
            "background_lab": np.median([r.background_lab for r in readings], axis=0)}


def fidelity(images: list[np.ndarray], ref: dict) -> dict[str, float]:
    kind_ok, color_ok, both = [], [], []
    for im in images:
        r = read_shape(im, ALL_SHAPES)
        k = float(r.kind == ref["kind"])
        c = float(r.foreground_lab is not None and ref["foreground_lab"] is not None
                  and float(delta_e(r.foreground_lab, ref["foreground_lab"])) < COLOR_TOLERANCE)
        kind_ok.append(k)
        color_ok.append(c)
        both.append(k * c)
    return {"concept_ok": float(np.mean(both)), "kind_ok": float(np.mean(kind_ok)), "color_ok": float(np.mean(color_ok))}


def pixel_drift(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean per-pixel CIELAB Delta E between paired images."""
    return float(np.mean([delta_e(srgb_to_lab(x), srgb_to_lab(y)).mean() for x, y in zip(a, b)]))


def eval_custom_diffusion(pretrained: str, custom_diffusion: str | Path, n: int = 16, steps: int = 20, seed: int = 0,
                          guidance_scale: float = 7.5, out: str | Path = "eval", n_unrelated: int = 8,
                          weight_name: str | None = None) -> dict:
    """Measure every concept of a Custom Diffusion folder; writes ``eval_custom_diffusion.json`` and a grid."""
    from ..eval.run import _base_resolution, generate_batched, text2image_pipeline
    from ..models import load_base_model
    from ..validation import image_grid
    from .export import load_custom_diffusion, read_meta

    meta = read_meta(custom_diffusion)
    base = load_base_model(pretrained)
    res = _base_resolution(base)
    base_pipe = text2image_pipeline(base)
    adapted = text2image_pipeline(load_base_model(pretrained))
    load_custom_diffusion(adapted, custom_diffusion, weight_name)

    def both(prompts: list[str], desc: str):
        kw = dict(seed=seed, steps=steps, resolution=res, guidance_scale=guidance_scale)
        return (generate_batched(base_pipe, prompts, desc=f"{desc} (base)", **kw),
                generate_batched(adapted, prompts, desc=f"{desc} (adapted)", **kw))

    result: dict = {"custom_diffusion": str(custom_diffusion), "base_model": pretrained, "n": n, "steps": steps,
                    "seed": seed, "concepts": {}}
    rows = []
    for concept in meta["concepts"]:
        tokens = concept.get("modifier_tokens") or meta["modifier_tokens"][:1]
        # the class noun: from the class prompt, else the instance prompt's last word that is not a token
        plain = [w for w in concept["instance_prompt"].split() if not any(t in w for t in meta["modifier_tokens"])]
        word = (concept.get("class_prompt") or "").split()[-1:] or plain[-1:] or [""]
        class_prompt = concept.get("class_prompt") or word[0]
        ref = concept_reference(concept["instance_data_dir"], res)
        # without tokens the concept lives in the prompt's own words: sample the instance prompt itself
        token_prompt = f"{' '.join(tokens)} {word[0]}".strip() if tokens else concept["instance_prompt"]
        concept_imgs = generate_batched(adapted, [token_prompt] * n, seed=seed, steps=steps, resolution=res,
                                        guidance_scale=guidance_scale, desc=token_prompt)
        base_cls, adapted_cls = both([class_prompt] * n, class_prompt)
        result["concepts"][token_prompt] = {
            "reference": {"kind": ref["kind"]},
            "fidelity": fidelity(concept_imgs, ref),
            "baseline_fidelity_base_on_class_prompt": fidelity(base_cls, ref),
            "class_prompt": class_prompt,
            "class_drift_delta_e": pixel_drift(base_cls, adapted_cls),
        }
        rows += [concept_imgs[:8], base_cls[:8], adapted_cls[:8]]
    unrelated = sample_shapes(n_unrelated, res, 777 + seed, BASE_SHAPES)
    base_un, adapted_un = both([s.prompt for s in unrelated], "unrelated")

    def accuracy(images):
        scores = [shape_scores(im, s.shape, s.color, s.background) for im, s in zip(images, unrelated)]
        return {k: float(np.mean([x[k] for x in scores])) for k in ("shape_kind_ok", "shape_color_ok", "background_ok")}

    result["unrelated"] = {"prompts": len(unrelated), "drift_delta_e": pixel_drift(base_un, adapted_un),
                           "accuracy_base": accuracy(base_un), "accuracy_adapted": accuracy(adapted_un)}
    rows += [base_un[:8], adapted_un[:8]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_custom_diffusion.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    from PIL import Image

    image_grid([[Image.fromarray(x) for x in row] for row in rows]).save(out / "eval_custom_diffusion.png")
    return result


def format_table(result: dict) -> str:
    lines = [f"{'prompt':<28} {'concept_ok':>10} {'kind_ok':>8} {'color_ok':>8} {'base@class':>10} {'class_drift':>11}"]
    for prompt, r in result["concepts"].items():
        f, b = r["fidelity"], r["baseline_fidelity_base_on_class_prompt"]
        lines.append(f"{prompt:<28} {f['concept_ok']:>10.2f} {f['kind_ok']:>8.2f} {f['color_ok']:>8.2f} "
                     f"{b['concept_ok']:>10.2f} {r['class_drift_delta_e']:>11.2f}")
    u = result["unrelated"]
    lines.append(f"unrelated prompts: drift {u['drift_delta_e']:.2f} Delta E; shape-kind accuracy "
                 f"{u['accuracy_base']['shape_kind_ok']:.2f} (base) -> {u['accuracy_adapted']['shape_kind_ok']:.2f}; "
                 f"colour {u['accuracy_base']['shape_color_ok']:.2f} -> {u['accuracy_adapted']['shape_color_ok']:.2f}")
    return "\n".join(lines)
