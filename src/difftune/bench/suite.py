"""``run_bench``: model, data, FLOPs, every configuration, then ``bench.json`` and ``bench.md``.

Burn-in then timed steps (nanoGPT's ``bench.py``): each configuration trains ``steps``
optimizer steps and is scored by the median seconds per step after ``warmup`` of them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UserError
from .architectures import ARCHS, build_random_model
from .flops import training_flops_breakdown
from .report import format_table
from .runner import METHODS, BenchPlan, run_config, run_reference

DEFAULT_RESOLUTION = {"tiny": 64, "tiny-sdxl": 64, "sd15": 512, "sdxl": 1024}
DEFAULT_SAMPLES = {"tiny": 256, "tiny-sdxl": 256, "sd15": 2000, "sdxl": 500}  # as the reference's data
DEFAULT_CLASS_IMAGES = 200  # Custom Diffusion: as the reference's measurement (--real_prior, 200 images)
CD_INSTANCE_IMAGES = 5
# dense bf16 matrix rate measured on an H100 (shared/bench/ANCHORS.md); H200 has the same compute
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


def default_peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def source_fingerprint(package_dir: Path) -> str:
    """SHA-256 (first 16 hex digits) of the package's Python sources, names and bytes, sorted by path.

    Identifies the code a benchmark ran even where the git metadata beside it is stale (a copy of
    a working tree taken to another machine keeps an older ``.git``): the same tree hashes the same
    everywhere, so a ``bench.json`` can be matched to a commit by hashing that commit's checkout.
    """
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(package_dir).rglob("*.py")):
        h.update(f.relative_to(package_dir).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit(package_dir: Path) -> str | None:
    """The checkout's short commit, ``+modified`` when the package's files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no", "--", "."):
            commit += "+modified"
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def environment(device: str) -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    import difftune

    package_dir = Path(difftune.__file__).parent
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
        "difftune": difftune.__version__, "difftune_commit": git_commit(package_dir),
        "difftune_source_sha256": source_fingerprint(package_dir),
    }


def resolve_configs(names: list[str], extra: dict[str, list[str]] | None = None,
                    method: str = "controlnet") -> dict[str, list[str]]:
    """Flags of each named configuration ("all": every predefined one); unknown names are an error.

    An extra configuration whose flags start with a predefined name builds on it:
    ``fast_profiled='fast --profile_steps 3'`` is ``fast``'s flags, then ``--profile_steps 3``.
    """
    predefined = METHODS[method]
    extra = {n: predefined[f[0]] + f[1:] if f and f[0] in predefined else f for n, f in (extra or {}).items()}
    known = {**predefined, **extra}
    if names == ["all"]:
        names = list(predefined) + [n for n in extra if n not in predefined]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--configs: unknown {', '.join(unknown)} for {method}; known: {', '.join(known)} "
                        "(or add one with --add_config NAME='--flag ...').")
    return {n: known[n] for n in names}


def write_concept_data(folder: Path, resolution: int, n_class: int, seed: int = 0) -> None:
    """Custom Diffusion inputs: ``instance/`` (one gold star on midnight blue, varied place and size)
    and ``class/`` (``n_class`` stars of random colours), both PNGs at ``resolution``."""
    import numpy as np

    from ..data.shapes import ShapeSample, render_shape, sample_shapes

    tmp = folder.with_name(folder.name + ".partial")
    for sub in ("instance", "class"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(CD_INSTANCE_IMAGES):
        size = float(rng.uniform(0.2, 0.3)) * resolution
        cx, cy = (float(v) for v in rng.uniform(size, resolution - size, size=2))
        sample = ShapeSample("star", cx, cy, size, "gold", (255, 215, 0), "midnightblue", (25, 25, 112))
        render_shape(sample, resolution).save(tmp / "instance" / f"{i:02d}.png")
    for i, sample in enumerate(sample_shapes(n_class, resolution, seed + 1, shapes=("star",))):
        render_shape(sample, resolution).save(tmp / "class" / f"{i:04d}.png")
    tmp.rename(folder)  # a folder that exists is complete


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def prepare_inputs(arch: str, out: Path, resolution: int, n_samples: int, model: str | None, data: str | None,
                   device: str, seed: int = 0, method: str = "controlnet") -> tuple[Path, Path, dict]:
    """The model and data folders (built under ``out`` unless given, reused if already there)."""
    from ..data import write_fill50k

    timings: dict = {}
    model_dir = Path(model) if model else out / f"model-{arch}"
    if not (model_dir / "model_index.json").is_file():
        if model:
            raise UserError(f"--model {model_dir}: no model_index.json there (a diffusers model folder).")
        _log(f"building a random {arch} model in {model_dir} on {device}")
        start = time.perf_counter()
        build_random_model(arch, model_dir, seed=seed, device=device)
        timings["model_build_seconds"] = round(time.perf_counter() - start, 2)
        if device == "cuda":  # the parent keeps no GPU memory while the runs measure theirs
            import torch

            torch.cuda.empty_cache()
    cd = method == "custom-diffusion"
    data_dir = Path(data) if data else out / (f"concept-{resolution}px-{n_samples}" if cd
                                              else f"fill50k-{resolution}px-{n_samples}")
    if not data_dir.is_dir():
        if data:
            raise UserError(f"--data {data_dir} does not exist.")
        start = time.perf_counter()
        if cd:
            _log(f"writing {CD_INSTANCE_IMAGES} instance and {n_samples} class images at {resolution} px to {data_dir}")
            write_concept_data(data_dir, resolution, n_samples, seed)
        else:
            _log(f"writing {n_samples} fill50k samples at {resolution} px to {data_dir}")
            write_fill50k(data_dir, n=n_samples, resolution=resolution, seed=0,
                          workers=min(8, os.cpu_count() or 1), progress=False)
        timings["data_seconds"] = round(time.perf_counter() - start, 2)
    elif cd and not ((data_dir / "instance").is_dir() and (data_dir / "class").is_dir()):
        raise UserError(f"--data {data_dir}: Custom Diffusion needs instance/ and class/ image folders there.")
    return model_dir, data_dir, timings


def run_bench(arch: str, configs: list[str], out: str | os.PathLike, *, steps: int = 40, warmup: int = 10,
              resolution: int | None = None, n_samples: int | None = None, model: str | None = None,
              data: str | None = None, device: str | None = None, steptimer: str | None = None,
              reference_script: str | None = None, peak_tflops: float | None = None,
              extra_configs: dict[str, list[str]] | None = None, timeout_s: float | None = None,
              method: str = "controlnet", reference_configs: list[str] | None = None) -> dict:
    """Benchmark ``configs`` of ``difftune train METHOD`` on ``arch``; writes ``out/bench.json``, ``bench.md``.

    The model and data are built in ``out`` unless given (``model``, ``data``) and reused by a
    later call. Every configuration runs in its own process; the returned dict is ``bench.json``.
    ``reference_configs`` (default: all of ``configs``) are also run with ``reference_script``.
    """
    import torch

    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}.")
    if arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}.")
    if steps < 2 or not 0 <= warmup < steps:
        raise UserError(f"--steps {steps} --warmup {warmup}: need steps >= 2 and 0 <= warmup < steps.")
    if reference_script and method != "controlnet":
        raise UserError("--reference_script: only diffusers' ControlNet scripts are supported (--method controlnet): "
                        "train_controlnet.py, or train_controlnet_sdxl.py for an SDXL --arch.")
    if reference_script and not steptimer:
        raise UserError("--reference_script is timed by the shared steptimer: give --steptimer DIR too.")
    for flag, path in (("--steptimer", steptimer), ("--reference_script", reference_script)):
        if path and not Path(path).exists():
            raise UserError(f"{flag} {path} does not exist.")
    chosen = resolve_configs(configs, extra_configs, method)
    if reference_configs is None:
        reference_configs = list(chosen)
    elif not set(reference_configs) <= set(chosen):
        raise UserError(f"--reference_configs {','.join(reference_configs)}: each must be one of --configs "
                        f"({','.join(chosen)}).")
    train_device = "cuda" if torch.cuda.is_available() else "cpu"  # where accelerate will put the runs
    if device == "cuda" and train_device != "cuda":
        raise UserError("--device cuda: no CUDA device is available here.")
    resolution = resolution or DEFAULT_RESOLUTION[arch]
    n_samples = n_samples or (DEFAULT_CLASS_IMAGES if method == "custom-diffusion" else DEFAULT_SAMPLES[arch])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    model_dir, data_dir, timings = prepare_inputs(arch, out, resolution, n_samples, model, data,
                                                  device or train_device, method=method)
    env = environment(train_device)
    if peak_tflops is None:
        peak_tflops = default_peak_tflops(env["device"])
    try:  # ControlNet's work per image; Custom Diffusion's is not counted (no MFU for it)
        flops = training_flops_breakdown(model_dir, resolution) if method == "controlnet" else {}
    except Exception as e:  # a model the counter cannot build: report without MFU, do not lose the timings
        _log(f"FLOP count failed: {e!r}")
        flops = {}
    plan = BenchPlan(model_dir=model_dir.resolve(), data_dir=data_dir.resolve(), out_dir=out.resolve(),
                     resolution=resolution, method=method, n_class_images=n_samples, steps=steps, warmup=warmup, workers=4 if train_device == "cuda" else 0,
                     steptimer=Path(steptimer).resolve() if steptimer else None, timeout_s=timeout_s)
    result = {
        "environment": env,
        "bench": {"method": method, "arch": arch, "resolution": resolution, "steps": steps, "warmup": warmup,
                  "n_samples": n_samples,
                  "model_dir": str(model_dir), "data_dir": str(data_dir), "peak_tflops": peak_tflops,
                  "flops_per_image": flops.get("total"), "flops_breakdown": flops, **timings},
        "records": [],
    }
    jobs = [(name, flags, None) for name, flags in chosen.items()]
    if reference_script:
        jobs += [(name, chosen[name], Path(reference_script)) for name in reference_configs]
    for name, flags, script in jobs:
        _log(f"{'reference ' if script else ''}{name}: {' '.join(flags) or '(defaults)'}")
        record = run_reference(name, flags, plan, script) if script else run_config(name, flags, plan)
        if record["status"] == "ok" and peak_tflops and flops.get("total") and record.get("images_per_s"):
            record["mfu"] = record["images_per_s"] * flops["total"] / (peak_tflops * 1e12)
        _log(f"{record['config']}: {record['status']}"
             + (f", {record['s_per_step']:.4f} s/step" if record["status"] == "ok" else f" ({record['error']})"))
        result["records"].append(record)
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")  # a killed bench keeps what it had
    (out / "bench.md").write_text(format_table(result) + "\n")
    return result
