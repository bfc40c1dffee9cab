"""What a local base model folder holds: its parts, their weight files' variants, and what it lacks.

Checked before any weights load, so that a folder missing a part, holding only pickles, or saved in fp16
only is named with what to do about it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger("difftune")


SINGLE_FILE_HINT = (" (a single-file checkpoint converts once, in diffusers: "
                    "`StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)`, then give DIR)")
# the parts another flag can stand in for, when a folder lacks them
_STAND_INS = {"vae": "--pretrained_vae_model_name_or_path", "tokenizer": "--tokenizer_name"}


def check_local_folder(path: Path, needed: tuple[str, ...], stand_ins: tuple[str, ...] = tuple(_STAND_INS)) -> None:
    """Each ``needed`` sub-folder is there, or the error says how to get it (``stand_ins``: the parts the
    command has a flag to give instead)."""
    missing = [sub for sub in needed if not (path / sub).is_dir()]
    if missing:
        inside = [p.parent for p in sorted(path.glob("*/model_index.json"))]  # (pretrain-base writes OUT/model)
        stand_ins = [f"{_STAND_INS[m]} for {m}/" for m in missing if m in _STAND_INS and m in stand_ins]
        hint = (f" It holds one, though: give --pretrained_model_name_or_path {inside[0]}." if inside else
                " Export one with `pipe.save_pretrained(DIR)`"
                + (f", or give {' and '.join(stand_ins)}." if stand_ins else "."))
        raise ModelLoadError(
            f"{path} is not a diffusers-layout Stable Diffusion folder: missing sub-folder(s) "
            f"{', '.join(missing)}.{hint}"
        )


def note_local_folder(path: Path, revision: str | None) -> None:
    """Warn about what a local base folder makes moot or lacks for others: ``--revision`` (a Hub branch, tag
    or commit: a folder has none) and a missing or damaged ``model_index.json`` (difftune reads the parts,
    but diffusers' ``from_pretrained``, as in the model card's code, needs it)."""
    import json

    if revision:
        log.warning("--revision %s: %s is a local folder, which has no revisions; the flag is ignored (it picks a "
                    "branch, tag or commit of a Hub model).", revision, path)
    index = path / "model_index.json"
    try:
        json.loads(index.read_text(encoding="utf-8"))
    except OSError:
        log.warning("%s has no model_index.json: difftune reads the parts, but diffusers' from_pretrained (as in the "
                    "model card's code) needs it; `pipe.save_pretrained(DIR)` writes one.", path)
    except ValueError as e:
        log.warning("%s is not valid JSON (%s): difftune reads the parts, but diffusers' from_pretrained (as in the "
                    "model card's code) fails on it; restore it, or write the folder again with "
                    "`pipe.save_pretrained(DIR)`.", index, e)


def variant_of(file_name: str) -> str | None:
    """'model.fp16.safetensors' -> 'fp16'; 'diffusion_pytorch_model.fp16-00001-of-00002.safetensors' -> 'fp16';
    a file of the plain weights ('model.safetensors', 'model-00001-of-00002.safetensors') -> None."""
    parts = file_name.removesuffix(".safetensors").split(".")
    return parts[1].split("-")[0] if len(parts) == 2 else None


def part_variants(local: Path, parts: tuple[str, ...], variant: str | None) -> dict[str, str | None]:
    """The variant to read each weights sub-folder of a local model with, as a diffusers pipeline does: the given
    one where the part has it, else its plain weights; without ``variant``, a part whose weights are all of one
    variant (a folder saved with ``variant="fp16"`` only) is read from those, and that is said once."""
    chosen: dict[str, str | None] = {}
    for part in parts:
        names = [p.name for p in (local / part).glob("*.safetensors")]
        tags = sorted({v for v in map(variant_of, names) if v is not None})
        plain = any(variant_of(n) is None for n in names)
        if variant is not None and variant not in tags and not plain and names:
            raise ModelLoadError(f"--variant {variant}: {local / part} has no {variant} weights, only "
                                 f"{', '.join(names)}: give --variant {tags[0]}, or leave --variant out.")
        if variant is not None:
            chosen[part] = variant if variant in tags else None
        elif plain or not tags:
            chosen[part] = None
        elif len(tags) == 1:
            chosen[part] = tags[0]
        else:
            raise ModelLoadError(f"{local / part} holds weights of several variants ({', '.join(tags)}) and no plain "
                                 f"ones: choose one with --variant {tags[0]} (or {', '.join(tags[1:])}).")
    if variant is not None and parts and not any(chosen.values()):
        raise ModelLoadError(f"--variant {variant}: {local} has no {variant} weights in {', '.join(parts)}: leave "
                             "--variant out to read its plain weights.")
    adopted = sorted({v for v in chosen.values() if v is not None and variant is None})
    if adopted:
        log.info(
            "%s: the weights are in *.%s.safetensors only: reading those (as --variant %s would).", local,
            adopted[0], adopted[0])
    return chosen


def pickle_only(folder: Path) -> str:
    """Why a folder whose weights are only ``.bin`` / ``.pt`` / ``.ckpt`` does not load, and the way on:
    weights are read from safetensors only, since unpickling a file can run any code in it."""
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickles or any(folder.glob("*.safetensors")):
        return ""
    return (f" Its weights are only in {', '.join(pickles)}, a pickle, which difftune does not load (unpickling a file "
            "can run any code in it). If you trust the file, convert it once: load it in diffusers or transformers "
            "and save it again with save_pretrained(DIR, safe_serialization=True).")


def damaged_weights(folder: Path, remedy: str) -> str:
    """The first ``.safetensors`` file in ``folder`` whose header or size is wrong (a download or copy cut
    short), said with ``remedy``; "" when each one opens. Checked after a load failed: diffusers and
    transformers then say only "Unable to load weights from checkpoint file", naming no damage."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):  # the header, and that the file covers every tensor
                pass
        except Exception as e:  # noqa: BLE001 — safetensors' own error type
            return f"{path} is damaged: not a readable safetensors file ({e}), e.g. truncated by an interrupted " \
                   f"download or copy; {remedy}."
    return ""
