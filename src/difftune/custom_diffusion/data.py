"""Instance/class examples and the paper's rescale augmentation with a loss mask.

The data set only decodes and resizes (deterministic, so it may run in worker processes).
Everything random - the rescale factor, the placement, the caption prefix, flips, class
crops - is drawn in the main process from the training loop's generator, sample by sample
(``draw_augmentation``), so gradient accumulation and resume stay exact.

Augmentation (Kumari et al. 2023, sec. 3.1 "Training details"; diffusers' defaults): with
probability 0.66 the instance image is shrunk to a random size in [R/3, R] and pasted at a
random place on a blank canvas, else enlarged to [1.2R, 1.4R) and randomly cropped. The loss
is masked to the latent cells the image covers, and the caption says what happened: "very
small"/"a far away" below 0.6R, "zoomed in"/"close up" above R.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import read_image_file

SMALL_PREFIXES = ("a far away ", "very small ")
LARGE_PREFIXES = ("zoomed in ", "close up ")
N_UNIFORMS = 9  # random numbers drawn per sample, whatever the flags (keeps streams aligned)
MAX_SCALE = 1.4


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def square_instance(im: Image.Image, size: int, center_crop: bool) -> Image.Image:
    """Instance images become ``size`` squares: squashed like diffusers, or centre-cropped first."""
    if center_crop:
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return im.resize((size, size), Image.Resampling.BICUBIC)


def shorter_side(im: Image.Image, size: int, center_crop: bool) -> Image.Image:
    """Class images: shorter side to ``size`` (bilinear); centre-cropped now, or randomly later."""
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


class CustomDiffusionExamples(torch.utils.data.Dataset):
    """Item i pairs instance image i mod N_inst with class image i mod N_class (as diffusers).

    Instance images are stored at ``ceil(1.4 R)`` px (the largest rescale) so that enlarging
    never up-samples; class images at R on their shorter side.
    """

    def __init__(self, instances: list[tuple[Path, str]], classes: list[tuple[Path, str]] | None,
                 resolution: int, center_crop: bool = False, aug: bool = True):
        self.instances, self.classes = instances, classes or []
        self.resolution, self.center_crop, self.aug = resolution, center_crop, aug
        self.stored = math.ceil(MAX_SCALE * resolution) if aug else resolution

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, i: int) -> dict:
        path, prompt = self.instances[i % len(self.instances)]
        item = {"instance": _to_tensor(square_instance(read_image_file(path, "--instance_data_dir"), self.stored,
                                                       self.center_crop)),
                "instance_prompt": prompt}
        if self.classes:
            cpath, cprompt = self.classes[i % len(self.classes)]
            item["class"] = _to_tensor(shorter_side(read_image_file(cpath, "--class_data_dir"), self.resolution,
                                                    self.center_crop))
            item["class_prompt"] = cprompt
        return item


def collate(items: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([it["instance"] for it in items]),
             "instance_prompts": [it["instance_prompt"] for it in items]}
    if "class" in items[0]:
        batch["class_images"] = [it["class"] for it in items]  # sizes may differ until cropped
        batch["class_prompts"] = [it["class_prompt"] for it in items]
    return batch


def draw_augmentation(generator: torch.Generator) -> torch.Tensor:
    """One sample's augmentation randomness: ``N_UNIFORMS`` numbers in [0, 1)."""
    return torch.rand(N_UNIFORMS, generator=generator, dtype=torch.float64)


def _randint(u: float, lo: int, hi: int) -> int:
    """An integer in [lo, hi) from a uniform number (like ``np.random.randint(lo, hi)``)."""
    return lo + min(int(u * (hi - lo)), hi - lo - 1) if hi > lo else lo


@dataclass
class Augmented:
    pixels: torch.Tensor  # [3, R, R] in [-1, 1]
    mask: torch.Tensor  # [1, R/f, R/f] of 0/1: latent cells the image covers
    prompt: str


def valid_cells(top: int, extent: int, factor: int, cells: int) -> tuple[int, int]:
    """Latent cells [lo, hi) lying fully inside pixels [top, top + extent); never empty.

    diffusers shrinks this range by one more cell on each side, which leaves no cell at all
    for small rescales at low resolution (e.g. 21 px at 64 px), and its loss divides by the
    mask's sum: NaN. Here a tiny image keeps at least the cell holding its centre.
    """
    lo, hi = -(-top // factor), (top + extent) // factor
    if hi <= lo:
        lo = min((top + extent // 2) // factor, cells - 1)
        hi = lo + 1
    return max(lo, 0), min(hi, cells)


def augment_instance(image: torch.Tensor, prompt: str, u: torch.Tensor, resolution: int, factor: int,
                     aug: bool, hflip: bool) -> Augmented:
    """Apply the rescale augmentation to one stored instance image (uint8 ``[3, S, S]``)."""
    R = resolution
    x = image.float().div(127.5).sub(1.0)
    if hflip and u[0] < 0.5:
        x = x.flip(-1)
    scale = R
    if aug:
        scale = _randint(float(u[2]), R // 3, R + 1) if u[1] < 0.66 else _randint(float(u[2]), int(1.2 * R),
                                                                                   int(MAX_SCALE * R))
    if scale != x.shape[-1]:
        x = F.interpolate(x[None], size=(scale, scale), mode="bilinear", antialias=True, align_corners=False)[0]
    cells = R // factor
    mask = torch.zeros(1, cells, cells, device=x.device)  # the batch may be on the accelerator already
    if scale >= R:
        off = scale - R
        top, left = _randint(float(u[3]), 0, off + 1), _randint(float(u[4]), 0, off + 1)
        pixels = x[:, top : top + R, left : left + R]
        mask[:] = 1.0
    else:
        top, left = _randint(float(u[3]), 0, R - scale + 1), _randint(float(u[4]), 0, R - scale + 1)
        pixels = torch.zeros(3, R, R, device=x.device)
        pixels[:, top : top + scale, left : left + scale] = x
        r0, r1 = valid_cells(top, scale, factor, cells)
        c0, c1 = valid_cells(left, scale, factor, cells)
        mask[:, r0:r1, c0:c1] = 1.0
    if scale < 0.6 * R:
        prompt = SMALL_PREFIXES[int(u[5] < 0.5)] + prompt
    elif scale > R:
        prompt = LARGE_PREFIXES[int(u[5] < 0.5)] + prompt
    return Augmented(pixels.clamp(-1, 1), mask, prompt)


def crop_class(image: torch.Tensor, u: torch.Tensor, resolution: int, hflip: bool) -> torch.Tensor:
    """Random ``resolution`` crop (a no-op on a centre-cropped square) and flip of a class image."""
    _, h, w = image.shape
    top, left = _randint(float(u[6]), 0, h - resolution + 1), _randint(float(u[7]), 0, w - resolution + 1)
    x = image[:, top : top + resolution, left : left + resolution].float().div(127.5).sub(1.0)
    return x.flip(-1) if hflip and u[8] < 0.5 else x
