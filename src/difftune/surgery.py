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


def checkpoint_conditioning_embedding(controlnet: torch.nn.Module) -> None:
    """Recompute ``controlnet``'s conditioning-image encoder in backward instead of keeping its activations.

    diffusers' gradient checkpointing covers the ControlNet's down and mid blocks, not this
    encoder, which runs at the full image resolution: on SD 1.5 at 512 px, batch 4, its kept
    activations are about 0.28 GiB, held from the ControlNet's forward until backward reaches
    it. Recomputing it costs little (its widest layer has 16 channels). Done by changing the
    module's class to a subclass whose forward is checkpointed, so parameter names, the saved
    weights and copies of the model are unaffected; without gradients (validation,
    generation) it runs as before.
    """
    embedding = controlnet.controlnet_cond_embedding
    if not isinstance(embedding, _CheckpointedEmbedding):
        embedding.__class__ = _checkpointed_class(type(embedding))


class _CheckpointedEmbedding:
    """Mixin: the forward of the class after it in the MRO, checkpointed while training with gradients."""

    def forward(self, conditioning):
        if torch.is_grad_enabled() and self.training:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(super().forward, conditioning, use_reentrant=False)
        return super().forward(conditioning)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedEmbedding, cls), {})
    return _CHECKPOINTED_CLASSES[cls]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
