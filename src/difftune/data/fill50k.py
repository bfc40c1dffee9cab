"""Generate the fill50k data set: filled circles whose outline is the control signal.

fill50k is the toy task of the ControlNet paper's tutorial: from the outline of a circle
(white on black) and a prompt "<colour> circle with <colour> background", generate the
filled circle on that background. It is synthetic, so instead of downloading it we draw
it, at any size, offline, and keep each circle's parameters for evaluation (circle IoU).

Determinism: every sample's parameters are drawn up front, in the main process, from one
``numpy.random.default_rng(seed)``; workers only render. So the output is the same for a
seed whatever ``workers`` is.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from difftune.data.colors import CSS_COLORS
from difftune.data.writing import check_out_dir, default_workers, fresh_temp_dir, ordered_map, replace_dir
from difftune.errors import ConfigError

N_VALIDATION = 4
SHARD_ROWS = 2000
ROW_GROUP_ROWS = 100  # small row groups keep streaming reads of image columns cheap


@dataclass(frozen=True)
class Circle:
    """One fill50k sample: a circle of ``color`` centred at (cx, cy) on ``background``."""

    cx: int
    cy: int
    r: int
    color_name: str
    color: tuple[int, int, int]
    background_name: str
    background: tuple[int, int, int]

    @property
    def prompt(self) -> str:
        return f"{self.color_name} circle with {self.background_name} background"


def outline_width(resolution: int) -> int:
    """Outline thickness: ~3 px at 512 like the original, never thinner than 1 px."""
    return max(1, round(resolution / 170))


def radius_range(resolution: int) -> tuple[int, int]:
    """Inclusive radius range, ~resolution/25 .. 0.3*resolution (at least 2 px so an outline shows)."""
    low = max(2, round(resolution / 25))
    return low, max(low, int(0.3 * resolution))


def sample_circles(count: int, resolution: int, seed: int) -> list[Circle]:
    """Draw ``count`` circles' parameters from ``default_rng(seed)``, in sample order."""
    rng = np.random.default_rng(seed)
    rgbs = np.array([rgb for _, rgb in CSS_COLORS])
    color = rng.integers(0, len(CSS_COLORS), count)
    background = rng.integers(0, len(CSS_COLORS), count)
    # Redraw backgrounds with the circle's RGB (aqua/cyan are one colour) until none clash.
    clash = np.all(rgbs[color] == rgbs[background], axis=1)
    while clash.any():
        background[clash] = rng.integers(0, len(CSS_COLORS), int(clash.sum()))
        clash = np.all(rgbs[color] == rgbs[background], axis=1)
    cx = rng.integers(0, resolution, count)
    cy = rng.integers(0, resolution, count)
    r_low, r_high = radius_range(resolution)
    r = rng.integers(r_low, r_high + 1, count)
    return [
        Circle(
            cx=int(cx[i]), cy=int(cy[i]), r=int(r[i]),
            color_name=CSS_COLORS[color[i]][0], color=CSS_COLORS[color[i]][1],
            background_name=CSS_COLORS[background[i]][0], background=CSS_COLORS[background[i]][1],
        )
        for i in range(count)
    ]


def render_circle(circle: Circle, resolution: int) -> tuple[Image.Image, Image.Image]:
    """The target (filled circle on background) and the conditioning image (outline)."""
    image = Image.new("RGB", (resolution, resolution), circle.background)
    cx, cy, r = circle.cx, circle.cy, circle.r
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=circle.color)
    # PIL draws an outline inwards from the box; widen the box by half the width so the
    # line is centred on the circle's edge.
    width = outline_width(resolution)
    outer = r + width // 2
    conditioning = Image.new("RGB", (resolution, resolution), (0, 0, 0))
    ImageDraw.Draw(conditioning).ellipse(
        (cx - outer, cy - outer, cx + outer, cy + outer), outline=(255, 255, 255), width=width
    )
    return image, conditioning


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _render_png(job: tuple[Circle, int]) -> tuple[bytes, bytes]:
    image, conditioning = render_circle(*job)
    return _png(image), _png(conditioning)


def _features():
    import datasets  # deferred: importing datasets costs ~1 s and workers never need it

    return datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "text": datasets.Value("string"),
            "circle_cx": datasets.Value("int32"),
            "circle_cy": datasets.Value("int32"),
            "circle_r": datasets.Value("int32"),
            "circle_color": datasets.List(datasets.Value("uint8"), length=3),
            "circle_background": datasets.List(datasets.Value("uint8"), length=3),
        }
    )


def _write_shard(path: Path, rows: list[tuple[Circle, bytes, bytes]], features) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "image": [{"bytes": image, "path": None} for _, image, _ in rows],
        "conditioning_image": [{"bytes": cond, "path": None} for _, _, cond in rows],
        "text": [c.prompt for c, _, _ in rows],
        "circle_cx": [c.cx for c, _, _ in rows],
        "circle_cy": [c.cy for c, _, _ in rows],
        "circle_r": [c.r for c, _, _ in rows],
        "circle_color": [list(c.color) for c, _, _ in rows],
        "circle_background": [list(c.background) for c, _, _ in rows],
    }
    # features.arrow_schema carries the "huggingface" metadata, so `datasets` reads the
    # image columns back as Image() features rather than plain structs.
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


def _rendered(circles: list[Circle], resolution: int, workers: int) -> Iterator[tuple[bytes, bytes]]:
    return ordered_map(_render_png, [(c, resolution) for c in circles], workers)


def write_fill50k(
    out_dir: str | os.PathLike,
    n: int = 50000,
    resolution: int = 512,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    n_validation: int = N_VALIDATION,
    shard_rows: int = SHARD_ROWS,
) -> dict:
    """Write fill50k (``n`` training rows + ``n_validation`` held-out samples) to ``out_dir``.

    Everything is written to ``.<out_dir>.tmp-<pid>`` and renamed into place at the end,
    so a killed run never leaves a folder that looks complete. Returns a summary dict
    (n, resolution, seed, seconds, path).
    """
    from tqdm.auto import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"-n {n!r}: the number of fill50k samples must be a positive integer")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ConfigError(f"--resolution {resolution!r}: fill50k needs at least 8 px, e.g. 512")
    if n_validation < 0 or shard_rows < 1:
        raise ConfigError("n_validation must be >= 0 and shard_rows >= 1")
    workers = default_workers(workers)
    out = Path(out_dir).expanduser().absolute()
    check_out_dir(out, overwrite)

    start = time.perf_counter()
    circles = sample_circles(n + n_validation, resolution, seed)
    tmp = fresh_temp_dir(out)
    (tmp / "train").mkdir()
    (tmp / "validation").mkdir()
    features = _features()
    n_shards = math.ceil(n / shard_rows)
    rendered = None
    try:
        # The pool is created before the progress bar so no tqdm thread exists at fork time.
        rendered = _rendered(circles, resolution, workers)
        shard: list[tuple[Circle, bytes, bytes]] = []
        prompts = []
        bar = tqdm(total=len(circles), desc="fill50k", unit="img", disable=not progress)
        for i, (circle, (image, conditioning)) in enumerate(zip(circles, rendered)):
            bar.update(1)
            if i < n:
                shard.append((circle, image, conditioning))
                if len(shard) == shard_rows or i == n - 1:
                    name = f"train-{i // shard_rows:05d}-of-{n_shards:05d}.parquet"
                    _write_shard(tmp / "train" / name, shard, features)
                    shard = []
                continue
            k = i - n
            (tmp / "validation" / f"conditioning_{k}.png").write_bytes(conditioning)
            (tmp / "validation" / f"image_{k}.png").write_bytes(image)
            prompts.append(
                {
                    "conditioning_image": f"conditioning_{k}.png",
                    "image": f"image_{k}.png",
                    "prompt": circle.prompt,
                    "circle": {
                        "cx": circle.cx, "cy": circle.cy, "r": circle.r,
                        "color": list(circle.color), "background": list(circle.background),
                    },
                }
            )
        bar.close()
        rendered.close()
        (tmp / "validation" / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
        seconds = round(time.perf_counter() - start, 3)
        info = {"kind": "fill50k", "n": n, "resolution": resolution, "seed": seed, "seconds": seconds,
                "n_validation": n_validation, "shards": n_shards}
        (tmp / "difftune_dataset.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(info))
        replace_dir(tmp, out, overwrite)
    except BaseException:
        if rendered is not None:
            rendered.close()  # stops the worker pool now, not whenever the generator is collected
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"n": n, "resolution": resolution, "seed": seed, "seconds": seconds, "path": str(out)}


def _card(info: dict) -> str:
    """A data set card whose YAML tells ``datasets.load_dataset(OUT)`` (what the diffusers
    script calls on ``--train_data_dir``) to read only ``train/*.parquet``: without it, the
    PNGs in ``validation/`` make it fail ("Couldn't infer the same data file format")."""
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: train/*.parquet\n---\n\n"
        f"# fill50k ({info['n']} samples, {info['resolution']} px, seed {info['seed']})\n\n"
        "Generated by `difftune data fill50k`. Each row: `image` (a filled circle of a CSS colour on a\n"
        "background of another), `conditioning_image` (the circle's outline, white on black), `text`\n"
        "(\"<colour> circle with <colour> background\"), and the circle's parameters (`circle_*`).\n"
        f"`validation/` holds {info['n_validation']} held-out samples (not in `train/`) with `prompts.json`.\n"
    )
