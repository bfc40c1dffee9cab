"""Model families: everything that differs between SD 1.x/2.x and SDXL bases, and nothing else.

The loop, the data, checkpoints, validation, export and the CLI are the same for every
base. A family owns only what the base architecture dictates:

- which extra frozen parts load (SDXL: a second tokenizer + ``CLIPTextModelWithProjection``),
- how captions become the UNet's text conditioning (SD: the last hidden state of one CLIP
  encoder; SDXL: the penultimate hidden states of both encoders concatenated, plus the
  second encoder's projected pooled embedding),
- SDXL's micro-conditioning time ids (original size, crop top-left, target size; Podell et
  al. 2023, "SDXL", sec. 2.2), passed as ``added_cond_kwargs`` to the UNet *and* ControlNet,
- whether the VAE must stay fp32 under mixed precision (the stock SDXL VAE overflows in fp16),
- the diffusers pipeline classes that sample with it, and the default resolution.

A ControlNet built from an SDXL UNet with ``ControlNetModel.from_unet`` already carries the
``text_time`` additional embedding, so no other code needs to know the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .noising import encode_prompt, to_device, tokenize


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch of captions."""

    encoder_hidden_states: torch.Tensor  # [B, 77, D] cross-attention context
    pooled: torch.Tensor | None = None  # [B, P] SDXL's ``text_embeds``; None for SD


@dataclass
class MicroConditions:
    """Per-sample image geometry for SDXL's size/crop conditioning, all in pixels."""

    original_sizes: torch.Tensor  # [B, 2] (height, width) before resizing
    crop_top_lefts: torch.Tensor  # [B, 2] (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of the training crop


def micro_conditions(batch: dict, resolution: int, crop_h: int | None = None, crop_w: int | None = None) -> MicroConditions:
    """The batch's real sizes and crop offsets; a crop flag given fixes its own coordinate.

    diffusers' SDXL ControlNet script always passes ``--crops_coords_top_left_h/_w`` (default 0) and
    ``(resolution, resolution)`` as the original size; its SDXL text-to-image script, like the
    SDXL paper, passes the real ones. We pass the real ones, but for a coordinate whose flag is set.
    """
    n = len(batch["captions"])
    full = torch.tensor([[resolution, resolution]] * n, dtype=torch.long)
    sizes = batch.get("original_sizes", full)
    crops = batch.get("crop_top_lefts", torch.zeros(n, 2, dtype=torch.long))
    if crop_h is not None or crop_w is not None:
        crops = crops.clone()
        for axis, fixed in enumerate((crop_h, crop_w)):
            if fixed is not None:
                crops[:, axis] = fixed
    return MicroConditions(sizes, crops, (resolution, resolution))


class SDFamily:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden state, no added conditioning."""

    name = "sd"
    default_resolution = 512
    extra_subfolders: tuple[str, ...] = ()
    vae_needs_fp32 = False
    controlnet_pipeline_name = "StableDiffusionControlNetPipeline"
    controlnet_tracker_project = "train_controlnet"  # diffusers' name for the project of its runs
    validation_guidance_scale = 7.5  # the pipeline's default, which diffusers' validation uses

    def load_extra_encoders(self, name_or_path: str, variant: str | None, common: dict) -> dict:
        return {}

    def encode_prompts(self, base: Any, captions: list[str], device: torch.device) -> PromptEmbeds:
        return PromptEmbeds(encode_prompt(base.text_encoder, tokenize(base.tokenizer, captions).to(device)))

    def added_cond_kwargs(self, prompt: PromptEmbeds, micro: MicroConditions, dtype: torch.dtype) -> dict | None:
        return None

    def controlnet_pipeline(self, base: Any, controlnet: torch.nn.Module, scheduler: Any):
        from diffusers import StableDiffusionControlNetPipeline

        return StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def text2image_pipeline(self, base: Any, scheduler: Any):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


class SDXLFamily(SDFamily):
    """SDXL: CLIP ViT-L + OpenCLIP bigG (with projection), pooled embedding, size/crop time ids."""

    name = "sdxl"
    default_resolution = 1024
    extra_subfolders = ("text_encoder_2", "tokenizer_2")
    vae_needs_fp32 = True
    controlnet_pipeline_name = "StableDiffusionXLControlNetPipeline"
    controlnet_tracker_project = "sd_xl_train_controlnet"
    validation_guidance_scale = 5.0

    def load_extra_encoders(self, name_or_path: str, variant: str | None, common: dict) -> dict:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        return {
            "tokenizer_2": AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", **common),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                name_or_path, subfolder="text_encoder_2", variant=variant, use_safetensors=True, **common
            ),
        }

    @torch.no_grad()
    def encode_prompts(self, base: Any, captions: list[str], device: torch.device) -> PromptEmbeds:
        """Both encoders see the same captions, so a dropped ('') caption is dropped for both.

        As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden state
        ``[B, 77, D1]`` and ``[B, 77, D2]`` concatenated to ``[B, 77, D1 + D2]``; pooled = the
        second encoder's projected end-of-text embedding ``[B, P]``.
        """
        hidden = []
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            out = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), out.text_embeds)

    @staticmethod
    def time_ids(micro: MicroConditions) -> torch.Tensor:
        """``[B, 6]``: original (h, w), crop (top, left), target (h, w) — the pipeline's ``add_time_ids``."""
        sizes = micro.original_sizes  # on the accelerator when a prepared data loader moved the batch there
        target = torch.tensor([micro.target_size], dtype=torch.long).repeat(sizes.shape[0], 1)
        # host tensors go over through pinned memory: a plain copy would wait for the GPU's queued work
        return torch.cat([sizes, to_device(micro.crop_top_lefts, sizes.device), to_device(target, sizes.device)], dim=1)

    def added_cond_kwargs(self, prompt: PromptEmbeds, micro: MicroConditions, dtype: torch.dtype) -> dict | None:
        device = prompt.encoder_hidden_states.device
        return {"text_embeds": prompt.pooled.to(dtype), "time_ids": self.time_ids(micro).to(device, dtype)}

    def controlnet_pipeline(self, base: Any, controlnet: torch.nn.Module, scheduler: Any):
        from diffusers import StableDiffusionXLControlNetPipeline

        return StableDiffusionXLControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=controlnet,
            scheduler=scheduler, add_watermarker=False,
        )

    def text2image_pipeline(self, base: Any, scheduler: Any):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=scheduler,
            add_watermarker=False,
        )


FAMILIES: dict[str, SDFamily] = {"sd": SDFamily(), "sdxl": SDXLFamily()}


def family_of(base: Any) -> SDFamily:
    return FAMILIES[getattr(base, "family", "sd")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def detect_family(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """"sdxl" or "sd" from a model folder's ``model_index.json`` (or its UNet config).

    SDXL pipelines are named ``StableDiffusionXL...`` and list ``text_encoder_2``; an SDXL UNet
    has ``addition_embed_type: text_time``. A hub id is looked up in its
    ``model_index.json`` (or the cached copy); a repository without one is "sd" (``--model_family``
    overrides, and ``check_unet_family`` catches a wrong guess once the UNet is loaded). A hub id that
    cannot be reached raises the hub's error: every part of the model would fail the same way.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        index, unet = _read_json(folder / "model_index.json"), _read_json(folder / "unet" / "config.json")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError

        try:
            index = _read_json(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision,
                                                    cache_dir=cache_dir)))
        except (HFValidationError, RemoteEntryNotFoundError):  # no repository name; a repository without one
            index = {}
        unet = {}
    if "XL" in str(index.get("_class_name", "")) or index.get("text_encoder_2"):
        return "sdxl"
    return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"


def check_unet_family(unet: torch.nn.Module, family: str, source: str) -> None:
    """Fail loudly when ``--model_family`` contradicts the UNet (else the first forward fails obscurely)."""
    is_xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if is_xl != (family == "sdxl"):
        found = "an SDXL UNet (addition_embed_type text_time)" if is_xl else "a UNet without SDXL's text_time embedding"
        raise ModelLoadError(f"{source} has {found}, but --model_family is {family}: use --model_family auto.")
