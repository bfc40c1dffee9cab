"""Random-weight models of the real published architectures, built from configs (no download).

Speed and memory of a training step depend on the architecture, not on the weight values,
so a benchmark needs the shapes of SD 1.5 / SDXL base, not their checkpoints. The configs
below are those of ``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``
(UNet 859.5M / 2567.5M parameters). The tokenizer is difftune's word-level CLIP tokenizer
(``difftune.tiny``): it tokenizes fill50k captions, and a 77-token sequence costs the text
encoder the same whatever the words are.

The folder is saved with the diffusers pipeline's ``save_pretrained`` (safetensors, fp32), so
``difftune train controlnet --pretrained_model_name_or_path DIR`` loads it like a real model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tiny import SD_SCHEDULER, default_words, write_tokenizer

if TYPE_CHECKING:
    import torch

ARCHS = ("tiny", "tiny-sdxl", "sd15", "sdxl")

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_VIT_L_TEXT = dict(  # SD 1.5's text encoder and SDXL's first one
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-d pooled text embedding
    norm_num_groups=32,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
OPENCLIP_BIGG_TEXT = dict(  # SDXL's second text encoder (with projection)
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


def _tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="difftune_tok_") as tmp:
        write_tokenizer(tmp, default_words())
        kwargs = {"pad_token": pad_token} if pad_token else {}
        return CLIPTokenizer.from_pretrained(tmp, **kwargs)


def _text_config(tokenizer: Any, values: dict):
    """CLIP text config whose special ids are the tokenizer's (the pooled output looks up EOS)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**values, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=1)


def build_components(arch: str, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """The pipeline parts of ``arch`` ("sd15" or "sdxl") with random weights, built on ``device``.

    ``device="meta"`` allocates no weights: shapes and parameter counts only.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"build_components: arch {arch!r} is not one of sd15, sdxl")
    xl = arch == "sdxl"
    tokenizer = _tokenizer()
    parts: dict[str, Any] = {"tokenizer": tokenizer}
    # built where they will run: random init of 3.5B parameters is seconds on a GPU, minutes on 2 cores
    with torch.device(device):
        torch.manual_seed(seed)
        parts["unet"] = UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET))
        torch.manual_seed(seed + 1)
        parts["vae"] = AutoencoderKL(**(SDXL_VAE if xl else SD15_VAE))
        torch.manual_seed(seed + 2)
        parts["text_encoder"] = CLIPTextModel(_text_config(tokenizer, CLIP_VIT_L_TEXT))
        if xl:
            parts["tokenizer_2"] = _tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
            torch.manual_seed(seed + 3)
            parts["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(parts["tokenizer_2"],
                                                                               OPENCLIP_BIGG_TEXT))
    extra = {"timestep_spacing": "leading"} if xl else {}
    parts["scheduler"] = DDPMScheduler(**SD_SCHEDULER, **extra)
    return parts


def build_random_model(arch: str, out_dir: str | os.PathLike, seed: int = 0,
                       device: str | torch.device = "cpu") -> Path:
    """Write a diffusers-layout folder of ``arch`` ("tiny", "tiny-sdxl", "sd15", "sdxl") with random weights.

    Weights are initialised on ``device`` and saved in fp32 safetensors.
    """
    import torch

    from ..tiny import save_tiny_model, save_tiny_sdxl_model

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
    out = Path(out_dir)
    if arch == "tiny":
        return save_tiny_model(out, seed=seed)
    if arch == "tiny-sdxl":
        return save_tiny_sdxl_model(out, seed=seed)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_components(arch, device, seed)
    if torch.device(device).type != "cpu":  # built in fp32 already; safetensors are written from the CPU
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.to("cpu")
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # as difftune.tiny: older transformers read only the slow-tokenizer files, keep them too
    with tempfile.TemporaryDirectory(prefix="difftune_tok_") as tmp:
        write_tokenizer(tmp, default_words())
        for sub in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
            for name in ("vocab.json", "merges.txt"):
                if not (out / sub / name).exists():
                    (out / sub / name).write_bytes((Path(tmp) / name).read_bytes())
    (out / "RANDOM_WEIGHTS.json").write_text(json.dumps(
        {"note": f"random weights, {arch} architecture (difftune.bench); not a trained model", "seed": seed}))
    return out


def parameter_counts(parts: dict) -> dict[str, int]:
    """Parameters of each module in ``parts`` (works on the meta device)."""
    import torch

    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()
            if isinstance(m, torch.nn.Module)}
