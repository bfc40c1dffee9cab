"""Reading all six shapes-world kinds (circle, square, triangle, star, heart, cross) from an image.

``eval.metrics.read_shape`` tells the base shapes apart by fill ratio alone (area / bounding
box). The held-out shapes need a second number: solidity, area / convex-hull area (a disk,
square, triangle and heart are nearly convex, a star ~0.6, a cross ~0.6). A shape is read as
the kind whose rendered reference (fill ratio, solidity) is nearest. References are measured
on shapes drawn by ``data.shapes`` itself at the image's resolution, so the reader agrees with
the renderer by construction.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..data.shapes import ALL_SHAPES, ShapeSample, render_shape, srgb_to_lab
from ..eval.metrics import FOREGROUND_MIN, border_color_lab, delta_e


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + the shoelace formula)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    lower: list[np.ndarray] = []
    upper: list[np.ndarray] = []
    for p in pts:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in pts[::-1]:
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def mask_features(mask: np.ndarray) -> tuple[float, float] | None:
    """(fill ratio, solidity) of a boolean mask; pixels count as unit squares."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    area = float(len(ys))
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # hull of the pixel squares' corners, only boundary pixels matter
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    by, bx = np.nonzero(mask & ~inner) if (mask & ~inner).any() else (ys, xs)
    corners = np.concatenate([np.stack([bx + dx, by + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return area / box, area / max(convex_hull_area(corners), area)


@lru_cache(maxsize=8)
def reference_features(resolution: int) -> dict[str, tuple[float, float]]:
    """Mean (fill ratio, solidity) of each kind, measured on rendered shapes of several sizes."""
    out = {}
    for kind in ALL_SHAPES:
        feats = []
        for frac in (0.15, 0.22, 0.3):
            size = frac * resolution
            s = ShapeSample(kind, resolution / 2, resolution / 2, size, "black", (0, 0, 0), "white", (255, 255, 255))
            im = np.asarray(render_shape(s, resolution))
            feats.append(mask_features(im[..., 0] < 128))
        out[kind] = tuple(float(np.mean([f[i] for f in feats])) for i in range(2))
    return out


def read_any_shape(image: np.ndarray, kinds: tuple[str, ...] = ALL_SHAPES) -> dict:
    """Kind, foreground and background colour (Lab) of an ``[H, W, 3]`` uint8 image."""
    lab = srgb_to_lab(image)
    bg = border_color_lab(lab)
    mask = delta_e(lab, bg) > FOREGROUND_MIN
    feats = mask_features(mask)
    if feats is None:
        return {"kind": None, "foreground_lab": None, "background_lab": bg, "features": None}
    refs = reference_features(image.shape[0])
    kind = min(kinds, key=lambda k: (refs[k][0] - feats[0]) ** 2 + (refs[k][1] - feats[1]) ** 2)
    return {"kind": kind, "foreground_lab": np.median(lab[mask], axis=0), "background_lab": bg, "features": feats}
