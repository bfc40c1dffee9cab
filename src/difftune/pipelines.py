"""Sampling pipelines, built from in-memory components (validation) or folders (``generate``).

Both paths build the same diffusers pipeline with the same UniPC scheduler, so an exported
model gives the image that in-memory sampling gave.
"""

from __future__ import annotations

from typing import Any

import torch


def unipc_from(noise_scheduler: Any):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(noise_scheduler.config)


def controlnet_pipeline(base: Any, controlnet: torch.nn.Module):
    """The base family's ControlNet pipeline (``StableDiffusionControlNetPipeline`` or
    ``StableDiffusionXLControlNetPipeline``) over a ``BaseModel`` and a ControlNet."""
    from .families import family_of

    pipe = family_of(base).controlnet_pipeline(base, controlnet, unipc_from(base.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text2image_pipeline(base: Any):
    """The base family's text-to-image pipeline (no ControlNet), with the same UniPC scheduler."""
    from .families import family_of

    pipe = family_of(base).text2image_pipeline(base, unipc_from(base.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_controlnet_pipeline(
    pipe: Any,
    prompts: list[str],
    conditions: list,
    num_images: int,
    seed: int,
    steps: int,
    resolution: int,
    guidance_scale: float = 7.5,
    controlnet_conditioning_scale: float = 1.0,
    negative_prompt: str | None = None,
) -> list[list]:
    """For each (prompt, condition) pair, ``num_images`` PIL images from a generator seeded ``seed``."""
    out = []
    for prompt, cond in zip(prompts, conditions):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        result = pipe(
            prompt,
            image=cond,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images,
            generator=generator,
        )
        out.append(list(result.images))
    return out
