"""Image analysis for measured quality: colours, shape kinds and condition fidelity.

Everything is simple, documented geometry and colour science, so a number can be checked
by hand:

- colours are compared in CIELAB (Delta E 1976, ``srgb_to_lab``); a colour is "right" when it
  lies within ``COLOR_TOLERANCE`` of the named colour (a just-noticeable difference is ~2.3;
  neighbouring CSS names are often 5-15 apart, so 25 means "the same colour to a person");
- the background colour is the median of a 2-pixel border ring;
- the shape is the set of pixels farther than ``FOREGROUND_MIN`` from that background;
- the shape kind is read from the shape's fill ratio (area / bounding-box area): a disk fills
  pi/4 = 0.785 of its box, an axis-aligned square 1.0, an upright equilateral triangle 0.5;
- condition fidelity for fill50k is the IoU between the generated circle (pixels closer to
  the prompt's circle colour than to its background colour) and the disk the outline gives.

Condition metrics share one small interface (``ConditionMetric``) so that other conditions
(edge F1 for canny, depth error, ...) plug in beside circle IoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..data.shapes import srgb_to_lab

COLOR_TOLERANCE = 25.0
FOREGROUND_MIN = 20.0
FILL_RATIOS = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}


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
    fill_ratio: float | None
    kind: str | None


def read_shape(image: np.ndarray, kinds: tuple[str, ...] = tuple(FILL_RATIOS)) -> ShapeReading:
    """Background colour, shape mask, shape colour and shape kind of an ``[H, W, 3]`` uint8 image."""
    lab = srgb_to_lab(image)
    bg = border_color_lab(lab)
    mask = delta_e(lab, bg) > FOREGROUND_MIN
    if mask.sum() < 4:
        return ShapeReading(bg, None, mask, None, None)
    fg = np.median(lab[mask], axis=0)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    ratio = float(mask.sum() / box)
    kind = min(kinds, key=lambda k: abs(FILL_RATIOS[k] - ratio))
    return ShapeReading(bg, fg, mask, ratio, kind)


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


CONDITION_METRICS: dict[str, type] = {"fill50k": CircleIoU}


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
