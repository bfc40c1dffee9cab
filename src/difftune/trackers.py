"""Experiment trackers behind one narrow interface: ``log_scalars`` and ``log_images``.

``metrics.jsonl`` in the output folder is always written (one JSON object per log call), so
a run can be read back with nothing installed. TensorBoard, Weights & Biases and Comet come
through accelerate's trackers (``--report_to``); the per-tracker image calls live here, not in
the methods.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

log = logging.getLogger("difftune")
_PACKAGES = {
    "tensorboard": ("tensorboard", "difftune[tensorboard]"),
    "wandb": ("wandb", "difftune[wandb]"),
    "comet_ml": ("comet_ml", "difftune[comet_ml]"),
}


_START_HINT = ("W&B: run `wandb login` or set WANDB_API_KEY, or log locally with WANDB_MODE=offline; Comet: set "
               "COMET_API_KEY, or COMET_START_ONLINE=false; or train without one: --report_to none.")


def requested_trackers(report_to: str) -> list[str]:
    """Tracker names for ``--report_to``; a clear error if one is not installed. Cheap (no import): run it
    before the base model loads, so a missing package fails at once."""
    if report_to == "none":
        return []
    names = list(_PACKAGES) if report_to == "all" else [report_to]
    available = [n for n in names if importlib.util.find_spec(_PACKAGES[n][0]) is not None]
    if report_to != "all":
        for n in names:
            if n not in available:
                raise ConfigError(f"--report_to {n}: the '{_PACKAGES[n][0]}' package is not installed; "
                                  f"pip install '{_PACKAGES[n][1]}' or use --report_to none.")
    return available


def say_picked(report_to: str, names: list[str]) -> None:
    """``--report_to all``: one line naming the trackers it found (or that only metrics.jsonl is written)."""
    if report_to != "all":
        return
    missing = [n for n in _PACKAGES if n not in names]
    if not names:
        log.warning("--report_to all: no tracker package is installed (tensorboard, wandb, comet_ml), so nothing is "
                    "logged beyond OUTPUT_DIR/metrics.jsonl; pip install 'difftune[tensorboard]' for one.")
    else:
        log.info("--report_to all: logging to %s%s.", ", ".join(names),
                 f" ({', '.join(missing)} not installed)" if missing else "")


def flat_hparams(config: dict) -> dict:
    """Scalars-only flat view of a nested config (what TensorBoard's hparams accept). Unset settings are left
    out (TensorBoard would record them as the string 'None'); difftune_config.json has every one."""
    out = {}
    for section, values in config.items():
        for key, value in (values.items() if isinstance(values, dict) else [(section, values)]):
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def drop_metrics_after(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the lines of steps up to ``step`` (where a run resumes: the killed run's
    later steps are trained again and logged anew, so a loss curve read from the file has each step once).
    Returns how many lines went. Rewritten through a temporary file, so a kill here loses nothing."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            late = int(json.loads(line).get("step", 0)) > step
        except (ValueError, AttributeError):
            late = True  # a line cut short by the kill
        if late:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class Trackers:
    """Logs to metrics.jsonl plus the accelerate trackers that were initialised."""

    def __init__(self, accelerator: Any, output_dir: Path, names: list[str], project: str, config: dict,
                 logging_dir: Path | None = None):
        self.accelerator = accelerator
        self.names = names
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        init_kwargs = {}
        if "wandb" in names and logging_dir is not None and not os.environ.get("WANDB_DIR"):
            # the run's wandb folder goes with its other logs, not into whatever folder it was started from
            Path(logging_dir).mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"] = {"dir": str(logging_dir)}
        if names:
            try:
                accelerator.init_trackers(project, config=flat_hparams(config), init_kwargs=init_kwargs)
            except Exception as e:  # a tracker's own failure (no login, no network): one line, before any step
                hint = (f"Its package is installed but does not import: pip install --upgrade "
                        f"{' '.join(repr(_PACKAGES[n][1]) for n in names)}, or use --report_to none."
                        if isinstance(e, ImportError) else _START_HINT)
                raise ConfigError(f"--report_to {'+'.join(names)}: the tracker could not start ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). "
                                  f"{hint}") from e

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.names:
            self.accelerator.log(values, step=step)

    def log_images(self, tag: str, images: list, captions: list[str], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        for name in self.names:
            tracker = self.accelerator.get_tracker(name, unwrap=True)
            if name == "tensorboard":
                stack = np.stack([np.asarray(im) for im in images])
                tracker.add_images(tag, stack, step, dataformats="NHWC")
            elif name == "wandb":
                import wandb

                tracker.log({tag: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
            elif name == "comet_ml":
                for j, (im, caption) in enumerate(zip(images, captions)):
                    tracker.log_image(im, name=f"{tag}/{j}", step=step, metadata={"caption": caption})

    def close(self) -> None:
        if self.names:
            self.accelerator.end_training()
