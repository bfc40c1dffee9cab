"""Shared helpers of the Custom Diffusion tests: concept images and small configs."""

from __future__ import annotations

from pathlib import Path

from difftune.data.shapes import ShapeSample, render_shape


def write_concept(folder: Path, shape: str = "star", color=(255, 215, 0), background=(25, 25, 112), n: int = 4,
                  resolution: int = 64) -> Path:
    """``n`` pictures of one concept: a ``shape`` of one colour on one background, in varied places."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        s = ShapeSample(shape, 24 + 4 * i, 30 + 2 * i, 14 + i, "gold", color, "midnightblue", background)
        render_shape(s, resolution).save(folder / f"{i}.png")
    return folder


def cd_config(model_dir, out_dir, **overrides):
    """A tiny Custom Diffusion config; overrides are flat flag names."""
    from difftune.config_custom_diffusion import make_config

    values = dict(
        pretrained_model_name_or_path=str(model_dir),
        output_dir=str(out_dir),
        resolution=64,
        train_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=100,
        learning_rate=1e-3,
        lr_warmup_steps=0,
        seed=0,
        num_class_inference_steps=2,
        sample_batch_size=2,
    )
    values.update(overrides)
    return make_config(values)
