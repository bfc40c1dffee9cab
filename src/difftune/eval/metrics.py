"""Image analysis for measured quality: colours, shape kinds and condition fidelity.

Everything is simple, documented geometry and colour science, so a number can be checked
by hand:

- colours are compared in CIELAB (Delta E 1976, ``srgb_to_lab``); a colour is "right" when it
  lies within ``COLOR_TOLERANCE`` of the named colour (a just-noticeable difference is ~2.3;
  neighbouring CSS names are often 5-15 apart, so 25 means "the same colour to a person");
- the background colour is the median of a 2-pixel border ring;
- the shape is the largest 4-connected region of pixels farther than ``FOREGROUND_MIN`` from
  that background (stray speckles elsewhere are ignored);
- the shape colour is the median of that region's interior (the region less its one-pixel
  rim, where a blurred edge mixes the two colours);
- the shape kind is the kind whose ideal outline, drawn with the region's area at the region's
  centroid, overlaps the region best (IoU) -- a template match that only needs the area and
  centroid, so it stays right on soft or slightly ragged shapes where a bounding box does not;
- condition fidelity for fill50k is the IoU between the generated circle (pixels closer to
  the prompt's circle colour than to its background colour) and the disk the outline gives;
- for edge conditions (canny) it is the edge F1 of the BSDS boundary benchmark (Martin et
  al. 2004), with its tolerance: the same edge detector runs on the generated image; a
  generated edge pixel counts as right (precision) when a condition edge lies within
  ``EDGE_TOLERANCE`` x the image diagonal (at least 1 px), and a condition edge pixel as found
  (recall) when a generated edge lies that close. (BSDS matches pixels one to one; counting
  within the tolerance is the common simpler form, and can only read a little higher.)
- for depth conditions, the same estimator runs on the generated image and its map is compared
  with the condition's (Pearson correlation and mean absolute difference, both maps scaled to
  their maximum).

Condition metrics share one small interface (``ConditionMetric``) so that other conditions
(pose keypoints, segmentation, ...) plug in beside circle IoU, edge F1 and depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from ..data.shapes import BASE_SHAPES, ShapeSample, render_shape, srgb_to_lab

COLOR_TOLERANCE = 25.0
FOREGROUND_MIN = 20.0


def delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIELAB Delta E 1976 between Lab arrays (broadcasting)."""
    return np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), axis=-1)


def border_color_lab(lab: np.ndarray, width: int = 2) -> np.ndarray:
    ring = np.concatenate([lab[:width].reshape(-1, 3), lab[-width:].reshape(-1, 3),
                           lab[:, :width].reshape(-1, 3), lab[:, -width:].reshape(-1, 3)])
    return np.median(ring, axis=0)


@dataclass
class ShapeReading:
    background_lab: np.ndarray
    foreground_lab: np.ndarray | None
    mask: np.ndarray
    kind: str | None
    fit: float | None  # IoU of the region with the best kind's ideal outline


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (an empty mask stays empty)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are all in ``mask`` too."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


@lru_cache(maxsize=None)
def kind_geometry(kind: str) -> tuple[float, float, float]:
    """(area / size**2, centroid offset x / size, y / size) of a kind, measured on a large rendering.

    ``size`` is the circumradius ``data.shapes`` draws with; the offset is from the drawing
    centre to the centroid (zero for symmetric kinds, non-zero for the heart).
    """
    res, size = 512, 200.0
    mask = _render_mask(kind, res / 2, res / 2, size, res)
    ys, xs = np.nonzero(mask)
    return float(len(ys) / size**2), float((xs.mean() - res / 2) / size), float((ys.mean() - res / 2) / size)


def _render_mask(kind: str, cx: float, cy: float, size: float, resolution: int) -> np.ndarray:
    sample = ShapeSample(kind, cx, cy, size, "white", (255, 255, 255), "black", (0, 0, 0))
    return np.asarray(render_shape(sample, resolution))[..., 0] > 127


def fit_kind(mask: np.ndarray, kinds: tuple[str, ...]) -> tuple[str, float]:
    """The kind whose ideal outline, with the mask's area at the mask's centroid, has the highest IoU."""
    ys, xs = np.nonzero(mask)
    area, mx, my = float(len(ys)), float(xs.mean()), float(ys.mean())
    fits = {}
    for kind in kinds:
        k_area, ox, oy = kind_geometry(kind)
        size = float(np.sqrt(area / k_area))
        # pixel i covers [i, i+1) in the renderer's coordinates: its centre is at i + 0.5
        template = _render_mask(kind, mx + 0.5 - ox * size, my + 0.5 - oy * size, size, mask.shape[0])
        fits[kind] = iou(template, mask)
    kind = max(fits, key=fits.get)
    return kind, fits[kind]


def read_shape(image: np.ndarray, kinds: tuple[str, ...] = BASE_SHAPES) -> ShapeReading:
    """Background colour, shape region, shape colour and shape kind of an ``[H, W, 3]`` uint8 image."""
    lab = srgb_to_lab(image)
    bg = border_color_lab(lab)
    mask = largest_component(delta_e(lab, bg) > FOREGROUND_MIN)
    if mask.sum() < 4:
        return ShapeReading(bg, None, mask, None, None)
    core = erode(mask)
    fg = np.median(lab[core if core.sum() >= 4 else mask], axis=0)
    kind, fit = fit_kind(mask, kinds)
    return ShapeReading(bg, fg, mask, kind, fit)


def disk_mask(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels whose centres lie inside the circle (the same convention PIL draws with)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class ConditionMetric(Protocol):
    """Scores one generated image against the condition it was generated from."""

    name: str

    def score(self, image: np.ndarray, target: dict) -> dict[str, float]:
        ...


class CircleIoU:
    """fill50k: IoU of the generated circle with the disk the outline describes, plus colours.

    ``target`` holds ``cx, cy, r`` (at the image's resolution), ``color`` and ``background`` (RGB).
    """

    name = "circle_iou"

    def score(self, image: np.ndarray, target: dict) -> dict[str, float]:
        lab = srgb_to_lab(image)
        fg = srgb_to_lab(np.array(target["color"]))
        bg = srgb_to_lab(np.array(target["background"]))
        predicted = delta_e(lab, fg) < delta_e(lab, bg)
        # PIL fills the pixels of the box [cx-r, cx+r] inclusive: a disk of radius r + 0.5 px
        truth = disk_mask(image.shape[:2], target["cx"], target["cy"], target["r"] + 0.5)
        inside = lab[truth].reshape(-1, 3)
        outside = lab[~truth].reshape(-1, 3)
        fg_err = float(delta_e(np.median(inside, axis=0), fg)) if len(inside) else float("nan")
        bg_err = float(delta_e(np.median(outside, axis=0), bg)) if len(outside) else float("nan")
        return {
            "iou": iou(predicted, truth),
            "circle_color_ok": float(fg_err < COLOR_TOLERANCE),
            "background_color_ok": float(bg_err < COLOR_TOLERANCE),
            "circle_delta_e": fg_err,
            "background_delta_e": bg_err,
        }


EDGE_TOLERANCE = 0.0075  # of the image diagonal: BSDS's maxDist (1 px at 64 px, 5 px at 512 px)


def within(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (Euclidean, pixel centres) of a pixel of ``mask``."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    padded = np.pad(mask, radius)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def edge_f1(predicted: np.ndarray, truth: np.ndarray, tolerance: int) -> dict[str, float]:
    """Precision, recall and F1 of a boolean edge map against another, with a tolerance in pixels."""
    n_pred, n_true = int(predicted.sum()), int(truth.sum())
    if n_pred == 0 and n_true == 0:
        return {"edge_f1": 1.0, "edge_precision": 1.0, "edge_recall": 1.0}
    precision = float((predicted & within(truth, tolerance)).sum() / n_pred) if n_pred else 0.0
    recall = float((truth & within(predicted, tolerance)).sum() / n_true) if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"edge_f1": f1, "edge_precision": precision, "edge_recall": recall}


class EdgeF1:
    """Edge conditions (canny): the edge F1 of the generated image's edges against the condition's.

    ``conditioner`` is the edge detector the data set was made with (``data.conditions``; its
    thresholds come from the data set's ``difftune_dataset.json``); ``target`` holds the
    ``condition`` image (white edges on black).
    """

    name = "edge_f1"

    def __init__(self, conditioner=None) -> None:
        from ..data.conditions import Canny

        self.conditioner = conditioner or Canny()

    def score(self, image: np.ndarray, target: dict) -> dict[str, float]:
        truth = np.asarray(target["condition"].convert("L")) > 127
        predicted = self.conditioner.edges(image)
        tolerance = max(1, round(EDGE_TOLERANCE * float(np.hypot(*truth.shape))))
        return edge_f1(predicted, truth, tolerance)


class DepthFidelity:
    """Depth conditions: the same estimator on the generated image, against the condition's depth map.

    Both maps are scaled to their maximum (as the condition was made); ``depth_corr`` is their
    Pearson correlation over pixels (1: the same layout of near and far, whatever the overall
    scale), ``depth_mae`` the mean absolute difference on that [0, 1] scale.
    """

    name = "depth_corr"

    def __init__(self, conditioner=None) -> None:
        from ..data.conditions import Depth

        self.conditioner = conditioner or Depth()

    def score(self, image: np.ndarray, target: dict) -> dict[str, float]:
        return self._compare(self.conditioner.depth(image), target)

    def score_all(self, images: list[np.ndarray], targets: list[dict], batch: int = 16) -> list[dict[str, float]]:
        """``score`` of each pair, with the estimator run on ``batch`` images at a time."""
        maps = [m for i in range(0, len(images), batch) for m in self.conditioner.depths(list(images[i : i + batch]))]
        return [self._compare(m, t) for m, t in zip(maps, targets)]

    @staticmethod
    def _compare(predicted: np.ndarray, target: dict) -> dict[str, float]:
        truth = np.asarray(target["condition"].convert("L"), dtype=np.float64) / 255.0
        truth = truth / truth.max() if truth.max() > 0 else truth
        predicted = predicted.astype(np.float64)
        a, b = truth - truth.mean(), predicted - predicted.mean()
        denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return {"depth_corr": float((a * b).sum() / denom) if denom > 0 else 0.0,
                "depth_mae": float(np.abs(truth - predicted).mean())}


CONDITION_METRICS: dict[str, type] = {"fill50k": CircleIoU, "canny": EdgeF1, "depth": DepthFidelity}


def score_all(scorer, images: list[np.ndarray], targets: list[dict]) -> list[dict[str, float]]:
    """``scorer.score`` of each (image, target) pair; a model-based scorer runs them in batches."""
    if hasattr(scorer, "score_all"):
        return scorer.score_all(images, targets)
    return [scorer.score(im, t) for im, t in zip(images, targets)]


def shape_scores(image: np.ndarray, shape: str, color: tuple, background: tuple) -> dict[str, float]:
    """Did the base model draw the prompt's shape kind, shape colour and background colour?"""
    reading = read_shape(image)
    bg_err = float(delta_e(reading.background_lab, srgb_to_lab(np.array(background))))
    fg_err = (float(delta_e(reading.foreground_lab, srgb_to_lab(np.array(color))))
              if reading.foreground_lab is not None else float("nan"))  # no shape: counted as wrong
    return {
        "background_ok": float(bg_err < COLOR_TOLERANCE),
        "shape_color_ok": float(fg_err < COLOR_TOLERANCE),
        "shape_kind_ok": float(reading.kind == shape),
        "background_delta_e": bg_err,
        "shape_delta_e": fg_err,
    }
