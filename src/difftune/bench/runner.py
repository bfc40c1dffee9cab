"""Run named training configurations, one subprocess each, and read back what they measured.

Each configuration is a list of ``difftune train controlnet`` (or ``custom-diffusion``) flags
on top of the common ones (ControlNet: batch 4; Custom Diffusion: one concept, batch 2 with
prior preservation, so 2 instance + 2 class images a step; ``--max_train_steps``, no mid-run
checkpoint, no validation, seed 0). A
fresh process per configuration keeps peak memory, the CUDA caching allocator and
``torch.compile``'s caches from leaking between them. A configuration whose flags the CLI
does not know (or that fails in any other way) becomes a record with ``status: error`` and
the tail of its stderr; the benchmark goes on.

What a run is read back from (the trainer's contract): ``metrics.jsonl``, one object per
optimizer step with ``step``, ``loss``, ``step_seconds`` (after a device sync) and
``data_wait_seconds``; ``train_summary.json`` with ``peak_allocated_gib``,
``peak_reserved_gib`` (of the training loop), ``setup_peak_allocated_gib`` (of the set-up before
it, e.g. a latent-cache build), ``setup_seconds``, ``cache_build_seconds``; ``difftune_config.json``
(the resolved batch size and accumulation). Optionally the shared ``steptimer`` times the
same run from outside, the way the diffusers reference was timed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BF16_FAST = ["--mixed_precision", "bf16", "--cache_latents", "--allow_tf32", "--channels_last", "--set_grads_to_none",
             "--cuda_graphs", "auto"]
# optimizer steps inside backward cannot clip by the global norm: the trainer asks for --max_grad_norm 0
LOWMEM = ["--mixed_precision", "bf16", "--cache_latents", "--gradient_checkpointing", "--optimizer_in_backward",
          "--set_grads_to_none", "--max_grad_norm", "0"]

# name -> flags added to the common ones (a later flag overrides an earlier one)
CONFIGS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["--mixed_precision", "bf16"],
    "fp16": ["--mixed_precision", "fp16"],
    "fast": BF16_FAST,  # as --recipe fast
    "fast_eager": BF16_FAST + ["--cuda_graphs", "no"],  # --recipe fast as it was until 2026-11-30: no CUDA graphs
    "fast_compile": BF16_FAST + ["--torch_compile", "blocks"],
    "fast_compile_full": BF16_FAST + ["--torch_compile", "full"],  # 2 models, not 42 block graphs
    "fast_graphs": BF16_FAST + ["--cuda_graphs"],  # graphs or an error (`fast` falls back to eager)
    "lowmem": LOWMEM,
    "lowmem_8bit": LOWMEM + ["--use_8bit_adam"],
    "lowmem_fp8": LOWMEM + ["--use_8bit_adam", "--fp8_frozen_unet"],
    "accum4": ["--train_batch_size", "1", "--gradient_accumulation_steps", "4", "--mixed_precision", "fp16"],
}

# Custom Diffusion, as the reference's measured settings (fp16, batch 2, prior preservation) and ours
CD_CONFIGS: dict[str, list[str]] = {
    "fp16": ["--mixed_precision", "fp16"],
    "bf16": ["--mixed_precision", "bf16"],
    "fast": ["--mixed_precision", "bf16", "--allow_tf32", "--channels_last"],
    "lowmem": ["--mixed_precision", "bf16", "--gradient_checkpointing", "--set_grads_to_none"],
    "lowmem_8bit": ["--mixed_precision", "bf16", "--gradient_checkpointing", "--set_grads_to_none",
                    "--use_8bit_adam"],
}
METHODS = {"controlnet": CONFIGS, "custom-diffusion": CD_CONFIGS}
CD_INSTANCE_PROMPT, CD_CLASS_PROMPT = "<new1> star", "star"

# flags of difftune's that diffusers' train_controlnet.py also has (the rest are dropped for it)
REFERENCE_FLAGS = {"--mixed_precision": 1, "--train_batch_size": 1, "--gradient_accumulation_steps": 1,
                   "--gradient_checkpointing": 0, "--use_8bit_adam": 0, "--set_grads_to_none": 0, "--allow_tf32": 0}
STDERR_TAIL = 3000


@dataclass
class BenchPlan:
    """What every configuration of one benchmark shares."""

    model_dir: Path
    data_dir: Path
    out_dir: Path
    resolution: int
    method: str = "controlnet"
    n_class_images: int = 0  # Custom Diffusion: class images in data_dir/class
    steps: int = 40
    warmup: int = 10
    workers: int = 0
    steptimer: Path | None = None
    timeout_s: float | None = None
    env: dict = field(default_factory=dict)


def common_flags(plan: BenchPlan, output_dir: Path) -> list[str]:
    if plan.method == "custom-diffusion":
        data = ["--instance_data_dir", str(plan.data_dir / "instance"), "--instance_prompt", CD_INSTANCE_PROMPT,
                "--modifier_token", "<new1>", "--with_prior_preservation", "--class_data_dir",
                str(plan.data_dir / "class"), "--class_prompt", CD_CLASS_PROMPT,
                "--num_class_images", str(plan.n_class_images), "--train_batch_size", "2"]
    else:
        data = ["--train_data_dir", str(plan.data_dir), "--train_batch_size", "4"]
    return [
        "--pretrained_model_name_or_path", str(plan.model_dir), *data,
        "--output_dir", str(output_dir), "--resolution", str(plan.resolution),
        "--max_train_steps", str(plan.steps), "--checkpointing_steps", str(plan.steps + 1), "--seed", "0",
        "--learning_rate", "1e-5", "--lr_warmup_steps", "0", "--dataloader_num_workers", str(plan.workers),
        "--report_to", "none",
    ]


def reference_flags(plan: BenchPlan, output_dir: Path, flags: list[str]) -> tuple[list[str], list[str]]:
    """(flags for diffusers' train_controlnet.py, difftune flags it has no equivalent of)."""
    kept, dropped, i = [], [], 0
    while i < len(flags):
        n = REFERENCE_FLAGS.get(flags[i])
        if n is None:
            j = i + 1
            while j < len(flags) and not flags[j].startswith("--"):
                j += 1
            dropped.append(" ".join(flags[i:j]))
            i = j
            continue
        kept += flags[i:i + 1 + n]
        i += 1 + n
    train = plan.data_dir / "train" if (plan.data_dir / "train").is_dir() else plan.data_dir  # parquet only
    common = [
        "--pretrained_model_name_or_path", str(plan.model_dir), "--train_data_dir", str(train),
        "--image_column", "image", "--conditioning_image_column", "conditioning_image", "--caption_column", "text",
        "--output_dir", str(output_dir), "--resolution", str(plan.resolution), "--train_batch_size", "4",
        "--max_train_steps", str(plan.steps), "--checkpointing_steps", str(plan.steps + 1), "--seed", "0",
        "--learning_rate", "1e-5", "--lr_warmup_steps", "0", "--dataloader_num_workers", str(plan.workers),
    ]
    return common + kept, dropped


def _env(plan: BenchPlan, steptimer_out: Path | None) -> dict:
    import difftune

    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", **plan.env)
    paths = [str(Path(difftune.__file__).resolve().parents[1])]  # difftune importable even if not installed
    if steptimer_out is not None:
        paths.insert(0, str(plan.steptimer))
        env.update(STEPTIMER_OUT=str(steptimer_out), STEPTIMER_WARMUP=str(plan.warmup))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _launch(cmd: list[str], plan: BenchPlan, log_stem: Path, steptimer_out: Path | None) -> dict:
    """Run ``cmd``; its stdout/stderr go to ``<log_stem>.stdout.log`` / ``.stderr.log``."""
    start = time.perf_counter()
    with open(f"{log_stem}.stdout.log", "w") as out, open(f"{log_stem}.stderr.log", "w") as err:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, env=_env(plan, steptimer_out),
                                timeout=plan.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    stderr = Path(f"{log_stem}.stderr.log").read_text(errors="replace")
    return {"returncode": rc, "wall_seconds": round(time.perf_counter() - start, 2),
            "stderr_tail": stderr[-STDERR_TAIL:], "command": cmd}


def error_line(stderr: str) -> str:
    """The line of ``stderr`` that says what went wrong (the last that names an error), else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln or "error:" in ln or "Exception" in ln]
    return (named or lines or ["(no stderr)"])[-1]


def read_metrics(output_dir: Path) -> list[dict]:
    """The per-optimizer-step records of ``metrics.jsonl`` (the last one of each step)."""
    path = output_dir / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "step" in rec and "loss" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def step_seconds(records: list[dict], images_per_step: int) -> tuple[list[float], str]:
    """Seconds of each optimizer step and where they came from.

    ``step_seconds`` when the trainer logs it; else derived from the cumulative
    ``images_per_s`` the trainer has always logged (elapsed = images seen / images_per_s;
    the loss's ``.item()`` each step synchronises the device, so it is close to a synced time).
    """
    if records and all("step_seconds" in r for r in records):
        return [float(r["step_seconds"]) for r in records], "step_seconds"
    elapsed = [images_per_step * (i + 1) / float(r["images_per_s"]) for i, r in enumerate(records)
               if r.get("images_per_s")]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)], "images_per_s"


def summarize(records: list[dict], summary: dict, images_per_step: int, warmup: int) -> dict:
    """s/step (median after warm-up), images/s, warm-up overhead, data-wait fraction, memory, loss."""
    seconds, source = step_seconds(records, images_per_step)
    if not seconds:
        return {}
    warm = min(warmup, len(seconds) - 1)  # keep at least one measured step
    measured = seconds[warm:]
    median = statistics.median(measured)
    result = {
        "n_steps": len(seconds),
        "n_measured": len(measured),
        "s_per_step": median,
        "images_per_step": images_per_step,
        "images_per_s": images_per_step / median if median > 0 else None,
        "warmup_overhead_s": sum(seconds[:warm]) - warm * median,
        "first_step_s": seconds[0],
        "timing_source": source,
        "final_loss": summary.get("final_loss", records[-1]["loss"]),
    }
    waits = [r.get("data_wait_seconds") for r in records[warm:]]
    if waits and all(w is not None for w in waits):
        result["data_wait_fraction"] = sum(waits) / sum(measured)
    for key in ("peak_allocated_gib", "peak_reserved_gib", "setup_peak_allocated_gib", "setup_seconds",
                "cache_build_seconds"):
        result[key] = summary.get(key)
    return result


def _images_per_step(output_dir: Path, flags: list[str]) -> int:
    """Batch x accumulation (x 2 with prior preservation: a class image beside each instance image),
    from the run's resolved config (or the flags if it never got that far)."""
    try:
        config = json.loads((output_dir / "difftune_config.json").read_text())
        train = config["train"]
        prior = 2 if config.get("data", {}).get("with_prior_preservation") else 1
        return int(train["train_batch_size"]) * int(train["gradient_accumulation_steps"]) * prior
    except (OSError, ValueError, KeyError):
        names = ("--train_batch_size", "--gradient_accumulation_steps")
        last = {f: int(v) for f, v in zip(flags, flags[1:]) if f in names}
        prior = 2 if "--with_prior_preservation" in flags else 1
        return last.get("--train_batch_size", 4) * last.get("--gradient_accumulation_steps", 1) * prior


def _steptimer_result(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    st = json.loads(path.read_text())
    gib = 2 ** 30
    return {"steptimer_s_per_step": st.get("median_s_per_step"), "steptimer_n_steps": st.get("n_steps"),
            "steptimer_peak_allocated_gib": (st.get("max_memory_allocated") or 0) / gib or None,
            "steptimer_peak_reserved_gib": (st.get("max_memory_reserved") or 0) / gib or None}


def run_config(name: str, flags: list[str], plan: BenchPlan) -> dict:
    """Train one configuration in a subprocess; its record for ``bench.json``."""
    runs = plan.out_dir / "runs"
    output_dir = runs / name
    shutil.rmtree(output_dir, ignore_errors=True)  # stale metrics.jsonl lines or checkpoints would be read back
    runs.mkdir(parents=True, exist_ok=True)
    all_flags = common_flags(plan, output_dir) + list(flags)
    # --optimizer_in_backward steps one optimizer per parameter: the steptimer would synchronise the
    # device after each of them (hundreds a step), slowing the very run it times; it stays out
    in_backward = "--optimizer_in_backward" in all_flags
    steptimer_out = runs / f"{name}.steptimer.json" if plan.steptimer and not in_backward else None
    if steptimer_out is not None:
        steptimer_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "difftune", "train", plan.method, *all_flags]
    proc = _launch(cmd, plan, runs / name, steptimer_out)
    record = {"config": name, "flags": list(flags), "wall_seconds": proc["wall_seconds"], "output_dir": str(output_dir)}
    if plan.steptimer and in_backward:
        record["steptimer_note"] = "not attached: --optimizer_in_backward (one optimizer step per parameter)"
    summary_path = output_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    measured = summarize(read_metrics(output_dir), summary, _images_per_step(output_dir, all_flags), plan.warmup)
    if proc["returncode"] != 0 or not measured:
        why = "timed out" if proc["returncode"] is None else f"exit code {proc['returncode']}"
        return {**record, "status": "error", "error": f"{why}: {error_line(proc['stderr_tail'])}",
                "stderr_tail": proc["stderr_tail"]}
    st = _steptimer_result(steptimer_out)
    if st and st["steptimer_n_steps"] != measured["n_steps"]:
        st["steptimer_note"] = (f"the steptimer saw {st['steptimer_n_steps']} optimizer steps in "
                                f"{measured['n_steps']} training steps: its median is not seconds per step")
        st["steptimer_s_per_step"] = None
    return {**record, "status": "ok", **measured, **st}


def is_sdxl_model(model_dir: Path) -> bool:
    """Whether a diffusers model folder holds an SDXL pipeline (by its model_index.json)."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return "XL" in str(index.get("_class_name", ""))


def run_reference(name: str, flags: list[str], plan: BenchPlan, script: Path) -> dict:
    """diffusers' ``train_controlnet.py`` (``train_controlnet_sdxl.py`` on an SDXL model, run through
    ``reference_fix``, as ANCHORS.md measured it) with the matching flags, timed by the steptimer."""
    runs = plan.out_dir / "runs"
    output_dir = runs / f"reference-{name}"
    shutil.rmtree(output_dir, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    ref_flags, dropped = reference_flags(plan, output_dir, list(flags))
    steptimer_out = runs / f"reference-{name}.steptimer.json"
    steptimer_out.unlink(missing_ok=True)
    fix = is_sdxl_model(plan.model_dir)  # its half-precision UNet gets float32 embeddings: cast them
    runner = [sys.executable, "-m", "difftune.bench.reference_fix"] if fix else [sys.executable]
    proc = _launch([*runner, str(script), *ref_flags], plan, runs / f"reference-{name}", steptimer_out)
    record = {"config": f"reference:{name}", "flags": ref_flags[ref_flags.index("--dataloader_num_workers") + 2:],
              "dropped_flags": dropped, "wall_seconds": proc["wall_seconds"], "output_dir": str(output_dir),
              **({"outside_fix": "prompt embeddings cast to the UNet's dtype (difftune.bench.reference_fix)"}
                 if fix else {})}
    st = _steptimer_result(steptimer_out)
    if proc["returncode"] != 0 or not st.get("steptimer_s_per_step"):
        why = "timed out" if proc["returncode"] is None else f"exit code {proc['returncode']}"
        return {**record, "status": "error", "error": f"{why}: {error_line(proc['stderr_tail'])}",
                "stderr_tail": proc["stderr_tail"]}
    images = _images_per_step(output_dir, ref_flags)
    s = st["steptimer_s_per_step"]
    return {**record, "status": "ok", "s_per_step": s, "images_per_step": images, "images_per_s": images / s,
            "peak_allocated_gib": st["steptimer_peak_allocated_gib"],
            "peak_reserved_gib": st["steptimer_peak_reserved_gib"], "timing_source": "steptimer", **st}
