"""Generate the class (prior) images a ``--class_data_dir`` lacks, with the base model.

Prior preservation (Kumari et al. 2023, sec. 3.1; Ruiz et al. 2023, DreamBooth eq. 2) needs
images of the class as the base model draws them. Image ``i`` is always generated from seed
``seed + i`` and written atomically as ``class-{i:05d}.png``, so an interrupted generation
resumes where it stopped and gives the same images as an uninterrupted one; images already in
the folder (generated or the user's own) count towards ``num_class_images``; each generated one
records its prompt (a PNG text chunk), so reusing a folder made for another prompt is said.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .concepts import IMAGE_SUFFIXES

log = logging.getLogger("difftune")

CLASS_SEED = 1_000_003


def existing_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []


PROMPT_KEY = "difftune class_prompt"  # a PNG text chunk of each generated class image


def _prompt_info(prompt: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PROMPT_KEY, prompt)
    return info


def _warn_other_prompt(images: list[Path], class_prompt: str, folder: Path) -> None:
    """Class images generated for another prompt are still used (as diffusers does), but said."""
    from PIL import Image

    others: dict[str, int] = {}
    for path in images:
        if path.suffix.lower() != ".png":
            continue
        try:
            with Image.open(path) as image:
                made_for = getattr(image, "text", {}).get(PROMPT_KEY)
        except OSError:
            continue  # an unreadable one is named when it is loaded
        if made_for is not None and made_for != class_prompt:
            others[made_for] = others.get(made_for, 0) + 1
    if others:
        made = ", ".join(f"{n} for {p!r}" for p, n in others.items())
        log.warning("--class_data_dir %s holds class images generated for another prompt (%s); they serve as the "
                    "prior of --class_prompt %r all the same. Give another --class_data_dir to generate its own.",
                    folder, made, class_prompt)


def generation_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """``--prior_generation_precision``: fp16 on a GPU and fp32 on the CPU by default, as diffusers."""
    if precision in (None, ""):
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--prior_generation_precision fp16 needs a GPU; use fp32 or bf16 on the CPU.")
    return dtype


def text2image_pipeline(base: Any):
    """A ``StableDiffusionPipeline`` over the in-memory components with the UniPC sampler."""
    from diffusers import StableDiffusionPipeline

    from ..pipelines import unipc_from

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=unipc_from(base.noise_scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def ensure_class_images(base: Any, class_data_dir: str | Path, class_prompt: str, num_class_images: int,
                        resolution: int, sample_batch_size: int = 4, steps: int = 25, seed: int = 0,
                        precision: str | None = None, device: torch.device | str = "cpu",
                        progress: bool = True) -> list[Path]:
    """Fill ``class_data_dir`` up to ``num_class_images`` images of ``class_prompt``; return the first N."""
    from tqdm.auto import tqdm

    folder = Path(class_data_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--class_data_dir {folder} is a file, not a folder: give the folder that holds (or will "
                          "hold) the class images.")
    folder.mkdir(parents=True, exist_ok=True)
    have = existing_images(folder)
    _warn_other_prompt(have[:num_class_images], class_prompt, folder)
    missing = num_class_images - len(have)
    if missing <= 0:
        return have[:num_class_images]
    device = torch.device(device)
    dtype = generation_dtype(precision, device)
    pipe = text2image_pipeline(base)
    taken = {p.name for p in have}
    # the next indices not yet used by a generated file: resuming continues the same sequence
    indices, i = [], 0
    while len(indices) < missing:
        if f"class-{i:05d}.png" not in taken:
            indices.append(i)
        i += 1
    bar = tqdm(total=missing, desc=f"class images '{class_prompt}'", unit="img", disable=not progress)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for start in range(0, len(indices), sample_batch_size):
        chunk = indices[start : start + sample_batch_size]
        gens = [torch.Generator().manual_seed(seed * CLASS_SEED + j) for j in chunk]
        with autocast:
            images = pipe([class_prompt] * len(chunk), num_inference_steps=steps, guidance_scale=7.5,
                          height=resolution, width=resolution, generator=gens).images
        for j, im in zip(chunk, images):
            final = folder / f"class-{j:05d}.png"
            tmp = folder / f".class-{j:05d}.png.tmp"
            im.save(tmp, format="PNG", pnginfo=_prompt_info(class_prompt))
            os.replace(tmp, final)
        bar.update(len(chunk))
    bar.close()
    return existing_images(folder)[:num_class_images]
