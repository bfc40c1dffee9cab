"""Two processes, one run: the multi-process code paths on CPU (gloo), as `accelerate launch` runs them on GPUs.

What only shows with several processes: the encoded cache is filled by both ranks (shard by
shard) and read by both, metrics and exports are written once, checkpoints resume, and the
gradients are all-reduced so both replicas stay identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import write_data_with_a_corrupt_image



def _launch(model_dir, data_dir, out, *extra, timeout=600):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "difftune", "train", "controlnet", "--pretrained_model_name_or_path", str(model_dir),
           "--train_data_dir", str(data_dir), "--output_dir", str(out), "--resolution", "64",
           "--train_batch_size", "2", "--seed", "0", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # processes waiting on each other: kill the launcher and its workers
        import psutil  # (torchrun starts each worker in a session of its own)

        for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
            p.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the two-process run hung for {timeout} s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_two_process_run_with_cache_checkpoints_and_resume(tiny_model_dir, fill_dir, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    done = _launch(tiny_model_dir, fill_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "2",
                   "--cache_latents", "--max_train_samples", "20")
    assert done.stdout.count("ControlNet saved") == 1  # one report, from rank 0
    # the batch of a step is said once, counting both processes (and so is every progress line)
    assert done.stderr.count("3 optimizer steps of 4 samples (batch 2 x 2 processes x accumulation 1)") == 1
    assert done.stderr.count("data columns:") == 1
    assert "Optimizer steps: 3 of 4 samples (batch 2 x 2 processes" in (out / "README.md").read_text()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # written once, not once per process
    (cache,) = (out / "encoded-cache").iterdir()
    assert (cache / "latents-00000.safetensors").is_file() and (cache / "text.json").is_file()
    ControlNetModel.from_pretrained(out)  # the export loads in diffusers
    # gradients are views into DDP's buckets (difftune.trainer.make_accelerator): freeing them between
    # steps (--set_grads_to_none) must train exactly what zeroing them in place does
    freed = tmp_path / "ddp-freed"
    _launch(tiny_model_dir, fill_dir, freed, "--max_train_steps", "3", "--checkpointing_steps", "2",
            "--cache_latents", "--max_train_samples", "20", "--set_grads_to_none")
    a, b = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (out, freed))
    start = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"))
    copied = [k for k in a if not k.startswith("controlnet_cond_embedding")]  # (that one starts random)
    moved = max(float((a[k] - start.state_dict()[k]).abs().max()) for k in copied)
    assert moved > 1e-4  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6 * max(moved, 1.0)
    # each process draws its own noise, so each one's random state is in the checkpoint ...
    rng = load_file(str(out / "checkpoints" / "checkpoint-3" / "rng.safetensors"))
    assert not torch.equal(rng["generator"], rng["rank1.generator"])
    done = _launch(tiny_model_dir, fill_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                   "--cache_latents", "--max_train_samples", "20", "--resume_from_checkpoint", "latest")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    # ... and comes back to it: resumed at step 3, the run ends where an uninterrupted one does
    # (before, process 1 resumed with process 0's state and drew its noise a second time)
    full = tmp_path / "ddp-full"
    _launch(tiny_model_dir, fill_dir, full, "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--cache_latents", "--max_train_samples", "20")
    a, b = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (out, full))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6 * max(moved, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs accelerate joins the processes")
def test_a_launch_that_accelerate_does_not_join_is_refused(tiny_model_dir, fill_dir, tmp_path):
    """Two processes started without ACCELERATE_USE_CPU on a machine with no GPU: accelerate sets each up
    as a run of its own, and both trained the whole run into one folder, then exited 0."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "difftune",
           "train", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
           str(fill_dir), "--output_dir", str(tmp_path / "run"), "--resolution", "64", "--max_train_steps", "2"]
    done = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("This launch started 2 processes (WORLD_SIZE=2), but accelerate joined 1") == 1
    assert "ACCELERATE_USE_CPU=1" in done.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_each_process_gets_its_own_random_state_back():
    from difftune.checkpoint import merge_process_rng, restore_rng, rng_tensors

    states = [rng_tensors(torch.Generator().manual_seed(s)) for s in (1, 2)]
    merged = merge_process_rng(states)
    for rank in (0, 1):
        g = torch.Generator().manual_seed(99)
        assert restore_rng(merged, g, rank)
        assert torch.equal(g.get_state(), states[rank]["generator"])
    g = torch.Generator().manual_seed(99)
    before = g.get_state()
    assert not restore_rng(merged, g, 2)  # saved by two processes, resumed by three: the caller reseeds
    assert torch.equal(g.get_state(), before)


def test_a_process_whose_batch_is_all_unreadable_still_joins_the_step(tiny_model_dir, tmp_path):
    # batch 1 on two processes: the rank that draws the broken file has nothing to train on, yet
    # the other waits in the gradient all-reduce (it crashed gloo, and hangs NCCL, before)
    data = write_data_with_a_corrupt_image(tmp_path / "data")
    out = tmp_path / "run"
    _launch(tiny_model_dir, data, out, "--max_train_steps", "4", "--train_batch_size", "1",
            "--checkpointing_steps", "4", timeout=180)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    assert summary["skipped_samples"] == 1  # counted by the process that met it, reported for the run
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["skipped_samples"] == 1
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_samples"] == 1  # the per-step log counts both processes too


def test_a_run_without_seed_draws_one_seed_for_all_processes_and_a_resume_keeps_it(fill_dir, tmp_path):
    """The seed picks the samples (--max_train_samples, a stream's cache) and their order: two processes
    with a seed each trained on two selections, and a resume without --seed drew a third."""
    from difftune.api import resolve_seed
    from difftune.config import ControlNetConfig, from_dict

    script = tmp_path / "seed.py"
    script.write_text(
        "import sys\n"
        "from difftune.api import resolve_seed\n"
        "from difftune.config import ControlNetConfig, from_dict\n"
        "cfg = from_dict(ControlNetConfig, {'train_data_dir': sys.argv[1], 'output_dir': sys.argv[2]})\n"
        "print('SEED', resolve_seed(cfg).train.seed, flush=True)\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(fill_dir), str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seeds = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("SEED")}
    assert len(seeds) == 1 and done.stdout.count("SEED") == 2

    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 5, "seed": 1234}))
    cfg = from_dict(ControlNetConfig, {"train_data_dir": str(fill_dir), "output_dir": str(tmp_path / "run"),
                                       "resume_from_checkpoint": "latest"})
    assert resolve_seed(cfg).train.seed == 1234  # the checkpoint's, recorded as such in difftune_config.json
