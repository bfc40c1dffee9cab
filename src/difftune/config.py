"""Typed run configuration.

A run is described by one dataclass made of sections (model, data, optim, loss, train,
validation). Field names are the diffusers example scripts' flag names, so the CLI is
generated from these dataclasses (``difftune.cli``) and users keep their flags. Each field's
``help`` metadata is its documentation; ``__post_init__`` rejects contradictions early, with
the flag names in the message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

# (de)serialisation (dicts, config files, the saved resolved config), re-exported: ``from .config import to_dict``
from .config_io import (SECRET_FIELDS, from_dict, merge, nest, read_config_file, save_resolved,  # noqa: F401
                        sections, shown, to_dict, typed_value)
from .errors import ConfigError


def opt(default: Any = None, help: str = "", *, choices: tuple | None = None, factory=None, bare: Any = None):
    """A config field with its CLI help text (and optional choices; ``bare``: the value of the flag given
    without one, e.g. ``--cuda_graphs`` for ``--cuda_graphs yes``)."""
    meta = {"help": help, "choices": choices, "bare": bare}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_fields(section: Any) -> None:
    """What each field of a config section can hold, checked however the section was made (flags, a
    config file, ``from_dict`` or the dataclass called in code): the value's type, a number finite (an
    ``inf`` learning rate trained and exported NaN weights), and for a field with choices one of them; a
    list-of-strings field given one string takes it as a list of one. A typo (``nan_policy: skp``) would
    otherwise pass silently, or fail minutes later without the setting's name."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        kind = kind.removesuffix("|None")
        if value is None and (optional or f.default is None):
            continue
        if kind.endswith("Config"):
            if not dataclasses.is_dataclass(value):
                raise ConfigError(f"Section {f.name!r} must be a {kind}, got {type(value).__name__} — build the "
                                  f"whole config from a dict with from_dict({type(section).__name__}, {{...}}).")
            continue
        choices = f.metadata.get("choices")
        if choices and isinstance(value, bool) and ("yes" if value else "no") in choices:
            value = "yes" if value else "no"  # YAML's bare no / yes, or a switch given true/false
            setattr(section, f.name, value)
        if kind == "str" and isinstance(value, os.PathLike):  # a folder given as a Path
            value = os.fspath(value)
            setattr(section, f.name, value)
        if kind == "list[str]":
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            if isinstance(value, (list, tuple)):
                setattr(section, f.name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
            continue
        expected = _SIMPLE_TYPES.get(kind)
        if expected and (not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool))):
            raise ConfigError(f"Setting {f.name!r} (--{f.name}) must be {_TYPE_WORDS[kind]}, got "
                              f"{shown(f.name, value)}.")
        if kind == "float" and not math.isfinite(value):  # argparse's float and YAML's .inf read it
            raise ConfigError(f"--{f.name} must be a finite number, got {value}.")
        if choices and value not in choices:
            raise ConfigError(f"--{f.name} {value!r}: choose from {', '.join(map(str, choices))}.")


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str | None = opt(
        "tiny-shapes",
        "Base model: a diffusers-layout folder, a Hugging Face Hub id (needs network), or the built-in "
        "'tiny-shapes' (64 px, ships with difftune).",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: str | None = opt(None, "Weight variant of the base model files, e.g. 'fp16'.")
    tokenizer_name: str | None = opt(None, "Tokenizer folder or id, if not the base model's (on an SDXL base: the first, CLIP ViT-L, one).")
    cache_dir: str | None = opt(None, "Where downloaded models and data sets are cached.")

    def __post_init__(self) -> None:
        check_fields(self)
        for flag in ("variant", "revision", "tokenizer_name"):
            if getattr(self, flag) is not None and not getattr(self, flag).strip():
                raise ConfigError(f"--{flag} is empty: give a value (e.g. --variant fp16), or leave the flag out.")


@dataclass
class ControlNetModelConfig(ModelConfig):
    """ControlNet's model section: the shared one plus what only a ControlNet run chooses (a starting
    ControlNet, SDXL bases)."""

    controlnet_model_name_or_path: str | None = opt(
        None, "Start from this ControlNet (folder or hub id) instead of copying the UNet's encoder."
    )

    model_family: str = opt(
        "auto",
        "Base model family: auto (from model_index.json / the UNet config), sd (SD 1.x/2.x) or sdxl.",
        choices=("auto", "sd", "sdxl"),
    )
    pretrained_vae_model_name_or_path: str | None = opt(
        None,
        "A VAE (folder or hub id) to use instead of the base's, e.g. an fp16-safe SDXL VAE. Without one, an "
        "SDXL base's own VAE stays in fp32 under --mixed_precision (the stock SDXL VAE overflows in fp16).",
    )


# How a ControlNet enters classifier-free guidance when sampling (``pipelines.controlnet_in_guidance``)
CONTROL_GUIDANCE = ("both", "cond")
INTERPOLATION_MODES = ("bilinear", "bicubic", "lanczos", "nearest", "nearest-exact", "box", "hamming")


@dataclass
class DataConfig:
    dataset_name: str | None = opt(None, "Hub data set id (needs network; cached copies work offline).")
    dataset_config_name: str | None = opt(None, "Config name of the hub data set.")
    train_data_dir: str | None = opt(
        None,
        "Local data: parquet/arrow files, a save_to_disk folder, a folder with metadata.jsonl "
        "(file paths + captions) or an imagefolder.",
    )
    image_column: str | None = opt(None, "Column with the target images (default: 'image' or the 1st).")
    conditioning_image_column: str | None = opt(
        None, "Column with the conditioning images (default: 'conditioning_image' or the 3rd)."
    )
    caption_column: str | None = opt(None, "Column with the captions (default: 'text' or the 2nd).")
    max_train_samples: int | None = opt(None, "Train on at most this many samples (shuffled with --seed).")
    streaming: bool = opt(False, "Stream the data set instead of loading it (needs --max_train_samples).")
    resolution: int | None = opt(
        None, "Training resolution: resize and centre crop; divisible by 8 (default: 512 for SD, 1024 for SDXL, "
              "or the base model's own size where smaller: 64 for tiny-shapes)."
    )
    image_interpolation_mode: str = opt(
        "bilinear", "Resampling filter of the resize (images and conditioning images alike).", choices=INTERPOLATION_MODES
    )
    crops_coords_top_left_h: int | None = opt(
        None, "SDXL: crop top coordinate given to the model as micro-conditioning (default: the real crop offset)."
    )
    crops_coords_top_left_w: int | None = opt(
        None, "SDXL: crop left coordinate given to the model as micro-conditioning (default: the real crop offset)."
    )
    proportion_empty_prompts: float = opt(0.0, "Fraction of captions replaced by '' (0 to 1).")
    dataloader_num_workers: int = opt(0, "Data loading worker processes (0: in the main process).")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError(
                f"--resolution {self.resolution} is not a positive multiple of 8 (as diffusers requires; Stable "
                f"Diffusion's VAE down-samples by 8): use e.g. {max(8, self.resolution // 8 * 8)}."
            )
        for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            if (getattr(self, flag) or 0) < 0:
                raise ConfigError(f"--{flag} must be >= 0 (pixels from the top/left), got {getattr(self, flag)}.")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ConfigError(f"--proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}.")
        if self.streaming and not self.max_train_samples:
            raise ConfigError("--streaming needs --max_train_samples: a stream has no length to plan steps by.")
        if self.dataset_name and self.train_data_dir:
            raise ConfigError("Give either --dataset_name or --train_data_dir, not both.")
        if self.dataloader_num_workers < 0:
            raise ConfigError("--dataloader_num_workers must be >= 0.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"--max_train_samples must be >= 1, got {self.max_train_samples}.")


@dataclass
class OptimConfig:
    learning_rate: float = opt(5e-6, "Initial learning rate (after warm-up).")
    scale_lr: bool = opt(False, "Multiply the learning rate by GPUs x batch size x accumulation steps (x2 for "
                                "Custom Diffusion with prior preservation: each example adds a class image).")
    lr_scheduler: str = opt(
        "constant",
        "Learning-rate schedule.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = opt(500, "Warm-up steps of the schedule.")
    lr_num_cycles: int = opt(1, "Hard restarts of cosine_with_restarts.")
    lr_power: float = opt(1.0, "Power of the polynomial schedule.")
    adam_beta1: float = opt(0.9, "Adam beta1.")
    adam_beta2: float = opt(0.999, "Adam beta2.")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = opt(1e-8, "Adam epsilon.")
    max_grad_norm: float = opt(1.0, "Clip gradients to this norm (0, or inf: no clipping).")
    use_8bit_adam: bool = opt(False, "8-bit AdamW from bitsandbytes (pip install 'difftune[bnb]').")
    set_grads_to_none: bool = opt(False, "Free gradients after each step instead of zeroing them (less memory).")
    optimizer_in_backward: bool = opt(
        False,
        "Step each parameter inside backward as soon as its gradient is ready, then free that gradient: the "
        "full set of gradients never exists at once (less memory). Needs --max_grad_norm 0, "
        "--gradient_accumulation_steps 1, one process and no fp16 loss scaling.",
    )

    def __post_init__(self) -> None:
        if self.max_grad_norm == math.inf:  # diffusers' scripts take it: no bound on the norm, i.e. no clipping
            self.max_grad_norm = 0.0
        check_fields(self)
        # the optimizer checks these too, but only once the model is loaded, and with a bare ValueError
        # ("Invalid learning rate: -1.0") that names no flag; ``not x > 0`` also refuses NaN
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate} (e.g. 1e-5; --help shows the "
                              "default).")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)} (defaults: 0.9 and 0.999).")
        if not self.adam_epsilon > 0:
            raise ConfigError(f"--adam_epsilon must be > 0, got {self.adam_epsilon} (default 1e-8).")
        if not self.adam_weight_decay >= 0:
            raise ConfigError(f"--adam_weight_decay must be >= 0, got {self.adam_weight_decay} (default 1e-2).")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}.")
        require_at_least_one(self, "lr_num_cycles")


@dataclass
class LossConfig:
    snr_gamma: float | None = opt(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 recommended.")
    prediction_type: str | None = opt(
        None, "Override the scheduler's prediction type.", choices=("epsilon", "v_prediction")
    )
    timestep_sampling: str = opt(
        "uniform",
        "How training timesteps are drawn: uniform (as diffusers), or cubic, biased toward the noisy steps where "
        "layout is decided (T2I-Adapter, Mou et al. 2023).",
        choices=("uniform", "cubic"),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"--snr_gamma must be > 0, got {self.snr_gamma}.")


@dataclass
class TrainConfig:
    output_dir: str = opt("controlnet-model", "Where checkpoints, logs, samples and the final model go.")
    seed: int | None = opt(None, "Seed for everything random (a random one is chosen and recorded if unset).")
    train_batch_size: int = opt(4, "Batch size per device.")
    num_train_epochs: int = opt(1, "Epochs (ignored when --max_train_steps is set).")
    max_train_steps: int | None = opt(None, "Optimizer steps to train for (overrides epochs).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (less memory, slower).")
    mixed_precision: str | None = opt(
        None, "Precision of the frozen weights and autocast (default: accelerate config).", choices=("no", "fp16", "bf16")
    )
    allow_tf32: bool = opt(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    enable_xformers_memory_efficient_attention: bool = opt(
        False, "Use xFormers attention (PyTorch's SDPA is already the default)."
    )
    enable_npu_flash_attention: bool = opt(
        False, "Ascend NPU flash attention (diffusers' NPU processors; needs torch_npu on an NPU machine)."
    )
    channels_last: bool = opt(False, "Keep the UNet and the trained model in channels-last memory format.")
    torch_compile: str = opt(
        "no",
        "torch.compile the UNet and the trained model: 'blocks' compiles each repeated block (fast to compile), "
        "'full' the whole models.",
        choices=("no", "blocks", "full"),
    )
    profile_steps: int = opt(
        0, "Record N optimizer steps with torch.profiler: OUTPUT_DIR/profile/ gets a Chrome trace and a summary "
           "(time per step, device busy share, kernels per step, the costliest operators)."
    )
    profile_start: int = opt(10, "Optimizer steps before --profile_steps starts recording (past warm-up and compiling).")
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = opt(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint folder to resume from.")
    overwrite_output_dir: bool = opt(
        False, "Start a new run in an --output_dir that holds another run's checkpoints, deleting them (without "
               "it that is refused, so that two runs never mix)."
    )
    logging_dir: str = opt("logs", "Tracker log folder, relative to --output_dir.")
    report_to: str = opt(
        "none", "Trackers: tensorboard, wandb, comet_ml, all (those installed) or none; metrics.jsonl is always written."
    )
    tracker_project_name: str | None = opt(
        None, "Project name given to the trackers (default: train_controlnet, or sd_xl_train_controlnet for an "
              "SDXL base, as diffusers' scripts name them)."
    )
    nan_policy: str = opt(
        "stop",
        "On a NaN/inf loss: stop with a message (the loss is checked while the next step runs, and always before "
        "a checkpoint is saved: a non-finite step is never saved), or skip the step and count it (the host then "
        "waits for each step's loss before stepping).",
        choices=("stop", "skip"),
    )
    push_to_hub: bool = opt(False, "Upload the final model to the Hugging Face Hub.")
    hub_model_id: str | None = opt(None, "Hub repository for --push_to_hub (default: output folder name).")
    hub_token: str | None = opt(None, "Hub token (prefer `huggingface-cli login`; never written anywhere).")

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least_one(self, "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                             "num_train_epochs")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}.")
        for name in ("profile_steps", "profile_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be >= 1, got {self.max_train_steps}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("--checkpoints_total_limit must be >= 1.")
        if self.report_to not in ("none", "all", "tensorboard", "wandb", "comet_ml"):
            raise ConfigError(f"--report_to {self.report_to!r}: choose tensorboard, wandb, comet_ml, all or none.")
        if self.tracker_project_name is not None:
            check_tracker_project_name(self.tracker_project_name)


# what W&B, Comet and a TensorBoard folder name all take: no path parts, no characters W&B refuses
_PROJECT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_tracker_project_name(name: str) -> None:
    """--tracker_project_name becomes a folder under --logging_dir (TensorBoard) and a W&B / Comet project:
    refused here, before the models load, if it could leave that folder or a tracker would refuse it."""
    if not _PROJECT_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"--tracker_project_name {name!r}: use letters, digits, '_', '-' and '.' (up to 128, "
                          "starting with a letter, digit or '_'; no '..', '/', spaces or other characters), "
                          "e.g. --tracker_project_name my_controlnet.")


@dataclass
class ControlNetTrainConfig(TrainConfig):
    """ControlNet's train section: the shared one plus encoder caching (its transforms are deterministic)."""

    cache_latents: bool = opt(
        False,
        "Encode every training image (VAE latent mean and std) and every distinct caption (text encoders) once "
        "before training, on disk under --latent_cache_dir; training then samples latents from the cached "
        "distribution and the encoders stay off the GPU. Resumable; reused by later runs on the same model and data.",
    )
    latent_cache_dir: str | None = opt(None, "Where --cache_latents writes (default: OUTPUT_DIR/encoded-cache).")
    cuda_graphs: str = opt(
        "no",
        "Capture the step's model work (ControlNet and UNet, forward and backward) as CUDA graphs on the first "
        "step and replay them: one launch instead of thousands of kernels, for a GPU the host cannot keep busy. "
        "Needs one CUDA GPU, no gradient checkpointing, accumulation or --optimizer_in_backward; implies "
        "--set_grads_to_none. yes (the flag alone): refuse a run that cannot have them; auto (--recipe fast): "
        "use them where the run can, say why not elsewhere, and train eagerly if capturing fails.",
        choices=("no", "yes", "auto"), bare="yes",
    )
    fp8_frozen_unet: bool = opt(
        False,
        "Store the frozen UNet's Linear/Conv weights in float8 (e4m3, one scale per output channel), dequantised "
        "as each layer runs: half the memory of bf16 weights, at a few percent of difference in the UNet's output.",
    )


def require_at_least_one(section: Any, *names: str) -> None:
    """Counts that must be >= 1 (a 0 would divide by zero or sample nothing, hours into a run)."""
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(section, name)}.")


@dataclass
class ValidationConfig:
    validation_prompt: list[str] | None = opt(None, "Prompts for validation images (paired with --validation_image).")
    validation_image: list[str] | None = opt(None, "Conditioning images for validation (one, or one per prompt).")
    num_validation_images: int = opt(4, "Images generated per validation pair.")
    validation_steps: int = opt(100, "Validate every N optimizer steps (and at the end).")
    num_validation_inference_steps: int = opt(20, "Denoising steps of the validation sampler (UniPC).")
    validation_control_guidance: str = opt(
        "both", "How the ControlNet enters classifier-free guidance in validation images: both halves "
                "(diffusers' default) or cond (the conditional half only: guidance amplifies the control too).",
        choices=CONTROL_GUIDANCE)

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least_one(self, "num_validation_images", "validation_steps", "num_validation_inference_steps")
        prompts, images = self.validation_prompt or [], self.validation_image or []
        if bool(prompts) != bool(images):
            raise ConfigError("--validation_prompt and --validation_image go together: give both or neither.")
        if prompts and not (len(prompts) == len(images) or len(prompts) == 1 or len(images) == 1):
            raise ConfigError(
                f"{len(prompts)} --validation_prompt and {len(images)} --validation_image: give one of either, "
                "or the same number of each."
            )

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt, conditioning image path) pairs, one-to-many as in diffusers."""
        prompts, images = self.validation_prompt or [], self.validation_image or []
        if len(prompts) == 1:
            prompts = prompts * len(images)
        if len(images) == 1:
            images = images * len(prompts)
        return list(zip(prompts, images))


@dataclass
class ControlNetConfig:
    """Everything a ControlNet training run needs."""

    model: ControlNetModelConfig = field(default_factory=ControlNetModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.data.dataset_name and not self.data.train_data_dir:
            raise ConfigError("No training data: give --train_data_dir DIR (or --dataset_name for a hub data set).")
        if not self.model.pretrained_model_name_or_path:
            raise ConfigError("No base model: give --pretrained_model_name_or_path (a diffusers folder or hub id).")
        if self.train.cuda_graphs != "no" and not self.optim.set_grads_to_none:
            # the graphs' gradients alias their static buffers: zeroing them in place would make the next
            # step add the buffer to itself, so they are freed between steps (the same training)
            self.optim = dataclasses.replace(self.optim, set_grads_to_none=True)
