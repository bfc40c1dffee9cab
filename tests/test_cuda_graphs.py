"""``--cuda_graphs``: what can be checked without a GPU.

The capture itself needs CUDA (``bench`` configs ``fast`` and ``fast_graphs`` measure it on one).
Here: the settings a graph cannot hold are refused (``yes``) or turn graphs off (``auto``); the denoiser's graph path (the ControlNet's own
forward under an autocast without a cast cache, bypassing accelerate's wrapper) computes
exactly what the loop's path does; it makes no host synchronisation (capture would fail); and
the wrapper's bookkeeping (static copies of the first call's arguments, other shapes eager).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_config
from difftune.api import train_controlnet
from difftune.cuda_graphs import GraphedModule, check_cuda_graphs, use_cuda_graphs
from difftune.errors import ConfigError, UserError


def test_settings_a_graph_cannot_hold_are_refused_by_name(tiny_model_dir, fill_dir, tmp_path):
    cfg = make_config(tiny_model_dir, fill_dir, tmp_path / "g", cuda_graphs=True, gradient_checkpointing=True,
                      gradient_accumulation_steps=2)
    with pytest.raises(ConfigError) as e:
        train_controlnet(cfg)
    msg = str(e.value)
    assert msg.startswith("--cuda_graphs cannot be combined with a cpu device")
    assert "--gradient_checkpointing" in msg and "--gradient_accumulation_steps 2" in msg
    assert not (tmp_path / "g" / "checkpoints").exists() or not any((tmp_path / "g" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="--optimizer_in_backward .*2 processes.*--torch_compile full"):
        check_cuda_graphs(torch.device("cuda"), gradient_checkpointing=False, optimizer_in_backward=True,
                          processes=2, accumulation=1, torch_compile="full")
    check_cuda_graphs(torch.device("cuda"), gradient_checkpointing=False, optimizer_in_backward=False,
                      processes=1, accumulation=1, torch_compile="no")  # what `fast` + --cuda_graphs is
    # the graphs' gradients alias their buffers: they are freed between steps, never zeroed in place
    assert make_config(tiny_model_dir, fill_dir, tmp_path / "h", cuda_graphs=True).optim.set_grads_to_none
    assert not make_config(tiny_model_dir, fill_dir, tmp_path / "h").optim.set_grads_to_none


def test_auto_uses_graphs_where_the_run_allows_them_and_says_why_not(caplog):
    ok = dict(gradient_checkpointing=False, optimizer_in_backward=False, processes=1, accumulation=1,
              torch_compile="no")
    cuda = torch.device("cuda")
    assert use_cuda_graphs("auto", cuda, **ok) and use_cuda_graphs("yes", cuda, **ok)
    assert not use_cuda_graphs("no", cuda, **ok)
    with caplog.at_level("INFO", logger="difftune"):
        assert not use_cuda_graphs("auto", cuda, **{**ok, "accumulation": 4})
        assert not use_cuda_graphs("auto", torch.device("cpu"), **ok)
    assert "--cuda_graphs auto: off, because of --gradient_accumulation_steps 4" in caplog.text
    assert "a cpu device" in caplog.text
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps 4"):
        use_cuda_graphs("yes", cuda, **{**ok, "accumulation": 4})


def test_cuda_graphs_flag_values(tmp_path):
    """The flag alone is ``yes``; ``--recipe fast`` asks for ``auto``; true/false (config files, the
    saved configs of runs before the tri-state) read as yes/no; anything else is refused by name."""
    from difftune.cli import build_parser, config_from_args
    from difftune.config import ControlNetConfig, ControlNetTrainConfig
    from difftune.recipes import RECIPES

    parse = build_parser().parse_args
    common = ["train", "controlnet", "--train_data_dir", "d", "--output_dir", "o"]
    graphs = lambda extra, recipe=None: config_from_args(ControlNetConfig, parse(common + extra), recipe).train.cuda_graphs  # noqa: E731
    assert graphs([]) == "no"
    assert graphs(["--cuda_graphs"]) == "yes"
    assert graphs(["--cuda_graphs", "auto"]) == "auto"
    assert graphs(["--recipe", "fast"], RECIPES["fast"]()) == "auto"
    assert graphs(["--recipe", "fast", "--cuda_graphs", "no"], RECIPES["fast"]()) == "no"
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text('{"cuda_graphs": true}')
    assert graphs(["--config", str(cfg_file)]) == "yes"
    assert ControlNetTrainConfig(cuda_graphs=False).cuda_graphs == "no"
    with pytest.raises(ConfigError, match="--cuda_graphs 'maybe': choose from no, yes, auto"):
        ControlNetTrainConfig(cuda_graphs="maybe")


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def bf16_method(request, tiny_model_dir, fill_dir, tmp_path_factory):
    """A tiny model's ControlNet method set up as the loop sets it up: bf16, prepared by accelerate.
    SD 1.x and SDXL (whose denoiser also takes pooled text embeddings and time ids)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from difftune.methods.controlnet import ControlNetMethod
    from difftune.tiny import save_tiny_sdxl_model

    model = tiny_model_dir
    if request.param == "sdxl":
        model = save_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)
    cfg = make_config(model, fill_dir, tmp_path_factory.mktemp("den"), mixed_precision="bf16",
                      proportion_empty_prompts=0.3)
    method = ControlNetMethod(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        method.setup(accelerator)
        method.bind([accelerator.prepare(method.controlnet)])
        data = method.train_dataset()
        batch = method.collate([data[i] for i in range(4)])
        yield method, accelerator, batch
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _loss_and_grads(method, accelerator, batch):
    method.controlnet.zero_grad(set_to_none=True)
    with accelerator.autocast():
        loss = method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.controlnet.parameters()]


def test_the_graph_path_computes_what_the_loop_computes(bf16_method):
    method, accelerator, batch = bf16_method
    # accelerate wrapped the ControlNet's forward in an autocast (and fp32 outputs): the loop's path
    assert "forward" in vars(method.controlnet)
    loss_a, grads_a = _loss_and_grads(method, accelerator, batch)
    method.denoiser.graph_autocast = ("cpu", torch.bfloat16)
    try:
        loss_b, grads_b = _loss_and_grads(method, accelerator, batch)
        # the graph path's own autocast is what the ControlNet runs under, not the loop's: without
        # one, its fp32 weights meet the bf16 latents
        method.denoiser.graph_autocast = ("cpu", None)
        with pytest.raises(RuntimeError, match="dtype"):
            _loss_and_grads(method, accelerator, batch)
    finally:
        method.denoiser.graph_autocast = None
    assert float(loss_a) > 0 and torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_the_denoiser_never_waits_for_the_device(bf16_method):
    """A CUDA graph cannot capture a host synchronisation (``.item()``, a data-dependent branch or
    shape). On fake tensors (shapes, no values) such an operation raises: run the denoiser's
    forward and backward on them, and check the check with a module that does synchronise."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    method, accelerator, batch = bf16_method
    den = method.denoiser
    real, seen = method._denoise, []
    method._denoise = lambda *args: seen.append(args) or real(*args)  # what the loss hands the denoiser
    try:
        with accelerator.autocast():
            method.loss(batch, torch.Generator().manual_seed(0))
    finally:
        method._denoise = real
    (args,) = seen
    assert len(args) == (7 if method.family.name == "sdxl" else 5), [a.shape for a in args]
    den.graph_autocast = ("cpu", torch.bfloat16)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            per_sample = den(*(torch.empty(a.shape, dtype=a.dtype) for a in args))
            grads = torch.autograd.grad(per_sample.sum(), [p for p in den.controlnet.parameters()], allow_unused=True)
        assert per_sample.shape == (4,) and any(g is not None for g in grads)

        class Syncs(torch.nn.Module):
            def forward(self, x):
                return x * 2 if x.sum().item() > 0 else x

        with pytest.raises(DataDependentOutputException), FakeTensorMode(allow_non_fake_inputs=True):
            Syncs()(torch.randn(3))
    finally:
        den.graph_autocast = None


def test_graphed_module_captures_static_copies_and_runs_other_shapes_eagerly():
    captured = {}

    def capture(module, sample_args):  # stands in for torch.cuda.make_graphed_callables' bookkeeping only
        captured["args"] = sample_args
        return lambda *args: module(*args) + 0

    lin = torch.nn.Linear(3, 2)
    g = GraphedModule(lin, capture=capture)
    x = torch.randn(4, 3)
    assert torch.equal(g(x), lin(x))
    (static,) = captured["args"]
    assert torch.equal(static, x) and static.data_ptr() != x.data_ptr()  # the graphs' own input buffer
    assert g.eager_calls == 0
    small = torch.randn(2, 3)  # an epoch's smaller last batch
    assert torch.equal(g(small), lin(small)) and g.eager_calls == 1
    g(torch.randn(4, 3))
    assert g.eager_calls == 1 and len(captured) == 1

    def fails(module, sample_args):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(UserError, match="--cuda_graphs: capturing the training step failed .*not permitted.*"
                                        "Train without --cuda_graphs"):
        GraphedModule(lin, capture=fails)(x)


def test_auto_trains_eagerly_when_capturing_fails(caplog):
    def fails(module, sample_args):
        raise RuntimeError("operation not permitted when stream is capturing")

    lin = torch.nn.Linear(3, 2)
    g = GraphedModule(lin, capture=fails, fallback=True)
    x = torch.randn(4, 3)
    with caplog.at_level("WARNING", logger="difftune"):
        assert torch.equal(g(x), lin(x))
    assert "capturing the training step failed (RuntimeError: operation not permitted" in caplog.text
    assert torch.equal(g(x), lin(x)) and torch.equal(g(x[:2]), lin(x[:2]))  # eager from then on, any shape
