"""Typed run configuration of Custom Diffusion (``difftune train custom-diffusion``).

Field names are those of diffusers' ``train_custom_diffusion.py``; the shared sections
(model, optim, loss, train) are the ones ControlNet uses. ``__post_init__`` checks what can
be checked without touching files; data problems (missing folders, bad images, prompts
without the modifier token) are checked when the concepts are resolved
(``difftune.custom_diffusion.concepts``), with the file and flag in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import LossConfig, ModelConfig, OptimConfig, TrainConfig, check_fields, opt, require_at_least_one
from .errors import ConfigError

DEFAULT_OUTPUT_DIR = "custom-diffusion-model"
DEFAULT_TRACKER = "custom-diffusion"


@dataclass
class CustomDiffusionDataConfig:
    instance_data_dir: str | None = opt(None, "Folder with the 4-20 images of the concept.")
    instance_prompt: str | None = opt(None, "Caption of the instance images; must contain the modifier token, "
                                            "e.g. 'photo of a <new1> cat'.")
    class_data_dir: str | None = opt(None, "Folder of class (prior) images; missing ones are generated.")
    class_prompt: str | None = opt(None, "Prompt of the class images, e.g. 'cat' (same class as the concept).")
    concepts_list: str | None = opt(
        None, "JSON file: a list of {instance_prompt, class_prompt, instance_data_dir, class_data_dir}, "
              "one per concept, trained jointly (replaces the four single-concept flags)."
    )
    concepts_root: str | None = opt(
        None, "Folder the relative folders in --concepts_list are read from where they do not exist from the current "
              "folder (a run's record repeated from another folder sets it to the folder that run was started in).")
    with_prior_preservation: bool = opt(False, "Add the prior-preservation loss on class images.")
    real_prior: bool = opt(False, "Class images are real images with captions (`difftune retrieve`, or a folder "
                                  "with images.txt + caption.txt, or images with same-name .txt captions).")
    prior_loss_weight: float = opt(1.0, "Weight of the prior-preservation loss.")
    num_class_images: int = opt(200, "Class images per concept; missing ones are generated with the base model.")
    sample_batch_size: int = opt(4, "Batch size when generating class images.")
    prior_generation_precision: str | None = opt(
        None, "Precision of class-image generation (default: fp16 on a GPU, fp32 on the CPU).",
        choices=("no", "fp32", "fp16", "bf16"),
    )
    num_class_inference_steps: int = opt(25, "Denoising steps (UniPC) for each generated class image.")
    resolution: int | None = opt(None, "Training resolution; divisible by 8 (default: 512, or the base model's own "
                                       "size where smaller: 64 for tiny-shapes).")
    center_crop: bool = opt(False, "Centre-crop images to a square (default: class images are randomly cropped, "
                                   "instance images resized to a square).")
    hflip: bool = opt(False, "Randomly flip images horizontally.")
    noaug: bool = opt(False, "Turn off the random-rescale augmentation of instance images.")
    dataloader_num_workers: int = opt(0, "Data loading worker processes (0: in the main process).")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError(f"--resolution {self.resolution} is not a positive multiple of 8 (as diffusers requires; "
                              f"Stable Diffusion's VAE down-samples by 8): use e.g. {max(8, self.resolution // 8 * 8)}.")
        if self.concepts_list and (self.instance_data_dir or self.instance_prompt):
            raise ConfigError("Give either --concepts_list or --instance_data_dir/--instance_prompt, not both.")
        if not self.concepts_list:
            if not self.instance_data_dir:
                raise ConfigError("No concept: give --instance_data_dir DIR and --instance_prompt "
                                  "'... <new1> ...' (or --concepts_list FILE.json).")
            if not self.instance_prompt:
                raise ConfigError("--instance_data_dir needs --instance_prompt, e.g. 'photo of a <new1> cat'.")
        if self.with_prior_preservation and not self.concepts_list:
            if not self.class_data_dir:
                raise ConfigError("--with_prior_preservation needs --class_data_dir (generated images go there).")
            if not self.class_prompt and not self.real_prior:
                raise ConfigError("--with_prior_preservation needs --class_prompt, e.g. 'cat'.")
        if self.real_prior and not self.with_prior_preservation:
            raise ConfigError("--real_prior only makes sense with --with_prior_preservation.")
        if self.prior_loss_weight < 0:
            raise ConfigError(f"--prior_loss_weight must be >= 0, got {self.prior_loss_weight}.")
        require_at_least_one(self, "num_class_images", "sample_batch_size", "num_class_inference_steps")
        if self.dataloader_num_workers < 0:
            raise ConfigError("--dataloader_num_workers must be >= 0.")


@dataclass
class CustomDiffusionModelConfig:
    modifier_token: str | None = opt(
        None, "New token(s) for the concept(s), '+'-separated for several: '<new1>+<new2>'. Without it, the "
              "<...> tokens written in the instance prompts are the new tokens; prompts without any train the "
              "cross-attention alone on their own words, text encoder frozen (diffusers' script without the flag)."
    )
    initializer_token: str | None = opt(
        None, "Word(s) whose embedding starts each new token, '+'-separated; each must be ONE token of the "
              "tokenizer (default: the last word of the concept's --class_prompt, else of its instance prompt)."
    )
    freeze_model: str = opt(
        "crossattn_kv", "Train the cross-attention key/value projections only, or all cross-attention weights.",
        choices=("crossattn_kv", "crossattn"),
    )
    embedding_learning_rate: float | None = opt(
        None, "Learning rate of the new tokens' embeddings (default: --learning_rate). --scale_lr and the "
              "schedule act on it as on --learning_rate. Only the new tokens' rows train, so a higher rate "
              "here changes what the concept prompt means without moving the model's other prompts."
    )
    no_safe_serialization: bool = opt(False, "Write .bin (torch.save) files instead of .safetensors.")

    def modifier_tokens(self) -> list[str]:
        return [t.strip() for t in (self.modifier_token or "").split("+") if t.strip()]

    def initializer_tokens(self) -> list[str]:
        return [t.strip() for t in (self.initializer_token or "").split("+") if t.strip()]

    def __post_init__(self) -> None:
        check_fields(self)
        tokens = self.modifier_tokens()
        if self.modifier_token is not None and not tokens:
            raise ConfigError("--modifier_token is empty: give e.g. '<new1>' (or '<new1>+<new2>'), or leave the "
                              "flag out.")
        if len(set(tokens)) != len(tokens):
            raise ConfigError(f"--modifier_token {self.modifier_token!r} repeats a token.")
        if self.embedding_learning_rate is not None and not self.embedding_learning_rate > 0:
            raise ConfigError(f"--embedding_learning_rate must be > 0, got {self.embedding_learning_rate}.")
        inits = self.initializer_tokens()
        if inits and tokens and len(inits) != len(tokens):  # diffusers drops the extra words; one may be a lost token
            raise ConfigError(f"--initializer_token {self.initializer_token!r} gives {len(inits)} word(s) for "
                              f"{len(tokens)} modifier token(s) ({'+'.join(tokens)}): give one per token, "
                              "'+'-separated, in the same order.")


@dataclass
class CustomDiffusionValidationConfig:
    validation_prompt: list[str] | None = opt(None, "Prompts for validation images, e.g. '<new1> cat in a bucket'.")
    num_validation_images: int = opt(2, "Images generated per validation prompt.")
    validation_steps: int = opt(50, "Validate every N optimizer steps (and at the end).")
    num_validation_inference_steps: int = opt(25, "Denoising steps of the validation sampler (UniPC).")

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least_one(self, "num_validation_images", "validation_steps", "num_validation_inference_steps")


def custom_diffusion_defaults() -> dict:
    """Where the diffusers script's defaults differ from the shared sections' (ControlNet's) ones.

    Applied under every recipe, config file and flag (``make_config``, the CLI), so a run
    writes to ``custom-diffusion-model`` and trains at lr 1e-5 unless told otherwise.
    """
    return {
        "optim": {"learning_rate": 1e-5},
        "train": {"output_dir": DEFAULT_OUTPUT_DIR, "tracker_project_name": DEFAULT_TRACKER,
                  "checkpointing_steps": 250},
    }


@dataclass
class CustomDiffusionConfig:
    """Everything a Custom Diffusion training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    custom: CustomDiffusionModelConfig = field(default_factory=CustomDiffusionModelConfig)
    data: CustomDiffusionDataConfig = field(default_factory=lambda: CustomDiffusionDataConfig(
        instance_data_dir="<unset>", instance_prompt="<unset>"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: CustomDiffusionValidationConfig = field(default_factory=CustomDiffusionValidationConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model.pretrained_model_name_or_path:
            raise ConfigError("No base model: give --pretrained_model_name_or_path (a diffusers folder or hub id).")
        if self.data.instance_data_dir == "<unset>":
            raise ConfigError("No concept: give --instance_data_dir and --instance_prompt (or --concepts_list).")


def make_config(values: dict | None = None) -> CustomDiffusionConfig:
    """A run config from flat or nested settings, over ``custom_diffusion_defaults()``."""
    from .config import from_dict, merge, nest

    return from_dict(CustomDiffusionConfig, merge(custom_diffusion_defaults(),
                                                  nest(CustomDiffusionConfig, values or {})))
