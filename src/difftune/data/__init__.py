"""Data for difftune: fill50k generation, data set loading, checks and training examples.

Names are imported lazily (PEP 562) so that ``import difftune.data`` — e.g. by the CLI
or by fill50k's worker processes — does not pay for torch and ``datasets`` until used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static tools see the real names; at run time they load on first use
    from difftune.data.check import CheckReport, Issue, check_dataset
    from difftune.data.colors import CSS_COLORS, color_rgb
    from difftune.data.columns import resolve_columns
    from difftune.data.dataset import ControlNetExamples, StreamingControlNetExamples, collate_examples
    from difftune.data.fill50k import Circle, render_circle, sample_circles, write_fill50k
    from difftune.data.images import ImageLoadError, load_image
    from difftune.data.sources import Table, load_table, select_samples
    from difftune.data.transforms import check_resolution, conditioning_to_tensor, image_to_tensor, resize_center_crop

_EXPORTS = {
    "CSS_COLORS": "colors",
    "color_rgb": "colors",
    "write_fill50k": "fill50k",
    "sample_circles": "fill50k",
    "render_circle": "fill50k",
    "Circle": "fill50k",
    "load_image": "images",
    "ImageLoadError": "images",
    "resize_center_crop": "transforms",
    "image_to_tensor": "transforms",
    "conditioning_to_tensor": "transforms",
    "check_resolution": "transforms",
    "Table": "sources",
    "load_table": "sources",
    "resolve_columns": "columns",
    "select_samples": "sources",
    "ControlNetExamples": "dataset",
    "StreamingControlNetExamples": "dataset",
    "collate_examples": "dataset",
    "check_dataset": "check",
    "CheckReport": "check",
    "Issue": "check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'difftune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"difftune.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
