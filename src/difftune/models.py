"""Loading the frozen base model (tokenizer, text encoder, VAE, UNet, noise scheduler).

One loader for every source: a diffusers-layout folder or a Hub id. Offline, a Hub id that
is not cached fails with a message that says so and what to pass instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion 1.x/2.x model."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    source: str

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.vae, self.unet]


BUILTIN_MODELS = {"tiny-shapes": "assets/tiny-shapes"}
DEFAULT_MODEL = "tiny-shapes"


def resolve_builtin(name_or_path: str) -> str:
    """A short built-in name ("tiny-shapes") becomes the folder shipped inside the package."""
    if name_or_path in BUILTIN_MODELS and not Path(name_or_path).exists():
        from importlib.resources import files

        folder = Path(str(files("difftune") / BUILTIN_MODELS[name_or_path]))
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"The built-in model '{name_or_path}' is missing from this install ({folder}).")
        return str(folder)
    return name_or_path


def _hub_hint(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "no network or no such repository"
    return ModelLoadError(
        f"Could not load '{name}': it is not a local folder, and it could not be fetched from the "
        f"Hugging Face Hub ({why}). Pass a local diffusers-layout folder (with model_index.json, unet/, "
        f"vae/, text_encoder/, tokenizer/, scheduler/). Underlying error: {type(err).__name__}: {err}"
    )


def check_local_folder(path: Path, needed: tuple[str, ...]) -> None:
    missing = [sub for sub in needed if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is not a diffusers-layout Stable Diffusion folder: missing sub-folder(s) "
            f"{', '.join(missing)}. Export one with `pipe.save_pretrained(DIR)`."
        )


def load_base_model(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    tokenizer_name: str | None = None,
    cache_dir: str | None = None,
) -> BaseModel:
    """Load the frozen components of an SD 1.x/2.x model in fp32 on the CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    name_or_path = resolve_builtin(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"--pretrained_model_name_or_path {local} is a file; give the model folder.")
        check_local_folder(local, ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
        name_or_path = str(local)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"Model folder {name_or_path} does not exist.")
    common = dict(revision=revision, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_name or name_or_path, subfolder=None if tokenizer_name else "tokenizer", **common
        )
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant, **common)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **common)
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **common)
        noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **common)
    except (OSError, ValueError) as e:
        if local.exists():
            raise ModelLoadError(f"Could not load the model in {local}: {e}") from None
        raise _hub_hint(name_or_path, e) from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(tokenizer, text_encoder, vae, unet, noise_scheduler, source=name_or_path)


def load_controlnet(name_or_path: str, revision: str | None = None, cache_dir: str | None = None):
    """An existing ControlNet (folder or hub id) to continue training from."""
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(
            name_or_path, revision=revision, cache_dir=cache_dir, torch_dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise ModelLoadError(f"Could not load the ControlNet in {name_or_path}: {e}") from None
        raise _hub_hint(name_or_path, e) from None


def load_tokenizer(name_or_path: str, revision: str | None = None, cache_dir: str | None = None):
    """The base model's tokenizer alone (for data checks)."""
    from transformers import AutoTokenizer

    name_or_path = resolve_builtin(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise ModelLoadError(f"Could not load the tokenizer in {name_or_path}/tokenizer: {e}") from None
        raise _hub_hint(name_or_path, e) from None
