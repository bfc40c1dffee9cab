"""Speed options that change how models run, never what they compute: memory format and compilation.

Both act on modules in place, so parameter names (checkpoints, export) stay the same:
``nn.Module.compile`` compiles a module's forward without wrapping it, unlike
``torch.compile(module)``, whose wrapper prefixes every state-dict key with ``_orig_mod.``.

``--torch_compile blocks`` is regional compilation: each repeated block of a UNet or
ControlNet (ResNet blocks, transformer blocks) is compiled on its own, and the glue between
blocks stays eager. Blocks of one class share a compiled graph only when their shapes (channel
counts included: parameter shapes are static) and the inputs' requires_grad agree: SD 1.5's
UNet + ControlNet make 42 graphs (counted with the ``eager`` backend at 128 px), which an
H200 had not finished compiling after 270 s. Hence no recipe turns it on.
"""

from __future__ import annotations

import itertools
import logging
import os

import torch

log = logging.getLogger("difftune")

# the repeated blocks of diffusers' UNets and ControlNets
BLOCK_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D")


def to_channels_last(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.to(memory_format=torch.channels_last)


def compile_backend() -> str:
    """torch.compile's backend: inductor, unless ``DIFFTUNE_COMPILE_BACKEND`` names another
    (``aot_eager`` captures the same graphs without generating kernels: to tell a numerical
    difference of the generated code from one of the capture, and for fast CPU tests)."""
    return os.environ.get("DIFFTUNE_COMPILE_BACKEND", "inductor")


def compile_blocks(module: torch.nn.Module) -> int:
    """Compile every repeated block of ``module`` in place; returns how many were compiled."""
    n = 0
    for sub in module.modules():
        if type(sub).__name__ in BLOCK_CLASSES:
            sub.compile(backend=compile_backend())
            n += 1
    return n


def apply_compile(mode: str, *modules: torch.nn.Module) -> None:
    """``mode``: 'no', 'blocks' (regional) or 'full' (each whole module)."""
    if mode == "no":
        return
    import torch._dynamo

    if all(p.device.type == "cpu" for m in modules for p in itertools.islice(m.parameters(), 1)):
        log.warning("--torch_compile %s on the CPU: inductor builds C++ kernels for every block first (minutes "
                    "before the first step, each time the shapes change); it pays off on a GPU.", mode)
    # blocks of one class recompile once per distinct input shape (a UNet's ResNet blocks
    # see a dozen); the default limit of 8 would silently fall back to eager for the rest
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for m in modules:
        if mode == "full":
            m.compile(backend=compile_backend())
        else:
            log.info("compiled %d blocks of %s", compile_blocks(m), type(m).__name__)
