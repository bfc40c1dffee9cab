"""``--cuda_graphs``: a training step's model work replayed as two CUDA graphs.

Why: on an H200, SD 1.5 ControlNet training at 512 px, batch 4 (`--recipe fast`) kept the GPU
busy 60 ms of a 159 ms step: the host spent the rest issuing 4,689 kernels, one by one, through
Python, autograd and autocast (`docs/bench/h200-2026-11-30-profile-fast.md`). A CUDA graph
records those kernels once and launches them all with one call.

What is captured: the method's *denoiser* — a module from prepared tensors (noisy latents,
timesteps, prompt embeddings, conditioning image, target) to per-sample squared errors,
forward and backward (``torch.cuda.make_graphed_callables``). Everything random or decided
on the host stays outside and eager, exactly as without graphs: the draws from the run's
generator, caption dropout, the text-cache lookup, noising, the Min-SNR weighting and the mean,
the optimizer. The same computation, so the same training (up to kernel-level float order).

What a captured graph cannot hold, and is refused with a message (``check_cuda_graphs``):
gradient checkpointing (it saves and restores the RNG state in backward), the optimizer
inside backward (the captured backward writes all gradients at once: nothing left to save),
several processes (DDP's all-reduce runs from hooks during backward), gradient accumulation
(each micro-batch's gradients land in the same captured buffers), ``--torch_compile``.
A micro-batch of another shape than the captured one (a smaller last batch of an epoch) runs
eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from .errors import ConfigError, UserError

log = logging.getLogger("difftune")

WARMUP_ITERS = 3  # eager forward+backward passes on a side stream before capture (cuDNN/cuBLAS set-up)


def use_cuda_graphs(mode: str, device: torch.device, **settings) -> bool:
    """Whether this run captures its step: ``mode`` is ``--cuda_graphs`` (no, yes, auto).

    ``yes`` refuses, naming every flag at fault, settings a captured step cannot hold
    (``check_cuda_graphs``); ``auto`` (``--recipe fast``) says why not and trains eagerly.
    """
    if mode == "no":
        return False
    if mode == "yes":
        check_cuda_graphs(device, **settings)
        return True
    problems = cuda_graphs_problems(device, **settings)
    if problems:
        log.info("--cuda_graphs auto: off, because of %s", "; ".join(problems))
    return not problems


def check_cuda_graphs(device: torch.device, **settings) -> None:
    """Refuse, naming every flag at fault, the settings a captured training step cannot hold."""
    problems = cuda_graphs_problems(device, **settings)
    if problems:
        raise ConfigError("--cuda_graphs cannot be combined with " + "; ".join(problems) + ".")


def cuda_graphs_problems(device: torch.device, *, gradient_checkpointing: bool, optimizer_in_backward: bool,
                         processes: int, accumulation: int, torch_compile: str) -> list[str]:
    """The settings of a run that a captured training step cannot hold, each named with its flag."""
    problems = []
    if device.type != "cuda":
        problems.append(f"a {device.type} device (CUDA graphs need a CUDA GPU)")
    if gradient_checkpointing:
        problems.append("--gradient_checkpointing (its recomputation saves and restores the RNG state, "
                        "which a captured graph cannot)")
    if optimizer_in_backward:
        problems.append("--optimizer_in_backward (the captured backward writes every gradient at once)")
    if processes > 1:
        problems.append(f"{processes} processes (DDP all-reduces gradients from hooks inside backward)")
    if accumulation > 1:
        problems.append(f"--gradient_accumulation_steps {accumulation} (each micro-batch's gradients are written "
                        "into the same captured buffers: use a larger --train_batch_size)")
    if torch_compile != "no":
        problems.append(f"--torch_compile {torch_compile} (choose one)")
    return problems


def signature(args: tuple[torch.Tensor, ...]) -> tuple:
    """What a captured graph is specific to: each input's shape, dtype, device and requires_grad."""
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)


class GraphedModule:
    """Calls ``module`` (positional tensor arguments only) through CUDA graphs captured on its first call.

    ``capture`` is ``torch.cuda.make_graphed_callables`` (replaceable only for tests of this
    class's bookkeeping on machines without CUDA). Arguments of another signature than the
    first call's run the module eagerly. If capturing fails, ``fallback`` (``--cuda_graphs auto``)
    trains eagerly from then on, with a warning; otherwise the run stops with the reason.
    """

    def __init__(self, module: torch.nn.Module, capture: Callable | None = None, fallback: bool = False):
        self.module = module
        self._eager = module.forward  # make_graphed_callables replaces module.forward in place
        self._capture = capture or self._make_graphed
        self.fallback = fallback
        self._graphed: Callable | None = None
        self._signature: tuple | None = None
        self.eager_calls = 0

    @staticmethod
    def _make_graphed(module: torch.nn.Module, sample_args: tuple[torch.Tensor, ...]) -> Callable:
        # make_graphed_callables refuses to start inside an autocast that caches casts (the cached
        # weight copies of the warm-up would be replayed, stale, forever); the module sets its own
        # autocast, without a cache
        with torch.autocast("cuda", enabled=False):
            return torch.cuda.make_graphed_callables(module, sample_args, num_warmup_iters=WARMUP_ITERS,
                                                     allow_unused_input=True)

    def __call__(self, *args: torch.Tensor):
        sig = signature(args)
        if self._graphed is None:
            log.info("capturing the training step's model work as CUDA graphs (%d warm-up passes)", WARMUP_ITERS)
            # the sample arguments become the graphs' static input buffers: copies, not the caller's tensors
            try:
                self._graphed = self._capture(self.module, tuple(a.detach().clone() for a in args))
            except Exception as e:  # an operation a graph cannot hold, in a model or library we do not own
                if self.fallback:
                    log.warning("--cuda_graphs auto: capturing the training step failed (%s: %s); training "
                                "without CUDA graphs (the same training)", type(e).__name__, e)
                    self.module.forward = self._eager
                    self._graphed = self._eager
                    self._signature = sig
                    return self._eager(*args)
                raise UserError(f"--cuda_graphs: capturing the training step failed ({type(e).__name__}: {e}). "
                                "Train without --cuda_graphs; the step is the same without it.") from e
            self._signature = sig
        if sig != self._signature:
            self.eager_calls += 1
            return self._eager(*args)
        return self._graphed(*args)


@contextlib.contextmanager
def no_autocast_cache(device_type: str, dtype: torch.dtype | None):
    """Autocast to ``dtype`` (off when None) with no cache of cast weights: every step casts the
    current fp32 master weights, in the captured graph as eagerly."""
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
        yield
