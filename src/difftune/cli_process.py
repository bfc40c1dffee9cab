"""What the command-line process sets up around a command: difftune's messages on stderr, secrets out of
the recorded command line, and SIGTERM ended like Ctrl-C (``difftune.cli.main`` uses each)."""

from __future__ import annotations

import logging
import os
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message, not the one it was made with
    (``main`` may be called many times in one process, each with its stderr redirected)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always answers
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """Through tqdm, which clears an open progress bar and redraws it below the message (a warning
        written straight to stderr would land in the middle of the bar's line)."""
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 — logging's own contract: a failed message never ends the run
            self.handleError(record)


def show_messages() -> None:
    """On the command line, difftune's progress messages ("resumed from ...", "encoding ... into the
    cache") go to stderr with its warnings; a library user configures logging as they like."""
    import warnings

    # diffusers passes huggingface_hub an argument it has retired: a notice no user can act on, printed
    # above difftune's own message whenever a hub id is looked up
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated",
                            category=UserWarning)
    logger = logging.getLogger("difftune")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def redact_secrets(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret flags (``--hub_token``) replaced by ``***``.

    Trackers record the command line (Weights & Biases' run metadata, Comet's "command"), so a
    token given as a flag would be saved with the run and uploaded with it.
    """
    from .config import SECRET_FIELDS

    flags = {f"--{name}" for name in SECRET_FIELDS}
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, _ = arg.partition("=")
        if name in flags and eq:
            out[i] = f"{name}=***"
        elif arg in flags and i + 1 < len(out):
            out[i + 1] = "***"
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): ended like Ctrl-C, through the same clean-up."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _default_sigterm_in_child() -> None:
    """A process forked while ``_on_sigterm`` is set (a multiprocessing pool or data-loader worker) gets the
    default back at once: a Python-level handler can be tripped while the worker is about to block in a C
    call (a queue's semaphore), and then the worker never ends, and the parent's ``Pool.terminate`` waits on
    it for ever. With the default, SIGTERM ends it in the kernel."""
    import signal

    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def stop_on_sigterm():
    """SIGTERM raises ``Terminated`` in this process (the main thread), so a stopped run says how to resume
    instead of vanishing; processes forked from it keep the default (``_default_sigterm_in_child``).
    Returns the handler it replaced (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def saved_so_far(output_dir: str | None) -> str:
    """What an interrupted training run leaves to resume from, for the line printed as it stops."""
    from pathlib import Path

    from .checkpoint import list_checkpoints

    if output_dir is None:  # stopped before the run was configured
        return ""
    done = list_checkpoints(Path(output_dir) / "checkpoints")
    if not done:
        return f": no checkpoint was saved yet in {output_dir}, so a rerun starts from the beginning"
    return (f": the newest checkpoint is {done[-1]} (step {done[-1].name.rsplit('-', 1)[1]}); resume from it with "
            "the same command and --resume_from_checkpoint latest")
