"""CLIP alignment, the Custom Diffusion paper's measures for concepts of any base model.

- image alignment: mean cosine similarity of CLIP image embeddings between generated images and
  the concept's own (target) images;
- text alignment: mean cosine similarity between each generated image and its prompt;
- paired similarity: image by image, between two sets drawn from the same seeds (1 = unchanged),
  for how far an adapted model drifted from its base.

The CLIP model is named by the user (``--clip_model``: a hub id such as
``openai/clip-vit-large-patch14`` or a local folder with the model and its processor); weights
load through transformers, safetensors where the folder has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError

CLIP_ADVICE = ("For --clip_model, give a CLIP model folder (CLIPModel weights with its tokenizer and image "
               "processor, as `save_pretrained` writes them) or a hub id such as openai/clip-vit-large-patch14.")


class ClipScorer:
    """Normalised CLIP embeddings of images and texts, and the similarities between them."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoProcessor, CLIPModel

        local = Path(name_or_path).expanduser()
        source = str(local) if local.exists() else name_or_path
        try:
            self.model = CLIPModel.from_pretrained(source, use_safetensors=True).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as e:
            if local.exists():
                raise ModelLoadError(f"--clip_model {name_or_path}: could not load a CLIP model ({e}). "
                                     f"{CLIP_ADVICE}") from None
            from ..hub_cache import hub_hint

            raise hub_hint(name_or_path, e, CLIP_ADVICE) from None
        self.device, self.batch_size, self.name = torch.device(device), batch_size, name_or_path

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """``[N, D]`` unit-length image embeddings of ``[H, W, 3]`` uint8 images."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return _unit(torch.cat(out))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """``[N, D]`` unit-length text embeddings (prompts cut at CLIP's 77 tokens)."""
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return _unit(_features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                            attention_mask=tokens["attention_mask"].to(self.device))))

    def image_alignment(self, generated: list[np.ndarray], targets: list[np.ndarray]) -> float:
        """Mean similarity over every (generated, target) pair."""
        return float((self.images(generated) @ self.images(targets).T).mean())

    def text_alignment(self, generated: list[np.ndarray], prompts: list[str]) -> float:
        """Mean similarity of each image with its own prompt."""
        return float((self.images(generated) * self.texts(prompts)).sum(-1).mean())

    def paired_similarity(self, a: list[np.ndarray], b: list[np.ndarray]) -> float:
        """Mean similarity of ``a[i]`` with ``b[i]``."""
        return float((self.images(a) * self.images(b)).sum(-1).mean())


def _features(x: Any) -> torch.Tensor:
    """The projected embeddings: a tensor, or (transformers 5) an output whose pooler_output holds them."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()
