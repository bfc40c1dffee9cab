"""Turn a (streamed, already limited) data set into a map-style one on local disk.

The trainer's data order is a seeded permutation and resume skips by index, which needs
random access. With ``--streaming --max_train_samples N`` we stream the first N rows once
into an Arrow file in the output folder (so nothing huge is ever downloaded or held in
memory) and train from that: the same order, resume and skipping as any local data set.

The cache is keyed by what defines its rows (``Table.source``: the hub name, config and
split or the local path with its files' sizes and times, the sample count, seed and
shuffle buffer, and the features), not by ``datasets``' own fingerprint of the generator,
which differs between runs: a resumed run reads the rows it streamed before instead of
streaming (downloading) them again, and changed data gets a new folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from .sources import Table, say_fewer_rows

_log = logging.getLogger("difftune")
_FORMAT = 1  # bump when what is written changes, so an old cache is not read as a new one


def _rows(stream: Any) -> Iterator[dict]:
    yield from stream


def folder_signature(root: Path, skip: Path | None = None) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime in ns) of every visible file under ``root`` (or of
    ``root`` itself, a file), sorted: a file added, removed, rewritten or touched changes it.
    Hidden files and folders (.cache, .git) are left out, as loading leaves them out, and so is
    ``skip`` (the run's own output folder, when it lies inside the data folder)."""
    if root.is_file():
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (skip is None or Path(folder, d) != skip)]
        for name in files:
            if not name.startswith("."):
                path = Path(folder, name)
                stat = path.stat()
                entries.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


def stream_cache_key(table: Table, cache_dir: Path) -> str:
    """A key for ``table``'s rows that is the same in every run given the same data and flags."""
    source = dict(table.source or {"description": table.description})
    if "path" in source:
        root, output = Path(source["path"]), cache_dir.resolve().parent
        inside = output != root and root in output.parents
        source["files"] = folder_signature(root, skip=output if inside else None)
    features = getattr(table.dataset, "features", None)
    fields = {"format": _FORMAT, "source": source, "features": repr(features) if features is not None else None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remove_lock_files(cache_dir: Path) -> None:
    """Delete the empty ``*.lock`` files ``datasets`` leaves next to a cache it built or read.

    They are ``filelock`` files, which are never deleted on release; they only matter while a
    process holds one. Call this only when no other process can be using ``cache_dir`` (a
    one-process run): a process of a multi-GPU run may still be waiting on one.
    """
    for lock in cache_dir.rglob("*.lock"):
        try:
            if lock.is_file() and lock.stat().st_size == 0:
                lock.unlink()
        except OSError:  # gone already, or not ours to remove: harmless either way
            pass


def materialize(table: Table, cache_dir: str | Path, single_process: bool = True) -> Table:
    """A non-streaming copy of ``table`` cached under ``cache_dir``; unchanged if not streaming.

    Reused when a run with the same data and flags made it before (``stream_cache_key``).
    Building is ``datasets``' own: written to an ``.incomplete`` folder and renamed, under a
    file lock, so an interrupted build is never read and the processes of a multi-GPU run
    build it once. ``single_process``: no other process uses ``cache_dir``, so the lock files
    can go afterwards.
    """
    if not table.streaming:
        return table
    import datasets

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = stream_cache_key(table, cache_dir)
    features = getattr(table.dataset, "features", None)
    dataset = datasets.Dataset.from_generator(
        _rows, gen_kwargs={"stream": table.dataset}, features=features, cache_dir=str(cache_dir), fingerprint=key
    )
    if single_process:
        remove_lock_files(cache_dir)
    wanted = (table.source or {}).get("max_train_samples")
    if wanted is not None and len(dataset) < wanted:
        say_fewer_rows(wanted, len(dataset))  # the stream ended early, as a short table is said to have
    return replace(table, dataset=dataset, description=f"{table.description} (streamed to {cache_dir})")
