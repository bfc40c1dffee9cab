"""Model surgery in small, separately tested functions."""

from __future__ import annotations

import torch


def controlnet_from_unet(unet: torch.nn.Module, conditioning_channels: int = 3):
    """A ControlNet whose encoder is a copy of ``unet``'s and whose output convolutions are zero.

    Zhang & Agrawala 2023 (arXiv 2302.05543), sec. 3.1: the trainable copy starts from the
    base weights, and zero-initialised 1x1 convolutions join it to the frozen UNet, so before
    any training the combined model computes exactly what the UNet alone computes.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)
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
