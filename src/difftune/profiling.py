"""``--profile_steps N``: where the time of a training step goes, from ``torch.profiler``.

After ``--profile_start`` optimizer steps (past warm-up and compilation) and one more step of
profiler warm-up, N optimizer steps are recorded on the CPU and, on a GPU, the device. Written
to ``OUTPUT_DIR/profile/``:

- ``trace.json``: the Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing);
- ``summary.json`` and ``summary.md``: wall seconds per step, the device's busy time per step
  and its share of the wall time, kernel launches per step, and the operators that take the
  most time (self time, per step).

How to read it: a GPU busy for most of the step is limited by its own work (fewer FLOPs, faster
kernels, lower precision help); a GPU idle for much of it waits on the host: Python and
dispatch overhead of many small kernels, host-device synchronisations, the data loader
(compilation and CUDA graphs, larger batches, fewer syncs help).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("difftune")

TOP_OPS = 15


class StepProfiler:
    """Call ``step()`` once per optimizer step; writes the files when the recorded steps are done.

    ``done_steps``: optimizer steps already done when the loop starts (a resumed run), so that
    ``start`` counts steps of the run, not of this session.
    """

    def __init__(self, out: Path, steps: int, start: int, done_steps: int = 0, enabled: bool = True,
                 device_type: str = "cpu"):
        self.out, self.steps = Path(out), steps
        self.on_cuda = device_type == "cuda"
        self.summary: dict | None = None
        self._prof = None
        if not enabled or steps <= 0:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        self._prof = profile(
            activities=activities,
            schedule=schedule(skip_first=max(0, start - done_steps), wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write,
        )

    def __enter__(self) -> "StepProfiler":
        if self._prof is not None:
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / "trace.json"))
        self.summary = summarise(prof, self.on_cuda)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(format_summary(self.summary) + "\n")
        log.info("profile of %d steps written to %s", self.summary["steps"], self.out)


def summarise(prof, on_device: bool) -> dict:
    """Per-step figures of a finished ``torch.profiler.profile`` whose schedule marked the steps."""
    from torch.autograd import DeviceType

    events = prof.events()
    # host-side step markers only: on a GPU each step also has a device-side annotation of the same name
    steps = [e for e in events if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
    n = max(len(steps), 1)
    wall_ms = sum(e.cpu_time_total for e in steps) / 1000 / n
    # operators (host-side events; on a GPU their self device time is that of the kernels they launched)
    ops = [a for a in prof.key_averages()
           if a.device_type == DeviceType.CPU and not a.key.startswith("ProfilerStep")
           and not getattr(a, "is_user_annotation", False)]
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    top = sorted(ops, key=lambda a: getattr(a, key), reverse=True)[:TOP_OPS]
    summary = {
        "steps": len(steps),
        "device": "cuda" if on_device else "cpu",
        "wall_ms_per_step": round(wall_ms, 3),
        "top_ops": [{"name": a.key, "calls_per_step": round(a.count / n, 1),
                     "self_device_ms_per_step": round(a.self_device_time_total / 1000 / n, 3),
                     "self_cpu_ms_per_step": round(a.self_cpu_time_total / 1000 / n, 3)} for a in top],
    }
    if on_device:
        # device-side events: kernels, copies, sets (as torch's own table totals them)
        device = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy_ms = sum(e.self_device_time_total for e in device) / 1000 / n
        summary["device_busy_ms_per_step"] = round(busy_ms, 3)
        summary["device_busy_fraction"] = round(busy_ms / wall_ms, 3) if wall_ms else None
        summary["kernels_per_step"] = round(len(device) / n, 1)
    else:
        summary["cpu_ops_per_step"] = round(sum(a.count for a in ops) / n, 1)
    return summary


def format_summary(s: dict) -> str:
    on_device = s["device"] == "cuda"
    lines = [f"Profile of {s['steps']} optimizer steps ({s['device']}): {s['wall_ms_per_step']:.1f} ms per step"]
    if on_device:
        lines.append(f"device busy {s['device_busy_ms_per_step']:.1f} ms per step "
                     f"({100 * (s['device_busy_fraction'] or 0):.0f}% of the wall time), "
                     f"{s['kernels_per_step']:.0f} kernels per step")
        lines += ["", "| operator | calls/step | self device ms/step | self CPU ms/step |", "|---|---|---|---|"]
    else:
        lines.append(f"{s['cpu_ops_per_step']:.0f} operator calls per step (nested calls included)")
        lines += ["", "| operator | calls/step | self CPU ms/step |", "|---|---|---|"]
    for op in s["top_ops"]:
        device = f" {op['self_device_ms_per_step']:.3f} |" if on_device else ""
        lines.append(f"| `{op['name']}` | {op['calls_per_step']:g} |{device} {op['self_cpu_ms_per_step']:.3f} |")
    return "\n".join(lines)
