#!/usr/bin/env python3
"""Condition fidelity against training steps: evaluate every checkpoint of a ControlNet run.

    python tools/iou_curve.py RUN_DIR [--n 200] [--base tiny-shapes] [--data HELD_OUT] [--metric fill50k|canny|depth]
                              [--control_guidance both [cond]] [--guidance_scale 7.5]
                              [--controlnet_conditioning_scale 1.0] [--seed 0]

fill50k (default): circle IoU on fresh held-out circles; canny: edge F1; depth: depth
correlation (on --data, or fresh shapes), as `difftune eval controlnet` measures them.
With ``--control_guidance both cond`` each checkpoint is also sampled with the ControlNet on the
conditional half of guidance only (its columns prefixed ``cond_``).

RUN_DIR is a finished `difftune train controlnet` output folder (its config.json gives the
architecture; each checkpoints/checkpoint-N/trainable.safetensors gives the weights).
Prints a table and writes RUN_DIR/iou_curve.json (iou_curve-g3.json, -cs1.5, -seed1, ... where the
guidance scale, ControlNet scale or seed is not the default). Used for the README's curve and to look for the ControlNet paper's "sudden convergence".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file


def main() -> None:
    from difftune.config import CONTROL_GUIDANCE
    from difftune.eval.metrics import CONDITION_METRICS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--base", default="tiny-shapes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", help="held-out data folder (default: fresh circles / shapes)")
    ap.add_argument("--metric", choices=tuple(CONDITION_METRICS), help="default: the condition --data was made with")
    ap.add_argument("--control_guidance", nargs="+", choices=CONTROL_GUIDANCE, default=["both"])
    ap.add_argument("--guidance_scale", type=float, default=7.5)
    ap.add_argument("--controlnet_conditioning_scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="held-out outlines and sampling seeds, as `difftune eval`")
    args = ap.parse_args()

    from diffusers import ControlNetModel

    from difftune.checkpoint import list_checkpoints
    from difftune.eval.run import eval_controlnet

    run = Path(args.run_dir)
    net = ControlNetModel.from_pretrained(run)
    rows = []
    for ckpt in list_checkpoints(run / "checkpoints"):
        net.load_state_dict(load_file(str(ckpt / "trainable.safetensors")))
        r = eval_controlnet(args.base, net, n=args.n, steps=args.steps, baseline=not rows, data=args.data,
                            metric=args.metric, control_guidance=tuple(args.control_guidance),
                            guidance_scale=args.guidance_scale, seed=args.seed,
                            conditioning_scale=args.controlnet_conditioning_scale)
        step = int(ckpt.name.split("-")[1])
        first = next(k for k in ("controlnet", "controlnet_cond") if k in r)
        keys = ["iou", "circle_color_ok"] if r["metric"] == "circle_iou" else list(r[first])[:1]
        rows.append({"step": step, **{k: r["controlnet"][k] for k in keys if "controlnet" in r},
                     **{f"cond_{k}": r["controlnet_cond"][k] for k in keys if "controlnet_cond" in r},
                     **({f"base_alone_{keys[0]}": r["base_alone"][keys[0]]} if "base_alone" in r else {})})
        print(json.dumps(rows[-1]), flush=True)
    # one file per sampling setting, so a run read at another guidance, scale or seed keeps the others
    suffix = "".join(f"-{tag}{value:g}" for tag, value, default in (
        ("g", args.guidance_scale, 7.5), ("cs", args.controlnet_conditioning_scale, 1.0), ("seed", args.seed, 0))
        if value != default)
    name = f"iou_curve{suffix}.json"
    (run / name).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
