"""Periodic validation: sample with the current weights, save a grid, log it.

The loop asks only ``should_run(step)`` and ``run(step)``; what sampling means is the
method's business (``Method.sample``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from .data.images import read_image_file


def image_grid(rows: list[list[Image.Image]], pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile rows of images (each row may differ in length) into one picture."""
    w = max(im.width for row in rows for im in row)
    h = max(im.height for row in rows for im in row)
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), background)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def load_validation_images(cfg: Any) -> list[tuple[str, Image.Image | None]]:
    """Read the (prompt, conditioning image) pairs up front: a missing file fails before training.

    A config without ``validation_image`` (text-to-image methods) gives (prompt, None) pairs.
    """
    if not cfg.validation_prompt:
        return []
    if not hasattr(cfg, "validation_image"):
        return [(p, None) for p in (cfg.validation_prompt or [])]
    pairs = []
    for prompt, path in cfg.pairs():
        pairs.append((prompt, read_image_file(path, "--validation_image")))
    return pairs


class Validator:
    def __init__(self, cfg: Any, method: Any, output_dir: Path, trackers: Any, seed: int,
                 pairs: list[tuple[str, Image.Image | None]] | None = None):
        self.cfg = cfg
        self.method = method
        self.folder = Path(output_dir) / "validation"
        self.trackers = trackers
        self.seed = seed
        self.pairs = load_validation_images(cfg) if pairs is None else pairs

    def should_run(self, step: int) -> bool:
        return bool(self.pairs) and step % self.cfg.validation_steps == 0

    def grid_path(self, step: int) -> Path:
        return self.folder / f"step-{step:07d}.png"

    def interrupted(self, step: int) -> bool:
        """Step ``step`` was due for validation and has no grid: the run was killed while sampling it."""
        return self.should_run(step) and not self.grid_path(step).is_file()

    def run(self, step: int) -> Path | None:
        if not self.pairs:
            return None
        prompts = [p for p, _ in self.pairs]
        conditions = [im for _, im in self.pairs]
        samples = self.method.sample(
            prompts, conditions, self.cfg.num_validation_images, self.seed, self.cfg.num_validation_inference_steps
        )
        rows = [([cond.resize(imgs[0].size)] if cond is not None else []) + list(imgs)
                for cond, imgs in zip(conditions, samples)]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.grid_path(step)
        from .checkpoint import atomic_write  # a kill mid-save leaves no half-written grid

        atomic_write(path, lambda tmp: image_grid(rows).save(tmp, format="PNG"))
        for i, (prompt, imgs) in enumerate(zip(prompts, samples)):
            self.trackers.log_images(f"validation/{i}", imgs, [prompt] * len(imgs), step)
        return path
