"""Diffusers-loadable Custom Diffusion files, and loading them back.

Written to the output folder:

- ``pytorch_custom_diffusion_weights.safetensors`` (``.bin`` with ``--no_safe_serialization``):
  every attention processor of the UNet, keyed as diffusers' ``save_attn_procs`` keys them;
- ``<new1>.safetensors`` (``.bin``) per modifier token: ``{token: embedding}``, the
  textual-inversion layout ``pipe.load_textual_inversion`` reads;
- ``custom_diffusion.json``: tokens, prompts and settings (for ``generate``, merge, eval).

Two defects of diffusers (issue huggingface/diffusers#9320, present in 0.42) are handled:

1. ``save_attn_procs(safe_serialization=True)`` drops the weightless self-attention
   processors (safetensors cannot store ``{}``), and ``load_attn_procs`` then builds too few
   processors and fails ("number of processors 6 does not match ... 12"). We store those
   entries as zero-length tensors: diffusers' loader tests ``len(value) == 0`` and builds a
   weightless processor for them, so the file loads.
2. ``load_attn_procs`` installs the processors only when called with ``_pipeline=...``; a
   plain ``pipe.unet.load_attn_procs(dir, weight_name=...)`` silently does nothing. Pass
   ``_pipeline=pipe`` with such versions, or use ``load_custom_diffusion`` here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write, list_checkpoints
from ..errors import ConfigError, ModelLoadError

WEIGHTS_SAFE = "pytorch_custom_diffusion_weights.safetensors"
WEIGHTS_BIN = "pytorch_custom_diffusion_weights.bin"
META = "custom_diffusion.json"
LOWRANK = "pytorch_custom_diffusion_weights.lowrank.safetensors"  # ``difftune custom-diffusion compress``


def full_processor_dict(unet: torch.nn.Module, weights: dict[str, torch.Tensor], safe: bool) -> dict[str, Any]:
    """``weights`` plus an entry for every weightless processor (zero-length tensor, or ``{}`` for .bin)."""
    out: dict[str, Any] = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    for name in unet.attn_processors:
        if not any(k.startswith(name + ".") for k in weights):
            out[name] = torch.zeros(0) if safe else {}
    return out


def save_custom_diffusion(output_dir: str | Path, unet: torch.nn.Module, weights: dict[str, torch.Tensor],
                          embeddings: dict[str, torch.Tensor], meta: dict, safe: bool = True) -> list[Path]:
    """Write the weight file, one embedding file per token and the metadata; return the paths.

    Each file is written atomically, and the set is too, as loaders see it: an earlier export's
    ``custom_diffusion.json`` goes first and the new one is written last, so an export killed half-way
    leaves a folder that is refused as unfinished, never new weights read with old embeddings.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = full_processor_dict(unet, weights, safe)
    earlier = _exported_files(out)
    (out / META).unlink(missing_ok=True)
    written = []
    if safe:
        written.append(atomic_write(out / WEIGHTS_SAFE, lambda p: save_file(state, str(p), metadata={"format": "pt"})))
    else:
        written.append(atomic_write(out / WEIGHTS_BIN, lambda p: torch.save(state, p)))
    for token, row in embeddings.items():
        name = f"{token}.{'safetensors' if safe else 'bin'}"
        tensors = {token: row.detach().float().cpu().contiguous()}
        written.append(atomic_write(out / name, (lambda p, t=tensors: save_file(t, str(p))) if safe
                               else (lambda p, t=tensors: torch.save(t, p))))
    meta = dict(meta, weight_name=written[0].name, embeddings={t: f"{t}.{'safetensors' if safe else 'bin'}"
                                                               for t in embeddings})
    written.append(atomic_write(out / META, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")))
    for name in earlier - {p.name for p in written}:  # an earlier run's tokens or weight format: no longer this folder's
        (out / name).unlink(missing_ok=True)
    return written


def _exported_files(folder: Path) -> set[str]:
    """The files a folder's current custom_diffusion.json says an export wrote (none when it has none)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        names = {meta["weight_name"], *meta.get("embeddings", {}).values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}


def read_meta(folder: str | Path, flag: str = "--custom_diffusion") -> dict:
    """A Custom Diffusion folder's custom_diffusion.json; errors name ``flag``, the flag that gave the folder."""
    path = Path(folder) / META
    if not Path(folder).is_dir():
        raise ModelLoadError(f"{flag} {folder}: no such folder. Give a `difftune train custom-diffusion` "
                             "output folder or one of its checkpoints/checkpoint-N.")
    if not path.is_file():
        done = [p for p in list_checkpoints(Path(folder) / "checkpoints") if (p / META).is_file()]
        if any((Path(folder) / n).is_file() for n in (WEIGHTS_SAFE, WEIGHTS_BIN)):  # save_custom_diffusion's order
            raise ModelLoadError(f"{flag} {folder}: its export did not finish (there is a weight file but no {META},"
                                 " which is written last). Run the training command again with "
                                 "--resume_from_checkpoint latest to export it again"
                                 + (f", or give {done[-1]} (the latest checkpoint)." if done else "."))
        hint = (f" It is a run that has not finished, but each checkpoint loads: give {done[-1]} (the latest),"
                " or finish the run with --resume_from_checkpoint latest." if done else
                " Give a `difftune train custom-diffusion` output folder or one of its checkpoints/checkpoint-N.")
        raise ModelLoadError(f"{flag} {folder}: no {META}; is this a difftune Custom Diffusion output "
                             f"folder?{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{flag} {folder}: {path} is not valid JSON ({e}); restore the file, or export the "
                             "folder again (train, merge or compress).") from None
    lacking = [k for k in ("weight_name",) if k not in meta] \
        if isinstance(meta, dict) else []
    if not isinstance(meta, dict) or lacking:
        raise ModelLoadError(f"{flag} {folder}: {path} is incomplete (no {', '.join(lacking) or 'settings object'});"
                             " restore the file, or export the folder again.")
    weights = meta["weight_name"]
    if not (isinstance(weights, str) and Path(weights).name == weights and (Path(folder) / weights).is_file()):
        raise ModelLoadError(f"{flag} {folder}: the weight file {weights} that {META} names is missing; restore it, "
                             "or export the folder again.")
    missing = [f"{file} (token {token})" for token, file in (meta.get("embeddings") or {}).items()
               if not (Path(folder) / file).is_file()]
    if missing:
        raise ModelLoadError(f"{flag} {folder}: the embedding file(s) {', '.join(missing)} that {META} names are "
                             "missing; restore them, or export the folder again.")
    return meta


def _weight_file(folder: Path, weight_name: str | None) -> Path:
    if weight_name:
        path = folder / weight_name
    else:
        path = next((folder / n for n in (WEIGHTS_SAFE, WEIGHTS_BIN) if (folder / n).is_file()), folder / WEIGHTS_SAFE)
    if not path.is_file():
        raise ModelLoadError(f"--custom_diffusion {folder}: no weight file {path.name}.")
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A weight file as tensors. ``.bin`` files are read with ``weights_only=True`` (no arbitrary
    unpickling); empty entries are dropped."""
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; restore it, or export the folder again.")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors' own error type: a truncated or overwritten file
            raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); restore it, or export the "
                                 "folder again.") from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path} is not a readable weight file: {e}") from None
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.numel() > 0}


def read_embedding(folder: str | Path, token: str, file: str) -> torch.Tensor:
    """The embedding row of ``token`` from its file (a textual-inversion ``{token: row}`` file)."""
    tensors = read_tensors(Path(folder) / file)
    if token not in tensors:
        raise ModelLoadError(f"{Path(folder) / file} holds no embedding for {token} (it holds "
                             f"{', '.join(tensors) or 'nothing'}); restore it, or export the folder again.")
    return tensors[token]


def check_base_family(base_unet: torch.nn.Module, folder: str | Path) -> None:
    """Custom Diffusion trains on SD 1.x/2.x bases only: an SDXL base is named as such, before its weight names
    fail to match one by one."""
    if base_unet.config.get("addition_embed_type") == "text_time":
        raise ConfigError(f"{folder}: Custom Diffusion supports SD 1.x/2.x bases, and this base is SDXL. Give the "
                          "SD base it was trained on with --pretrained_model_name_or_path, or leave the flag out for "
                          "the one its folder records.")


def read_weights(folder: str | Path, weight_name: str | None = None, base_unet: torch.nn.Module | None = None
                 ) -> dict[str, torch.Tensor]:
    """The processor weights of an output folder (low-rank files are expanded against ``base_unet``)."""
    from .compress import expand_lowrank, is_lowrank

    path = _weight_file(Path(folder), weight_name)
    tensors = read_tensors(path)
    if is_lowrank(tensors):
        if base_unet is None:
            raise ConfigError(f"{path} holds low-rank deltas; the base UNet is needed to expand them.")
        tensors = expand_lowrank(tensors, base_unet)
    return tensors


def load_custom_diffusion(pipe: Any, folder: str | Path, weight_name: str | None = None) -> list[str]:
    """Install a folder's processors and tokens into a diffusers text-to-image pipeline; return the tokens.

    Equivalent to ``pipe.unet.load_attn_procs`` + ``pipe.load_textual_inversion`` for each
    token, but independent of the diffusers defects described above, and it also reads
    low-rank (``difftune custom-diffusion compress``) files.
    """
    from .surgery import install_processors, load_processor_state_dict

    folder = Path(folder)
    meta = read_meta(folder)
    check_base_family(pipe.unet, folder)
    weights = read_weights(folder, weight_name or meta.get("weight_name"), base_unet=pipe.unet)
    freeze = "crossattn" if any("to_q_custom_diffusion" in k for k in weights) else "crossattn_kv"
    install_processors(pipe.unet, freeze)
    load_processor_state_dict(pipe.unet, weights)
    pipe.unet.to(pipe.unet.device)
    tokens = []
    for token, file in meta.get("embeddings", {}).items():
        read_embedding(folder, token, file)  # a damaged file is named here, not deep in diffusers
        pipe.load_textual_inversion(str(folder), weight_name=file, token=token)
        tokens.append(token)
    return tokens
