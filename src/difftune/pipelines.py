"""Sampling pipelines, built from in-memory components (validation) or folders (``generate``).

Both paths build the same diffusers pipeline with the same UniPC scheduler, so an exported
model gives the image that in-memory sampling gave.
"""

from __future__ import annotations

import logging

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .config import CONTROL_GUIDANCE


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


@contextmanager
def controlnet_in_guidance(pipe: Any, mode: str = "both") -> Iterator[None]:
    """How the ControlNet takes part in classifier-free guidance while ``pipe`` samples in this block.

    ``both`` (diffusers' default): its residuals go to the unconditional and the conditional
    prediction alike, so guidance, ``u + g (c - u)``, amplifies the prompt but not the control.
    ``cond``: to the conditional prediction only. The unconditional one is then the base model
    alone, and guidance amplifies the control together with the prompt (what AUTOMATIC1111's
    web UI calls "ControlNet is more important"). Unlike diffusers' ``guess_mode``, which also
    feeds only the conditional half, the residuals keep their trained scale. Without guidance
    (``guidance_scale <= 1``) the two are the same.

    Done by a forward hook on the pipeline's ControlNet, removed when the block ends (the
    module may be the one being trained). diffusers puts the unconditional half of a guided
    batch first; ``tests/test_export_generate.py`` checks that the residuals go with the prompt.
    """
    if mode not in CONTROL_GUIDANCE:
        raise ValueError(f"control guidance {mode!r} is not one of {CONTROL_GUIDANCE}")
    controlnet = getattr(pipe, "controlnet", None)
    if mode == "both" or controlnet is None or controlnet.config.get("global_pool_conditions", False):
        # a globally pooled ControlNet (e.g. shuffle) already runs on the conditional half only
        yield
        return

    def conditional_half_only(module, inputs, output):
        if not pipe.do_classifier_free_guidance:
            return output
        down, mid = output if isinstance(output, tuple) else (output.down_block_res_samples,
                                                              output.mid_block_res_sample)
        half = mid.shape[0] // 2

        def zero_uncond(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(t[:half]), t[half:]])

        down, mid = [zero_uncond(d) for d in down], zero_uncond(mid)
        if isinstance(output, tuple):
            return (down, mid)
        return type(output)(down_block_res_samples=down, mid_block_res_sample=mid)

    handle = controlnet.register_forward_hook(conditional_half_only)
    try:
        yield
    finally:
        handle.remove()


MAX_ASPECT = 4  # a longer side than this many resolutions is warned about


def output_size(condition: Any, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """(height, width) to sample a condition at: its own aspect ratio, the shorter side at ``resolution``,
    both multiples of ``multiple``. A square stretched from a 2:3 condition would put every edge of it
    in the wrong place; diffusers' SD script keeps the condition's whole native size instead, which
    for a photo can be far larger than the model was trained at."""
    size = getattr(condition, "size", None)  # a PIL image; tensors and arrays are used as given
    if size is None or size[0] == size[1]:
        return resolution, resolution
    w, h = size
    scale = resolution / min(w, h)
    if max(w, h) * scale > MAX_ASPECT * resolution:  # a strip (2000x40 at 64: 3200x64) samples slowly; said
        logging.getLogger("difftune").warning(
            "the condition is %dx%d: sampled at its own aspect ratio, %dx%d, which takes as long as %d square "
            "images; crop it for a faster sample", w, h, round(w * scale), round(h * scale),
            round(max(w, h) / min(w, h)))
    return (max(multiple, round(h * scale / multiple) * multiple),
            max(multiple, round(w * scale / multiple) * multiple))


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
    control_guidance: str = "both",
    on_image: Callable[[int, Any], None] | None = None,
    keep: bool = True,
) -> list[list]:
    """For each (prompt, condition) pair, ``num_images`` PIL images, image i from a generator seeded
    ``seed + i`` (``sample_in_chunks``; ``on_image(i, image)`` as each is made, ``keep=False`` to keep
    none); ``control_guidance``: how the ControlNet enters guidance, ``controlnet_in_guidance``. A non-square
    condition is sampled at its own aspect ratio (``output_size``)."""
    out = []
    for prompt, cond in zip(prompts, conditions):
        height, width = output_size(cond, resolution, max(8, getattr(pipe, "vae_scale_factor", 8)))

        def call(n: int, generators: list) -> list:
            with controlnet_in_guidance(pipe, control_guidance):
                return pipe(prompt, image=cond, height=height, width=width, num_inference_steps=steps,
                            guidance_scale=guidance_scale, controlnet_conditioning_scale=controlnet_conditioning_scale,
                            negative_prompt=negative_prompt, num_images_per_prompt=n, generator=generators).images

        out.append(sample_in_chunks(pipe, num_images, seed, call, on_image, keep))
    return out


def sample_in_chunks(pipe: Any, num_images: int, seed: int, call: Callable[[int, list], list],
                     on_image: Callable[[int, Any], None] | None = None, keep: bool = True,
                     chunk: int = 4) -> list:
    """``num_images`` images, ``chunk`` per pipeline call, image i drawn from a generator seeded ``seed + i``:
    an image does not depend on how many are asked for (image 0 is the one image of ``num_images`` 1), and
    many images take the memory of a few and stop at Ctrl-C within one call. ``call(n, generators)``
    samples n images; ``on_image(i, image)`` is called as each is made (the CLI saves it then)."""
    from tqdm.auto import tqdm

    images = []
    several = num_images > chunk  # one bar over the images, instead of one per call
    if several:
        pipe.set_progress_bar_config(disable=True)
    try:
        with tqdm(total=num_images, desc="images", unit="img", disable=not several) as bar:
            for start in range(0, num_images, chunk):
                n = min(chunk, num_images - start)
                made = call(n, [torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(n)])
                for j, image in enumerate(made):
                    if on_image is not None:
                        on_image(start + j, image)
                    if keep:
                        images.append(image)
                bar.update(n)
    finally:
        if several:
            pipe.set_progress_bar_config(disable=False)
    return images
