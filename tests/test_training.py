"""End-to-end training through the entry function: learning, accumulation, resume, checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_training, make_config, write_data_with_a_corrupt_image
from difftune import checkpoint as ckpt
from difftune.api import train_controlnet


def _weights(out_dir):
    return load_file(str(out_dir / "diffusion_pytorch_model.safetensors"))


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_training_reduces_loss_on_fixed_batch(tiny_model_dir, fill_dir, tmp_path):
    from difftune.methods.controlnet import ControlNetMethod

    cfg = make_config(tiny_model_dir, fill_dir, tmp_path / "run", max_train_steps=30, learning_rate=2e-3)
    probe = ControlNetMethod(cfg)
    batch = probe.collate([probe.train_dataset()[i] for i in range(16)])

    @torch.no_grad()
    def fixed_loss(m):
        return float(m.loss(batch, torch.Generator().manual_seed(123)))

    before = fixed_loss(probe)
    summary = train_controlnet(cfg)
    assert summary["global_step"] == 30
    probe.controlnet.load_state_dict(_weights(tmp_path / "run"))
    after = fixed_loss(probe)
    assert after < 0.9 * before, (before, after)


def test_accumulation_2x2_equals_batch_4(tiny_model_dir, fill_dir, tmp_path):
    common = dict(max_train_steps=2, max_grad_norm=0.0)
    train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "b4", train_batch_size=4, **common))
    train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "b2x2", train_batch_size=2,
                                 gradient_accumulation_steps=2, **common))
    assert_same_training(_weights(tmp_path / "b4"), _weights(tmp_path / "b2x2"), lr=1e-3)


def test_resume_equals_uninterrupted(tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    # 48 samples / batch 4 = 12 steps per epoch: 14 steps cross an epoch boundary
    kw = dict(max_train_steps=14, checkpointing_steps=5, lr_scheduler="cosine", lr_warmup_steps=3,
              proportion_empty_prompts=0.5)
    train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "full", **kw))
    part = tmp_path / "part"
    real = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):  # the process is killed right after checkpoint-5 lands
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_controlnet(make_config(tiny_model_dir, fill_dir, part, **kw))
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    assert [p.name for p in ckpt.list_checkpoints(part / "checkpoints")] == ["checkpoint-5"]
    from difftune.errors import ModelLoadError
    from difftune.models import load_controlnet

    with pytest.raises(ModelLoadError, match=r"has not finished .* give .*checkpoint-5 \(the latest\)"):
        load_controlnet(str(part), flag="--controlnet")  # the unfinished run's folder: its checkpoint is named
    with open(part / "metrics.jsonl", "a") as f:  # what the killed run logged after its checkpoint, cut mid-line
        f.write(json.dumps({"step": 6, "loss": 0.5}) + "\n" + '{"step": 7, "lo')
    # a different --seed on the command line must not change a resumed run's data order
    summary = train_controlnet(make_config(tiny_model_dir, fill_dir, part, seed=99,
                                           resume_from_checkpoint="latest", **kw))
    assert summary["global_step"] == 14
    assert _max_diff(_weights(tmp_path / "full"), _weights(part)) == 0.0

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(part) == losses(tmp_path / "full") and [s for s, _ in losses(part)] == list(range(1, 15))
    # the finished run resumed again: nothing to train, the export and its summary stay whole
    again = train_controlnet(make_config(tiny_model_dir, fill_dir, part, resume_from_checkpoint="latest", **kw))
    assert again["global_step"] == 14 and again["final_loss"] == summary["final_loss"] is not None
    json.loads((part / "train_summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert _max_diff(_weights(tmp_path / "full"), _weights(part)) == 0.0


def test_checkpoint_limit_keeps_newest(tiny_model_dir, fill_dir, tmp_path):
    out = tmp_path / "run"
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=6, checkpointing_steps=1,
                                 checkpoints_total_limit=2, train_batch_size=2))
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["checkpoint-5", "checkpoint-6"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-6"


def test_kill_during_checkpoint_save_keeps_previous(tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=2, checkpointing_steps=2))
    calls = {"n": 0}
    real = ckpt.save_file

    def dying_save(tensors, path, *a, **k):  # dies after writing some files of the next checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=2,
                                     resume_from_checkpoint="latest"))
    monkeypatch.setattr(ckpt, "save_file", real)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "checkpoint-2"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-2"]
    assert any(p.name.startswith(".checkpoint-4") for p in root.iterdir())  # the partial one is hidden
    summary = train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=2,
                                           resume_from_checkpoint="latest"))
    assert summary["global_step"] == 4
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_model_dir, fill_dir, tmp_path, caplog):
    """Resumed from checkpoint-2 beside checkpoint-4 and -6 of the run that went on, the new line of the run
    owns 'latest' and pruning: the old later ones are moved aside whole (not deleted, never pruned in place of
    the new ones), and a stale export temp folder is cleared."""
    import logging

    out = tmp_path / "run"
    kw = dict(checkpointing_steps=2, train_batch_size=2)
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=6, **kw))
    (out / ".export.tmp-999999").mkdir()  # a run killed while exporting, as another process
    with caplog.at_level(logging.WARNING, logger="difftune"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpoints_total_limit=2,
                                     resume_from_checkpoint="checkpoint-2", **kw))
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]
    assert (root / "latest").read_text().strip() == "checkpoint-4"
    assert sorted(p.name for p in (root / "superseded-from-2").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert "moved to" in caplog.text and not (out / ".export.tmp-999999").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # another run's checkpoint, by its path: this run's later checkpoints go aside, the other run is not touched
    other = tmp_path / "other"
    train_controlnet(make_config(tiny_model_dir, fill_dir, other, max_train_steps=6, **kw))
    train_controlnet(make_config(tiny_model_dir, fill_dir, other, max_train_steps=4, checkpoints_total_limit=2,
                                 resume_from_checkpoint=str(root / "checkpoint-2"), **kw))
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]  # as it was
    assert (root / "latest").read_text().strip() == "checkpoint-4" and len(list(root.glob("superseded-*"))) == 1
    assert [p.name for p in ckpt.list_checkpoints(other / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (other / "checkpoints" / "superseded-from-2").iterdir()) == ["checkpoint-4",
                                                                                               "checkpoint-6"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difftune"):  # asked for fewer steps than the checkpoint holds
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=2,
                                     resume_from_checkpoint="latest", **kw))
    assert "past --max_train_steps 2" in caplog.text and "--resume_from_checkpoint checkpoint-2" in caplog.text


def test_bf16_on_the_cpu_samples_validation_and_keeps_training_in_bf16(tiny_model_dir, fill_dir, tmp_path):
    """The CPU's group norm refuses bf16 weights under the fp32 latents the pipeline makes for an fp32
    ControlNet: validation used to crash after every step had trained, before the export."""
    from difftune.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    cfg = make_config(tiny_model_dir, fill_dir, tmp_path / "run", max_train_steps=2, mixed_precision="bf16",
                      validation_steps=1, num_validation_images=1, num_validation_inference_steps=2,
                      validation_prompt=["red circle with blue background"],
                      validation_image=[str(fill_dir / "validation" / "conditioning_0.png")])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        summary = train_controlnet(cfg, base=base)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == ["step-0000001.png",
                                                                                  "step-0000002.png"]
    assert summary["exported"] and base.unet.dtype == torch.bfloat16  # put back after sampling


def test_a_validation_killed_after_its_checkpoint_runs_again_on_resume(tiny_model_dir, fill_dir, tmp_path,
                                                                          monkeypatch):
    from difftune.validation import Validator

    out = tmp_path / "run"
    flags = dict(max_train_steps=4, checkpointing_steps=2, validation_steps=2, num_validation_inference_steps=1,
                 validation_prompt=["red circle with blue background"],
                 validation_image=[str(fill_dir / "validation" / "conditioning_0.png")])
    real, ran = Validator.run, []

    def killed_while_sampling(self, step):
        raise KeyboardInterrupt  # after checkpoint-2 was saved, before its grid

    monkeypatch.setattr(Validator, "run", killed_while_sampling)
    with pytest.raises(KeyboardInterrupt):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, **flags))
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "validation").exists()
    monkeypatch.setattr(Validator, "run", lambda self, step: ran.append(step) or real(self, step))
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, resume_from_checkpoint="latest", **flags))
    assert ran == [2, 4] and (out / "validation" / "step-0000002.png").is_file()
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, resume_from_checkpoint="checkpoint-2",
                                 **flags))
    assert ran == [2, 4, 4]  # its grid is there now: not sampled again


def test_a_killed_prune_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    args = ({"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {}, torch.Generator())
    for step in (1, 2):
        ckpt.save_checkpoint(root, ckpt.TrainState(global_step=step), *args, total_limit=2)

    def killed(path, *a, **k):  # dies after the first file of the pruned checkpoint is gone
        next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, ckpt.TrainState(global_step=3), *args, total_limit=2)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-2", "checkpoint-3"]  # never 1, half gone
    ckpt.clean_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3", "latest"]


def test_a_kill_around_the_rename_never_sets_a_complete_checkpoint_aside(tmp_path, monkeypatch):
    """``latest`` moves before the new checkpoint is renamed into place: a kill between the two leaves a
    pointer to a checkpoint not there yet (the newest complete one is resumed), never a pointer to the
    previous one beside a newer complete one (which resuming took for a branch and set aside)."""
    root = tmp_path / "checkpoints"
    args = ({"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {}, torch.Generator())
    ckpt.save_checkpoint(root, ckpt.TrainState(global_step=2), *args)
    real_rename = Path.rename

    def killed_at(target_step):
        def rename(self, target):
            if Path(target).name == f"checkpoint-{target_step}":
                raise KeyboardInterrupt("killed")
            return real_rename(self, target)
        return rename

    monkeypatch.setattr(Path, "rename", killed_at(4))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, ckpt.TrainState(global_step=4), *args)
    monkeypatch.undo()
    assert ckpt.resolve_resume(root, "latest").name == "checkpoint-2"  # 4 was never complete
    monkeypatch.setattr(ckpt, "_fsync_dir", lambda path: (_ for _ in ()).throw(KeyboardInterrupt("killed"))
                        if (path / "checkpoint-4").is_dir() else None)
    with pytest.raises(KeyboardInterrupt):  # killed right after the rename
        ckpt.save_checkpoint(root, ckpt.TrainState(global_step=4), *args)
    monkeypatch.undo()
    assert ckpt.resolve_resume(root, "latest").name == "checkpoint-4"
    assert ckpt.supersede_later(root, 4) is None


def test_a_latest_pointer_to_a_lost_checkpoint_is_said_once(tmp_path, caplog):
    """The run resolves its checkpoint twice (its seed, then the trainer): the warning comes once."""
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, ckpt.TrainState(global_step=2), {"w": torch.ones(2)},
                         {"state": {}, "param_groups": []}, {}, torch.Generator())
    (root / "latest").write_text("checkpoint-9")  # a folder removed by hand after the pointer was written
    with caplog.at_level("WARNING", logger="difftune"):
        assert [ckpt.resolve_resume(root, "latest").name for _ in range(2)] == ["checkpoint-2"] * 2
    assert [r.getMessage().count("checkpoint-9") > 0 for r in caplog.records] == [True]


def test_stale_temporary_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (out / "validation").mkdir(parents=True)
    stale = [out / "validation" / ".step-0000020.png.tmp-999999", out / ".pytorch_custom_diffusion_weights.safetensors.tmp-12"]
    kept = [out / ".hidden", out / "notes.tmp-12", out / "validation" / f".step-0000002.png.tmp-{os.getpid()}"]
    for p in stale + kept:
        p.write_text("x")
    ckpt.clean_stale_temp_files(out, out / "validation", out / "absent")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_data_position_follows_samples_when_the_batch_size_changes():
    """A checkpoint 10 micro-batches of 2 into an epoch of 48 samples has seen 20: at batch 4 that is 5."""
    from difftune.resuming import data_position

    state = ckpt.TrainState(micro_batches=10, micro_batch_samples=2)
    assert data_position(state, 48, 4) == 5 and data_position(state, 48, 2) == 10
    assert data_position(state, 48, 3) == 6  # 18 samples skipped, the 2 after them seen again
    # a second epoch: 24 micro-batches of 2 per epoch, so 30 is 6 into epoch 1; at batch 4, 12 per epoch + 3
    assert data_position(ckpt.TrainState(micro_batches=30, micro_batch_samples=2), 48, 4) == 15
    assert data_position(ckpt.TrainState(micro_batches=7), 48, 4) == 7  # saved before the count was recorded


def test_nan_loss_stops_with_step_or_is_skipped(tiny_model_dir, fill_dir, tmp_path):
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.trainer import Trainer, TrainingDiverged

    cfg = make_config(tiny_model_dir, fill_dir, tmp_path / "stop", max_train_steps=3)
    method = ControlNetMethod(cfg)
    with torch.no_grad():
        method.controlnet.controlnet_mid_block.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="at step 1"):
        Trainer(method, cfg).fit()

    # skipped: NaN losses of finite weights (NaN weights are never saved nor exported: see the test below)
    cfg = make_config(tiny_model_dir, fill_dir, tmp_path / "skip", max_train_steps=3, nan_policy="skip")
    method = ControlNetMethod(cfg)
    loss = method.loss
    method.loss = lambda batch, gen: loss(batch, gen) * float("nan")
    summary = Trainer(method, cfg).fit()
    assert summary["nonfinite_steps"] == 3
    lines = (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=pytest.fail)["loss"] for line in lines] == [None] * 3  # strict JSON


def test_nonfinite_weights_are_never_saved_nor_exported(tiny_model_dir, fill_dir, tmp_path):
    """A finite loss does not make finite weights: an update that overflows (--learning_rate inf was taken,
    and exported a ControlNet of NaNs with exit 0) stops the run at the next checkpoint, the earlier ones kept."""
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.trainer import Trainer, TrainingDiverged

    out = tmp_path / "run"
    cfg = make_config(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=2, nan_policy="skip")
    method = ControlNetMethod(cfg)
    trainer, steps = Trainer(method, cfg), []
    step = trainer._step

    def overflowing_step(*args):
        step(*args)
        steps.append(1)
        if len(steps) == 3:  # the update of step 3 overflows
            with torch.no_grad():
                method.controlnet.controlnet_mid_block.weight.fill_(float("inf"))

    trainer._step = overflowing_step
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite values at step 4 \(controlnet_mid_block.weight.*"
                                               r"the last checkpoint, .*checkpoint-2, is intact.*--learning_rate"):
        trainer.fit()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "diffusion_pytorch_model.safetensors").exists() and not (out / "config.json").exists()


@pytest.mark.parametrize("bad_step", [2, 3])
def test_nan_stop_checks_a_step_while_the_next_runs_and_never_saves_it(tiny_model_dir, fill_dir, tmp_path, bad_step):
    """Under --nan_policy stop a step's loss is read during the next step (no wait for the GPU), but a
    step that is checkpointed (2) is read before its checkpoint, and one that is not (3) stops the run
    before the next step's update: no checkpoint after the bad step, and its number in the message."""
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.trainer import Trainer, TrainingDiverged

    out = tmp_path / "run"
    cfg = make_config(tiny_model_dir, fill_dir, out, max_train_steps=6, checkpointing_steps=2)
    method = ControlNetMethod(cfg)
    calls, loss = [], method.loss
    method.loss = lambda batch, gen: (calls.append(1), loss(batch, gen) * (float("nan") if len(calls) == bad_step else 1))[1]
    with pytest.raises(TrainingDiverged, match=f"The loss is nan at step {bad_step}. Training stopped there, and "
                                               "nothing after the last checkpoint \\(.*checkpoint-2\\) was saved"
                       if bad_step == 3 else "at step 2.*last checkpoint \\(none\\)"):
        Trainer(method, cfg).fit()
    assert len(calls) == bad_step + (bad_step == 3)  # step 3 is caught during step 4, before its update
    saved = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert saved == (["checkpoint-2"] if bad_step == 3 else [])
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, bad_step))


def test_device_scalars_read_back_on_the_cpu():
    from difftune.trainer import DeviceScalars

    r = DeviceScalars(torch.tensor([1.5, float("inf")]))
    assert r.get() == [1.5, float("inf")] and r.get() is r.get()


def _tags(event_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(event_file))
    board.Reload()
    return board.Tags()["scalars"]


def test_outputs_and_resolved_config(tiny_model_dir, fill_dir, tmp_path):
    out = tmp_path / "run"
    val = fill_dir / "validation"
    cfg = make_config(tiny_model_dir, fill_dir, out, max_train_steps=2, hub_token="hf_SECRET_do_not_write",
                      validation_image=[str(val / "conditioning_0.png"), str(val / "conditioning_1.png")],
                      validation_prompt=["red circle with blue background"], validation_steps=1,
                      num_validation_images=1, num_validation_inference_steps=2, report_to="tensorboard")
    train_controlnet(cfg)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "difftune_config.json",
                 "metrics.jsonl", "train_summary.json", "validation/step-0000001.png", "validation/step-0000002.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "difftune_config.json").read_text())
    assert saved["train"]["seed"] == 0 and saved["data"]["resolution"] == 64
    assert saved["train"]["tracker_project_name"] == "train_controlnet"
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET_do_not_write" not in path.read_bytes(), path
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    # the same scalars and the validation images reach TensorBoard (its own reader)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*") if "loss" in _tags(p)}
    board = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    assert [e.step for e in board.Scalars("loss")] == [1, 2]
    assert [e.value for e in board.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    assert sorted(board.Tags()["images"]) == ["validation/0", "validation/1"]  # one per conditioning image
    assert [(e.step, e.width) for e in board.Images("validation/1")] == [(1, 64), (2, 64)]
    assert "diffusion_pytorch_model.safetensors" in (out / "README.md").read_text() or "ControlNet" in (
        out / "README.md").read_text()
    # resumed without validation prompts: the summary and the card keep the run's newest grid (it was null)
    summary = train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=3,
                                           resume_from_checkpoint="latest", report_to="tensorboard"))
    assert summary["validation_grid"] == str(out / "validation" / "step-0000002.png")
    assert "step-0000002.png" in (out / "README.md").read_text()


def test_streaming_trains_on_the_first_samples(tiny_model_dir, fill_dir, tmp_path):
    out = tmp_path / "run"
    summary = train_controlnet(make_config(tiny_model_dir, fill_dir, out, streaming=True, max_train_samples=8,
                                           max_train_steps=3, train_batch_size=4))
    assert summary["global_step"] == 3
    assert (out / "stream-cache").is_dir()


def test_corrupt_sample_is_skipped_and_counted(tiny_model_dir, tmp_path):
    import shutil

    data = write_data_with_a_corrupt_image(tmp_path / "data")
    summary = train_controlnet(make_config(tiny_model_dir, data, tmp_path / "run", max_train_steps=2,
                                           train_batch_size=4))
    assert summary["global_step"] == 2 and summary["skipped_samples"] == 1
    shutil.rmtree(tmp_path / "run")
    # a batch with nothing readable in it is no step: no loss of 0 logged, no learning-rate step taken
    summary = train_controlnet(make_config(tiny_model_dir, data, tmp_path / "run", max_train_steps=8,
                                           train_batch_size=1, lr_scheduler="linear"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["global_step"] == 8 and summary["skipped_samples"] >= 1
    assert [r["step"] for r in logged] == list(range(1, 9)) and all(r["loss"] > 0 for r in logged)
    assert [r["lr"] for r in logged] == pytest.approx([1e-3 * (1 - k / 8) for k in range(1, 9)])  # one decay a step


def test_continue_from_existing_controlnet(tiny_model_dir, fill_dir, tmp_path):
    from difftune.methods.controlnet import ControlNetMethod

    first = tmp_path / "first"
    train_controlnet(make_config(tiny_model_dir, fill_dir, first, max_train_steps=2))
    method = ControlNetMethod(make_config(tiny_model_dir, fill_dir, tmp_path / "second",
                                          controlnet_model_name_or_path=str(first)))
    saved = _weights(first)
    assert all(torch.equal(v, saved[k]) for k, v in method.controlnet.state_dict().items())
    assert torch.count_nonzero(method.controlnet.controlnet_mid_block.weight) > 0


def _digests(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_never_mixes_into_another_runs_checkpoints(tiny_model_dir, fill_dir, tmp_path):
    from difftune.errors import ConfigError, DataError

    out = tmp_path / "run"
    kw = dict(max_train_steps=2, checkpointing_steps=1)
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, **kw))
    before = _digests(out / "checkpoints")
    with pytest.raises(ConfigError, match="already holds a run's checkpoints.*--resume_from_checkpoint latest"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=1, learning_rate=5e-3))
    assert _digests(out / "checkpoints") == before  # nothing of the earlier run was touched
    # asked to start over with a flag at fault (a column, a validation file): it fails before deleting anything
    moved = tmp_path / "moved"  # rows whose image paths no longer resolve: seen only when samples are read
    moved.mkdir()
    (moved / "metadata.jsonl").write_text("".join(json.dumps({"image": f"gone/{i}.png", "conditioning_image":
                                                              f"gone/c{i}.png", "text": "red circle"}) + "\n"
                                                  for i in range(8)))
    for wrong in (dict(caption_column="no_such_column"),
                  dict(validation_prompt=["red circle"], validation_image=[str(tmp_path / "missing.png")]),
                  dict(train_data_dir=str(moved))):
        with pytest.raises((ConfigError, DataError)):
            train_controlnet(make_config(tiny_model_dir, wrong.pop("train_data_dir", fill_dir), out,
                                         max_train_steps=1, overwrite_output_dir=True, **wrong))
        assert _digests(out / "checkpoints") == before
        assert (out / "metrics.jsonl").is_file()
    # asked to start over: the earlier run's checkpoints, metrics and profile go, the new run's are alone
    (out / "profile").mkdir()  # (what --profile_steps writes; it stayed)
    (out / "profile" / "trace.json").write_text("{}")
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=1, checkpointing_steps=1,
                                 checkpoints_total_limit=1, overwrite_output_dir=True))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-1"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-1"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "profile").exists()


def test_resuming_longer_on_a_decaying_schedule_says_the_schedule_is_planned_anew(tmp_path, caplog):
    import logging

    from difftune.config import to_dict
    from difftune.guards import warn_changed_settings

    checkpoint = tmp_path / "checkpoint-12"
    checkpoint.mkdir()
    for schedule, warned in (("cosine", True), ("constant", False)):
        old = make_config("m", "d", tmp_path, max_train_steps=12, lr_scheduler=schedule)
        (checkpoint / "difftune_config.json").write_text(json.dumps(to_dict(old)))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difftune"):
            assert warn_changed_settings(tmp_path, make_config("m", "d", tmp_path, max_train_steps=16,
                                                               lr_scheduler=schedule), checkpoint) == []
        assert ("--max_train_steps 12 -> 16: the cosine learning-rate schedule is planned anew" in caplog.text) == warned


def test_resume_says_which_settings_changed_and_a_damaged_checkpoint_is_named(tiny_model_dir, fill_dir, tmp_path,
                                                                               caplog, monkeypatch):
    import logging

    from difftune.errors import ConfigError

    out = tmp_path / "run"
    train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=2, checkpointing_steps=1))
    changed = dict(max_train_steps=3, checkpointing_steps=1, learning_rate=1e-2, resume_from_checkpoint="latest")
    real = ckpt.save_checkpoint
    for attempt in ("killed before its first checkpoint", "again"):  # the second compares with the checkpoint too
        if attempt == "again":
            monkeypatch.setattr(ckpt, "save_checkpoint", real)
        else:
            monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difftune"):
            try:
                summary = train_controlnet(make_config(tiny_model_dir, fill_dir, out, **changed))
            except KeyboardInterrupt:
                pass
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "--learning_rate 0.001 -> 0.01" in said and "its learning rate, not a new --learning_rate" in said
        assert "max_train_steps" not in said  # running longer is what resuming is for
    # the rate used is the checkpoint's, and the card says what changed
    assert summary["learning_rate"] == 0.001 and summary["resumed_changes"] == ["--learning_rate 0.001 -> 0.01"]
    card = (out / "README.md").read_text()
    assert "learning rate 0.001" in card and "Resumed with settings changed" in card
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difftune"):  # the rate used is what the checkpoint recorded
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=1,
                                     resume_from_checkpoint="latest"))
    assert "--learning_rate" not in caplog.text
    (out / "checkpoints" / "checkpoint-2" / "scheduler.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"checkpoint-2: it is damaged \(.*scheduler\.json: JSONDecodeError"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, resume_from_checkpoint="checkpoint-2"))
    # truncated on disk after it was written: named, with the intact checkpoints beside it
    damaged = out / "checkpoints" / "checkpoint-4" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"checkpoint-4: it is damaged.*--resume_from_checkpoint checkpoint-3"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=5, learning_rate=1e-2,
                                     resume_from_checkpoint="latest"))
    (out / "checkpoints" / "checkpoint-3" / "difftune_config.json").write_text("[1, 2")  # damaged: said, not skipped
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difftune"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=1,
                                     resume_from_checkpoint="checkpoint-3"))
    assert "checkpoint-3/difftune_config.json (Expecting" in caplog.text and "cannot be listed" in caplog.text
    # damaged without a change of size (bytes overwritten with NaNs): named before the new run writes anything
    from safetensors.torch import save_file

    weights = load_file(str(out / "checkpoints" / "checkpoint-3" / "trainable.safetensors"))
    name = sorted(weights)[len(weights) // 2]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(out / "checkpoints" / "checkpoint-3" / "trainable.safetensors"))
    elsewhere = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match=rf"checkpoint-3 is damaged: {name} holds NaN"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, elsewhere, max_train_steps=5,
                                     resume_from_checkpoint=str(out / "checkpoints" / "checkpoint-3")))
    assert not (tmp_path / "new").exists()


def test_a_run_over_mostly_unreadable_samples_stops_with_the_reason(tiny_model_dir, tmp_path):
    from difftune.errors import DataError

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"image": f"missing/{i}.png", "conditioning_image": f"missing/c{i}.png", "text": "red circle"}
            for i in range(12)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"none of the first 8 training samples could be loaded.*--image_column"):
        train_controlnet(make_config(tiny_model_dir, data, out, max_train_steps=4, train_batch_size=4))
    assert not out.exists()  # found before the run started: nothing recorded
    # one readable row first: the start goes ahead, and the loop stops once most samples fail
    from PIL import Image

    Image.new("RGB", (64, 64)).save(data / "ok.png")
    rows[0] = {"image": "ok.png", "conditioning_image": "ok.png", "text": "red circle"}
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"of the \d+ training samples read so far could not be loaded.*--image_column"):
        train_controlnet(make_config(tiny_model_dir, data, out, max_train_steps=4, train_batch_size=4))
    assert not (out / "diffusion_pytorch_model.safetensors").exists()  # nothing exported as if it had trained


def test_resume_from_a_checkpoint_that_is_not_there_says_so(tmp_path):
    from difftune.errors import ConfigError

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / ckpt.STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match=r"checkpoint-99: there is no checkpoint-99 \(nor .*checkpoint-99\)\. Use "
                                          r"'latest' or one of: checkpoint-2"):
        ckpt.resolve_resume(tmp_path, "checkpoint-99")
    (tmp_path / "checkpoint-5").mkdir()  # a folder without the state file: named as incomplete
    with pytest.raises(ConfigError, match="checkpoint-5 is not a complete difftune checkpoint"):
        ckpt.resolve_resume(tmp_path, "checkpoint-5")


def test_training_from_python_leaves_the_callers_random_state_alone(tiny_model_dir, fill_dir, tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "run", max_train_steps=1))
    assert torch.equal(torch.rand(3), expected)  # training seeded torch with its own --seed, and gave it back


def test_checkpoints_of_the_diffusers_script_are_refused_with_the_way_on(tmp_path):
    """A diffusers run's OUT/checkpoint-N (accelerate's save_state): `latest` started afresh over it, and
    naming it said there was no such checkpoint."""
    from difftune.checkpoint import resolve_resume
    from difftune.errors import ConfigError

    out = tmp_path / "run"
    theirs = out / "checkpoint-500"
    (theirs / "controlnet").mkdir(parents=True)
    (theirs / "optimizer.bin").write_bytes(b"")
    (theirs / "random_states_0.pkl").write_bytes(b"")
    for spec in ("latest", "checkpoint-500", str(theirs)):
        with pytest.raises(ConfigError, match=r"holds checkpoints of a diffusers training script \(checkpoint-500\).*"
                                              r"--controlnet_model_name_or_path .*checkpoint-500/controlnet"):
            resolve_resume(out / "checkpoints", spec)
    assert resolve_resume(tmp_path / "fresh" / "checkpoints", "latest") is None  # nothing at all: a fresh start
