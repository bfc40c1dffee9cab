"""Run a diffusers training script with one outside fix: the frozen UNet takes its prompt
embeddings in its own dtype.

    python -m difftune.bench.reference_fix SCRIPT [script flags...]

diffusers' ``train_controlnet_sdxl.py`` (0.42) pre-computes the prompt embeddings with
``datasets.map``, which hands them back as float32; under ``--mixed_precision fp16|bf16`` it runs
the frozen UNet in half precision outside autocast, and the first step stops with "expected m1
and m2 to have the same dtype". The reference figures in ``../shared/bench/ANCHORS.md`` were
taken with this cast (upstream made the same fix in its SD3 script). Nothing else changes: the
script runs as ``__main__`` with its own arguments.
"""

from __future__ import annotations

import runpy
import sys


def cast_prompt_embeddings_to_unet_dtype() -> None:
    from diffusers import UNet2DConditionModel

    forward = UNet2DConditionModel.forward
    if getattr(forward, "_difftune_cast", False):
        return

    def cast_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        return forward(self, sample, timestep, encoder_hidden_states.to(self.dtype), *args, **kwargs)

    cast_forward._difftune_cast = True
    UNet2DConditionModel.forward = cast_forward


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m difftune.bench.reference_fix SCRIPT [flags...]")
    cast_prompt_embeddings_to_unet_dtype()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
