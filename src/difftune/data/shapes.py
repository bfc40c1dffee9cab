"""The shapes world: one flat shape of a named colour on a background of another.

Captions read "<colour> <shape> with <colour> background" (fill50k is its circle subset).
The bundled tiny base model is trained on ``BASE_SHAPES`` only; ``HELD_OUT_SHAPES`` are
never shown to it, so that Custom Diffusion has genuinely new concepts to learn.

Colours are the CSS named colours; a shape/background pair is only drawn when the two are
clearly different (CIELAB distance >= ``MIN_CONTRAST``), so that every image shows its shape.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from difftune.errors import ConfigError

from .colors import CSS_COLORS

BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_SHAPES = ("star", "heart", "cross")
ALL_SHAPES = BASE_SHAPES + HELD_OUT_SHAPES
MIN_CONTRAST = 30.0  # CIELAB Delta E 1976


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, [..., 3]) to CIELAB (D65), the space where distances match perception."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_LAB = srgb_to_lab(np.array([rgb for _, rgb in CSS_COLORS]))


@dataclass(frozen=True)
class ShapeSample:
    shape: str
    cx: float
    cy: float
    size: float  # circumradius in pixels
    color_name: str
    color: tuple[int, int, int]
    background_name: str
    background: tuple[int, int, int]

    @property
    def prompt(self) -> str:
        return f"{self.color_name} {self.shape} with {self.background_name} background"


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for the circle, which is drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":  # axis-aligned, inscribed in the circle of radius size
        h = size / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up
        return [(cx + size * math.cos(a), cy - size * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "star":  # five points, inner radius 0.45
        pts = []
        for k in range(10):
            r = size if k % 2 == 0 else 0.45 * size
            a = math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy - r * math.sin(a)))
        return pts
    if shape == "cross":  # a plus sign of arm width 0.5 * size
        w, s = 0.25 * size, size
        return [(cx - w, cy - s), (cx + w, cy - s), (cx + w, cy - w), (cx + s, cy - w), (cx + s, cy + w),
                (cx + w, cy + w), (cx + w, cy + s), (cx - w, cy + s), (cx - w, cy + w), (cx - s, cy + w),
                (cx - s, cy - w), (cx - w, cy - w)]
    if shape == "heart":  # parametric heart curve, scaled to the circumradius
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        scale = size / 17.0
        return [(cx + scale * float(a), cy - scale * float(b) - 0.1 * size) for a, b in zip(x, y)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def render_shape(sample: ShapeSample, resolution: int) -> Image.Image:
    image = Image.new("RGB", (resolution, resolution), sample.background)
    draw = ImageDraw.Draw(image)
    poly = shape_polygon(sample.shape, sample.cx, sample.cy, sample.size)
    if poly is None:
        r = sample.size
        draw.ellipse((sample.cx - r, sample.cy - r, sample.cx + r, sample.cy + r), fill=sample.color)
    else:
        draw.polygon(poly, fill=sample.color)
    return image


def size_range(resolution: int) -> tuple[float, float]:
    return resolution * 0.09, resolution * 0.32


def wide_size_range(resolution: int) -> tuple[float, float]:
    """fill50k's geometry: from its smallest radius (``resolution / 25``) to the world's largest size."""
    return resolution / 25, resolution * 0.32


def sample_shapes(count: int, resolution: int, seed: int, shapes: tuple[str, ...] = BASE_SHAPES,
                  wide: bool = False) -> list[ShapeSample]:
    """``count`` random samples: shape, colours (clearly different), size and position.

    By default every shape lies fully in frame and is at least 9% of the image wide. ``wide``
    draws fill50k's geometry instead: sizes down to fill50k's smallest circle and centres
    anywhere in the image, so that shapes may be cut by the border (fill50k's circles are).
    """
    rng = np.random.default_rng(seed)
    lo, hi = wide_size_range(resolution) if wide else size_range(resolution)
    out = []
    while len(out) < count:
        fg, bg = (int(i) for i in rng.integers(len(CSS_COLORS), size=2))
        if np.linalg.norm(_LAB[fg] - _LAB[bg]) < MIN_CONTRAST:
            continue
        shape = shapes[int(rng.integers(len(shapes)))]
        size = float(rng.uniform(lo, hi))
        margin = 0.0 if wide else size
        cx, cy = (float(v) for v in rng.uniform(margin, resolution - margin, size=2))
        out.append(ShapeSample(shape, cx, cy, size, CSS_COLORS[fg][0], CSS_COLORS[fg][1],
                               CSS_COLORS[bg][0], CSS_COLORS[bg][1]))
    return out


def render_batch(samples: list[ShapeSample], resolution: int) -> np.ndarray:
    """uint8 array ``[N, H, W, 3]``."""
    return np.stack([np.asarray(render_shape(s, resolution)) for s in samples])


def write_shapes_folder(out_dir: str | os.PathLike, n: int, resolution: int = 64, seed: int = 0,
                        shapes: tuple[str, ...] | None = None, overwrite: bool = False) -> dict:
    """A plain image folder of the shapes world (``NNNNN.png`` + ``metadata.jsonl`` with ``file_name``, ``text``).

    The same kind of folder a user brings: ``difftune data conditions`` turns it into a
    ControlNet data set (canny edges of shapes for the bundled base model).
    """
    shapes = tuple(shapes or BASE_SHAPES)
    unknown = sorted(set(shapes) - set(ALL_SHAPES))
    if unknown:
        raise ConfigError(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(ALL_SHAPES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n {n!r}: the number of images must be a positive integer")
    from .writing import check_out_dir, fresh_temp_dir, replace_dir

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    tmp = fresh_temp_dir(out)
    try:
        rows = []
        for i, sample in enumerate(sample_shapes(n, resolution, seed, shapes)):
            name = f"{i:05d}.png"
            render_shape(sample, resolution).save(tmp / name)
            rows.append({"file_name": name, "text": sample.prompt})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"n": n, "resolution": resolution, "seed": seed, "shapes": list(shapes), "path": str(out)}
