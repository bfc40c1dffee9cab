"""Every speed/memory option trains the same thing as the plain loop (issue 5).

Each test runs the tiny model for a few steps with and without one option and compares the
per-step losses (metrics.jsonl) and the final weights. Tolerances are for float reordering
only: a wrong latent sample, a dropped gradient or a skipped update is orders larger.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config
from difftune.api import train_controlnet
from difftune.errors import ConfigError


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(str(out / "diffusion_pytorch_model.safetensors"))


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _flat(weights):
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, fill_dir, tmp_path_factory):
    """The reference: 4 steps of the plain loop, no clipping (so in-backward stepping compares too)."""
    from difftune.methods.controlnet import ControlNetMethod

    out = tmp_path_factory.mktemp("plain")
    cfg = make_config(tiny_model_dir, fill_dir, out, max_grad_norm=0.0, proportion_empty_prompts=0.3)
    initial = ControlNetMethod(cfg).controlnet.state_dict()
    train_controlnet(cfg)
    return SimpleNamespace(out=out, initial=initial)


def _same_training(out, plain, tolerance):
    """Losses agree step by step, and the weights moved the same way: Adam's normalised update
    turns float-reordering noise on near-zero gradients into differences of up to lr per
    element, so the weights are compared as the norm of their difference against the norm
    of the whole update."""
    assert _losses(out) == pytest.approx(_losses(plain.out), rel=tolerance, abs=1e-7)
    w0, a, b = _flat(plain.initial), _flat(_weights(out)), _flat(_weights(plain.out))
    assert float((a - b).norm() / (b - w0).norm()) < 1e-2


def _run(tiny_model_dir, fill_dir, out, **flags):
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_grad_norm=0.0, proportion_empty_prompts=0.3,
                                 **flags))
    return out


def test_cached_latents_train_the_same_thing(plain_run, tiny_model_dir, fill_dir, tmp_path):
    out = _run(tiny_model_dir, fill_dir, tmp_path / "cached", cache_latents=True)
    _same_training(out, plain_run, 1e-4)
    (folder,) = (out / "encoded-cache").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"] == 48 and meta["resolution"] == 64
    captions = json.loads((folder / "text.json").read_text())
    assert captions[0] == "" and len(captions) > 1  # '' for dropped prompts, then the data's captions
    shards = sorted(folder.glob("latents-*.safetensors"))
    latents = load_file(str(shards[0]))
    assert latents["mean"].shape == (48, 4, 8, 8) and (latents["std"] > 0).all() and latents["ok"].all()


def test_cache_is_reused_and_an_interrupted_build_resumes(tiny_model_dir, fill_dir, tmp_path):
    from difftune import encoded_cache

    shared = tmp_path / "cache"
    first = _run(tiny_model_dir, fill_dir, tmp_path / "a", cache_latents=True, latent_cache_dir=str(shared),
                 max_train_steps=1)
    (folder,) = shared.iterdir()
    shard = next(folder.glob("latents-*.safetensors"))
    stamp = shard.stat().st_mtime_ns
    # a second run on the same model and data reads the cache, encoding nothing
    _run(tiny_model_dir, fill_dir, tmp_path / "b", cache_latents=True, latent_cache_dir=str(shared),
         max_train_steps=1)
    assert shard.stat().st_mtime_ns == stamp and len(list(shared.iterdir())) == 1
    # a build killed before its last shard: the rerun writes exactly the missing one
    shard.unlink()
    assert not encoded_cache.is_complete(folder, 48) and encoded_cache.encoded_before(folder, 48) < 48
    _run(tiny_model_dir, fill_dir, tmp_path / "c", cache_latents=True, latent_cache_dir=str(shared),
         max_train_steps=1)
    assert shard.exists() and encoded_cache.is_complete(folder, 48) and encoded_cache.encoded_before(folder, 48) == 48
    assert _losses(tmp_path / "c") == pytest.approx(_losses(first), rel=1e-5)
    # another resolution is another cache: never a stale read
    _run(tiny_model_dir, fill_dir, tmp_path / "d", cache_latents=True, latent_cache_dir=str(shared),
         max_train_steps=1, resolution=32)
    assert len(list(shared.iterdir())) == 2


def test_cache_key_sees_replaced_pictures_and_edited_weights(tmp_path, tiny_base):
    """A metadata.jsonl of paths keeps its fingerprint when the pictures it names are replaced, and a VAE
    edited in place keeps its path: the cache key must change in both cases (a stale read trains on the
    old pictures or latents of another VAE without a word)."""
    from PIL import Image

    from difftune.data import load_table
    from difftune.data.images import files_signature
    from difftune.encoded_cache import weights_probe

    root = tmp_path / "data"
    root.mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(root / f"t{k}.png")
        Image.new("RGB", (8, 8), (0, k, 0)).save(root / f"c{k}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"image": f"t{k}.png", "conditioning_image": f"c{k}.png",
                                                             "text": "a"}) + "\n" for k in range(2)))

    def signature():
        table = load_table(train_data_dir=root, cache_dir=str(tmp_path / "hf"))
        return files_signature(table.dataset, ["image", "conditioning_image"], table.base_dir)

    before = signature()
    assert signature() == before  # stable
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "t1.png")  # the same name, another picture
    assert signature() != before
    vae = copy.deepcopy(tiny_base.vae)
    probe = weights_probe(vae)
    assert weights_probe(copy.deepcopy(vae)) == probe
    middle = list(vae.parameters())[len(list(vae.parameters())) // 2]  # neither the first nor the last
    with torch.no_grad():
        middle.mul_(3)
    assert weights_probe(vae) != probe


def test_optimizer_in_backward_equals_plain_step(plain_run, tiny_model_dir, fill_dir, tmp_path):
    out = _run(tiny_model_dir, fill_dir, tmp_path / "inbw", optimizer_in_backward=True)
    _same_training(out, plain_run, 1e-5)


def test_optimizer_in_backward_steps_buckets_exactly_as_the_plain_optimizer_steps_all():
    """Buckets of consecutive tensors, each stepped when its last gradient lands: the same AdamW
    update bit for bit, one optimizer call per bucket, gradients freed inside backward, and a
    bucket holding a parameter that got no gradient stepped by ``step()``."""
    from difftune.optim import InBackwardOptimizer

    torch.manual_seed(0)
    plain_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16),
                                      torch.nn.Linear(16, 4), torch.nn.Linear(3, 3))  # the last is never used
    model = copy.deepcopy(plain_model)
    # 600 bytes: [Linear 0], [Linear 2's weight], [Linear 2's bias, Linear 3, the unused Linear 4]
    inbw = InBackwardOptimizer([{"params": list(model.parameters()), "lr": 1e-2}],
                               lambda params, options: torch.optim.AdamW(params, fused=True, **options),
                               bucket_bytes=600, min_buckets=1)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, fused=True)
    assert inbw.num_buckets == 3
    calls = []
    for _, _, inner in inbw._buckets:
        inner.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    waiting = {id(p) for p in (model[2].bias, *model[3].parameters())}
    for step in range(3):
        x = torch.randn(5, 8)
        plain_model[:4](x).square().mean().backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        model[:4](x).square().mean().backward()
        assert {id(p) for p in model.parameters() if p.grad is not None} == waiting  # the rest: stepped and freed
        assert len(calls) == 3 * step + 2
        inbw.step()  # the last bucket
        assert all(p.grad is None for p in model.parameters())
        inbw.zero_grad()
        for a, b in zip(plain_model.parameters(), model.parameters()):
            assert torch.equal(a, b)
    assert len(calls) == 3 * 3


def test_optimizer_in_backward_resumes_from_its_checkpoint(tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    from difftune import checkpoint as ckpt

    kw = dict(optimizer_in_backward=True, max_train_steps=4, checkpointing_steps=2, lr_scheduler="cosine",
              lr_warmup_steps=1)
    full = _run(tiny_model_dir, fill_dir, tmp_path / "full", **kw)
    part = tmp_path / "part"
    real = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):  # killed right after checkpoint-2 lands
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, fill_dir, part, **kw)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    state = ckpt.load_checkpoint(ckpt.resolve_resume(part / "checkpoints", "latest"))
    assert any(k.endswith("exp_avg_sq") for k in state["optimizer"]["state"][0])  # the per-parameter Adam state
    _run(tiny_model_dir, fill_dir, part, resume_from_checkpoint="latest", **kw)
    assert _max_diff(_weights(part), _weights(full)) == 0.0


@pytest.mark.parametrize("flags, named", [
    (dict(max_grad_norm=1.0), "--max_grad_norm"),
    (dict(gradient_accumulation_steps=2), "--gradient_accumulation_steps"),
])
def test_optimizer_in_backward_rejects_what_needs_all_gradients(tiny_model_dir, fill_dir, tmp_path, flags, named):
    cfg = make_config(tiny_model_dir, fill_dir, tmp_path, optimizer_in_backward=True, **{"max_grad_norm": 0.0, **flags})
    with pytest.raises(ConfigError, match=named):
        train_controlnet(cfg)


def test_channels_last_trains_the_same_thing(plain_run, tiny_model_dir, fill_dir, tmp_path):
    out = _run(tiny_model_dir, fill_dir, tmp_path / "cl", channels_last=True)
    _same_training(out, plain_run, 1e-4)


def test_set_grads_to_none_trains_exactly_the_same(plain_run, tiny_model_dir, fill_dir, tmp_path):
    """Freed gradients are written by backward where zeroed ones are added to: 0 + g == g, so bit for bit."""
    out = _run(tiny_model_dir, fill_dir, tmp_path / "none", set_grads_to_none=True)
    assert _losses(out) == _losses(plain_run.out)
    assert _max_diff(_weights(out), _weights(plain_run.out)) == 0.0


def test_fast_recipe_is_the_bench_fast_config():
    """``difftune bench``'s ``fast`` measures what ``--recipe fast`` trains."""
    from difftune.bench.runner import CONFIGS
    from difftune.cli import build_parser, config_from_args
    from difftune.config import ControlNetConfig
    from difftune.recipes import RECIPES

    parse = build_parser().parse_args
    common = ["train", "controlnet", "--train_data_dir", "d", "--output_dir", "o"]
    recipe = config_from_args(ControlNetConfig, parse(common + ["--recipe", "fast"]), RECIPES["fast"]())
    flags = config_from_args(ControlNetConfig, parse(common + CONFIGS["fast"]))
    assert recipe == flags


def test_gradient_checkpointing_trains_the_same_thing(plain_run, tiny_model_dir, fill_dir, tmp_path):
    out = _run(tiny_model_dir, fill_dir, tmp_path / "gc", gradient_checkpointing=True)
    _same_training(out, plain_run, 1e-5)


def test_fused_adamw_matches_the_loop_implementation():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=fused, foreach=False if not fused else None)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compiled_models_train_the_same_thing(plain_run, tiny_model_dir, fill_dir, tmp_path, monkeypatch, mode):
    """The compiled graphs (captured by dynamo, differentiated by AOT autograd) train the same thing.

    Inductor's code generation is left out here (``aot_eager``): on 2 CPU cores it takes
    minutes of C++ compilation; the GPU benchmark runs it for real.
    """
    import torch._dynamo

    monkeypatch.setenv("DIFFTUNE_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    out = _run(tiny_model_dir, fill_dir, tmp_path / mode, torch_compile=mode)
    torch._dynamo.reset()
    assert counts["stats"]["unique_graphs"] > 0  # something was really compiled
    _same_training(out, plain_run, 1e-4)


def test_mixed_precision_autocasts_only_the_trained_controlnet(tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    """Under bf16 the frozen UNet, VAE and text encoder run in their own dtype outside autocast
    (autocast would run their group norms in fp32: more bytes and a cast per op, and slower than
    diffusers' script on an H200); the fp32 ControlNet runs under autocast. The noising runs
    outside autocast too: CUDA autocast computes the scheduler's ``alphas ** 0.5`` in fp32, which
    made the noisy latents fp32 and the bf16 UNet fail on an H200 (CPU autocast does not)."""
    from difftune.noising import DiffusionObjective

    seen = {"frozen": set(), "trained": set(), "noising": set()}
    add_noise = DiffusionObjective.add_noise

    def recording_add_noise(self, latents, noise, timesteps):
        seen["noising"].add((torch.is_autocast_enabled("cpu"), latents.dtype))
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DiffusionObjective, "add_noise", recording_add_noise)

    def record(module, args, output):
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
            role = "trained" if module.weight.requires_grad else "frozen"
            seen[role].add((module.weight.dtype, torch.is_autocast_enabled("cpu"), output.dtype))

    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process: earlier tests' runs set "no"
    AcceleratorState._reset_state(reset_partial_state=True)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        _run(tiny_model_dir, fill_dir, tmp_path / "bf16", mixed_precision="bf16", max_train_steps=1)
    finally:
        handle.remove()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen["frozen"] == {(torch.bfloat16, False, torch.bfloat16)}
    assert seen["noising"] == {(False, torch.bfloat16)}
    assert {autocast for _, autocast, _ in seen["trained"]} == {True}
    assert {dtype for dtype, _, _ in seen["trained"]} == {torch.float32}


def test_fp8_frozen_unet_trains_nearly_the_same_thing(plain_run, tiny_model_dir, fill_dir, tmp_path):
    """Float8 weights move the frozen UNet's output by a few percent: the losses stay close and
    the ControlNet's update points the same way (not bit-equal, unlike the options above; Adam
    turns small gradient differences into sign flips of tiny updates, so the cosine read 0.87
    over 4 steps; a backward that lost the gradient through the UNet would not be near it)."""
    out = _run(tiny_model_dir, fill_dir, tmp_path / "fp8", fp8_frozen_unet=True)
    assert _losses(out) == pytest.approx(_losses(plain_run.out), rel=0.05)
    w0, a, b = _flat(plain_run.initial), _flat(_weights(out)), _flat(_weights(plain_run.out))
    assert float(torch.nn.functional.cosine_similarity(a - w0, b - w0, dim=0)) > 0.8


def test_profile_steps_write_a_trace_and_a_summary_and_train_the_same(plain_run, tiny_model_dir, fill_dir, tmp_path,
                                                                       caplog):
    """--profile_steps 2 --profile_start 1: the 4-step run skips 1 step, warms the profiler up on the
    2nd, records the 3rd and 4th (not the checkpoint saved after the 4th); training is untouched."""
    out = _run(tiny_model_dir, fill_dir, tmp_path / "prof", profile_steps=2, profile_start=1)
    assert _losses(out) == _losses(plain_run.out)
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["device"] == "cpu" and summary["wall_ms_per_step"] > 0
    names = [op["name"] for op in summary["top_ops"]]
    assert any("conv" in n or "mm" in n for n in names), names  # the model's work, not only bookkeeping
    assert summary["cpu_ops_per_step"] > 100
    trace = json.loads((out / "profile" / "trace.json").read_text())
    assert any(e.get("name", "").startswith("ProfilerStep") for e in trace["traceEvents"])
    # the final step's checkpoint is saved after the recording ends: a profile of training alone
    assert not any("save checkpoint" in e.get("name", "") for e in trace["traceEvents"])
    assert "| operator |" in (out / "profile" / "summary.md").read_text()
    assert json.loads((out / "train_summary.json").read_text())["profile"]["steps"] == 2
    # a run that ends before the recording starts says so, and writes nothing
    with caplog.at_level("WARNING", logger="difftune"):
        late = _run(tiny_model_dir, fill_dir, tmp_path / "late", profile_steps=2, profile_start=10)
    assert not (late / "profile").exists() and "nothing was recorded" in caplog.text
    with pytest.raises(ConfigError, match="--profile_steps must be >= 0"):
        make_config(tiny_model_dir, fill_dir, tmp_path, profile_steps=-1)
