"""Image transforms of the ControlNet recipe: resize + centre crop, then to tensors.

The target image and the conditioning image go through the *same* geometric transform
(resize the shorter side, centre crop), so a control signal stays aligned with its
target. Only the value range differs: targets are mapped to [-1, 1] because that is what
the VAE encoder was trained on, conditioning images to [0, 1] as in the ControlNet paper
(Zhang & Agrawala 2023) and diffusers. torchvision is not a dependency; PIL does the
resampling (PIL always antialiases, like ``torchvision.transforms.Resize`` on PIL input).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from difftune.errors import ConfigError

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,  # torchvision's name; on PIL images it is PIL's NEAREST too
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def check_resolution(resolution: int) -> None:
    """Reject resolutions the VAE cannot map to whole latent pixels (it downsamples by 8)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ConfigError(f"--resolution {resolution!r} must be a positive whole number of pixels, e.g. 512")
    if resolution % 8 != 0:
        lower, upper = resolution // 8 * 8, (resolution // 8 + 1) * 8
        suggestion = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ConfigError(
            f"--resolution {resolution} is not divisible by 8: the VAE downsamples by 8, so "
            f"use a multiple of 8 such as {suggestion}"
        )


def resize_center_crop(img: Image.Image, resolution: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize the shorter side to ``resolution``, then crop the centre square.

    Sizes follow torchvision's ``Resize(int)`` + ``CenterCrop`` (long side truncated,
    crop offset rounded) so results match the diffusers scripts pixel-for-pixel geometry.
    """
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(
            f"unknown interpolation {interpolation!r}: use one of {', '.join(_INTERPOLATIONS)}"
        )
    width, height = img.size
    if width == resolution and height == resolution:
        return img
    new_size, (top, left) = resize_center_crop_geometry(img.size, resolution)
    if new_size != img.size:
        img = img.resize(new_size, _INTERPOLATIONS[interpolation])
    return img.crop((left, top, left + resolution, top + resolution))


def resize_center_crop_geometry(size: tuple[int, int], resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((width, height) after the resize, (top, left) offset of the centre crop in it)`` for a PIL ``size``.

    The crop offset is what SDXL's micro-conditioning calls ``crop_top_left`` (Podell et al.
    2023, sec. 2.2): the model is told where in the resized image its training crop was.
    """
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    if short != resolution:
        new_long = int(resolution * long / short)
        width, height = (resolution, new_long) if width <= height else (new_long, resolution)
    return (width, height), (int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0)))


def _to_chw_uint8(img: Image.Image) -> torch.Tensor:
    if img.mode != "RGB":
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image to a float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    return _to_chw_uint8(img).float().div_(127.5).sub_(1.0)


def conditioning_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB conditioning image to a float tensor [3, H, W] in [0, 1] (ControlNet's input range)."""
    return _to_chw_uint8(img).float().div_(255.0)


ASPECT_TOLERANCE = 0.01  # relative; below it two centre crops differ by under 1% of the side


def aspects_differ(size_a: tuple[int, int], size_b: tuple[int, int]) -> bool:
    """Whether two (width, height) sizes have aspect ratios so different that their centre crops
    to a square cover different parts of the scene (an image and its condition then misalign)."""
    (w1, h1), (w2, h2) = size_a, size_b
    return abs(w1 / h1 - w2 / h2) / max(w1 / h1, w2 / h2) > ASPECT_TOLERANCE


def misaligned_words(image_size: tuple[int, int], conditioning_size: tuple[int, int]) -> str:
    """How training and ``data check`` both say an image and a condition of other shapes: a warning, since
    the pair still trains (diffusers resizes and crops each on its own, and takes such data)."""
    (w, h), (cw, ch) = image_size, conditioning_size
    return f"the image is {w}x{h} but its conditioning image {cw}x{ch}; cropped to squares they no longer line up"
