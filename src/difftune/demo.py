"""The main job on the embedded default: data -> ControlNet training -> samples, offline on a CPU.

Until a pretrained tiny base model ships with the package, the base is the tiny
Stable-Diffusion-architecture model with random weights (``difftune.tiny``): the run
exercises every part of the product (data generation, the training loop, checkpoints,
validation, export, loading in diffusers, generation) but its images are not meaningful.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def run_demo(out: Path, steps: int | None = None, n: int | None = None) -> dict:
    from .api import train_controlnet
    from .config import ControlNetConfig, from_dict, merge
    from .data import write_fill50k
    from .recipes import controlnet_tiny_demo
    from .tiny import save_tiny_model
    from .validation import image_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_dir = out / "base-tiny-random"
    if not (base_dir / "model_index.json").is_file():
        print(f"[1/4] building the tiny base model (random weights) in {base_dir}")
        save_tiny_model(base_dir, seed=0)
    data_dir = out / "fill50k-64"
    n = n or 2000
    if not (data_dir / "difftune_dataset.json").is_file():
        print(f"[2/4] generating fill50k: {n} circles at 64 px in {data_dir}")
        write_fill50k(data_dir, n=n, resolution=64, seed=0)
    val = json.loads((data_dir / "validation" / "prompts.json").read_text())
    run_dir = out / "controlnet"
    values = merge(controlnet_tiny_demo(), {
        "model": {"pretrained_model_name_or_path": str(base_dir)},
        "data": {"train_data_dir": str(data_dir)},
        "train": {"output_dir": str(run_dir), "resume_from_checkpoint": "latest",
                  **({"max_train_steps": steps} if steps else {})},
        "validation": {
            "validation_image": [str(data_dir / "validation" / v["conditioning_image"]) for v in val],
            "validation_prompt": [v["prompt"] for v in val],
        },
    })
    cfg = from_dict(ControlNetConfig, values)
    print(f"[3/4] training a ControlNet for {cfg.train.max_train_steps} steps in {run_dir} "
          "(interrupt and re-run to resume)")
    summary = train_controlnet(cfg)
    print("[4/4] sampling with the exported ControlNet through diffusers")
    from .api import generate
    from PIL import Image

    rows = []
    for v in val:
        cond_path = data_dir / "validation" / v["conditioning_image"]
        images = generate(str(base_dir), run_dir, cond_path, v["prompt"], num_inference_steps=20, seed=0)
        rows.append([Image.open(cond_path).convert("RGB"), Image.open(data_dir / "validation" / v["image"]), *images])
    grid_path = out / "samples.png"
    image_grid(rows).save(grid_path)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    k = max(1, min(20, len(losses) // 4))
    result = {
        "steps": summary["global_step"],
        "loss_first_steps": round(_mean(losses[:k]), 4),
        "loss_last_steps": round(_mean(losses[-k:]), 4),
        "train_seconds": summary["seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "controlnet": str(run_dir),
        "samples": str(grid_path),
        "base_model": str(base_dir) + " (random weights: images are not meaningful yet)",
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
