"""Encode once, train many times: cached VAE latent distributions and text embeddings.

The frozen VAE encoder is 37% of the reference ControlNet trainer's work per image
(``../shared/bench/ANCHORS.md``) and fill50k's 50k images share a few thousand captions.
With ``--cache_latents`` both are encoded once, before training, and the encoders stay off
the GPU. The semantics do not change: the cache holds the latent *distribution* (mean and
std of the VAE's diagonal Gaussian), and each step draws its latent sample from it with
the same generator draws the uncached path uses, so a cached and an uncached run train the
same thing (``tests/test_speed_options.py`` checks their losses agree).

Only deterministic transforms can be cached: difftune's ControlNet data is resized and
centre-cropped, never flipped or randomly cropped.

A cache folder is keyed by what its contents depend on (model weights, data, resolution,
interpolation, dtype), so a stale cache is never read: another key is another folder.

    meta.json                      what the cache was built from
    latents-00000.safetensors      samples [0, k): mean, std [k,C,h,w]; ok [k] (0: unreadable
                                   image); original_size, crop_top_left [k,2] (SDXL conditioning)
    text.safetensors + text.json   embeddings of each distinct caption ('' included)

Every file is written under a temporary name, fsynced and renamed: an interrupted build
leaves whole shards only, and running again encodes just the missing ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.data
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_write
from .errors import DataError
from .families import PromptEmbeds
from .noising import to_device

log = logging.getLogger("difftune")

SHARD_SIZE = 1024


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))


def _save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def weights_probe(*modules: torch.nn.Module) -> str:
    """A fingerprint of all the weights of ``modules``: each tensor's sum and sum of squares, in float64
    (computed where the weights are, nothing copied off the GPU), to 12 significant digits, hashed.
    A fine-tuned or edited VAE or text encoder at the same path changes it."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for m in modules:
            for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                t = t.detach().double()
                digest.update(f"{name}:{tuple(t.shape)}:{float(t.sum()):.12g}:{float((t * t).sum()):.12g}\n".encode())
    return digest.hexdigest()[:16]


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def distinct_captions(values: list[Any]) -> list[str]:
    """Every caption a data set can yield (a row may hold a list of them), plus '' (dropped prompts)."""
    seen = {"": None}
    for v in values:
        for c in ([v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else []):
            if isinstance(c, str):
                seen.setdefault(c, None)
    return list(seen)


class TextCache:
    """Embeddings of known captions, looked up per batch (kept in host memory)."""

    def __init__(self, captions: list[str], hidden: torch.Tensor, pooled: torch.Tensor | None):
        self.row = {c: i for i, c in enumerate(captions)}
        self.hidden, self.pooled = hidden, pooled

    def lookup(self, captions: list[str], device: torch.device) -> PromptEmbeds:
        missing = [c for c in captions if c not in self.row]
        if missing:  # pragma: no cover - the cache is built from the same column
            raise KeyError(f"caption {missing[0]!r} is not in the encoded cache; delete the cache folder and rerun")
        rows = torch.tensor([self.row[c] for c in captions])
        pooled = to_device(self.pooled[rows], device) if self.pooled is not None else None
        return PromptEmbeds(to_device(self.hidden[rows], device), pooled)


class LatentCache:
    """Latent mean/std per sample, from the shard files (kept in host memory)."""

    def __init__(self, folder: Path, n: int):
        self.n = n
        self.shards = [load_file(str(folder / _shard_name(s))) for s in range(_n_shards(n))]

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> dict | None:
        shard, i = divmod(index, SHARD_SIZE)
        t = self.shards[shard]
        if not bool(t["ok"][i]):
            return None
        return {
            "latent_mean": t["mean"][i],
            "latent_std": t["std"][i],
            "original_size": tuple(int(x) for x in t["original_size"][i]),
            "crop_top_left": tuple(int(x) for x in t["crop_top_left"][i]),
        }


def _n_shards(n: int) -> int:
    return (n + SHARD_SIZE - 1) // SHARD_SIZE


def _shard_name(s: int) -> str:
    return f"latents-{s:05d}.safetensors"


def _collate_pixels(items: list[dict | None]) -> list[dict | None]:
    return items


def encoded_before(folder: Path, n: int) -> int:
    """How many of ``n`` images the shards already in ``folder`` hold (a cache a killed run began)."""
    return sum(min(SHARD_SIZE, n - s * SHARD_SIZE) for s in range(_n_shards(n)) if (folder / _shard_name(s)).exists())


def build_latent_shards(
    folder: Path,
    examples: torch.utils.data.Dataset,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> int:
    """Encode the missing shards this process owns (shard ``s`` belongs to rank ``s % world``).

    ``examples[i]`` is a training example with ``pixel_values`` (or ``None`` if unreadable);
    ``encode(pixels)`` returns the latent mean and std. Returns the number of shards written.
    """
    from tqdm.auto import tqdm

    n = len(examples)
    todo = [s for s in range(_n_shards(n)) if s % world == rank and not (folder / _shard_name(s)).exists()]
    bar = tqdm(total=sum(min(SHARD_SIZE, n - s * SHARD_SIZE) for s in todo), desc="encode images", unit="img",
               disable=not progress or not todo, dynamic_ncols=True)
    for s in todo:
        indices = list(range(s * SHARD_SIZE, min(n, (s + 1) * SHARD_SIZE)))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(examples, indices), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_collate_pixels,
        )
        # (mean, std, original size, crop offset) per sample; None for an unreadable image
        encoded: list[tuple | None] = []
        for items in loader:
            good = [it for it in items if it is not None]
            if good:
                mean, std = encode(torch.stack([it["pixel_values"] for it in good]))
                moments = zip(mean.cpu(), std.cpu())
            encoded += [None if it is None else (*next(moments), it["original_size"], it["crop_top_left"])
                        for it in items]
            bar.update(len(items))
        first = next((e for e in encoded if e is not None), None)
        if first is None:
            raise DataError(f"none of the images of rows {indices[0]}..{indices[-1]} could be read: check the "
                            "data (`difftune data check`) before caching it")
        blank = (torch.zeros_like(first[0]), torch.zeros_like(first[1]), (0, 0), (0, 0))
        rows = [blank if e is None else e for e in encoded]
        _save_tensors({
            "mean": torch.stack([r[0] for r in rows]),
            "std": torch.stack([r[1] for r in rows]),
            "ok": torch.tensor([e is not None for e in encoded], dtype=torch.uint8),
            "original_size": torch.tensor([r[2] for r in rows], dtype=torch.long),
            "crop_top_left": torch.tensor([r[3] for r in rows], dtype=torch.long),
        }, folder / _shard_name(s))
    bar.close()
    return len(todo)


def build_text_cache(
    folder: Path,
    captions: list[str],
    encode: Callable[[list[str]], PromptEmbeds],
    batch_size: int = 64,
) -> None:
    """Encode ``captions`` into ``text.safetensors`` + ``text.json`` (skipped if both exist)."""
    if (folder / "text.json").exists() and (folder / "text.safetensors").exists():
        return
    hidden, pooled = [], []
    for i in range(0, len(captions), batch_size):
        p = encode(captions[i : i + batch_size])
        hidden.append(p.encoder_hidden_states.cpu())
        if p.pooled is not None:
            pooled.append(p.pooled.cpu())
    tensors = {"hidden": torch.cat(hidden)}
    if pooled:
        tensors["pooled"] = torch.cat(pooled)
    _save_tensors(tensors, folder / "text.safetensors")
    _save_text(json.dumps(captions), folder / "text.json")


def load_text_cache(folder: Path) -> TextCache:
    t = load_file(str(folder / "text.safetensors"))
    captions = json.loads((folder / "text.json").read_text(encoding="utf-8"))
    return TextCache(captions, t["hidden"], t.get("pooled"))


def write_meta(folder: Path, fields: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "meta.json").exists():
        _save_text(json.dumps(fields, indent=2, default=str) + "\n", folder / "meta.json")


def is_complete(folder: Path, n: int) -> bool:
    return (folder / "text.json").exists() and all((folder / _shard_name(s)).exists() for s in range(_n_shards(n)))


class CachedExamples(torch.utils.data.Dataset):
    """Training examples with the target image replaced by its cached latent distribution."""

    def __init__(self, examples: Any, latents: LatentCache):
        if len(examples) != len(latents):
            raise ValueError(f"the data set has {len(examples)} rows but the cache {len(latents)}")
        self.examples, self.latents = examples, latents

    def set_epoch(self, epoch: int) -> None:
        self.examples.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict | None:
        cached = self.latents.get(int(index))
        if cached is None:
            return None
        example = self.examples.example(int(index), with_image=False)
        return None if example is None else {**example, **cached}
