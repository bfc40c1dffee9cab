"""What a training method plugs into the generic loop.

The loop (``difftune.trainer``) knows nothing about ControlNet or Custom Diffusion. A method
owns which modules train, the loss of a batch, what a checkpoint holds of it, the final
export, and how to sample for validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Method(Protocol):
    name: str

    def setup(self, accelerator: Any) -> list[torch.nn.Module]:
        """Put frozen parts on the device in their dtype; return the trainable modules to prepare."""

    def bind(self, prepared: list[torch.nn.Module]) -> None:
        """Receive the trainable modules back from ``accelerator.prepare`` (DDP-wrapped etc.)."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (only trainable parameters)."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The map-style data set of training examples."""

    def collate(self, items: list) -> dict:
        """Batch a list of examples; adds ``n_skipped`` for examples that could not be read."""

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss of one micro-batch; all randomness drawn from ``generator``."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained weights as a flat state dict (for checkpoints)."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state_tensors()`` (resume)."""

    def export(self, output_dir: Path) -> list[Path]:
        """Write the final weights in diffusers format; return the files written."""

    def sample(self, prompts: list[str], images: list[Any], num_images: int, seed: int, steps: int) -> list:
        """Validation images (PIL) for (prompt, conditioning image) pairs."""

    def model_card(self, output_dir: Path, summary: dict) -> str:
        """README.md text describing the exported model."""
