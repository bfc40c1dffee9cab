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
    """``StableDiffusionControlNetPipeline`` over a ``BaseModel`` and a ControlNet."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        controlnet=controlnet,
        scheduler=unipc_from(base.noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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
