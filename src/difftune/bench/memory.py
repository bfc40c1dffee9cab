"""Peak GPU memory of a ControlNet training step, estimated on the CPU: no GPU, no weights.

The step is difftune's own (``ControlNetMethod.setup``, ``loss``, the optimizer of
``difftune.optim``), run twice (the second step is the steady state: optimizer states
exist) on *fake* tensors (``torch._subclasses.fake_tensor``): every operation computes
shapes and dtypes only, so no GPU and almost no memory are needed; the time is Python's, op
by op (SD 1.5 at 512 px: about 30 s a configuration on one CPU core).
``torch.distributed._tools.mem_tracker.MemTracker`` follows every tensor storage that is
alive and records the peak, by kind: parameters, gradients, optimizer states, activations
(kept for backward) and temporaries.

The same steps also count the operators the step dispatches (``ops_per_step``: the second
step's ATen calls that compute, by phase and by operator; views and bare allocations left
out). A step that is host-bound (a GPU waiting for Python to launch its kernels, as SD 1.5
ControlNet training was on an H200) takes time about in proportion to that count, so it says
which options add launches and where, before a GPU is at hand. CPU autocast casts a few
operators differently from CUDA's, so the count of ``_to_copy`` is near, not equal, to a
GPU run's.

What it is not: a measurement. It counts the bytes of live tensors, which is a lower bound
of ``torch.cuda.max_memory_allocated``: the CUDA caching allocator rounds blocks up, cuDNN
and cuBLAS take workspaces, and CUDA autocast keeps layer and group norms in fp32 where the
CPU autocast used here computes them in bf16 (this only touches the trained ControlNet: the
frozen modules run outside autocast). bitsandbytes' 8-bit AdamW is stood in for by its
states' sizes (one byte per value, an fp32 scale per 256 values, 32-bit states below 4,096
values), since its kernels need CUDA. What the estimate is good for: the share of each kind,
and which option moves which, before a GPU is at hand.

Uses private PyTorch APIs (fake tensors, MemTracker); a PyTorch without them gets a clear
error, and nothing else in difftune depends on this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
import weakref
from typing import Any

import torch

from ..errors import UserError

GIB = 2**30
KINDS = ("PARAM", "BUFFER", "GRAD", "OPT", "ACT", "TEMP", "OTH")


class _Adam8bitStates(torch.optim.Optimizer):
    """The memory of bitsandbytes' ``AdamW8bit``: its state tensors' sizes, an in-place update."""

    BLOCK, MIN_8BIT = 256, 4096

    def __init__(self, params, lr: float = 1e-3, **_ignored):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if p.numel() >= self.MIN_8BIT:
                        blocks = -(-p.numel() // self.BLOCK)
                        for i in (1, 2):
                            state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8)
                            state[f"absmax{i}"] = torch.zeros(blocks, device=p.device)
                    else:
                        for i in (1, 2):
                            state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32)
                p.add_(p.grad, alpha=-group["lr"])
        return None


@contextlib.contextmanager
def _bitsandbytes_standin():
    """``import bitsandbytes`` gives the stand-in above while the estimate runs."""
    saved = {k: sys.modules.get(k) for k in ("bitsandbytes", "bitsandbytes.optim")}
    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.ModuleType("bitsandbytes.optim")
    bnb.optim.AdamW8bit = _Adam8bitStates
    sys.modules.update({"bitsandbytes": bnb, "bitsandbytes.optim": bnb.optim})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _fake_mode():
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError as e:  # pragma: no cover - depends on the PyTorch build
        raise UserError(f"--estimate_memory needs PyTorch's fake tensors ({e}).") from None
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _plain_memo(mode):
    """Module set-up under fake tensors: ``nn.Module.to()`` swaps each fake parameter for its
    converted copy, and torch refuses to swap a tensor that has a weak reference, which the
    converter's memo holds. Held plainly while modules are moved; weak again afterwards, so that
    what the step converts can be freed (kept alive, it doubled the activations counted)."""
    converter = mode.fake_tensor_converter.meta_converter
    converter.tensor_memo, converter.storage_memo = {}, {}
    try:
        yield
    finally:
        converter.tensor_memo, converter.storage_memo = weakref.WeakValueDictionary(), weakref.WeakValueDictionary()


class _OpCounter:
    """Counts the ATen operators dispatched while ``phase`` is set (None: not counting)."""

    # no kernel: allocation, aliasing, the profiler's markers (torch.utils.checkpoint records some)
    SKIP = frozenset({"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "set_",
                      "_record_function_enter_new", "_record_function_exit"})

    def __init__(self):
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.phase: str | None = None
        self.counts: Counter = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counter.phase is not None and func.namespace == "aten" and not func.is_view:
                    name = func.overloadpacket.__name__
                    if name not in counter.SKIP:
                        counter.counts[(counter.phase, name)] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def summary(self, top: int = 12) -> dict:
        """``{"total", "by_phase": {phase: n}, "top": [[operator, n], ...]}``."""
        from collections import Counter

        by_phase, by_op = Counter(), Counter()
        for (phase, name), n in self.counts.items():
            by_phase[phase] += n
            by_op[name] += n
        return {"total": sum(by_phase.values()), "by_phase": dict(by_phase),
                "top": [[name, n] for name, n in by_op.most_common(top)]}


def _tracker():
    try:
        from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
    except ImportError as e:  # pragma: no cover - depends on the PyTorch build
        raise UserError(f"--estimate_memory needs torch.distributed._tools.mem_tracker ({e}).") from None

    class Tracker(MemTracker):
        peak_at: str | None = None

        # MemTracker hooks every parameter's gradient, which frozen ones (the UNet's) refuse;
        # gradients are still found as such through each parameter's .grad
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        # the global peak only, and where it was (the innermost module running then, in forward or
        # backward): MemTracker also keeps every module's peak, walking all modules at every
        # operation (two thirds of the estimate's time), and the estimate reads none of them
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)
                    inner = max(self._mod_tracker.parents, key=lambda m: (m.count("."), len(m)))
                    where = "outside the models" if inner == "Global" else inner
                    for through, model in DENOISER_PARTS.items():  # named by the model, as before the Denoiser
                        if where.startswith(through):
                            where = model + where[len(through):]
                    self.peak_at = f"{where} ({'backward' if self._mod_tracker.is_bw else 'forward'})"

    return Tracker()


# module paths through ``methods.controlnet.Denoiser`` -> the model's class, which names them in the tables
DENOISER_PARTS = {"Denoiser.controlnet": "ControlNetModel", "Denoiser.unet": "UNet2DConditionModel"}


def components(arch: str) -> dict:
    """Random-weight parts of ``arch`` (see ``difftune.bench.architectures.ARCHS``), built in-process."""
    from ..tiny import build_tiny_components, build_tiny_sdxl_components
    from .architectures import build_components

    if arch == "tiny":
        return build_tiny_components()
    if arch == "tiny-sdxl":
        return build_tiny_sdxl_components()
    return build_components(arch, "cpu")


def _base_model(parts: dict, arch: str):
    from ..models import BaseModel

    base = BaseModel(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"], parts["scheduler"],
                     source=f"random {arch}", tokenizer_2=parts.get("tokenizer_2"),
                     text_encoder_2=parts.get("text_encoder_2"), family="sdxl" if "sdxl" in arch else "sd")
    for m in base.frozen_modules():
        m.requires_grad_(False)
    return base


def _batch(method: Any, batch_size: int) -> dict:
    """What the data loader hands the step: latents' distribution (cached) or pixels, and conditions."""
    res, base = method.resolution, method.base
    captions = ["red circle with blue background"] * batch_size
    batch = {"captions": captions, "conditioning_pixel_values": torch.zeros(batch_size, 3, res, res)}
    if method.cfg.train.cache_latents:
        from ..encoded_cache import TextCache

        side = res // base.vae_scale_factor
        batch["latent_mean"] = torch.zeros(batch_size, base.latent_channels, side, side)
        batch["latent_std"] = torch.ones(batch_size, base.latent_channels, side, side)
        with torch.no_grad():
            prompt = method.family.encode_prompts(base, captions[:1], method.device)
        method.text_cache = TextCache(captions[:1], prompt.encoder_hidden_states, prompt.pooled)
    else:
        batch["pixel_values"] = torch.zeros(batch_size, 3, res, res)
    return batch


def estimate_controlnet_memory(arch: str, flags: list[str], *, steps: int = 2, fake: bool = True) -> dict:
    """Peak tensor memory of ``steps`` steps of ``difftune train controlnet FLAGS`` on ``arch``.

    ``flags`` are the training flags (``--resolution``, ``--train_batch_size``, precision and
    memory options; data and output flags are not needed). ``fake=False`` runs the same steps
    on real CPU tensors (small models only: it is how the tests check the fake count).
    Returns ``{"peak_gib", "by_kind_gib", "peak_at", "ops_per_step", "seconds", "exact": False}``.
    """
    from ..cli import config_from_args, parse_command
    from ..config import ControlNetConfig
    from ..methods.controlnet import ControlNetMethod
    from ..optim import build_optimizer
    from ..trainer import autocast_cache_enabled

    args = parse_command(["train", "controlnet", "--output_dir", "memory-estimate",
                          "--train_data_dir", "none (estimate)", *flags])
    cfg = config_from_args(ControlNetConfig, args)
    t = cfg.train
    if t.torch_compile != "no":
        raise UserError("--estimate_memory: leave out --torch_compile (compiled graphs are not estimated).")
    if t.mixed_precision == "fp16":
        raise UserError("--estimate_memory: fp16 loss scaling is not estimated; bf16 uses the same memory.")
    started = time.perf_counter()
    mode = _fake_mode() if fake else contextlib.nullcontext()
    with mode:
        with _plain_memo(mode) if fake else contextlib.nullcontext():
            base = _base_model(components(arch), arch)
            method = ControlNetMethod(cfg, base)
            # on the host: --cuda_graphs auto (`fast`) estimates the eager step, and --cuda_graphs (yes) is refused
            accelerator = types.SimpleNamespace(device=torch.device("cpu"), mixed_precision=t.mixed_precision,
                                                num_processes=1)
            method.setup(accelerator)
        on_device = [base.unet, method.controlnet] + ([] if t.cache_latents else method._encoders())
        batch = _batch(method, t.train_batch_size)
        # "cuda": the optimizer the GPU run would build (fused AdamW)
        with _bitsandbytes_standin() if cfg.optim.use_8bit_adam else contextlib.nullcontext():
            optimizer = build_optimizer(method.param_groups(), cfg.optim, cfg.optim.learning_rate, "cuda")
        tracker, ops = _tracker(), _OpCounter()
        tracker.track_external(*on_device, optimizer)
        generator = torch.Generator().manual_seed(0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16",
                                  cache_enabled=autocast_cache_enabled(t))
        with tracker, ops.mode:
            for step in range(steps):
                counting = step == steps - 1  # the steady state: optimizer states exist
                ops.phase = "forward" if counting else None
                with autocast:
                    loss = method.loss(batch, generator)
                ops.phase = "backward" if counting else None  # optimizer_in_backward steps count here
                loss.backward()
                ops.phase = "optimizer" if counting else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=cfg.optim.set_grads_to_none)
                ops.phase = None
                tracker.reset_mod_stats()  # per-module statistics only; the global peak is kept
        peak = tracker.get_tracker_snapshot("peak")
    by_kind: dict[str, float] = {}
    for per_device in peak.values():
        for kind, nbytes in per_device.items():
            name = str(kind).rsplit(".", 1)[-1]
            if name in KINDS:
                by_kind[name] = by_kind.get(name, 0.0) + nbytes / GIB
    return {"peak_gib": sum(by_kind.values()), "by_kind_gib": by_kind, "peak_at": tracker.peak_at,
            "ops_per_step": ops.summary(), "seconds": round(time.perf_counter() - started, 1), "exact": False}


def format_memory_table(arch: str, resolution: int, batch: int, rows: dict[str, dict]) -> str:
    """Markdown table of ``estimate_controlnet_memory`` results, one row per configuration."""
    head = ("| configuration | estimated peak GiB | parameters | gradients | optimizer states | activations "
            "| temporaries | peak in | operators/step (forward + backward + optimizer) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"Estimated peak tensor memory of a ControlNet training step: {arch}, {resolution} px, batch {batch} "
             "(fake tensors on the CPU; a lower bound of torch.cuda.max_memory_allocated), and the ATen operators "
             "the step dispatches (views and allocations left out; what a host-bound step's time follows)", "", head]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | | |")
            continue
        k = r["by_kind_gib"]
        cells = [k.get("PARAM", 0) + k.get("BUFFER", 0), k.get("GRAD", 0), k.get("OPT", 0), k.get("ACT", 0),
                 k.get("TEMP", 0) + k.get("OTH", 0)]
        ops = r.get("ops_per_step") or {}
        phases = ops.get("by_phase", {})
        split = " + ".join(str(phases.get(phase, 0)) for phase in ("forward", "backward", "optimizer"))
        lines.append(f"| {name} | **{r['peak_gib']:.2f}** | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {r.get('peak_at') or '?'} | {ops.get('total', '?')} ({split}) |")
    return "\n".join(lines)


def estimate_suite(arch: str, configs: dict[str, list[str]], out: str | os.PathLike, resolution: int,
                   batch_size: int = 4) -> dict:
    """``estimate_controlnet_memory`` for each named configuration; writes ``out/memory_estimate.json`` and ``.md``."""
    import json
    from pathlib import Path

    rows: dict[str, dict] = {}
    for name, flags in configs.items():
        try:
            rows[name] = estimate_controlnet_memory(
                arch, ["--resolution", str(resolution), "--train_batch_size", str(batch_size), *flags])
        except UserError as e:
            rows[name] = {"error": str(e)}
    result = {"arch": arch, "resolution": resolution, "batch_size": batch_size, "estimates": rows,
              "note": "fake tensors on the CPU: live tensor bytes, a lower bound of torch.cuda.max_memory_allocated"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "memory_estimate.md").write_text(format_memory_table(arch, resolution, batch_size, rows) + "\n")
    return result
