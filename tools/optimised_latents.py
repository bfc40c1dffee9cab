#!/usr/bin/env python3
"""Would a ControlNet trained on decoder-optimised latents draw the circles better? Rewrite a latent cache.

    difftune train controlnet ... --cache_latents --latent_cache_dir CACHE   # builds CACHE/<key>/
    python tools/optimised_latents.py --cache CACHE/<key> --data DATA --out CACHE2/<key> --steps 30
    difftune train controlnet ... --cache_latents --latent_cache_dir CACHE2  # trains on the new means

Copies a `--cache_latents` cache of a fill50k-style folder (one parquet file per shard, images in
cache order) and replaces every latent *mean* by one optimised against the frozen decoder: Adam
(lr --lr) on the latent, from the encoder's mean, minimising the MSE between the decoded and the
true image (`tools/decoder_ceiling.py` does the same for held-out images). The posterior std,
captions and everything else stay, so a run on the copy differs from one on the original only in
the latents it learns to produce. The key folder keeps its name, so training reads the copy as if
it were its own cache (an experiment: the copy no longer matches the weights its key names).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a cache key folder: CACHE/<key>")
    ap.add_argument("--data", required=True, help="the fill50k folder the cache was built from")
    ap.add_argument("--out", required=True, help="where the copy goes: CACHE2/<key>")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from decoder_ceiling import fit_latents  # tools/, beside this script
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from difftune.models import resolve_builtin
    from difftune.pretrain import _images_to_tensor

    vae = AutoencoderKL.from_pretrained(str(Path(resolve_builtin("tiny-shapes")) / "vae")).eval().requires_grad_(False)
    images = []
    for f in sorted((Path(args.data) / "train").glob("*.parquet")):
        for cell in pq.read_table(f, columns=["image"]).column("image").to_pylist():
            images.append(np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")))
    src, out = Path(args.cache), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    offset, t0 = 0, time.time()
    for shard in sorted(out.glob("latents-*.safetensors")):
        tensors = load_file(str(shard))
        mean = tensors["mean"]
        x_all = _images_to_tensor(np.stack(images[offset : offset + len(mean)]))
        with torch.no_grad():  # the cache must be this data's: its means are the encoder's of these images
            check = vae.encode(x_all[:8]).latent_dist.mean
        if not torch.allclose(check, mean[:8], atol=1e-3):
            raise SystemExit(f"{shard.name}: the cached means are not the encoder's of {args.data}'s images in order")
        for i in range(0, len(mean), args.batch):
            x = x_all[i : i + args.batch]
            done = offset + i + len(x)
            mean[i : i + args.batch] = fit_latents(
                vae, mean[i : i + args.batch], x, args.steps, args.lr,
                report=lambda step, z, mse: print(json.dumps({"shard": shard.name, "done": done, "mse": round(mse, 5),
                                                              "seconds": round(time.time() - t0)}), flush=True))
        tensors["mean"] = mean
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard))
        offset += len(mean)


if __name__ == "__main__":
    main()
