#!/usr/bin/env python3
"""Does a wider latent keep fill50k's circles better? Train VAEs that differ only in latent channels.

    python tools/vae_channels.py --steps 300 --channels 4,16,8 [--out /tmp/vae-channels]

Each VAE is trained from scratch as `difftune pretrain-base` trains its VAE (the `wide` world,
20,000 images, batch 32, the same one-cycle schedule over --steps, seed 0), then 200 fresh fill50k
circles (eval seed 0, as `difftune eval controlnet` draws them) are encoded and decoded and scored
with the circle-IoU reader, overall and by radius. Prints one JSON line per VAE and saves each
VAE under OUT/cN/vae. The README's latent-channel table came from this command (2026-11-30).

    python tools/vae_channels.py --eval DIR_OR_FILE [...] [--channels 8]

scores VAEs that exist instead, the same way: a diffusers VAE folder, or a `difftune pretrain-base`
VAE checkpoint's `trainable.safetensors` (of a VAE with --channels latent channels), e.g. each
checkpoint of a run to follow its round-trip IoU against steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--channels", default="4,8,16", help="comma-separated latent channel counts")
    ap.add_argument("--downsample", type=int, default=4, choices=(2, 4, 8),
                    help="image pixels per latent pixel (4 ships: 16x16 latents; 2: 32x32)")
    ap.add_argument("--n_images", type=int, default=20000)
    ap.add_argument("--n_eval", type=int, default=200)
    ap.add_argument("--out", default="/tmp/vae-channels")
    ap.add_argument("--eval", nargs="+", metavar="PATH", help="score these VAEs instead of training")
    args = ap.parse_args()

    import numpy as np
    import torch

    from difftune.data.shapes import render_batch
    from difftune.eval.run import _summary, by_radius, vae_round_trip
    from difftune.eval.targets import condition_targets
    from difftune.pretrain import RESOLUTION, architecture, train_vae, world_samples

    scorer, targets = condition_targets("fill50k", args.n_eval, RESOLUTION, 0, None)
    truth = np.stack([np.asarray(t["image"]) for t in targets])

    def score(vae) -> dict:
        with torch.no_grad():
            decoded = vae_round_trip(SimpleNamespace(vae=vae.eval()), truth)
        scores = {"vae": [scorer.score(im, t) for im, t in zip(decoded, targets)]}
        return {"all": _summary(scores["vae"]), "by_radius": by_radius(scores, targets, RESOLUTION)}

    if args.eval:
        from diffusers import AutoencoderKL
        from safetensors.torch import load_file

        for path in map(Path, args.eval):
            if path.is_dir():
                vae = AutoencoderKL.from_pretrained(path)
            else:
                vae = AutoencoderKL(**architecture(args.downsample, int(args.channels.split(",")[0]))[0])
                vae.load_state_dict(load_file(str(path)))
            print(json.dumps({"vae": str(path), **score(vae)}), flush=True)
        return
    images = render_batch(world_samples(args.n_images, 0, "wide"), RESOLUTION)
    for channels in (int(c) for c in args.channels.split(",")):
        vae_config, _ = architecture(args.downsample, channels)
        out = Path(args.out) / f"c{channels}"
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        vae = train_vae(out, images, args.steps, 0, batch=32, config=vae_config)
        print(json.dumps({"channels": channels, "downsample": args.downsample, "steps": args.steps,
                          "seconds": round(time.time() - t0), **score(vae)}),
              flush=True)
        vae.save_pretrained(out / "vae")


if __name__ == "__main__":
    main()
