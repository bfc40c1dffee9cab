"""difftune: train ControlNet and Custom Diffusion adapters on frozen Stable Diffusion models, then generate with them."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["train_controlnet", "train_custom_diffusion", "generate", "CustomDiffusionConfig", "ControlNetConfig", "__version__"]


def __getattr__(name: str):
    # Lazy: `import difftune` stays cheap (no torch/diffusers import) for the CLI's --help.
    if name in ("train_controlnet", "train_custom_diffusion", "generate"):
        from . import api

        return getattr(api, name)
    if name == "ControlNetConfig":
        from .config import ControlNetConfig

        return ControlNetConfig
    if name == "CustomDiffusionConfig":
        from .config_custom_diffusion import CustomDiffusionConfig

        return CustomDiffusionConfig
    raise AttributeError(f"module 'difftune' has no attribute {name!r}")
