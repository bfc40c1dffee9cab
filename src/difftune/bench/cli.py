"""``difftune bench``: flags -> ``run_bench``; prints the table."""

from __future__ import annotations

import argparse
import shlex

from ..errors import UserError


def _extra_configs(specs: list[str] | None, method: str = "controlnet") -> dict[str, list[str]]:
    """NAME=FLAGS configurations, their flags parsed now as `difftune train METHOD` would: a typo is
    refused before the model and data are built, not recorded as a failed run minutes later."""
    from ..cli import parse_command

    extra = {}
    for spec in specs or []:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--add_config {spec!r}: write NAME='--flag value ...'.")
        extra[name.strip()] = shlex.split(flags)
        try:
            parse_command(["train", method, *extra[name.strip()]])
        except SystemExit:  # argparse has printed what is wrong
            raise UserError(f"--add_config {name.strip()}: {flags!r} are not `difftune train {method}` flags (the "
                            "line above says which one is wrong).") from None
    return extra


def _names(text: str, flag: str = "--configs") -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:  # nothing to run would still rewrite the table, leaving it out of step with bench.json
        from ..errors import ConfigError

        raise ConfigError(f"{flag} {text!r} names no configuration; give e.g. bf16,low_memory or 'all' "
                          "(--list_configs shows them).")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    from .report import format_table
    from .runner import METHODS
    from .suite import run_bench

    extra = _extra_configs(args.add_config, args.method)
    if args.list_configs:
        base = "(batch 2 + 2 class images, fp32)" if args.method == "custom-diffusion" else "(batch 4, fp32)"
        for name, flags in {**METHODS[args.method], **extra}.items():
            print(f"{name:16s} {' '.join(flags) or base}")
        return 0
    if args.estimate_memory:
        from .memory import estimate_suite, format_memory_table
        from .suite import DEFAULT_RESOLUTION, resolve_configs

        if args.method != "controlnet":
            raise UserError("--estimate_memory: ControlNet only (--method controlnet).")
        resolution = args.resolution or DEFAULT_RESOLUTION[args.arch]
        est = estimate_suite(args.arch, resolve_configs(_names(args.configs), extra), args.out, resolution)
        print(format_memory_table(args.arch, resolution, est["batch_size"], est["estimates"]))
        print(f"\nwritten: {args.out}/memory_estimate.json, {args.out}/memory_estimate.md")
        return 0 if all("error" not in r for r in est["estimates"].values()) else 1
    result = run_bench(
        args.arch, _names(args.configs), args.out, steps=args.steps,
        warmup=args.warmup, resolution=args.resolution, n_samples=args.n_samples, model=args.model, data=args.data,
        device=args.device, steptimer=args.steptimer, reference_script=args.reference_script,
        peak_tflops=args.peak_tflops, extra_configs=extra, timeout_s=args.timeout, method=args.method,
        reference_configs=_names(args.reference_configs, "--reference_configs") if args.reference_configs else None,
    )
    print(format_table(result))
    print(f"\nwritten: {args.out}/bench.json, {args.out}/bench.md (logs and run folders in {args.out}/runs)")
    return 0 if all(r["status"] == "ok" for r in result["records"]) else 1


def register(sub) -> None:
    """Add ``difftune bench`` to the top-level sub-parsers."""
    from ..cli_flags import at_least, finite_float, positive_seconds
    from .architectures import ARCHS

    b = sub.add_parser("bench", help="time named training configurations (s/step, images/s, memory, MFU)")
    b.add_argument("--method", choices=("controlnet", "custom-diffusion"), default="controlnet",
                   help="what is trained: ControlNet (fill50k, batch 4) or Custom Diffusion (one concept, "
                        "batch 2 + prior preservation on --n_samples class images)")
    b.add_argument("--arch", choices=ARCHS, default="sd15", help="random-weight model architecture (default: sd15)")
    b.add_argument("--configs", default="bf16", help="comma-separated configuration names, or 'all' (--list_configs)")
    b.add_argument("--add_config", action="append", metavar="NAME=FLAGS",
                   help="an extra configuration: NAME='--flag value ...', or NAME='CONFIG --flag ...' to build on "
                        "a predefined one (repeatable)")
    b.add_argument("--list_configs", action="store_true", help="print the configurations and their flags")
    b.add_argument("--steps", type=at_least(1), default=40, help="optimizer steps per configuration")
    b.add_argument("--warmup", type=at_least(0), default=10, help="steps left out of the median (compile, cache warm-up)")
    b.add_argument("--resolution", type=at_least(8), help="default: 64 tiny, 512 sd15, 1024 sdxl")
    b.add_argument("--n_samples", type=at_least(1), help="fill50k samples to generate (default: 2000 sd15, 500 sdxl); "
                                                  "Custom Diffusion: class images (default 200)")
    b.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, the model, data and runs")
    b.add_argument("--model", help="existing diffusers model folder (default: build a random one in --out)")
    b.add_argument("--data", help="existing fill50k folder (default: generate one in --out)")
    b.add_argument("--device", choices=("cuda", "cpu"), help="where the random model's weights are initialised (default: cuda if any)")
    b.add_argument("--steptimer", help="shared steptimer folder: also time each run from outside, as the reference")
    b.add_argument("--reference_script",
                   help="diffusers' train_controlnet.py (train_controlnet_sdxl.py for an SDXL --arch, run with the "
                        "embedding cast ANCHORS.md used): run it too, with the same flags (needs --steptimer)")
    b.add_argument("--reference_configs", help="which of --configs the reference runs (default: all of them)")
    b.add_argument("--peak_tflops", type=finite_float, help="peak rate for MFU (default: 790 on H100/H200, else no MFU)")
    b.add_argument("--timeout", type=positive_seconds, help="seconds before a configuration's run is stopped")
    b.add_argument("--estimate_memory", action="store_true",
                   help="no training and no GPU: estimate each configuration's peak GPU memory on the CPU (the "
                        "training step on fake tensors, twice: the second holds the optimizer state; live tensor "
                        "bytes by kind; ControlNet only)")
    b.set_defaults(func=cmd_bench)
