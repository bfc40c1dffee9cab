"""Optimizer and learning-rate schedule from ``OptimConfig``."""

from __future__ import annotations

import dataclasses

import torch

from .config import OptimConfig
from .errors import ConfigError


def effective_learning_rate(cfg: OptimConfig, batch_size: int, accumulation: int, processes: int) -> float:
    """``--scale_lr`` multiplies by the number of images per optimizer step, as diffusers does."""
    if cfg.scale_lr:
        return cfg.learning_rate * batch_size * accumulation * processes
    return cfg.learning_rate


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, lr: float, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA and the CPU), or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``.

    Fused on the CPU too: for the tiny-shapes ControlNet (256 tensors, 2.8M parameters) a step
    takes 10 ms instead of the for-loop implementation's 38 (2 cores), about 4% of a demo step.

    With ``--optimizer_in_backward`` the same optimizer is built per bucket of parameters and stepped
    inside backward (``InBackwardOptimizer``). A group may carry ``lr_multiplier``: its
    learning rate is then ``lr`` times that (so the schedule and ``--scale_lr`` act on it too).
    """
    param_groups = [_with_own_lr(g, lr) for g in param_groups]
    if cfg.optimizer_in_backward:
        groups = [{**g, "lr": g.get("lr", lr)} for g in param_groups]
        single = dataclasses.replace(cfg, optimizer_in_backward=False)
        return InBackwardOptimizer(groups, lambda params, options: build_optimizer(
            [{**options, "params": params}], single, lr, device_type))
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        return _bitsandbytes().optim.AdamW8bit(param_groups, **kwargs)
    if device_type in ("cuda", "cpu"):
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups, **kwargs)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "--use_8bit_adam needs bitsandbytes: pip install 'difftune[bnb]' (CUDA GPUs only)."
        ) from None
    return bitsandbytes


def check_optimizer_available(cfg: OptimConfig) -> None:
    """Before any model or data is loaded (or a latent cache built): the optimizer asked for can be made."""
    if cfg.use_8bit_adam:
        _bitsandbytes()


def _with_own_lr(group: dict, lr: float) -> dict:
    if "lr_multiplier" not in group:
        return group
    group = dict(group)
    group["lr"] = lr * group.pop("lr_multiplier")
    return group


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_train_steps: int):
    """The diffusers schedules, stepped once per optimizer step (not once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


class InBackwardOptimizer(torch.optim.Optimizer):
    """Steps the parameters inside backward, as soon as their gradients are complete, then frees them.

    Parameters are taken in buckets of consecutive ones (in their group's order, which follows
    the model's layers) of at most ``bucket_bytes`` together and at most 1/``min_buckets`` of
    all (a larger tensor is a bucket of its own), each with its own inner optimizer, stepped
    from a post-accumulate-grad hook when the bucket's last gradient lands; the bucket's
    gradients are freed then. So the full set of gradients never coexists: for a 361M-parameter
    ControlNet, 1.4 GB of fp32 gradients, of which only the buckets still waiting for a
    gradient are held. Buckets rather than one tensor at a time because each inner step costs
    host time (an optimizer call and its kernels): SD 1.5's ControlNet has 340 tensors in 69
    buckets of 16 MiB.

    The update is the same AdamW update as the plain optimizer's (each tensor is updated on its
    own in both); what is lost is anything that needs all gradients first: clipping by the
    global norm, accumulation over several micro-batches, fp16 loss scaling and DDP's gradient
    all-reduce (the callers check these).

    To the loop and the lr schedule it looks like one optimizer: the schedule writes the
    learning rate into ``param_groups``, each bucket copies it into its inner optimizer before
    stepping, and ``state_dict`` is in the standard format (state keyed by parameter index),
    so checkpoints are written and resumed exactly as for the plain optimizer. ``step`` steps
    only what backward left: buckets some of whose parameters got no gradient this time.
    """

    BUCKET_BYTES = 16 * 2**20

    def __init__(self, param_groups: list[dict], make_inner, bucket_bytes: int = BUCKET_BYTES, min_buckets: int = 32):
        super().__init__(param_groups, defaults={})
        self._buckets: list[tuple[dict, list[torch.nn.Parameter], torch.optim.Optimizer]] = []
        self._bucket_of: dict[torch.nn.Parameter, int] = {}
        self._ready: list[set] = []
        self._handles = []
        total = sum(p.numel() * p.element_size() for g in self.param_groups for p in g["params"])
        limit = min(bucket_bytes, max(1, total // min_buckets))  # a small model's too are never all held
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for params in _consecutive_buckets(group["params"], limit):
                for p in params:
                    self._bucket_of[p] = len(self._buckets)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
                self._buckets.append((group, params, make_inner(params, options)))
                self._ready.append(set())

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        b = self._bucket_of[p]
        self._ready[b].add(p)
        if len(self._ready[b]) == len(self._buckets[b][1]):
            self._step_bucket(b)

    @torch.no_grad()
    def _step_bucket(self, b: int) -> None:
        group, params, inner = self._buckets[b]
        inner.param_groups[0]["lr"] = group["lr"]
        inner.step()
        for p in params:
            p.grad = None
        self._ready[b].clear()

    def step(self, closure=None):  # noqa: D401 - see the class docstring
        for b, ready in enumerate(self._ready):
            if ready:
                self._step_bucket(b)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._bucket_of:
            p.grad = None
        for ready in self._ready:
            ready.clear()

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _inner_of(self, p: torch.nn.Parameter) -> torch.optim.Optimizer:
        return self._buckets[self._bucket_of[p]][2]

    def state_dict(self) -> dict:
        state = {}
        for i, p in enumerate(self._params()):
            inner_state = self._inner_of(p).state.get(p)
            if inner_state:
                state[i] = dict(inner_state)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        index, packed = 0, []
        for g, full in zip(groups, self.param_groups):
            packed.append({**g, "params": list(range(index, index + len(full["params"])))})
            index += len(full["params"])
        return {"state": state, "param_groups": packed}

    def load_state_dict(self, state_dict: dict) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        index = {p: i for i, p in enumerate(self._params())}
        saved_state = {int(i): entry for i, entry in state_dict["state"].items()}
        for _, params, inner in self._buckets:
            # through the inner optimizer's own loader: it places each state tensor (e.g. a
            # fused AdamW's step counter on the GPU) where that optimizer expects it
            inner_state = inner.state_dict()
            inner_state["state"] = {j: saved_state[index[p]] for j, p in enumerate(params) if index[p] in saved_state}
            inner.load_state_dict(inner_state)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _consecutive_buckets(params: list, limit: int) -> list[list]:
    """``params`` cut into runs of consecutive tensors of at most ``limit`` bytes together (a
    larger tensor is a bucket of its own)."""
    buckets, current, size = [], [], 0
    for p in params:
        n = p.numel() * p.element_size()
        if current and size + n > limit:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += n
    if current:
        buckets.append(current)
    return buckets


def check_optimizer_in_backward(cfg: OptimConfig, accumulation: int, mixed_precision: str | None, processes: int) -> None:
    """Reject settings that need all gradients at once before any parameter is updated."""
    if not cfg.optimizer_in_backward:
        return
    problems = []
    if cfg.max_grad_norm > 0:
        problems.append(f"--max_grad_norm {cfg.max_grad_norm} (clipping needs the global norm: pass --max_grad_norm 0)")
    if accumulation > 1:
        problems.append(f"--gradient_accumulation_steps {accumulation} (use a larger --train_batch_size, or "
                        "gradient checkpointing to make room for it)")
    if mixed_precision == "fp16":
        problems.append("--mixed_precision fp16 (loss scaling unscales all gradients first: use bf16)")
    if processes > 1:
        problems.append(f"{processes} processes (DDP all-reduces gradients after backward: use it on one GPU)")
    if problems:
        raise ConfigError("--optimizer_in_backward cannot be combined with " + "; ".join(problems) + ".")


def learning_rate_text(summary: dict, optim_cfg) -> str:
    """The learning rate as a model card states it: the rate used, and how --scale_lr got there."""
    used = summary.get("learning_rate", optim_cfg.learning_rate)
    if optim_cfg.scale_lr and used != optim_cfg.learning_rate:
        return f"learning rate {used:g} (--learning_rate {optim_cfg.learning_rate:g} scaled by --scale_lr)"
    return f"learning rate {used:g}"


def batch_text(batch_size: int, processes: int, accumulation: int) -> str:
    """The samples an optimizer step trains on, and how they come about: "8 samples (batch 2 x 2 processes
    x accumulation 2)"; the processes only when there are several."""
    parts = [f"batch {batch_size}", *([f"{processes} processes"] if processes > 1 else []),
             f"accumulation {accumulation}"]
    return f"{batch_size * processes * accumulation} samples ({' x '.join(parts)})"
