"""FLOPs per image of a ControlNet training step, counted by ``torch.utils.flop_counter``.

The necessary work per image is: ControlNet forward + backward (weights and activations),
UNet forward, and UNet backward through activations only (its weights are frozen, so no
weight gradients; autograd also skips the UNet's down blocks, whose outputs need no
gradient). VAE encoding and text encoding are not counted: latents and prompt embeddings can
be cached once per data set. ``vae_encode`` is reported separately, since a run without
``--cache_latents`` pays it every step.

FLOPs depend only on shapes, so by default the modules are built on the ``meta`` device from
the folder's configs: nothing is allocated or computed, and an SD 1.5 count takes about a
second on a laptop. On ``meta`` the attention products are counted as the matmuls they are
(``bmm``); on CUDA, fused attention kernels that the counter does not know would be missed.
``attention`` is reported separately too, because the reference figure in
``shared/bench/ANCHORS.md`` (1.84 TFLOP/image at 512 px for SD 1.5) leaves it out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ATTENTION_OPS = ("bmm", "_scaled_dot_product")  # op names whose FLOPs are attention's products


def _count(fn) -> tuple[float, float]:
    """(all FLOPs, attention FLOPs) of ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in per_op.items() if any(a in str(op) for a in ATTENTION_OPS))
    return float(counter.get_total_flops()), float(attention)


def training_flops_breakdown(model_dir: str | os.PathLike, resolution: int,
                             device: str | torch.device = "meta") -> dict[str, float]:
    """FLOPs per image (batch 1) of the parts of a ControlNet training step on ``model_dir``'s architecture.

    Keys: ``controlnet_forward``, ``unet_forward``, ``backward`` (ControlNet weights and
    activations + UNet activations), ``total`` (their sum), ``attention`` (the attention
    products within ``total``), ``total_without_attention`` (the reference's convention) and
    ``vae_encode`` (not in ``total``). Only ``unet/config.json`` and ``vae/config.json`` are read.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    model_dir = Path(model_dir)
    unet_config = UNet2DConditionModel.load_config(model_dir / "unet")
    vae_config = AutoencoderKL.load_config(model_dir / "vae")
    device = torch.device(device)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    controlnet.requires_grad_(True)

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = resolution // f
    noisy = torch.randn(1, unet.config.in_channels, latent, latent, device=device)
    timesteps = torch.tensor([500], device=device)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    condition = torch.randn(1, 3, resolution, resolution, device=device)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, device=device),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                          dtype=torch.float32, device=device)}

    out: dict = {}

    def controlnet_forward():
        out["residuals"] = controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=condition,
                                      added_cond_kwargs=added, return_dict=False)

    def unet_forward():
        down, mid = out["residuals"]
        out["pred"] = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid,
                           return_dict=False)[0]

    def backward():
        torch.nn.functional.mse_loss(out["pred"].float(), noisy.float()).backward()

    def vae_encode():
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, resolution, resolution, device=device))

    counts = {name: _count(fn) for name, fn in (("controlnet_forward", controlnet_forward),
                                                ("unet_forward", unet_forward), ("backward", backward),
                                                ("vae_encode", vae_encode))}
    parts = ("controlnet_forward", "unet_forward", "backward")
    result = {name: counts[name][0] for name in counts}
    result["total"] = sum(counts[p][0] for p in parts)
    result["attention"] = sum(counts[p][1] for p in parts)
    result["total_without_attention"] = result["total"] - result["attention"]
    return result


def training_flops_per_image(model_dir: str | os.PathLike, resolution: int,
                             device: str | torch.device = "meta") -> float:
    """FLOPs of the necessary work of one ControlNet training image (see ``training_flops_breakdown``)."""
    return training_flops_breakdown(model_dir, resolution, device)["total"]
