"""Merge separately trained concepts into one model (``difftune custom-diffusion merge``).

Kumari et al. 2023, sec. 3.2 ("Constrained optimization to merge concepts"), eq. 4: for each
cross-attention key/value projection, find the W closest to the base W0 on regularisation
text features C_reg (rows: token features of generic captions) while reproducing every
fine-tuned model's output on its own concept's features C_n:

    W^ = argmin_W || W C_reg^T - W0 C_reg^T ||_F   s.t.   W C^T = V,
    C = [C_1; ...; C_N],   V = [W_1 C_1^T, ..., W_N C_N^T].

Closed form (Lagrange multipliers), with M = C_reg^T C_reg:

    W^ = W0 + (V - W0 C^T) (C M^-1 C^T)^-1 C M^-1.

A small ridge keeps M invertible, and a pseudo-inverse handles constraints that conflict or
outnumber the feature dimension. The constraint rows are the features of each concept's
instance prompts from its modifier token to the end-of-text token: the positions whose
features the new token changes (earlier positions are shared by all prompts, as CLIP is causal).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..noising import tokenize
from ..recorded import local_or_name, one_prediction_type, same_model
from .export import check_base_family, read_embedding, read_meta, read_weights, save_custom_diffusion
from .surgery import add_tokens, set_embeddings

log = logging.getLogger(__name__)


# everyday subjects and settings: the default regularization captions on a base other than tiny-shapes
_SUBJECTS = ("man", "woman", "child", "dog", "cat", "horse", "bird", "car", "bicycle", "house", "tree", "flower",
             "mountain", "lake", "beach", "city street", "kitchen", "living room", "table", "chair", "cup of coffee",
             "plate of food", "book", "guitar", "boat", "train", "bridge", "forest", "field of grass", "old building",
             "robot", "castle", "river", "garden", "shoe", "hat", "bag", "teddy bear", "clock", "lamp")
_SETTINGS = ("a photo of a {}", "a painting of a {}", "a close-up photo of a {}", "a {} at night",
             "a {} in the snow")


def default_regularization_prompts(class_prompts: list[str], shapes_world: bool, n: int = 200) -> list[str]:
    """Generic captions plus the class prompts. On the bundled ``tiny-shapes``, the shapes world's captions
    (what it knows); on any other base, everyday subjects in a few settings (200 by default).

    The paper regularizes with 1000 LAION captions: for a real model, ``--regularization_prompts`` with
    captions like the prompts the merged model will see does better than these.
    """
    if shapes_world:
        from ..data.shapes import BASE_SHAPES, sample_shapes

        generic = [s.prompt for s in sample_shapes(n, 64, 12345, BASE_SHAPES)]
    else:
        generic = [setting.format(subject) for setting in _SETTINGS for subject in _SUBJECTS][:n]
    return generic + [p for p in class_prompts if p]


@torch.no_grad()
def token_features(tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """All 77 positions' text features of ``prompts``: ``[len(prompts) * 77, D]`` (fp64)."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids, return_dict=False)[0].reshape(-1, text_encoder.config.hidden_size).double().cpu()


@torch.no_grad()
def concept_features(tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str], token_ids: list[int]
                     ) -> torch.Tensor:
    """Features at the positions from the first modifier token to EOS: ``[m, D]`` (fp64)."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    feats = text_encoder(ids, return_dict=False)[0].double().cpu()
    rows = []
    for i in range(len(prompts)):
        row = ids[i].tolist()
        starts = [j for j, t in enumerate(row) if t in token_ids]
        if not starts:
            raise ConfigError(f"merge: the prompt {prompts[i]!r} contains none of its concept's tokens.")
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row) - 1
        rows.append(feats[i, starts[0] : end + 1])
    return torch.cat(rows)


def merged_weight(w0: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], c_reg: torch.Tensor,
                  ridge: float = 1e-4) -> torch.Tensor:
    """Closed-form solution of eq. 4 for one projection. ``targets``: (W_n [out, D], C_n [m_n, D])."""
    w0 = w0.double()
    C = torch.cat([c for _, c in targets])  # [m, D]
    V = torch.cat([w.double() @ c.T for w, c in targets], dim=1)  # [out, m]
    M = c_reg.T @ c_reg
    M = M + ridge * M.diagonal().mean() * torch.eye(M.shape[0], dtype=M.dtype)
    D = torch.linalg.solve(M, C.T).T  # C M^-1, [m, D] (M is symmetric)
    A = D @ C.T  # [m, m]
    return (w0 + (V - w0 @ C.T) @ torch.linalg.pinv(A, hermitian=True) @ D).float()


def _rename(prompt: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        prompt = re.sub(re.escape(old), new, prompt)
    return prompt


def check_merge_inputs(folders: list[str | Path], regularization_prompts: list[str] | None) -> None:
    """What a merge can refuse without the base model (the CLI asks before loading it; ``merge_concepts`` too,
    for a call from Python): fewer than two folders, one named twice, a folder that is no Custom Diffusion
    output or was trained in a way the closed form cannot merge, empty regularization prompts."""
    if len(folders) < 2:
        raise ConfigError("merge needs at least two Custom Diffusion folders.")
    seen: dict[Path, str | Path] = {}
    for folder in folders:
        if Path(folder).resolve() in seen:
            raise ConfigError(f"merge: --concepts names {folder} twice (also as {seen[Path(folder).resolve()]}); "
                              "give each concept's folder once.")
        seen[Path(folder).resolve()] = folder
    for folder in folders:
        meta = read_meta(folder, flag="--concepts")
        if meta.get("freeze_model") != "crossattn_kv":
            raise ConfigError(f"merge: {folder} was trained with --freeze_model {meta.get('freeze_model')}; the "
                              "closed-form merge combines key/value projections only (crossattn_kv).")
        if not meta.get("modifier_tokens"):
            raise ConfigError(f"merge: {folder} was trained without modifier tokens; the closed-form merge keeps "
                              "each concept's token features, so each folder needs its own token (--modifier_token).")
    if regularization_prompts is not None and not regularization_prompts:
        raise ConfigError("merge: the regularization prompts are empty; give captions, one per line, or leave "
                          "--regularization_prompts out to use ones made from the concepts' class prompts.")


def merge_concepts(folders: list[str | Path], base: Any, output_dir: str | Path,
                   regularization_prompts: list[str] | None = None, safe: bool = True,
                   tokenizer_name: str | None = None) -> dict:
    """Merge Custom Diffusion folders (each trained with crossattn_kv on ``base``) into ``output_dir``, which
    records ``base`` (and the ``tokenizer_name`` it was read with) as its base: what the merge was computed on."""
    from .compress import base_weight

    check_merge_inputs(folders, regularization_prompts)
    own = base.noise_scheduler.config.prediction_type  # (what a folder that predates the record trained with)
    prediction = one_prediction_type({str(f): read_meta(f, flag="--concepts").get("prediction_type") for f in folders},
                                     own, "merge: the concepts", "merge concepts trained alike (train one again "
                                     "with the other's --prediction_type)") or own
    base = copy.deepcopy(base)
    parts, used, all_tokens, rows, concepts, renamed = [], set(), [], [], [], {}
    w0: dict[str, torch.Tensor] = {}  # the base projections, read once (and checked against each folder's shapes)
    for folder in folders:
        meta = read_meta(folder)
        check_base_family(base.unet, folder)
        mapping = {}
        for token in meta["modifier_tokens"]:
            new = token
            k = 1
            while new in used:  # separately trained folders usually both call their token <new1>
                new, k = f"<new{k}>", k + 1
            used.add(new)
            mapping[token] = new
            if new != token:  # the prompts for this concept change: say so, and record it
                renamed.setdefault(str(folder), {})[token] = new
                log.warning("merge: %s's %s is %s in the merged folder (%s is taken by an earlier concept); "
                            "prompt it with %s.", folder, token, new, token, new)
        embeds = {mapping[t]: read_embedding(folder, t, f) for t, f in meta["embeddings"].items()}
        weights = read_weights(folder, meta.get("weight_name"), base.unet)
        width = base.text_encoder.get_input_embeddings().weight.shape[1]
        wrong = [f"token embedding {len(row)} values, the base's {width}" for row in embeds.values() if len(row) != width]
        if wrong:
            raise ConfigError(f"merge: {folder} was trained on another base model ({wrong[0]}): merge concepts "
                              "trained on one base, the one --pretrained_model_name_or_path gives (default: the "
                              "first folder's).")
        try:
            for k, w in weights.items():
                w0[k] = base_weight(base.unet, k, like=w)  # a layer this base lacks, or has in another shape, is named
        except ConfigError as e:
            raise ConfigError(f"merge: {folder}: {e}") from None
        prompts = [_rename(c["instance_prompt"], mapping) for c in meta["concepts"]]
        concepts += [dict(c, instance_prompt=_rename(c["instance_prompt"], mapping),
                          modifier_tokens=[mapping[t] for t in c.get("modifier_tokens", [])]) for c in meta["concepts"]]
        parts.append((weights, list(embeds), prompts))
        all_tokens += list(embeds)
        rows += [embeds[t] for t in embeds]
    ids = add_tokens(base.tokenizer, base.text_encoder, all_tokens)
    set_embeddings(base.text_encoder, ids, rows)
    token_id = dict(zip(all_tokens, ids))
    if regularization_prompts is None:
        from ..models import DEFAULT_MODEL, resolve_builtin

        shapes_world = Path(str(base.source)).resolve() == Path(resolve_builtin(DEFAULT_MODEL)).resolve()
        if not shapes_world:
            log.warning("merge: regularizing with %d generic captions (everyday subjects) and the class prompts; "
                        "for a real model, --regularization_prompts with captions like the prompts the merged model "
                        "will see does better (the paper uses 1000 LAION captions).", 200)
    reg = regularization_prompts or default_regularization_prompts([c.get("class_prompt") for c in concepts],
                                                                   shapes_world)
    c_reg = token_features(base.tokenizer, base.text_encoder, reg)
    feats = [concept_features(base.tokenizer, base.text_encoder, prompts, [token_id[t] for t in toks])
             for _, toks, prompts in parts]
    keys = sorted(parts[0][0])
    for w, _, _ in parts[1:]:
        if sorted(w) != keys:
            raise ConfigError("merge: the folders' weights cover different layers: were they trained on one base model?")
    merged = {k: merged_weight(w0[k], [(w[k], f) for (w, _, _), f in zip(parts, feats)], c_reg)
              for k in keys}
    first = read_meta(folders[0])
    meta = dict(first, modifier_tokens=all_tokens, initializer_tokens=[], concepts=concepts, prediction_type=prediction,
                merged_from=[str(Path(f).resolve()) for f in folders], base_model=local_or_name(base.source))
    if not same_model(base.source, str(first.get("base_model") or "")):  # (another base: the first's tokenizer not)
        meta.pop("tokenizer_name", None)
    if tokenizer_name:
        meta["tokenizer_name"] = local_or_name(tokenizer_name)
    save_custom_diffusion(output_dir, base.unet, merged, dict(zip(all_tokens, rows)), meta, safe=safe)
    errors = {}
    for (w, toks, _), f in zip(parts, feats):  # how well each concept's constraint holds, relative
        num = sum(float(((merged[k].double() - w[k].double()) @ f.T).norm() ** 2) for k in keys)
        den = sum(float((w[k].double() @ f.T).norm() ** 2) for k in keys)
        errors["+".join(toks)] = (num / den) ** 0.5
    info = {"tokens": all_tokens, "renamed": renamed, "constraint_relative_error": errors, "regularization_prompts": len(reg)}
    (Path(output_dir) / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
