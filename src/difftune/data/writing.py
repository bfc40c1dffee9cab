"""Writing data sets safely: an output folder check, an atomic swap into place, an ordered parallel map."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from difftune.errors import DataError

J = TypeVar("J")
R = TypeVar("R")


def check_out_dir(out: Path, overwrite: bool, flag: str = "--out", what: str = "the data set",
                  inputs: tuple[str | Path, ...] = (), model_folder_ok: bool = False) -> None:
    """Refuse to write into a file or a non-empty folder unless --overwrite; and even with it, a folder
    that is not this command's to replace: the one the command runs in or one above it, one that holds a
    folder the command reads (``inputs``), a base model (unless ``model_folder_ok``) or a training run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out} is a file, not a folder — choose a folder path for {what}")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise DataError(
            f"{flag} {out} already exists and is not empty — choose another folder, delete it, "
            f"or pass --overwrite to replace it"
        )
    here, target = Path.cwd().resolve(), out.resolve()
    held = next((Path(p) for p in inputs if Path(p).resolve().is_relative_to(target)), None)
    why = ("is the folder this command runs in, or holds it" if here.is_relative_to(target) else
           f"holds {held}, which this command reads" if held is not None else
           "holds a base model (model_index.json)" if (out / "model_index.json").is_file() and not model_folder_ok else
           f"is a part of the base model in {target.parent}" if (target.parent / "model_index.json").is_file() else
           "holds a training run (checkpoints/)" if (out / "checkpoints").is_dir() else None)
    if why:
        raise DataError(f"{flag} {out} {why}: --overwrite replaces the whole folder, so it is not replaced; "
                        f"choose a new folder for {what}")


def replace_dir(tmp: Path, out: Path, overwrite: bool, **check) -> None:
    """Move the finished folder into place; an old one is removed only after the swap. ``check``: the
    ``check_out_dir`` arguments the command checked with before it wrote."""
    check_out_dir(out, overwrite, **check)  # again: something may have appeared while we wrote
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp(out: Path) -> None:
    """Remove the temporary folders of ``out`` that earlier runs killed while writing left beside it
    (``.<name>.tmp-<pid>``, and ``<name>.tmp-<pid>`` as older versions named them), their processes gone:
    a killed run of fill50k at 512 px left gigabytes behind for good. A live process's folder stays."""
    pattern = re.compile(rf"^\.?{re.escape(out.name)}\.tmp-(\d+)$")
    for p in out.parent.iterdir() if out.parent.is_dir() else []:
        m = pattern.match(p.name)
        if m and p.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's, or a platform without signal 0: left alone
        return True
    return True


def fresh_temp_dir(out: Path) -> Path:
    """An empty hidden folder beside ``out`` to write into before ``replace_dir`` moves it into place, the
    leftovers of killed runs removed first (``remove_stale_temp``)."""
    out = Path(out)
    remove_stale_temp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def ordered_map(fn: Callable[[J], R], jobs: list[J], workers: int) -> Iterator[R]:
    """``map(fn, jobs)`` on ``workers`` processes, results in job order (``fn`` must be module-level).

    Close the generator (or let it finish) to stop the pool.
    """
    if workers <= 1 or len(jobs) < 2 * workers:
        yield from map(fn, jobs)
        return
    # fork is cheapest (workers need no imports); elsewhere spawn re-imports the module.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    chunksize = max(1, min(64, len(jobs) // (workers * 8)))
    with mp.get_context(method).Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=chunksize)


def default_workers(workers: int | None) -> int:
    return (os.cpu_count() or 1) if workers is None else max(1, int(workers))

