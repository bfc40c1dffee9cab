"""Optimizer and learning-rate schedule from ``OptimConfig``."""

from __future__ import annotations

import torch

from .config import OptimConfig
from .errors import ConfigError


def effective_learning_rate(cfg: OptimConfig, batch_size: int, accumulation: int, processes: int) -> float:
    """``--scale_lr`` multiplies by the number of images per optimizer step, as diffusers does."""
    if cfg.scale_lr:
        return cfg.learning_rate * batch_size * accumulation * processes
    return cfg.learning_rate


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, lr: float, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``."""
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "--use_8bit_adam needs bitsandbytes: pip install 'difftune[bnb]' (CUDA GPUs only)."
            ) from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    if device_type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_train_steps: int):
    """The diffusers schedules, stepped once per optimizer step (not once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
