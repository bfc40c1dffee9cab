"""Turn a (streamed, already limited) data set into a map-style one on local disk.

The trainer's data order is a seeded permutation and resume skips by index, which needs
random access. With ``--streaming --max_train_samples N`` we stream the first N rows once
into an Arrow file in the output folder (so nothing huge is ever downloaded or held in
memory) and train from that: the same order, resume and skipping as any local data set.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .sources import Table


def _rows(stream: Any):
    yield from stream


def materialize(table: Table, cache_dir: str | Path) -> Table:
    """A non-streaming copy of ``table`` cached under ``cache_dir``; unchanged if not streaming."""
    if not table.streaming:
        return table
    import datasets

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = getattr(table.dataset, "features", None)
    dataset = datasets.Dataset.from_generator(
        _rows, gen_kwargs={"stream": table.dataset}, features=features, cache_dir=str(cache_dir)
    )
    return replace(table, dataset=dataset, description=f"{table.description} (streamed to {cache_dir})")
