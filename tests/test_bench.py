"""``difftune bench``: architectures, FLOP counting, read-back arithmetic, and a CPU smoke run.

No timing assertions: the smoke run checks that every number is there and sane, not how big.
"""

from __future__ import annotations

import json
import os

import pytest

from difftune.bench.runner import CONFIGS, reference_flags, summarize
from difftune.cli import main
from difftune.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread_runs():
    """The runs are subprocesses: as conftest does in-process, one thread each, or a busy 2-core machine crawls."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", os.environ.get("DIFFTUNE_TEST_THREADS", "1"))
        yield


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    rc = main(["bench", "--arch", "tiny", "--configs", "fp32,fast", "--steps", "4", "--warmup", "1",
               "--resolution", "64", "--n_samples", "16", "--out", str(out)])
    return out, rc


def test_smoke_run_writes_json_and_table(bench_out):
    out, rc = bench_out
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["bench"]["arch"] == "tiny" and result["bench"]["resolution"] == 64
    assert result["environment"]["torch"] and result["environment"]["device"]
    assert result["bench"]["flops_per_image"] > 0
    records = {r["config"]: r for r in result["records"]}
    assert list(records) == ["fp32", "fast"]
    for r in records.values():
        assert r["status"] == "ok", r.get("error")
        assert r["n_steps"] == 4 and r["n_measured"] == 3 and r["images_per_step"] == 4
        assert r["s_per_step"] > 0 and r["images_per_s"] > 0 and r["final_loss"] > 0
        assert 0 <= r.get("data_wait_fraction", 0) < 1
        assert "mfu" not in r  # no peak rate on a CPU
    assert records["fast"]["flags"] == CONFIGS["fast"]
    table = (out / "bench.md").read_text()
    assert "| fp32 | ok |" in table and "| fast | ok |" in table and "images/s" in table
    assert len(result["environment"]["difftune_source_sha256"]) == 16
    assert result["environment"]["difftune_source_sha256"] in table


def test_source_fingerprint_and_commit_name_the_code_that_ran(tmp_path):
    """A copy of a tree with a stale .git (as on a lent GPU machine) must not pass for that commit."""
    import shutil
    import subprocess

    from difftune.bench.suite import git_commit, source_fingerprint

    pkg = tmp_path / "repo" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = source_fingerprint(pkg)
    assert first == source_fingerprint(pkg) and len(first) == 16
    copy = tmp_path / "copy"
    shutil.copytree(pkg, copy)
    assert source_fingerprint(copy) == first  # the same tree hashes the same anywhere
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert source_fingerprint(pkg) != first
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "sub" / "b2.py").write_text("")
    assert source_fingerprint(pkg) != first  # a new file counts too
    (pkg / "sub" / "b2.py").unlink()

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                       capture_output=True)

    assert git_commit(pkg) is None  # not a checkout
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(pkg) == head
    (pkg / "a.py").write_text("x = 5\n")
    assert git_commit(pkg) == head + "+modified"


def test_a_failing_configuration_is_an_error_record_not_a_crash(bench_out, tmp_path, capsys):
    out, _ = bench_out
    common = ["--steps", "4", "--warmup", "1", "--model", str(out / "model-tiny"),
              "--data", str(out / "fill50k-64px-16"), "--out", str(tmp_path), "--peak_tflops", "1"]
    # a flag that is no training flag: refused before anything is built
    assert main(["bench", "--arch", "tiny", "--configs", "bogus", "--add_config", "bogus=nosuchbase --seed 1",
                 *common]) == 2
    assert "--add_config bogus: 'nosuchbase --seed 1' are not `difftune train controlnet` flags" in \
        capsys.readouterr().err and not (tmp_path / "bench.json").exists()
    # flags that parse but cannot train: the run fails, and is recorded as such
    rc = main(["bench", "--arch", "tiny", "--configs", "bogus", "--add_config", "bogus=--resolution 60 --seed 1",
               *common])
    assert rc == 1
    (record,) = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert record["status"] == "error" and record["flags"] == ["--resolution", "60", "--seed", "1"]
    assert "--resolution 60" in record["error"] and "--resolution 60" in record["stderr_tail"]
    assert "| bogus | error |" in (tmp_path / "bench.md").read_text()


def test_unknown_config_name_is_refused_before_any_work(tmp_path):
    from difftune.bench.suite import run_bench

    with pytest.raises(UserError, match="unknown nope"):
        run_bench("tiny", ["fp32", "nope"], tmp_path)
    assert not (tmp_path / "model-tiny").exists()
    assert main(["bench", "--arch", "tiny", "--out", str(tmp_path / "b"), "--configs", ","]) == 2  # nothing to run
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch, expected", [
    ("sd15", {"unet": 859.52, "text_encoder": 123.06, "vae": 83.65}),
    ("sdxl", {"unet": 2567.46, "text_encoder": 123.06, "text_encoder_2": 694.66, "vae": 83.65}),
])
def test_architectures_have_the_published_parameter_counts(arch, expected):
    from difftune.bench.architectures import build_components, parameter_counts

    parts = build_components(arch, device="meta")  # shapes only: nothing allocated
    counts = {k: round(v / 1e6, 2) for k, v in parameter_counts(parts).items()}
    assert counts == expected
    assert parts["tokenizer"].model_max_length == 77
    assert parts["vae"].config.scaling_factor == (0.13025 if arch == "sdxl" else 0.18215)


def test_sd15_flops_match_the_reference_count(tmp_path):
    """ANCHORS.md: 1.84 TFLOP/image at 512 px without attention products; VAE encode 1.08."""
    from difftune.bench.architectures import build_components
    from difftune.bench.flops import training_flops_breakdown

    parts = build_components("sd15", device="meta")
    parts["unet"].save_config(tmp_path / "unet")
    parts["vae"].save_config(tmp_path / "vae")
    f = training_flops_breakdown(tmp_path, 512)
    assert f["total_without_attention"] / 1e12 == pytest.approx(1.84, abs=0.01)
    assert f["vae_encode"] > 1.08e12  # counted apart: not in "total"
    assert f["total"] == pytest.approx(f["controlnet_forward"] + f["unet_forward"] + f["backward"])
    assert 0 < f["attention"] < f["total"] * 0.3


def test_summary_arithmetic():
    records = [{"step": i + 1, "loss": 0.5, "step_seconds": s, "data_wait_seconds": 0.01}
               for i, s in enumerate([5.0, 3.0, 1.0, 1.2, 0.8, 1.0])]
    r = summarize(records, {"final_loss": 0.4, "peak_allocated_gib": 2.0}, images_per_step=4, warmup=2)
    assert r["s_per_step"] == 1.0 and r["images_per_s"] == 4.0 and r["n_measured"] == 4
    assert r["warmup_overhead_s"] == pytest.approx(5.0 + 3.0 - 2 * 1.0)
    assert r["data_wait_fraction"] == pytest.approx(0.04 / 4.0)
    assert r["final_loss"] == 0.4 and r["peak_allocated_gib"] == 2.0 and r["timing_source"] == "step_seconds"
    # without step_seconds: derived from the cumulative images_per_s the trainer logs
    legacy = [{"step": k, "loss": 0.5, "images_per_s": 4 * k / t} for k, t in ((1, 2.0), (2, 3.0), (3, 4.0))]
    r = summarize(legacy, {}, images_per_step=4, warmup=1)
    assert r["s_per_step"] == pytest.approx(1.0) and r["timing_source"] == "images_per_s"
    assert "data_wait_fraction" not in r


def test_reference_flags_keep_what_diffusers_has(tmp_path):
    from difftune.bench.runner import BenchPlan

    plan = BenchPlan(model_dir=tmp_path / "m", data_dir=tmp_path / "d", out_dir=tmp_path, resolution=512)
    flags, dropped = reference_flags(plan, tmp_path / "o", CONFIGS["lowmem_8bit"])
    assert dropped == ["--cache_latents", "--optimizer_in_backward", "--max_grad_norm 0"]
    assert flags[-5:] == ["--mixed_precision", "bf16", "--gradient_checkpointing", "--set_grads_to_none",
                          "--use_8bit_adam"]
    assert flags[flags.index("--train_data_dir") + 1] == str(tmp_path / "d")  # no train/ split folder there


def test_custom_diffusion_smoke_run(bench_out, tmp_path):
    """The same bench trains Custom Diffusion: one concept, batch 2 + 2 class images per step."""
    out, _ = bench_out
    rc = main(["bench", "--method", "custom-diffusion", "--arch", "tiny", "--configs", "plain",
               "--add_config", "plain=", "--steps", "3", "--warmup", "1", "--n_samples", "6",
               "--model", str(out / "model-tiny"), "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["bench"]["method"] == "custom-diffusion" and result["bench"]["flops_per_image"] is None
    (record,) = result["records"]
    assert record["status"] == "ok", record.get("error")
    assert record["images_per_step"] == 4 and record["n_steps"] == 3 and record["s_per_step"] > 0
    assert len(list((tmp_path / "concept-64px-6" / "class").glob("*.png"))) == 6
    assert len(list((tmp_path / "concept-64px-6" / "instance").glob("*.png"))) == 5
    assert (tmp_path / "runs" / "plain" / "pytorch_custom_diffusion_weights.safetensors").is_file()
    assert "Custom Diffusion" in (tmp_path / "bench.md").read_text()


def test_reference_options_are_checked_before_any_work(tmp_path):
    from difftune.bench.suite import run_bench

    with pytest.raises(UserError, match="only diffusers' ControlNet scripts"):
        run_bench("tiny", ["bf16"], tmp_path, method="custom-diffusion", reference_script="x.py", steptimer=".")
    with pytest.raises(UserError, match="--reference_configs fast"):
        run_bench("tiny", ["bf16"], tmp_path, reference_script=__file__, steptimer=".", reference_configs=["fast"])
    assert not (tmp_path / "model-tiny").exists()


def test_the_sdxl_reference_runs_with_its_embedding_cast(tmp_path):
    """diffusers' SDXL script hands its half-precision UNet float32 prompt embeddings and stops; the
    reference is run through ``reference_fix``, which casts them (and changes nothing else)."""
    import subprocess
    import sys

    from difftune.bench.runner import is_sdxl_model

    script = tmp_path / "script.py"
    script.write_text(
        "import sys, torch\n"
        "from diffusers import UNet2DConditionModel\n"
        "u = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,\n"
        "    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),\n"
        "    attention_head_dim=8, norm_num_groups=8).to(torch.bfloat16)\n"
        "u(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 10, encoder_hidden_states=torch.randn(1, 7, 32))\n"
        "print('ran', sys.argv[1:])\n")
    plain = subprocess.run([sys.executable, str(script), "--flag"], capture_output=True, text=True)
    assert plain.returncode != 0 and "same dtype" in plain.stderr
    fixed = subprocess.run([sys.executable, "-m", "difftune.bench.reference_fix", str(script), "--flag"],
                           capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "ran ['--flag']" in fixed.stdout  # its own arguments, as __main__
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert is_sdxl_model(tmp_path / "xl") and not is_sdxl_model(tmp_path / "sd")


def test_memory_estimate_on_fake_tensors_equals_the_real_steps_count(tmp_path, monkeypatch):
    """The estimate (fake tensors: shapes only) counts what the same two steps hold on real tensors,
    for the low-memory configuration (encoded cache, checkpointing, optimizer in backward, 8-bit states)."""
    from difftune.bench.memory import GIB, _Adam8bitStates, components, estimate_controlnet_memory
    from difftune.surgery import controlnet_from_unet

    flags = ["--resolution", "32", "--train_batch_size", "2", *CONFIGS["lowmem_8bit"]]
    fake = estimate_controlnet_memory("tiny", flags)
    real = estimate_controlnet_memory("tiny", flags, fake=False)
    assert fake["peak_gib"] == pytest.approx(real["peak_gib"], rel=0.02)
    # the same operators reach the device either way, but for a few casts in backward (15 of 1,865)
    fake_ops, real_ops = fake["ops_per_step"], real["ops_per_step"]
    assert fake_ops["by_phase"]["forward"] == real_ops["by_phase"]["forward"]
    assert fake_ops["total"] == pytest.approx(real_ops["total"], rel=0.02)
    assert fake["peak_at"].startswith("UNet2DConditionModel.") or fake["peak_at"].startswith("ControlNetModel.")
    assert fake["peak_at"].endswith(("(forward)", "(backward)")), fake["peak_at"]
    for kind in ("PARAM", "GRAD", "OPT"):
        assert fake["by_kind_gib"].get(kind, 0) == pytest.approx(real["by_kind_gib"].get(kind, 0), rel=1e-6)
    # what is on the device: the frozen UNet in bf16 and the ControlNet's fp32 weights, not the encoders
    parts = components("tiny")
    unet = parts["unet"]
    controlnet = controlnet_from_unet(unet, vae_scale_factor=2 ** (len(parts["vae"].config.block_out_channels) - 1))
    expected = sum(p.numel() for p in unet.parameters()) * 2 + sum(p.numel() for p in controlnet.parameters()) * 4
    assert fake["by_kind_gib"]["PARAM"] * GIB == pytest.approx(expected, rel=1e-3)
    assert fake["by_kind_gib"].get("GRAD", 0) == 0  # each gradient is freed by its own update
    states = sum(2 * p.numel() + 8 * -(-p.numel() // _Adam8bitStates.BLOCK) if p.numel() >= _Adam8bitStates.MIN_8BIT
                 else 8 * p.numel() for p in controlnet.parameters())
    assert fake["by_kind_gib"]["OPT"] * GIB == pytest.approx(states, rel=1e-3)
    # with checkpointing, autocast's cache of bf16 weight copies is off (difftune.trainer.autocast_cache_enabled):
    # on, it would hold a copy of every ControlNet weight through the forward
    import difftune.trainer

    # (at batch 1: at batch 2 the tiny model's peak is a temporary of the backward, after the cache is gone)
    one = ["--resolution", "32", "--train_batch_size", "1", *CONFIGS["lowmem_8bit"]]
    uncached = estimate_controlnet_memory("tiny", one)
    monkeypatch.setattr(difftune.trainer, "autocast_cache_enabled", lambda cfg: True)
    cached = estimate_controlnet_memory("tiny", one)
    bf16_copy = sum(p.numel() for p in controlnet.parameters()) * 2
    assert (cached["peak_gib"] - uncached["peak_gib"]) * GIB > 0.05 * bf16_copy  # 0.066 of it at the peak


def test_operator_count_sees_the_gradient_accumulation_that_freed_gradients_avoid():
    """Zeroed gradients are added to by backward, one ``add_`` per ControlNet tensor; freed ones are written."""
    from difftune.bench.memory import components, estimate_controlnet_memory
    from difftune.surgery import controlnet_from_unet

    flags = ["--resolution", "32", "--train_batch_size", "1", "--mixed_precision", "bf16", "--cache_latents"]
    zeroed = estimate_controlnet_memory("tiny", flags)["ops_per_step"]
    freed = estimate_controlnet_memory("tiny", flags + ["--set_grads_to_none"])["ops_per_step"]
    parts = components("tiny")
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    tensors = len(list(controlnet_from_unet(parts["unet"], vae_scale_factor=factor).parameters()))
    assert zeroed["by_phase"]["forward"] == freed["by_phase"]["forward"]
    assert zeroed["by_phase"]["backward"] - freed["by_phase"]["backward"] == tensors
    assert dict(zeroed["top"]).get("add_", 0) - dict(freed["top"]).get("add_", 0) == tensors


def test_checkpointing_runs_autocast_without_its_weight_cache(tmp_path):
    from difftune.config import TrainConfig
    from difftune.trainer import make_accelerator

    accelerator = make_accelerator(TrainConfig(output_dir=str(tmp_path), gradient_checkpointing=True), [])
    assert accelerator.autocast_handler is not None and accelerator.autocast_handler.cache_enabled is False
    # and with several processes, gradients are views into DDP's buckets (tests/test_distributed.py trains so)
    assert accelerator.ddp_handler is not None and accelerator.ddp_handler.gradient_as_bucket_view is True


def test_estimate_memory_flag_writes_a_table_without_training(tmp_path, capsys):
    rc = main(["bench", "--arch", "tiny", "--configs", "bf16,fast_compile", "--estimate_memory",
               "--out", str(tmp_path)])
    assert rc == 1  # fast_compile is refused (compiled graphs are not estimated), bf16 is estimated
    result = json.loads((tmp_path / "memory_estimate.json").read_text())
    assert result["estimates"]["bf16"]["peak_gib"] > 0 and "error" in result["estimates"]["fast_compile"]
    printed = capsys.readouterr().out
    assert "estimated peak GiB" in printed and "| peak in | operators/step" in printed
    assert not (tmp_path / "runs").exists()


def test_an_added_config_can_build_on_a_predefined_one():
    from difftune.bench.runner import CONFIGS
    from difftune.bench.suite import resolve_configs

    got = resolve_configs(["fast_profiled", "own"], {"fast_profiled": ["fast", "--profile_steps", "3"],
                                                     "own": ["--seed", "1"]})
    assert got == {"fast_profiled": CONFIGS["fast"] + ["--profile_steps", "3"], "own": ["--seed", "1"]}
