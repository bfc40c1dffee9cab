"""Low-rank compression of the trained weight deltas (``difftune custom-diffusion compress``).

Kumari et al. 2023 (sec. 4, "Compressing model weights"): the update dW = W - W0 of each
fine-tuned projection is close to low-rank, so keeping its top singular values,
dW ~ U_r S_r V_r^T, stores a concept in a fraction of the space at little loss of quality.

Two files are written: the compact one (``pytorch_custom_diffusion_weights.lowrank.safetensors``,
keys ``<weight key>.lora_up``/``.lora_down`` = U_r S_r and V_r^T, relative to the base model),
which difftune reads, and a full-size file with W0 + U_r S_r V_r^T that diffusers loads as is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import atomic_write
from ..errors import ConfigError
from .export import (LOWRANK, META, WEIGHTS_SAFE, check_base_family, full_processor_dict, read_embedding, read_meta,
                     read_weights)

log = logging.getLogger("difftune")

UP, DOWN = ".lora_up", ".lora_down"


def is_lowrank(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(UP) for k in tensors)


OTHER_BASE = ("was it trained on another base model? Give the one it was trained on with "
              "--pretrained_model_name_or_path, or leave the flag out for the one its folder records.")


def base_weight(base_unet: torch.nn.Module, key: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """The base projection a processor weight key was copied from ('...attn2.processor.to_k_custom_diffusion.weight');
    a ConfigError when this UNet has no such layer, or (given ``like``, the trained weight) one of another shape."""
    proc, _, rest = key.partition(".processor.")
    src = rest.replace("_custom_diffusion", "")  # to_k.weight, to_out.0.weight, ...
    try:
        attn = base_unet.get_submodule(proc)
        w0 = attn.get_submodule(src.rsplit(".", 1)[0]).get_parameter(src.rsplit(".", 1)[1]).detach().float().cpu()
    except AttributeError:
        raise ConfigError(f"the Custom Diffusion weight {key} matches no layer of this base's UNet: {OTHER_BASE}") \
            from None
    if like is not None and like.shape != w0.shape:
        raise ConfigError(f"the Custom Diffusion weight {key} is {tuple(like.shape)}, the base's layer "
                          f"{tuple(w0.shape)}: {OTHER_BASE}")
    return w0


def lowrank_factors(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) with r = ``rank``, or the least r keeping ``energy`` of sum(S^2)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        cum = torch.cumsum(S**2, 0) / (S**2).sum().clamp(min=1e-30)
        rank = int((cum < energy).sum()) + 1
    r = max(1, min(rank, S.numel()))
    return (U[:, :r] * S[:r]).float(), Vh[:r].float()


def check_compress_amount(rank: int | None, energy: float | None) -> None:
    """--rank or --energy: exactly one, in range (the CLI checks before any model loads)."""
    if (rank is None) == (energy is None):
        raise ConfigError("Give exactly one of --rank N or --energy F (0 < F <= 1).")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}.")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}.")


def compress(folder: str | Path, base_unet: torch.nn.Module, output_dir: str | Path, rank: int | None = None,
             energy: float | None = None) -> dict:
    """Compress a Custom Diffusion folder's deltas; returns sizes and the relative error of the deltas."""
    check_compress_amount(rank, energy)
    folder, out = Path(folder), Path(output_dir)
    meta = read_meta(folder)
    check_base_family(base_unet, folder)
    weights = read_weights(folder, meta.get("weight_name"))
    out.mkdir(parents=True, exist_ok=True)
    compact, full, err_num, err_den, full_numel, compact_numel = {}, {}, 0.0, 0.0, 0, 0
    for key, w in weights.items():
        if w.dim() != 2:  # biases (to_out with crossattn) are kept whole
            compact[key] = full[key] = w
            continue
        w0 = base_weight(base_unet, key, like=w)
        up, down = lowrank_factors(w.float() - w0, rank, energy)
        compact[key + UP], compact[key + DOWN] = up.contiguous(), down.contiguous()
        approx = w0 + up @ down
        full[key] = approx
        err_num += float(((w.float() - approx) ** 2).sum())
        err_den += float(((w.float() - w0) ** 2).sum())
        full_numel += w.numel()
        compact_numel += up.numel() + down.numel()
    atomic_write(out / LOWRANK, lambda p: save_file(compact, str(p), metadata={"format": "pt", "difftune": "lowrank"}))
    atomic_write(out / WEIGHTS_SAFE, lambda p: save_file(full_processor_dict(base_unet, full, safe=True), str(p),
                                                          metadata={"format": "pt"}))
    embeddings = {}
    for token, file in meta.get("embeddings", {}).items():  # safetensors like the weights, whatever the source was
        read_embedding(folder, token, file)  # a damaged file is named, not copied
        name = f"{token}.safetensors"
        if Path(file).suffix == ".safetensors" and Path(folder, file).resolve() != Path(out, name).resolve():
            shutil.copyfile(folder / file, out / name)
        elif Path(file).suffix != ".safetensors":
            row = {token: read_embedding(folder, token, file).float().contiguous()}
            atomic_write(out / name, lambda p, t=row: save_file(t, str(p)))
        embeddings[token] = name
    if compact_numel >= full_numel:
        what = f"--rank {rank}" if rank is not None else f"--energy {energy}"
        log.warning("%s keeps as many numbers as the full matrices (%d low-rank against %d): the low-rank file is "
                    "no smaller; a lower --rank (or --energy) compresses.", what, compact_numel, full_numel)
    meta = dict(meta, weight_name=WEIGHTS_SAFE, embeddings=embeddings,
                compressed={"rank": rank, "energy": energy, "file": LOWRANK})
    (out / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {
        "relative_delta_error": (err_num / err_den) ** 0.5 if err_den else 0.0,
        "parameters_full": full_numel, "parameters_lowrank": compact_numel,
        "bytes_lowrank_file": (out / LOWRANK).stat().st_size,
        "bytes_full_file": (out / WEIGHTS_SAFE).stat().st_size,
    }


def expand_lowrank(tensors: dict[str, torch.Tensor], base_unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full processor weights W0 + up @ down from a compact file."""
    out = {}
    for key, v in tensors.items():
        if key.endswith(UP):
            k = key[: -len(UP)]
            out[k] = base_weight(base_unet, k) + v.float() @ tensors[k + DOWN].float()
        elif not key.endswith(DOWN):
            out[key] = v
    return out
