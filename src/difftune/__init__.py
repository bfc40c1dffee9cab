"""difftune: train ControlNet adapters on frozen Stable Diffusion models, then generate with them."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["train_controlnet", "generate", "ControlNetConfig", "__version__"]


def __getattr__(name: str):
    # Lazy: `import difftune` stays cheap (no torch/diffusers import) for the CLI's --help.
    if name in ("train_controlnet", "generate"):
        from . import api

        return getattr(api, name)
    if name == "ControlNetConfig":
        from .config import ControlNetConfig

        return ControlNetConfig
    raise AttributeError(f"module 'difftune' has no attribute {name!r}")
