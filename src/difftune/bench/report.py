"""``bench.md``: the benchmark's records as a Markdown table."""

from __future__ import annotations


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


TITLES = {"controlnet": "ControlNet",
          "custom-diffusion": "Custom Diffusion (one concept, batch 2 + 2 class images)"}
COLUMNS = (  # header, record key, format
    ("s/step", "s_per_step", ".4f"),
    ("images/s", "images_per_s", ".1f"),
    ("peak alloc GiB", "peak_allocated_gib", ".2f"),
    ("peak reserved GiB", "peak_reserved_gib", ".2f"),
    ("set-up peak GiB", "setup_peak_allocated_gib", ".2f"),
    ("warm-up/compile s", "warmup_overhead_s", ".1f"),
    ("cache build s", "cache_build_seconds", ".1f"),
    ("data wait", "data_wait_fraction", ".1%"),
    ("MFU", "mfu", ".1%"),
    ("final loss", "final_loss", ".4f"),
)


def format_table(result: dict) -> str:
    """Title, environment line, one table row per record, and the last stderr line of each failure."""
    b, env, records = result["bench"], result["environment"], result["records"]
    columns = list(COLUMNS)
    if any("steptimer_s_per_step" in r for r in records):
        columns.insert(1, ("steptimer s/step", "steptimer_s_per_step", ".4f"))
    flops = b.get("flops_per_image")
    lines = [
        f"# difftune bench: {TITLES.get(b.get('method', 'controlnet'))}, {b['arch']}, {b['resolution']} px",
        "",
        f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}; difftune {env['difftune']}"
        + (f" ({env['difftune_commit']})" if env.get("difftune_commit") else "")
        + (f", sources {env['difftune_source_sha256']}" if env.get("difftune_source_sha256") else "")
        + f"; {env['date']}.",
        f"{b['steps']} optimizer steps, median s/step after {b['warmup']} warm-up steps; "
        + (f"{flops / 1e12:.3f} TFLOP/image (ControlNet fwd+bwd, UNet fwd + activation bwd)" if flops else "FLOPs n/a")
        + (f"; MFU against {b['peak_tflops']:g} TFLOP/s." if b.get("peak_tflops") else "; no peak rate, no MFU."),
        "",
        "| config | status | " + " | ".join(h for h, _, _ in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    errors = []
    for r in records:
        cells = [_num(r.get(key), fmt) for _, key, fmt in columns] if r["status"] == "ok" else ["–"] * len(columns)
        lines.append(f"| {r['config']} | {r['status']} | " + " | ".join(cells) + " |")
        if r["status"] != "ok":
            errors.append(f"- {r['config']}: {r.get('error')}")
    if errors:
        lines += ["", "Failed:", *errors]
    return "\n".join(lines)
