"""--report_to wandb / comet_ml through their own packages, offline: what reaches them, and no token.

(TensorBoard is read back in test_training.py::test_outputs_and_resolved_config.)
"""

from __future__ import annotations

import json
import logging
import sys
import zipfile

import pytest

from difftune.cli import main, redact_secrets
from difftune.errors import ConfigError

SECRET = "hf_SECRET_tracker_must_not_see"


def test_secret_flag_values_are_redacted_in_both_spellings():
    argv = ["difftune", "train", "controlnet", "--hub_token", SECRET, "--seed", "1", f"--hub_token={SECRET}"]
    assert redact_secrets(argv) == ["difftune", "train", "controlnet", "--hub_token", "***", "--seed", "1",
                                    "--hub_token=***"]
    assert redact_secrets(["--hub_model_id", "me/x"]) == ["--hub_model_id", "me/x"]  # only secrets


def test_a_message_during_a_progress_bar_gets_its_own_line(monkeypatch):
    import io
    import logging

    from tqdm.auto import tqdm

    from difftune.cli_process import show_messages

    show_messages()
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with tqdm(total=2, file=sys.stderr, mininterval=0) as bar:
        bar.update(1)
        logging.getLogger("difftune").warning("skipping a sample")
    lines = stderr.getvalue().split("\n")
    said = next(line for line in lines if "skipping a sample" in line)
    assert said.rsplit("\r", 1)[-1] == "skipping a sample"  # the bar cleared first, not "50%|#  | skipping..."


def _train(tracker, model_dir, data_dir, out, monkeypatch):
    val = data_dir / "validation"
    argv = ["train", "controlnet", "--pretrained_model_name_or_path", str(model_dir), "--train_data_dir",
            str(data_dir), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "2", "--validation_steps", "1", "--validation_prompt", "red circle",
            "--validation_image", str(val / "conditioning_0.png"), "--num_validation_images", "1",
            "--num_validation_inference_steps", "2", "--report_to", tracker, "--hub_token", SECRET]
    monkeypatch.setattr(sys, "argv", ["difftune", *argv])  # what the trackers record as the command
    assert main(argv) == 0


def test_wandb_offline_run_gets_losses_and_images_but_not_the_token(tiny_model_dir, fill_dir, tmp_path,
                                                                    monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    _train("wandb", tiny_model_dir, fill_dir, out, monkeypatch)
    (run,) = (out / "logs" / "wandb").glob("offline-run-*")  # with the run's other logs, not in the cwd
    images = sorted((run / "files" / "media" / "images" / "validation").glob("*.png"))
    assert [p.name.split("_")[:2] for p in images] == [["0", "1"], ["0", "2"]]  # image 0 at steps 1 and 2
    # wandb's service process writes the record file; once seen with only its header under a loaded CPU, as
    # if read before the service got to it: a process exit (the CLI's) waits for it, as teardown does
    wandb.teardown()
    (record,) = run.glob("run-*.wandb")
    assert b"loss" in record.read_bytes()
    for path in out.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_wandb_without_a_login_is_one_clear_error_before_training(tiny_model_dir, fill_dir, tmp_path, monkeypatch,
                                                                  capsys):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # an earlier test's offline settings stay in wandb's process-wide state otherwise
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    with pytest.raises(AssertionError):
        _train("wandb", tiny_model_dir, fill_dir, out, monkeypatch)
    err = capsys.readouterr().err
    assert "--report_to wandb: the tracker could not start" in err and "WANDB_MODE=offline" in err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


def test_comet_offline_experiment_gets_losses_and_images_but_not_the_token(tiny_model_dir, fill_dir, tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("comet_ml")
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.delenv("COMET_OFFLINE_DIRECTORY", raising=False)
    # a fresh --output_dir: the offline folder Comet is given is made first (Comet refused one not there)
    _train("comet_ml", tiny_model_dir, fill_dir, tmp_path / "run", monkeypatch)
    (archive,) = (tmp_path / "run" / "logs" / "comet_ml").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        members = {name: z.read(name) for name in z.namelist()}
    messages = [json.loads(line) for line in members["messages.json"].splitlines()]
    metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
    assert [(m["metricName"], m["step"]) for m in metrics if m["metricName"] == "loss"] == [("loss", 1), ("loss", 2)]
    images = [m["payload"] for m in messages
              if m["type"] == "file_upload" and m["payload"]["upload_type"] == "visualization"]
    assert [(i["additional_params"]["figName"], i["additional_params"]["step"]) for i in images] == [
        ("validation/0/0", 1), ("validation/0/0", 2)]
    assert all(members[i["file_path"]].startswith(b"\x89PNG") for i in images)
    assert all(SECRET.encode() not in data for data in members.values())
    (command,) = [m["payload"]["command"] for m in messages if "command" in m["payload"]]
    assert "***" in command


def test_a_tracker_that_does_not_import_says_to_reinstall_it(tiny_model_dir, fill_dir, tmp_path, monkeypatch, capsys):
    """Installed but broken (it is found, it does not import): the hint was about logins and API keys."""
    pytest.importorskip("tensorboard")
    import accelerate

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'summary' from 'tensorboard'")

    monkeypatch.setattr(accelerate.Accelerator, "init_trackers", broken)
    with pytest.raises(AssertionError):
        _train("tensorboard", tiny_model_dir, fill_dir, tmp_path / "run", monkeypatch)
    err = capsys.readouterr().err
    assert "does not import: pip install --upgrade 'difftune[tensorboard]'" in err and "wandb login" not in err


@pytest.mark.parametrize("name", ["../../escaped", "my proj/../x", "a/b", "..", ""])
def test_a_tracker_project_name_that_is_not_a_plain_name_is_refused_at_config_time(name, tmp_path):
    from conftest import make_config

    with pytest.raises(ConfigError, match="--tracker_project_name .*letters, digits"):
        make_config(tmp_path / "model", tmp_path / "data", tmp_path / "run", tracker_project_name=name)


def _run(model_dir, data_dir, out, **flags):
    from conftest import make_config

    from difftune.api import train_controlnet

    return train_controlnet(make_config(model_dir, data_dir, out, train_batch_size=2, **flags))


def _without_packages(monkeypatch, *missing):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))


def test_report_to_all_says_what_it_picked(monkeypatch, caplog):
    from difftune.trackers import requested_trackers, say_picked

    caplog.set_level(logging.INFO, logger="difftune")
    _without_packages(monkeypatch, "comet_ml")
    say_picked("all", requested_trackers("all"))
    assert "--report_to all: logging to tensorboard, wandb (comet_ml not installed)." in caplog.text
    caplog.clear()
    _without_packages(monkeypatch, "tensorboard", "wandb", "comet_ml")
    say_picked("all", requested_trackers("all"))
    assert "nothing is logged beyond OUTPUT_DIR/metrics.jsonl" in caplog.text


def test_a_missing_tracker_package_is_said_before_the_base_model_loads(fill_dir, tmp_path, monkeypatch):
    _without_packages(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match="--report_to wandb: the 'wandb' package is not installed"):
        _run(tmp_path / "no-model-here", fill_dir, tmp_path / "run", report_to="wandb")


def _board(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    board.Reload()  # (it applies a resumed writer's purge_step, as TensorBoard does)
    return [(e.step, e.value) for e in board.Scalars("loss")]


def _offline_trackers(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a Comet archive written to the current folder would show here
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    for name in ("WANDB_DIR", "COMET_OFFLINE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def test_a_resume_continues_each_trackers_run_and_overwrite_clears_them(tiny_model_dir, fill_dir, tmp_path,
                                                                          monkeypatch):
    """Resumed from checkpoint-2 of a 4-step run: TensorBoard's curve has each step once (it was 1,2,3,4,3,4),
    W&B goes on under the run's id, Comet under its experiment key. --overwrite_output_dir then leaves only the
    new run's logs (TensorBoard showed 1,2,3,4,1,2)."""
    for name in ("tensorboard", "wandb", "comet_ml"):
        pytest.importorskip(name)
    import wandb

    wandb.teardown()
    _offline_trackers(monkeypatch, tmp_path)
    out, logs = tmp_path / "run", tmp_path / "run" / "logs"
    _run(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=2, report_to="all")
    _run(tiny_model_dir, fill_dir, out, max_train_steps=4, checkpointing_steps=2, report_to="all",
         resume_from_checkpoint=str(out / "checkpoints" / "checkpoint-2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert _board(logs / "train_controlnet") == [(r["step"], pytest.approx(r["loss"], rel=1e-5)) for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    runs = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["tracker_runs"]
    wandb_runs = sorted(p.name for p in (logs / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(f"-{runs['wandb']}") for name in wandb_runs)
    archives = sorted((logs / "comet_ml").glob("*.zip"))  # with the run's logs, not in the current folder
    assert len(archives) == 2 and all(p.name.startswith(runs["comet_ml"]) for p in archives)
    assert not (tmp_path / ".cometml-runs").exists()
    for hparams in logs.rglob("hparams.yml"):
        assert "None" not in hparams.read_text()  # unset settings were written as the string 'None'

    _run(tiny_model_dir, fill_dir, out, max_train_steps=2, report_to="tensorboard", overwrite_output_dir=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert _board(logs / "train_controlnet") == [(r["step"], pytest.approx(r["loss"], rel=1e-5)) for r in rows]
    assert sorted(p.name for p in logs.iterdir()) == ["train_controlnet"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_overwrite_never_deletes_a_logging_dir_outside_the_output_dir(tiny_model_dir, fill_dir, tmp_path):
    pytest.importorskip("tensorboard")
    outside = tmp_path / "board"
    flags = dict(max_train_steps=1, report_to="tensorboard", logging_dir=str(outside))
    _run(tiny_model_dir, fill_dir, tmp_path / "run", **flags)
    first = sorted(outside.rglob("events.out.tfevents.*"))
    _run(tiny_model_dir, fill_dir, tmp_path / "run", overwrite_output_dir=True, **flags)
    assert set(first) < set(outside.rglob("events.out.tfevents.*"))


def _comet_cannot_start(monkeypatch, tmp_path):
    """Comet online with no API key anywhere: its start fails."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.comet.config
    for name in ("COMET_API_KEY", "COMET_START_ONLINE", "COMET_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def test_a_failed_tracker_start_records_no_run(tiny_model_dir, fill_dir, tmp_path, monkeypatch, capsys):
    """--report_to all with Comet failing after TensorBoard and W&B started: a fresh output folder is not left
    (it kept difftune_config.json and logs/); over an earlier run (--overwrite_output_dir) all of it stays."""
    for name in ("tensorboard", "wandb", "comet_ml"):
        pytest.importorskip(name)
    import wandb

    wandb.teardown()
    _offline_trackers(monkeypatch, tmp_path)
    out = tmp_path / "run"
    _run(tiny_model_dir, fill_dir, out, max_train_steps=2, report_to="tensorboard")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _comet_cannot_start(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="--report_to tensorboard.wandb.comet_ml: the tracker \\(comet_ml\\) could not start"):
        _run(tiny_model_dir, fill_dir, out, max_train_steps=2, report_to="all", overwrite_output_dir=True,
             learning_rate=1e-4)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier run, whole
    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(ConfigError, match="could not start"):
        _run(tiny_model_dir, fill_dir, fresh, max_train_steps=2, report_to="all")
    assert not (tmp_path / "fresh").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_overwrite_also_clears_the_earlier_model_card_and_its_other_logging_dir(tmp_path):
    """An earlier run that logged to `logs` and a new one given --logging_dir tb: `logs` went on beside `tb`,
    and the earlier model card described a deleted model until the new run's export replaced it."""
    from difftune.guards import earlier_outputs

    out = tmp_path / "run"
    (out / "logs" / "train_controlnet").mkdir(parents=True)
    (out / "difftune_config.json").write_text(json.dumps({"train": {"logging_dir": "logs"}}))
    (out / "README.md").write_text("---\nbase_model: sd\nlibrary_name: diffusers\n"
                                   "tags: [controlnet, stable-diffusion, difftune]\n---\n# ControlNet\n")
    assert {out / "README.md", out / "logs"} <= set(earlier_outputs(out, new_logs=out / "tb"))
    assert out / "logs" not in earlier_outputs(out, new_logs=out / "logs")  # the new run's own (set aside before)
    (out / "README.md").write_text("# my notes on this run\n")
    assert out / "README.md" not in earlier_outputs(out, new_logs=out / "tb")  # the user's own file stays
    (out / "difftune_config.json").write_text(json.dumps({"train": {"logging_dir": str(tmp_path / "elsewhere")}}))
    (tmp_path / "elsewhere").mkdir()
    assert tmp_path / "elsewhere" not in earlier_outputs(out, new_logs=out / "tb")  # never outside the run
