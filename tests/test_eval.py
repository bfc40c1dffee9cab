"""The quality metrics read ground truth correctly, and the eval commands run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.data.fill50k import render_circle, sample_circles
from difftune.data.shapes import BASE_SHAPES, render_shape, sample_shapes
from difftune.eval.metrics import CircleIoU, shape_scores


def test_shape_metrics_read_rendered_shapes_perfectly():
    for s in sample_shapes(90, 64, seed=3, shapes=BASE_SHAPES):
        scores = shape_scores(np.asarray(render_shape(s, 64)), s.shape, s.color, s.background)
        assert scores["background_ok"] == scores["shape_color_ok"] == scores["shape_kind_ok"] == 1.0, s


def test_shape_reader_survives_soft_edges_and_stray_speckles():
    """Generated images are softer than renderings and carry speckles: the reading must not hinge on either."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    kinds_ok = colours_ok = 0
    samples = sample_shapes(60, 64, seed=4, shapes=BASE_SHAPES)
    for s in samples:
        image = np.asarray(render_shape(s, 64).filter(ImageFilter.GaussianBlur(1.0))).copy()
        y, x = rng.integers(0, 64, size=2)  # a stray off-colour pixel away from the shape
        if (x - s.cx) ** 2 + (y - s.cy) ** 2 > (s.size + 4) ** 2:
            image[y, x] = 255 - image[y, x]
        scores = shape_scores(image, s.shape, s.color, s.background)
        kinds_ok += scores["shape_kind_ok"]
        colours_ok += scores["shape_color_ok"]
    assert kinds_ok >= 0.95 * len(samples) and colours_ok >= 0.95 * len(samples)


def test_shape_metrics_notice_wrong_colour_and_kind():
    s = sample_shapes(1, 64, seed=5, shapes=("square",))[0]
    image = np.asarray(render_shape(s, 64))
    assert shape_scores(image, "triangle", s.color, s.background)["shape_kind_ok"] == 0.0
    assert shape_scores(image, "circle", s.color, s.background)["shape_kind_ok"] == 0.0
    assert shape_scores(image, "square", s.background, s.color)["shape_color_ok"] == 0.0
    flat = np.full_like(image, 128)
    assert shape_scores(flat, "square", s.color, s.background)["shape_color_ok"] == 0.0


def test_circle_iou_of_ground_truth_is_high_and_of_a_moved_circle_low():
    metric = CircleIoU()
    ious, moved = [], []
    for c in sample_circles(60, 64, 0):
        image = np.asarray(render_circle(c, 64)[0])
        target = dict(cx=c.cx, cy=c.cy, r=c.r, color=c.color, background=c.background)
        ious.append(metric.score(image, target)["iou"])
        moved.append(metric.score(np.roll(image, 32, axis=1), target)["iou"])
    assert np.mean(ious) > 0.95
    assert np.mean(moved) < 0.3


def test_eval_commands_run_on_a_tiny_model(tiny_model_dir, fill_dir, tmp_path, capsys):
    from difftune.api import train_controlnet
    from difftune.cli import main
    from conftest import make_config

    run = tmp_path / "cn"
    train_controlnet(make_config(tiny_model_dir, fill_dir, run, max_train_steps=1))
    assert main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet",
                 str(run), "--n", "3", "--num_inference_steps", "2", "--out", str(tmp_path / "ev"),
                 "--control_guidance", "both", "cond"]) == 0
    result = json.loads((tmp_path / "ev" / "eval_controlnet.json").read_text())
    assert result["n"] == 3 and 0.0 <= result["controlnet"]["iou"] <= 1.0 and "base_alone" in result
    assert 0.0 <= result["controlnet_cond"]["iou"] <= 1.0 and result["guidance_scale"] == 7.5
    assert 0.0 <= result["vae_ceiling"]["iou"] <= 1.0  # the true images through the VAE
    assert (result["base_model"], result["controlnet_path"], result["num_inference_steps"], result["seed"]) == (
        str(tiny_model_dir), str(run), 2, 0)  # what was measured, recorded with the numbers
    assert sum(b["n"] for b in result["by_radius"].values()) == 3 and all(
        "vae_ceiling" in b and "base_alone" in b and "controlnet_cond" in b for b in result["by_radius"].values())
    assert result["data_is_training_data"] is False
    grid = Image.open(tmp_path / "ev" / "eval_controlnet.png")  # condition | both | cond | base alone, a row each
    assert (grid.width, grid.height) == (4 * 66 + 2, 3 * 66 + 2)  # 64-px cells, 2-px padding
    assert main(["eval", "base", "--pretrained_model_name_or_path", str(tiny_model_dir), "--n_prompts", "2",
                 "--per_prompt", "2", "--num_inference_steps", "2", "--out", str(tmp_path / "eb")]) == 0
    result = json.loads((tmp_path / "eb" / "eval_base.json").read_text())
    assert result["n_images"] == 4 and set(result["by_shape"]) <= set(BASE_SHAPES)
    assert 0.0 <= result["vae_ceiling"]["shape_kind_ok"] <= 1.0  # the truth through the VAE
    printed = capsys.readouterr().out
    assert "shape_kind_ok" in printed and "controlnet_cond " in printed


def test_eval_on_the_training_data_says_so(tiny_model_dir, fill_dir, tmp_path, caplog, monkeypatch, capsys):
    """Scores on the conditions a ControlNet trained on are no held-out measure: eval warns and records it,
    also when the run recorded its data and output folders relative to where training ran."""
    import shutil

    from difftune.api import train_controlnet
    from difftune.cli import main
    from difftune.recorded import recorded_base, recorded_train_data
    from conftest import make_config

    monkeypatch.chdir(tmp_path)
    shutil.copytree(fill_dir, "fill")
    shutil.copytree(tiny_model_dir, "base")
    train_controlnet(make_config("base", "fill", "runs/cn", max_train_steps=1))
    assert recorded_train_data("runs/cn") == tmp_path.resolve() / "fill"
    # a checkpoint's own copy of the settings resolves against the same training folder
    assert recorded_train_data("runs/cn/checkpoints/checkpoint-1") == tmp_path.resolve() / "fill"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # from another folder: the recorded base and data still resolve
    assert recorded_base(controlnet="../runs/cn")[0] == str(tmp_path.resolve() / "base")
    assert main(["eval", "controlnet", "--controlnet", "../runs/cn", "--data", "../fill", "--n", "2",
                 "--num_inference_steps", "1", "--no_baseline", "--out", "ev"]) == 0
    assert json.loads(Path("ev/eval_controlnet.json").read_text())["data_is_training_data"] is True
    assert "(2 training-set conditions" in capsys.readouterr().out
    assert any("is the data set this ControlNet was trained on" in r.getMessage() for r in caplog.records)
    caplog.clear()
    shutil.copytree(fill_dir, "other")  # the same rows, but not the recorded folder: no warning
    assert main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet",
                 "../runs/cn", "--data", "other", "--n", "2", "--num_inference_steps", "1", "--no_baseline",
                 "--out", "ev2"]) == 0
    assert json.loads(Path("ev2/eval_controlnet.json").read_text())["data_is_training_data"] is False
    assert not any("trained on" in r.getMessage() for r in caplog.records)


def test_eval_conditioning_scale_zero_is_the_base_alone(tiny_model_dir, tiny_base, tmp_path, capsys):
    """--controlnet_conditioning_scale reaches the pipeline: 0 reproduces the base alone's images exactly."""
    import torch
    from diffusers import ControlNetModel

    from difftune.cli import main

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(tiny_base.unet)
    with torch.no_grad():  # a ControlNet whose residuals are far from zero, unlike a freshly initialised one
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    net.save_pretrained(tmp_path / "cn")
    rows = {}
    for scale in ("0", "1"):
        assert main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet",
                     str(tmp_path / "cn"), "--n", "3", "--num_inference_steps", "2", "--controlnet_conditioning_scale",
                     scale, "--out", str(tmp_path / scale)]) == 0
        rows[scale] = json.loads((tmp_path / scale / "eval_controlnet.json").read_text())
    zero, one = rows["0"], rows["1"]
    assert zero["controlnet_conditioning_scale"] == 0.0 and one["controlnet_conditioning_scale"] == 1.0
    assert zero["controlnet"] == zero["base_alone"]  # every score, the continuous colour distances included
    assert one["controlnet"] != one["base_alone"]
    printed = capsys.readouterr().out  # the table names a non-default scale, and only then
    assert printed.count("controlnet_conditioning_scale 0;") == 1 and "controlnet_conditioning_scale 1" not in printed


def test_by_radius_bins_the_demo_sizes_as_the_readme_table():
    from difftune.eval.run import by_radius

    targets = [{"r": r} for r in range(3, 20)]
    scores = {"controlnet": [{"iou": r / 20} for r in range(3, 20)]}
    bins = by_radius(scores, targets, 64)
    assert list(bins) == ["r 3-5 px", "r 6-9 px", "r 10-14 px", "r 15-19 px"]
    assert bins["r 3-5 px"]["n"] == 3 and bins["r 3-5 px"]["controlnet"]["iou"] == pytest.approx(4 / 20)
    # named by the bins' bounds, not the radii that happen to fall in them: runs compare key by key
    assert list(by_radius({"controlnet": [{"iou": 0.5}] * 2}, [{"r": 6}, {"r": 16}], 64)) == ["r 6-9 px", "r 15-19 px"]


def test_eval_data_and_controlnet_are_checked_before_anything_loads(tmp_path, capsys):
    """A missing --data, or one the metric cannot read, is named before the base model loads (the base
    given here does not exist: any load would fail first) instead of 'Empty data_files'."""
    from difftune.cli import main

    def run(*extra: str) -> str:
        code = main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                     "--n", "2", "--num_inference_steps", "1", "--out", str(tmp_path / "ev"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        return err

    cn = tmp_path / "cn"
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    err = run("--controlnet", str(cn), "--data", str(tmp_path / "nope_data"))
    assert "--data" in err and "does not exist" in err and "difftune data fill50k" in err
    plain = tmp_path / "plain"  # a trainer-readable folder without difftune_dataset.json: scored as fill50k
    plain.mkdir()
    (plain / "metadata.jsonl").write_text('{"image": "a.png", "conditioning_image": "b.png", "text": "x"}\n')
    err = run("--controlnet", str(cn), "--data", str(plain))
    assert "holds no fill50k circles" in err and "--metric canny" in err
    (plain / "difftune_dataset.json").write_text(json.dumps({"kind": "conditions", "condition": "canny"}))
    assert "leave out --metric" in run("--controlnet", str(cn), "--data", str(plain), "--metric", "fill50k")
    assert "--controlnet nope_cn does not exist" in run("--controlnet", "nope_cn")
    assert not (tmp_path / "ev").exists()  # a failed evaluation leaves no empty --out
    (tmp_path / "a-file").write_text("")  # --out: refused before any sampling, not after it
    for command in (["controlnet", "--controlnet", str(cn)], ["base"], ["custom-diffusion", "--custom_diffusion", "x"]):
        code = main(["eval", *command, "--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                     "--out", str(tmp_path / "a-file")])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {tmp_path / 'a-file'}: cannot make this folder" in err, err


def test_a_damaged_run_record_is_said_not_silently_skipped(tmp_path, caplog):
    """A ControlNet folder whose difftune_config.json cannot be read was evaluated on the default base, with
    the training-data check off, and nothing said so."""
    from difftune.recorded import recorded_base

    (tmp_path / "difftune_config.json").write_text('{"x')
    with caplog.at_level("WARNING", logger="difftune"):
        assert recorded_base(controlnet=tmp_path) is None
    assert f"{tmp_path / 'difftune_config.json'} is not valid JSON" in caplog.text


def test_eval_controlnet_from_python_without_a_base_uses_the_recorded_one(tiny_model_dir, fill_dir, tmp_path, capsys):
    """None as the base: the one the run recorded, read as the run read it (its tokenizer, prediction type), as
    generate() does and the CLI did on its own (the API raised a TypeError on None)."""
    from difftune.api import train_controlnet
    from difftune.eval.run import eval_controlnet
    from conftest import make_config

    run = tmp_path / "cn"
    train_controlnet(make_config(tiny_model_dir, fill_dir, run, max_train_steps=1, prediction_type="v_prediction",
                                 tokenizer_name=str(tiny_model_dir / "tokenizer")))
    capsys.readouterr()
    result = eval_controlnet(None, run, n=1, steps=1, baseline=False)
    assert result["base_model"] == str(tiny_model_dir)
    said = capsys.readouterr().err
    assert f"base model: {tiny_model_dir} (recorded in" in said and f"tokenizer: {tiny_model_dir / 'tokenizer'}" in said
    assert "prediction type: v_prediction (the adapter's run trained with it" in said


def test_an_adapters_record_reads_its_base_from_where_its_run_started(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                      caplog):
    """From a folder holding another folder of the recorded name, generate/eval take the one the run read (the
    folder it was started in), say which, and print it absolutely; a base named as the recorded one in any
    spelling is the recorded one (its tokenizer and prediction type apply), another is warned about."""
    import shutil

    from difftune.models import DEFAULT_MODEL, resolve_builtin
    from difftune.recorded import (recorded_concept_loading, recorded_loading, resolve_base, same_model,
                                   warn_unused_records)

    monkeypatch.chdir(tmp_path)
    for folder in ("sdxl", "tok", "here/sdxl", "here/tok"):
        shutil.copytree(tiny_model_dir / "tokenizer", folder)  # (any folders: only their places matter)
    run = tmp_path / "runs" / "cn"
    run.mkdir(parents=True)
    (run / "difftune_config.json").write_text(json.dumps({
        "model": {"pretrained_model_name_or_path": "sdxl", "tokenizer_name": "tok"},
        "loss": {"prediction_type": "v_prediction"}, "train": {"output_dir": "runs/cn"}}))
    monkeypatch.chdir(tmp_path / "here")
    assert resolve_base(None, "../runs/cn") == str(tmp_path / "sdxl")
    said = capsys.readouterr().err
    assert f"as sdxl, read from {tmp_path}, where its run was started, not {tmp_path / 'here' / 'sdxl'} here" in said
    for name in ("../sdxl", "../sdxl/", str(tmp_path / "sdxl"), "./../sdxl"):  # the recorded base, by name
        assert recorded_loading(name, "../runs/cn") == {"tokenizer_name": str(tmp_path / "tok"),
                                                        "prediction_type": "v_prediction"}, name
    assert recorded_loading("sdxl", "../runs/cn") == {}  # the other folder here: another base
    with caplog.at_level("WARNING", logger="difftune"):
        warn_unused_records("sdxl", "../runs/cn")
    assert f"--tokenizer_name {tmp_path / 'tok'} to use the run's here" in caplog.text
    assert "prediction type v_prediction" in caplog.text
    assert same_model(DEFAULT_MODEL, resolve_builtin(DEFAULT_MODEL)) and same_model("org/model", "org/model")
    assert not same_model("org/model", "org/other")

    concept = tmp_path / "cd"  # a Custom Diffusion folder's record, named by another spelling of its base
    concept.mkdir()
    (concept / "custom_diffusion.json").write_text(json.dumps({
        "base_model": str(tmp_path / "sdxl"), "tokenizer_name": str(tmp_path / "tok"),
        "prediction_type": "v_prediction"}))
    assert recorded_concept_loading("../sdxl/", concept)["prediction_type"] == "v_prediction"
    assert recorded_concept_loading(str(tiny_model_dir), concept) == {}
