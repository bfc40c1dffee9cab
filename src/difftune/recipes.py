"""Named starting points for a run, as plain functions returning settings.

A recipe returns nested settings ({section: {field: value}}); flags and config files
override them (``difftune train controlnet --recipe NAME ...``).
"""

from __future__ import annotations


def controlnet_fill50k() -> dict:
    """The diffusers ControlNet tutorial run on fill50k at 512 px (SD 1.5 base)."""
    return {
        "data": {"resolution": 512},
        "optim": {"learning_rate": 1e-5},
        "train": {"train_batch_size": 4, "mixed_precision": "bf16", "checkpointing_steps": 500},
        "validation": {"validation_steps": 500},
    }


def controlnet_tiny_demo() -> dict:
    """The offline demo: a ControlNet on the bundled 64 px tiny-shapes base, ~8 minutes of training on 2 CPU cores.

    Latents and captions are encoded once before training (1 min for 5,000 images on 2 cores):
    a step then costs 0.50 s instead of 0.69, and 800 steps of batch 16 see each image 2.6 times.
    """
    return {
        "data": {"resolution": 64},
        "optim": {"learning_rate": 1e-3, "lr_warmup_steps": 20, "lr_scheduler": "constant_with_warmup"},
        "train": {"train_batch_size": 16, "max_train_steps": 800, "checkpointing_steps": 200,
                  "checkpoints_total_limit": 2, "seed": 0, "cache_latents": True},
        "validation": {"validation_steps": 200, "num_validation_images": 2, "num_validation_inference_steps": 20},
    }


def fast() -> dict:
    """Throughput on a recent NVIDIA GPU: bf16 frozen parts, encoders cached, TF32, channels-last,
    gradients freed rather than zeroed between steps (backward then writes each gradient instead
    of adding it to zeros: one kernel fewer per trained tensor, 340 on SD 1.5's ControlNet, and
    no gradient memory through the next forward), and the step's model work replayed as CUDA
    graphs where the run allows them (``--cuda_graphs auto``: one CUDA GPU, no accumulation or
    checkpointing; on an H200, SD 1.5 at 512 px: 47.7 images/s against 33.3 without, in less
    memory). Same training as the plain loop (each option is tested for it). Compilation stays opt-in
    (``--torch_compile blocks``): on an H200 it had not finished compiling SD 1.5's blocks
    after 270 s, longer than a short run lasts."""
    return {
        "train": {"mixed_precision": "bf16", "cache_latents": True, "allow_tf32": True, "channels_last": True,
                  "cuda_graphs": "auto"},
        "optim": {"set_grads_to_none": True},
    }


def low_memory() -> dict:
    """Smallest GPU memory: bf16 frozen parts, encoders cached (never on the GPU), activations
    recomputed, each parameter stepped inside backward so full gradients never exist.
    Clipping by the global norm is off (it needs all gradients at once)."""
    return {
        "train": {"mixed_precision": "bf16", "cache_latents": True, "gradient_checkpointing": True},
        "optim": {"optimizer_in_backward": True, "set_grads_to_none": True, "max_grad_norm": 0.0},
    }


def debug() -> dict:
    """Smallest possible run to check a set-up end to end: 4 steps, checkpoint every 2."""
    return {
        "train": {"train_batch_size": 2, "max_train_steps": 4, "checkpointing_steps": 2, "seed": 0},
        "optim": {"lr_warmup_steps": 0},
        "validation": {"validation_steps": 2, "num_validation_images": 1, "num_validation_inference_steps": 2},
    }


RECIPES = {"controlnet_fill50k": controlnet_fill50k, "controlnet_tiny_demo": controlnet_tiny_demo, "debug": debug,
           "fast": fast, "low_memory": low_memory}
# recipes written for one method's data and learning rates; the others serve any run whose config has their settings
ONLY_FOR = {"controlnet_fill50k": "ControlNetConfig", "controlnet_tiny_demo": "ControlNetConfig"}


def recipes_for(cfg_cls: type) -> dict:
    """The recipes whose every setting exists in the run config ``cfg_cls`` (e.g. no encoder
    caching for Custom Diffusion, whose images are augmented differently at every step)."""
    from .config import nest
    from .errors import ConfigError

    usable = {}
    for name, recipe in RECIPES.items():
        if ONLY_FOR.get(name, cfg_cls.__name__) != cfg_cls.__name__:
            continue
        try:
            nest(cfg_cls, recipe())
        except ConfigError:
            continue
        usable[name] = recipe
    return usable
