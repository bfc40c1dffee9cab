"""The main job on the embedded default: data -> ControlNet -> measured control, offline on a CPU.

1. generate fill50k at the base model's 64 px;
2. train a ControlNet on the bundled tiny-shapes base (checkpoints, validation grids);
3. evaluate it on held-out circle outlines: circle IoU with the ControlNet (sampled with it on
   both halves of classifier-free guidance, diffusers' default, and on the conditional half
   only, ``--control_guidance cond``) and, as the baseline, with the base model alone (which
   cannot know where the circle should be);
4. write a sample grid and print where everything is.
Re-running resumes an interrupted training and reuses the generated data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_SAMPLES = 5000


def run_demo(out: Path, steps: int | None = None, n: int | None = None, eval_n: int = 200) -> dict:
    from .api import train_controlnet
    from .config import ControlNetConfig, from_dict, merge
    from .data import write_fill50k
    from .eval.run import eval_controlnet, format_table
    from .recipes import controlnet_tiny_demo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_dir = out / "fill50k-64"
    if not (data_dir / "difftune_dataset.json").is_file():
        print(f"[1/3] generating fill50k: {n or DEMO_SAMPLES} circles at 64 px in {data_dir}")
        write_fill50k(data_dir, n=n or DEMO_SAMPLES, resolution=64, seed=0)
    else:
        made = json.loads((data_dir / "difftune_dataset.json").read_text()).get("n")
        print(f"[1/3] reusing {data_dir} ({made} circles" + (f"; --n {n} is not applied to data made before: "
              "use a new --out for it)" if n and n != made else ")"))
    val = json.loads((data_dir / "validation" / "prompts.json").read_text())
    run_dir = out / "controlnet"
    values = merge(controlnet_tiny_demo(), {
        "data": {"train_data_dir": str(data_dir)},
        "train": {"output_dir": str(run_dir), "resume_from_checkpoint": "latest",
                  **({"max_train_steps": steps} if steps else {})},
        "validation": {
            "validation_image": [str(data_dir / "validation" / v["conditioning_image"]) for v in val],
            "validation_prompt": [v["prompt"] for v in val],
        },
    })
    cfg = from_dict(ControlNetConfig, values)
    print(f"[2/3] training a ControlNet on the bundled '{cfg.model.pretrained_model_name_or_path}' base for "
          f"{cfg.train.max_train_steps} steps in {run_dir} (interrupt and re-run to resume)")
    summary = train_controlnet(cfg)
    print(f"[3/3] evaluating on {eval_n} held-out circle outlines (ControlNet vs the base model alone)")
    result = eval_controlnet(cfg.model.pretrained_model_name_or_path, run_dir, n=eval_n, out=out,
                             control_guidance=("both", "cond"))
    print(format_table(result))
    report = {
        "circle_iou_controlnet": round(result["controlnet"]["iou"], 3),
        "circle_iou_controlnet_cond": round(result["controlnet_cond"]["iou"], 3),
        "circle_iou_base_alone": round(result["base_alone"]["iou"], 3),
        "circle_iou_vae_ceiling": round(result["vae_ceiling"]["iou"], 3),
        "circle_color_ok_controlnet": round(result["controlnet"]["circle_color_ok"], 3),
        "steps": summary["global_step"],
        "train_seconds": summary["seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "controlnet": str(run_dir),
        "eval_grid (condition | ControlNet | ControlNet, cond only | base alone)": str(out / "eval_controlnet.png"),
        "validation_grids": str(run_dir / "validation"),
    }
    (out / "demo_result.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report
