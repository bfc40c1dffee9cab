"""A ``difftune pretrain-base`` run's folder: its settings, what each finished stage was trained
with, the stages' resumable checkpoints, and the checks made before any work starts.

``OUT/vae`` and ``OUT/model`` each hold a ``difftune_pretrain.json`` written into the folder
before it is moved into place, so a stage's record and its weights appear together. A rerun
compares its flags with the records: a finished stage trained otherwise is refused (a UNet
trained over another run's VAE would be a mixed model), and a finished run is not retrained.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import TrainState, clean_partial, load_checkpoint, resolve_resume, save_checkpoint, umask_mode
from .errors import ConfigError

RECORD = "difftune_pretrain.json"
VAE_FLAGS = ("n_images", "world", "seed", "latent_downsample", "latent_channels", "vae_steps", "vae_batch")
UNET_FLAGS = ("unet_steps", "unet_batch")


@dataclass(frozen=True)
class PretrainSettings:
    """The flags of ``difftune pretrain-base`` that decide what is trained (field names are the flags)."""

    n_images: int = 20000
    """shapes-world images rendered to train on"""
    world: str = "standard"
    """``standard`` or ``wide`` (half of the images with fill50k's geometry)"""
    seed: int = 0
    latent_downsample: int = 4
    """image pixels per latent pixel: 2, 4 or 8"""
    latent_channels: int = 4
    """channels per latent pixel: any positive number"""
    vae_steps: int = 1500
    vae_batch: int = 32
    unet_steps: int = 2000
    """0: the VAE only"""
    unet_batch: int = 64
    stop_at_step: int | None = None
    """end at this UNet step, after exporting the model there; None: at ``unet_steps``"""

    def __post_init__(self) -> None:
        for flag in ("n_images", "vae_steps", "vae_batch", "unet_batch", "latent_channels"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be at least 1, not {getattr(self, flag)}")
        if self.unet_steps < 0:
            raise ConfigError(f"--unet_steps must be at least 0, not {self.unet_steps}")
        if self.world not in ("standard", "wide"):
            raise ConfigError(f"--world must be 'standard' or 'wide', not {self.world!r}")
        if self.latent_downsample not in (2, 4, 8):
            raise ConfigError(f"--latent_downsample must be 2, 4 or 8, not {self.latent_downsample}")
        for flag in ("vae_batch", "unet_batch"):  # a batch samples images from the set: more than it holds is a typo
            if getattr(self, flag) > self.n_images and not (flag == "unet_batch" and self.unet_steps == 0):
                raise ConfigError(f"--{flag} {getattr(self, flag)} is more than --n_images {self.n_images}: "
                                  f"lower --{flag} or render more images")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.unet_steps:
            raise ConfigError(f"--stop_at_step {self.stop_at_step} is not a UNet step of this run (1 to --unet_steps "
                              f"{self.unet_steps}): lower it, or leave it out to train all {self.unet_steps} steps")

    @property
    def last_unet_step(self) -> int:
        """The UNet step this run ends at."""
        return self.unet_steps if self.stop_at_step is None else self.stop_at_step

    def vae_stage(self) -> dict:
        """What ``OUT/vae`` depends on."""
        return {k: v for k, v in asdict(self).items() if k in VAE_FLAGS}

    def model_stage(self) -> dict:
        """What ``OUT/model`` depends on (its VAE's settings too)."""
        return {k: v for k, v in asdict(self).items() if k in VAE_FLAGS + UNET_FLAGS}


def memory_needed(s: PretrainSettings, resolution: int) -> int:
    """Bytes of host memory the run's data takes, roughly: the rendered uint8 images twice (while
    they are stacked), every image's latent mean and std in float32 (on the CPU), the tokenized
    captions, and each shape's description."""
    image = resolution * resolution * 3
    latent = s.latent_channels * (resolution // s.latent_downsample) ** 2 * 4
    return s.n_images * (2 * image + 2 * latent + 24 * 8 + 1000)


def available_memory() -> int | None:
    """Bytes of memory available to a new process (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} PB"


def check_memory(s: PretrainSettings, resolution: int, available: int | None = None) -> None:
    """Refuse a run whose images cannot fit in memory, before rendering them for hours."""
    available = available_memory() if available is None else available
    needed = memory_needed(s, resolution)
    if available is not None and needed > available:
        raise ConfigError(f"--n_images {s.n_images} needs about {_size(needed)} of memory for its images and their "
                          f"latents, and {_size(available)} is available here: lower --n_images")


def _latent_downsample_of(vae_config: dict) -> int | None:
    """A VAE's pixels per latent pixel, from its number of levels (each but the last halves the image)."""
    return {4: 8, 3: 4, 2: 2}.get(len(vae_config.get("block_out_channels", ())))


def recorded_settings(folder: Path) -> dict | None:
    """What a finished stage's folder was trained with; None when there is no finished stage.

    A VAE saved before records were written tells only its latent shape, read from its config."""
    record = folder / RECORD
    if record.is_file():
        return json.loads(record.read_text())["settings"]
    config = folder / "config.json"
    if folder.name == "vae" and config.is_file():
        vae_config = json.loads(config.read_text())
        return {"latent_downsample": _latent_downsample_of(vae_config), "latent_channels": vae_config["latent_channels"]}
    return None


def recorded_step(folder: Path) -> int | None:
    """The UNet step ``OUT/model`` was exported at; None without a record."""
    record = folder / RECORD
    return json.loads(record.read_text()).get("step") if record.is_file() else None


def refuse_other_settings(folder: Path, recorded: dict, wanted: dict) -> None:
    """A finished stage trained with other flags is never built upon or replaced silently."""
    differ = [k for k in recorded if recorded[k] != wanted.get(k)]
    if differ:
        said = ", ".join(f"--{k} {recorded[k]} (this run: {wanted.get(k)})" for k in differ)
        raise ConfigError(f"{folder} was trained with {said}. Building on it with other flags would mix two runs: "
                          f"use a new --out for these flags, or give the ones it was trained with.")


def write_record(folder: Path, settings: dict, step: int | None = None) -> None:
    """Record a stage's settings (and the UNet step exported) in its folder, before it is put in place."""
    (folder / RECORD).write_text(json.dumps({"settings": settings, "step": step}, indent=1) + "\n")


def save_whole(folder: Path, save: Callable[[Path], None]) -> None:
    """``save(tmp)`` into a folder beside ``folder``, then put it in ``folder``'s place: a reader
    (or a resumed run) finds the previous folder or the whole new one, never half of one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    save(tmp)
    umask_mode(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# the internal names in a checkpoint's run description, as the flags that set them
_CHECKPOINT_FLAGS = {"steps": "--{stage}_steps", "batch": "--{stage}_batch", "n_images": "--n_images",
                     "world": "--world", "seed": "--seed", "config": "--latent_downsample/--latent_channels",
                     "scaling_factor": "the VAE in OUT/vae"}


class StageCheckpoints:
    """Resumable checkpoints of one pretraining stage in ``folder`` (the newest one kept), every
    ``every`` steps, for the run that ``run`` describes (steps, seed, batch, data, architecture).

    A rerun of the same command resumes from the newest; a checkpoint of another run is refused
    rather than mixed in. Written with ``checkpoint.save_checkpoint``: atomic, safetensors and
    JSON only."""

    def __init__(self, folder: Path, run: dict, every: int):
        self.folder, self.every = Path(folder), every
        self.run = json.loads(json.dumps(run))  # as it reads back from JSON (tuples become lists)

    def load(self) -> dict | None:
        clean_partial(self.folder)
        path = resolve_resume(self.folder, "latest")
        if path is None:
            return None
        ck = load_checkpoint(path)
        theirs = ck["extra"].get("run", {})
        if theirs != self.run:
            stage = self.run.get("stage", "")
            differ = sorted(_CHECKPOINT_FLAGS.get(k, k).format(stage=stage)
                            for k in set(theirs) | set(self.run) if theirs.get(k) != self.run.get(k))
            raise ConfigError(f"{path} is a checkpoint of another run (it differs in: {', '.join(differ)}). "
                              f"Rerun with that run's flags to resume it, or delete {self.folder} to start over.")
        return ck

    def due(self, step: int, steps: int, stop: int | None = None) -> bool:
        """Save after ``step``: every ``every`` steps, and at ``stop`` so that a later run continues
        from there; never at the last step, whose result is saved as the model."""
        return (step % self.every == 0 or step == stop) and step < steps

    def save(self, step: int, weights: dict, opt, sched, generator: torch.Generator, extra: dict | None = None) -> None:
        save_checkpoint(self.folder, TrainState(global_step=step), weights, opt.state_dict(), sched.state_dict(),
                        generator, total_limit=1, extra={"run": self.run, **(extra or {})})

    def finished(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
