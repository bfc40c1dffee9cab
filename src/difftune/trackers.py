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
import math
import os
import shutil
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


def tracker_init_kwargs(names: list[str], logging_dir: Path | None, resume_step: int,
                        runs: dict[str, str]) -> dict[str, dict]:
    """What each tracker starts with (accelerate's ``init_kwargs``): its files go with the run's other logs
    (unless WANDB_DIR / COMET_OFFLINE_DIRECTORY say otherwise) and, resuming at ``resume_step``, it continues
    the run that the checkpoint's ``runs`` (tracker name -> run id) name."""
    kwargs: dict[str, dict] = {n: {} for n in names}
    if "tensorboard" in names and resume_step:
        # the killed run's events after the checkpoint are hidden: those steps are trained and logged again
        kwargs["tensorboard"]["purge_step"] = resume_step + 1
    if "wandb" in names:
        if logging_dir is not None and not os.environ.get("WANDB_DIR"):
            kwargs["wandb"]["dir"] = str(logging_dir)
        if runs.get("wandb"):
            kwargs["wandb"].update(id=runs["wandb"], resume="allow")
    if "comet_ml" in names:
        if runs.get("comet_ml"):
            kwargs["comet_ml"].update(experiment_key=runs["comet_ml"], mode="get_or_create")
        if logging_dir is not None and not os.environ.get("COMET_OFFLINE_DIRECTORY"):
            import comet_ml  # (not at the top: an extra)

            folder = Path(logging_dir) / "comet_ml"  # offline archives: not into the current folder
            folder.mkdir(parents=True, exist_ok=True)  # (Comet refuses an offline directory that is not there)
            kwargs["comet_ml"]["experiment_config"] = comet_ml.ExperimentConfig(offline_directory=str(folder))
    return kwargs


class Trackers:
    """Logs to metrics.jsonl plus the accelerate trackers that were initialised."""

    def __init__(self, accelerator: Any, output_dir: Path, names: list[str], project: str, config: dict,
                 logging_dir: Path | None = None, resume_step: int = 0, runs: dict[str, str] | None = None):
        self.accelerator = accelerator
        self.names = names
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if not names:
            return
        try:
            init_kwargs = tracker_init_kwargs(names, logging_dir, resume_step, runs or {})
            if "wandb" in names and "dir" in init_kwargs["wandb"] and accelerator.is_main_process:
                Path(logging_dir).mkdir(parents=True, exist_ok=True)  # (wandb wants it there)
            accelerator.init_trackers(project, config=flat_hparams(config), init_kwargs=init_kwargs)
        except Exception as e:  # a tracker's own failure (no login, no network): one line, before any step
            failed = self._failed(names)
            self._stop_started()
            hint = (f"Its package is installed but does not import: pip install --upgrade "
                    f"{' '.join(repr(_PACKAGES[n][1]) for n in failed)}, or use --report_to none."
                    if isinstance(e, ImportError) else _START_HINT)
            which = f" ({failed[0]})" if len(names) > 1 and len(failed) == 1 else ""
            raise ConfigError(f"--report_to {'+'.join(names)}: the tracker{which} could not start ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). "
                              f"{hint}") from e

    def _failed(self, names: list[str]) -> list[str]:
        """The tracker whose start raised: accelerate makes them all, in order, then starts each in order; the
        first made but not started, else the first not made. All of ``names`` when that cannot be told."""
        made = list(getattr(self.accelerator, "trackers", []))
        for tracker in made:
            try:
                started = getattr(tracker, "tracker", None) is not None
            except Exception:  # noqa: BLE001 — a tracker's own property may raise before its start
                started = False
            if not started and getattr(tracker, "name", None) in names:
                return [tracker.name]
        names_made = {getattr(t, "name", None) for t in made}
        return [n for n in names if n not in names_made][:1] or names

    def _stop_started(self) -> None:
        """Close the trackers that started before one failed (--report_to all), so none runs on half-made."""
        for tracker in list(getattr(self.accelerator, "trackers", [])):
            if getattr(tracker, "tracker", None) is None:  # never started (accelerate's property raises)
                continue
            try:
                tracker.finish()
            except Exception as e:  # the start's error is the one to report
                log.debug("closing tracker %s after a failed start: %s", tracker.name, e)
        self.accelerator.trackers.clear()

    def run_ids(self) -> dict[str, str]:
        """The W&B run id and the Comet experiment key: a checkpoint keeps them, so that a resume continues the run."""
        if not self.accelerator.is_main_process:
            return {}
        ids = {}
        if "wandb" in self.names:
            ids["wandb"] = str(self.accelerator.get_tracker("wandb", unwrap=True).id)
        if "comet_ml" in self.names:
            ids["comet_ml"] = str(self.accelerator.get_tracker("comet_ml", unwrap=True).get_key())
        return ids

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        # strict JSON (a NaN loss skipped under --nan_policy skip is null): JSON has no NaN, and readers
        # other than Python's refuse the NaN and Infinity json.dumps writes by default
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **finite}, allow_nan=False) + "\n")
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


# --overwrite_output_dir: the earlier run's tracker logs wait here until the new run's trackers have started
EARLIER_LOGS = ".earlier-logs"


def logs_inside(out: Path, logging_dir: Path) -> Path | None:
    """``logging_dir`` when it lies inside the output folder ``out`` (not ``out`` itself): tracker logs that
    difftune may move or delete. A --logging_dir elsewhere is the user's and is never touched."""
    return Path(logging_dir) if Path(out).resolve() in Path(logging_dir).resolve().parents else None


def start_trackers(accelerator: Any, out: Path, logging_dir: Path, clear_earlier: bool, **kwargs: Any) -> Trackers:
    """``Trackers(...)`` that leave no trace of a failed start in the output folder: what the trackers wrote
    there goes, and with --overwrite_output_dir (``clear_earlier``) the earlier run's logs, set aside first so
    that the new run's go into an empty folder, come back (``guards.clear_earlier_run`` deletes them otherwise)."""
    logs = logs_inside(out, logging_dir) if accelerator.is_main_process else None
    aside = _set_aside(logs, Path(out) / EARLIER_LOGS) if logs is not None and clear_earlier else None
    before = set(logs.rglob("*")) if logs is not None and logs.is_dir() else None
    try:
        return Trackers(accelerator, out, logging_dir=logging_dir, **kwargs)
    except BaseException:
        if logs is not None:
            _remove_new(logs, before)
            if aside is not None:
                os.replace(aside, logs)
        raise


def _set_aside(logs: Path, target: Path) -> Path | None:
    if not logs.is_dir():
        return None
    if target.exists():  # a killed start's: an earlier run's logs too
        shutil.rmtree(target)
    os.replace(logs, target)
    return target


def _remove_new(logs: Path, before: set[Path] | None) -> None:
    """Remove what appeared under ``logs`` since ``before`` (its contents then; None: it was not there)."""
    if before is None:
        shutil.rmtree(logs, ignore_errors=True)
        return
    new = set(logs.rglob("*")) - before
    for path in sorted(p for p in new if p.parent not in new):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
