"""``difftune bench``: speed, memory and MFU of ControlNet training configurations.

- ``architectures``: SD 1.5 / SDXL base architectures with random weights, built from configs.
- ``flops``: FLOPs per training image, counted by ``torch.utils.flop_counter``.
- ``runner``: the named configurations; one ``difftune train controlnet`` subprocess each.
- ``suite``: ``run_bench`` puts it together and writes ``bench.json`` / ``bench.md``.

Heavy imports (torch, diffusers) happen inside the functions, so ``difftune --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["CONFIGS", "build_random_model", "run_bench", "training_flops_per_image"]


def __getattr__(name: str):
    if name == "CONFIGS":
        from .runner import CONFIGS

        return CONFIGS
    if name == "build_random_model":
        from .architectures import build_random_model

        return build_random_model
    if name == "run_bench":
        from .suite import run_bench

        return run_bench
    if name == "training_flops_per_image":
        from .flops import training_flops_per_image

        return training_flops_per_image
    raise AttributeError(f"module 'difftune.bench' has no attribute {name!r}")
