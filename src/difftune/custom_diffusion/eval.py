"""``difftune eval custom-diffusion``: concept fidelity and prior drift, measured.

- Concept fidelity: images of "<token> <class word>" are read (``eval.metrics.read_shape``, all six kinds)
  and compared with the concept's own instance images: is the shape of the same kind, is its
  colour within ``COLOR_TOLERANCE`` (CIELAB Delta E) of theirs? ``concept_ok`` needs both.
  The base model alone on "<class word>" is the baseline (what the class prompt gives anyway).
- Prior drift: for the class prompts and for unrelated prompts (base shapes with colours),
  the adapted model and the base model draw from the same seeds; drift is the mean per-pixel
  Delta E between the two images (0 = unchanged), and for the unrelated prompts we also report
  whether the prompt's shape and colours are still drawn (accuracy, base vs adapted).

Those readings only mean something for concepts of the shapes world (flat shapes on flat
backgrounds, what the bundled base draws). For any other concept (photos, on an SD model) give
``--clip_model``: the paper's CLIP image alignment (generated vs the concept's images) and text
alignment (generated vs the prompt without its tokens), and CLIP similarity between base and
adapted images as the drift (``eval.clip``); unrelated prompts are then everyday captions.
Without a CLIP model such a concept is refused rather than given shape numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.shapes import ALL_SHAPES, BASE_SHAPES, sample_shapes, srgb_to_lab
from ..errors import UserError
from ..eval.metrics import COLOR_TOLERANCE, FOREGROUND_MIN, delta_e, read_shape, shape_scores
from .concepts import list_images

# unrelated prompts for concepts outside the shapes world (prior drift on everyday subjects)
EVERYDAY_PROMPTS = (
    "a photo of a mountain lake at sunrise", "a bowl of fruit on a wooden table", "a red bicycle leaning on a wall",
    "a city street at night in the rain", "a portrait of an old man with a beard", "a sailing boat on the sea",
    "a plate of pasta with tomato sauce", "a snowy forest with pine trees",
)


def _load(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image

    from ..data.images import read_image_file

    im = read_image_file(path, "the concept's images")
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.BILINEAR))


def is_flat_shape(image: np.ndarray) -> bool:
    """A shapes-world image: one flat-coloured region on a flat background (a photo's border and
    subject vary in colour; flat shapes do not)."""
    reading, lab = read_shape(image, ALL_SHAPES), srgb_to_lab(image)
    if reading.foreground_lab is None:
        return False
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    flat_border = np.mean(delta_e(border, reading.background_lab) < FOREGROUND_MIN)
    flat_shape = np.mean(delta_e(lab[reading.mask], reading.foreground_lab) < COLOR_TOLERANCE)
    return bool(flat_border >= 0.9 and flat_shape >= 0.9)


def is_shapes_concept(instance_dir: str | Path, resolution: int = 64) -> bool:
    """Are three in four of a concept's instance images shapes-world images?"""
    images = [_load(p, resolution) for p in list_images(instance_dir, "instance_data_dir")]
    return bool(np.mean([is_flat_shape(im) for im in images]) >= 0.75)


def concept_reference(instance_dir: str | Path, resolution: int) -> dict:
    """The concept's instance images, their shape kind (majority) and median shape/background colours."""
    images = [_load(p, resolution) for p in list_images(instance_dir, "instance_data_dir")]
    readings = [read_shape(im, ALL_SHAPES) for im in images]
    kinds = [r.kind for r in readings if r.kind]
    fg = [r.foreground_lab for r in readings if r.foreground_lab is not None]
    return {"images": images,
            "kind": max(set(kinds), key=kinds.count) if kinds else None,
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
                          weight_name: str | None = None, clip_model: str | None = None,
                          loading: dict | None = None) -> dict:
    """Measure every concept of a Custom Diffusion folder; writes ``eval_custom_diffusion.json`` and a grid.

    ``loading`` (``tokenizer_name``, ``prediction_type``): how the base is read, as the concept's run read it
    (``difftune.recorded.recorded_concept_loading``); the base alone is sampled alike, as the baseline."""
    import copy

    from ..eval.run import _base_resolution, generate_batched, note_guidance, save_atomically, text2image_pipeline
    from ..models import load_base_model, with_prediction_type
    from ..validation import image_grid
    from .export import load_custom_diffusion, read_meta

    meta = read_meta(custom_diffusion)
    for c in meta["concepts"]:  # the concept's own images are the reference: they must still be where training read them
        if not Path(c["instance_data_dir"]).is_dir():
            raise UserError(f"{Path(custom_diffusion) / 'custom_diffusion.json'} records the concept's images in "
                            f"{c['instance_data_dir']}, which is not a folder (here, {Path.cwd()}). Put them back there, "
                            "or edit instance_data_dir in that file to where they are now.")
    shapes = [is_shapes_concept(c["instance_data_dir"]) for c in meta["concepts"]]  # before anything loads
    shapes_world = all(shapes)
    if not shapes_world and clip_model is None:
        other = [c["instance_data_dir"] for c, flat in zip(meta["concepts"], shapes) if not flat]
        raise UserError(
            f"the images of {', '.join(other)} are not flat shapes on flat backgrounds, so this evaluation's shape "
            "and colour readings do not apply to them. Pass --clip_model (e.g. openai/clip-vit-large-patch14, or "
            "a local CLIP folder) to measure them with CLIP image and text alignment instead."
        )
    note_guidance(guidance_scale)
    clip = None
    if clip_model is not None:
        from ..eval.clip import ClipScorer

        clip = ClipScorer(clip_model, device="cuda" if torch.cuda.is_available() else "cpu")
    loading = loading or {}
    base = with_prediction_type(load_base_model(pretrained, tokenizer_name=loading.get("tokenizer_name"),
                                                stand_ins=("tokenizer",)), loading.get("prediction_type"), recorded=True)
    res = _base_resolution(base)
    refs = [concept_reference(c["instance_data_dir"], res) for c in meta["concepts"]]
    base_pipe = text2image_pipeline(base)
    adapted = text2image_pipeline(copy.deepcopy(base))  # (the concept is installed into its own copy)
    load_custom_diffusion(adapted, custom_diffusion, weight_name)

    def both(prompts: list[str], desc: str):
        kw = dict(seed=seed, steps=steps, resolution=res, guidance_scale=guidance_scale)
        return (generate_batched(base_pipe, prompts, desc=f"{desc} (base)", **kw),
                generate_batched(adapted, prompts, desc=f"{desc} (adapted)", **kw))

    result: dict = {"custom_diffusion": str(custom_diffusion), "base_model": pretrained, "n": n,
                    "num_inference_steps": steps, "seed": seed, "guidance_scale": guidance_scale,
                    "grid_rows": [*(f"{c['instance_prompt']}: {what}" for c in meta["concepts"] for what in (
                        "adapted on its token prompt", "base on the class prompt", "adapted on the class prompt")),
                        "base on unrelated prompts", "adapted on unrelated prompts"],
                    "concepts": {}}
    rows = []
    for concept, ref, is_shapes in zip(meta["concepts"], refs, shapes):
        tokens = concept.get("modifier_tokens") or meta["modifier_tokens"][:1]
        # the class noun: from the class prompt, else the instance prompt's last word that is not a token
        plain = [w for w in concept["instance_prompt"].split() if not any(t in w for t in meta["modifier_tokens"])]
        word = (concept.get("class_prompt") or "").split()[-1:] or plain[-1:] or [""]
        class_prompt = concept.get("class_prompt") or word[0]
        # without tokens the concept lives in the prompt's own words: sample the instance prompt itself
        token_prompt = f"{' '.join(tokens)} {word[0]}".strip() if tokens else concept["instance_prompt"]
        concept_imgs = generate_batched(adapted, [token_prompt] * n, seed=seed, steps=steps, resolution=res,
                                        guidance_scale=guidance_scale, desc=token_prompt)
        base_cls, adapted_cls = both([class_prompt] * n, class_prompt)
        r = result["concepts"][token_prompt] = {
            "class_prompt": class_prompt, "class_drift_delta_e": pixel_drift(base_cls, adapted_cls)}
        if is_shapes:
            r.update({"reference": {"kind": ref["kind"]}, "fidelity": fidelity(concept_imgs, ref),
                      "baseline_fidelity_base_on_class_prompt": fidelity(base_cls, ref)})
        if clip is not None:
            # text alignment with the prompt as a reader would write it: without the new tokens
            plain_prompt = " ".join(w for w in token_prompt.split() if not any(t in w for t in meta["modifier_tokens"]))
            r["clip"] = {"image_alignment": clip.image_alignment(concept_imgs, ref["images"]),
                         "text_alignment": clip.text_alignment(concept_imgs, [plain_prompt or class_prompt] * n),
                         "baseline_image_alignment_base_on_class_prompt": clip.image_alignment(base_cls, ref["images"]),
                         "class_similarity_base_vs_adapted": clip.paired_similarity(base_cls, adapted_cls)}
        rows += [concept_imgs[:8], base_cls[:8], adapted_cls[:8]]
    if shapes_world:
        unrelated = sample_shapes(n_unrelated, res, 777 + seed, BASE_SHAPES)
        prompts = [s.prompt for s in unrelated]
    else:
        prompts = [EVERYDAY_PROMPTS[i % len(EVERYDAY_PROMPTS)] for i in range(n_unrelated)]
    base_un, adapted_un = both(prompts, "unrelated")
    result["unrelated"] = {"prompts": len(prompts), "drift_delta_e": pixel_drift(base_un, adapted_un)}
    if shapes_world:
        def accuracy(images):
            scores = [shape_scores(im, s.shape, s.color, s.background) for im, s in zip(images, unrelated)]
            return {k: float(np.mean([x[k] for x in scores])) for k in ("shape_kind_ok", "shape_color_ok",
                                                                          "background_ok")}

        result["unrelated"].update(accuracy_base=accuracy(base_un), accuracy_adapted=accuracy(adapted_un))
    if clip is not None:
        result["clip_model"] = clip.name
        result["unrelated"]["clip_similarity_base_vs_adapted"] = clip.paired_similarity(base_un, adapted_un)
    rows += [base_un[:8], adapted_un[:8]]
    from PIL import Image

    save_atomically(Path(out), {"eval_custom_diffusion.png": image_grid([[Image.fromarray(x) for x in row]
                                                                          for row in rows]),
                                "eval_custom_diffusion.json": result})
    return result


def format_table(result: dict) -> str:
    lines = []
    shapes = {p: r for p, r in result["concepts"].items() if "fidelity" in r}
    if shapes:
        lines.append(f"{'prompt':<28} {'concept_ok':>10} {'kind_ok':>8} {'color_ok':>8} {'base@class':>10} "
                     f"{'class_drift':>11}")
        for prompt, r in shapes.items():
            f, b = r["fidelity"], r["baseline_fidelity_base_on_class_prompt"]
            lines.append(f"{prompt:<28} {f['concept_ok']:>10.2f} {f['kind_ok']:>8.2f} {f['color_ok']:>8.2f} "
                         f"{b['concept_ok']:>10.2f} {r['class_drift_delta_e']:>11.2f}")
    clipped = {p: r["clip"] for p, r in result["concepts"].items() if "clip" in r}
    if clipped:
        lines.append(f"{'prompt':<28} {'clip_image':>10} {'clip_text':>9} {'base@class':>10} {'class_sim':>9}")
        for prompt, c in clipped.items():
            lines.append(f"{prompt:<28} {c['image_alignment']:>10.3f} {c['text_alignment']:>9.3f} "
                         f"{c['baseline_image_alignment_base_on_class_prompt']:>10.3f} "
                         f"{c['class_similarity_base_vs_adapted']:>9.3f}")
    u = result["unrelated"]
    line = f"unrelated prompts: drift {u['drift_delta_e']:.2f} Delta E"
    if "accuracy_base" in u:
        line += (f"; shape-kind accuracy {u['accuracy_base']['shape_kind_ok']:.2f} (base) -> "
                 f"{u['accuracy_adapted']['shape_kind_ok']:.2f}; colour {u['accuracy_base']['shape_color_ok']:.2f} "
                 f"-> {u['accuracy_adapted']['shape_color_ok']:.2f}")
    if "clip_similarity_base_vs_adapted" in u:
        line += f"; CLIP similarity base vs adapted {u['clip_similarity_base_vs_adapted']:.3f}"
    return "\n".join(lines + [line])
