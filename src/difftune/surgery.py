"""Model surgery in small, separately tested functions."""

from __future__ import annotations

import torch


CONDITIONING_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' default, for latents 1/8 of the image


def conditioning_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Channels of the conditioning-image encoder for a VAE that shrinks images ``vae_scale_factor`` times.

    The encoder halves the image once per channel step after the first, so it must have
    log2(factor) + 1 entries to land on the latent grid: (16, 32, 96, 256) for SD's factor 8,
    (16, 32, 96) for a factor-4 VAE.
    """
    steps = int(vae_scale_factor).bit_length() - 1
    if vae_scale_factor < 1 or 2**steps != vae_scale_factor or steps >= len(CONDITIONING_EMBEDDING_CHANNELS):
        raise ValueError(f"VAE scale factor {vae_scale_factor} is not 1, 2, 4 or 8; a ControlNet cannot be built for it")
    return CONDITIONING_EMBEDDING_CHANNELS[: steps + 1]


def controlnet_from_unet(unet: torch.nn.Module, conditioning_channels: int = 3, vae_scale_factor: int = 8):
    """A ControlNet whose encoder is a copy of ``unet``'s and whose output convolutions are zero.

    Zhang & Agrawala 2023 (arXiv 2302.05543), sec. 3.1: the trainable copy starts from the
    base weights, and zero-initialised 1x1 convolutions join it to the frozen UNet, so before
    any training the combined model computes exactly what the UNet alone computes.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=conditioning_embedding_channels(vae_scale_factor),
    )
    if controlnet.dtype != torch.float32:  # trainable weights are fp32 masters whatever the base's dtype
        controlnet.to(dtype=torch.float32)
    return controlnet


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
