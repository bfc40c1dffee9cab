"""Conditions from plain images (canny) and the edge-F1 metric: right edges, clear errors, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.data.conditions import Canny, write_condition_dataset
from difftune.data.shapes import ShapeSample, render_shape, sample_shapes, write_shapes_folder
from difftune.errors import ConfigError, DataError
from difftune.eval.metrics import EdgeF1, edge_f1, score_all


def _square(resolution: int = 64, half: int = 12) -> Image.Image:
    c = resolution / 2
    return render_shape(ShapeSample("square", c, c, half * np.sqrt(2), "red", (255, 0, 0), "white", (255, 255, 255)),
                        resolution)


def test_canny_marks_the_outline_and_nothing_else():
    image = _square()
    cond = np.asarray(Canny()(image))
    assert cond.shape == (64, 64, 3) and set(np.unique(cond)) == {0, 255}
    edges = cond[..., 0] > 0
    ys, xs = np.nonzero(edges)
    # the square covers pixels 20..43; its edges lie on its border, one pixel either side at most
    assert ys.min() >= 19 and ys.max() <= 44 and xs.min() >= 19 and xs.max() <= 44
    assert not edges[24:40, 24:40].any()  # nothing inside
    assert edges[32, 19:22].any() and edges[19:22, 32].any()  # each side found
    assert not Canny()(Image.new("RGB", (64, 64), (40, 90, 200))).getbbox()  # a flat image: no edges
    with pytest.raises(ConfigError, match="low <= high"):
        Canny(low_threshold=200, high_threshold=100)


def test_edge_f1_counts_within_the_tolerance():
    truth = np.asarray(Canny()(_square()))[..., 0] > 0
    assert edge_f1(truth, truth, 1)["edge_f1"] == 1.0
    shifted = np.roll(truth, 1, axis=1)
    assert edge_f1(shifted, truth, 1)["edge_f1"] == 1.0  # one pixel off: within BSDS's tolerance at 64 px
    assert edge_f1(np.roll(truth, 6, axis=1), truth, 1)["edge_f1"] < 0.5  # six pixels off: half the edges missed
    nothing = np.zeros_like(truth)
    assert edge_f1(nothing, truth, 1) == {"edge_f1": 0.0, "edge_precision": 0.0, "edge_recall": 0.0}
    assert edge_f1(nothing, nothing, 1)["edge_f1"] == 1.0
    noisy = truth | (np.random.default_rng(0).random(truth.shape) < 0.2)
    scores = edge_f1(noisy, truth, 1)
    assert scores["edge_recall"] == 1.0 and scores["edge_precision"] < 0.4  # clutter costs precision


def test_edge_f1_scorer_reads_true_images_as_perfect_and_others_as_poor():
    image = _square()
    target = {"condition": Canny()(image)}
    assert EdgeF1().score(np.asarray(image), target)["edge_f1"] == 1.0
    other = render_shape(ShapeSample("triangle", 20, 20, 10, "red", (255, 0, 0), "white", (255, 255, 255)), 64)
    assert EdgeF1().score(np.asarray(other), target)["edge_f1"] < 0.2
    # thresholds matter: a faint edge (contrast 30 in one channel) is below canny's 100 / 200 ...
    faint = render_shape(ShapeSample("square", 32, 32, 12 * np.sqrt(2), "a", (130, 130, 130), "b", (100, 100, 100)), 64)
    assert EdgeF1().score(np.asarray(faint), target)["edge_f1"] == 0.0
    # ... and found by a scorer built with the data set's lower thresholds
    assert EdgeF1(Canny(20, 60)).score(np.asarray(faint), target)["edge_f1"] > 0.95


def _photos(root: Path, n: int = 3, size: tuple[int, int] = (96, 80)) -> list[str]:
    names = []
    for k in range(n):
        name = f"sub/{k}.jpg" if k == 0 else f"{k}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, (255, 255, 255))
        image.paste((200, 20, 20), (20 + 5 * k, 20, 60, 60))
        image.save(root / name, quality=95)
        names.append(name)
    return names


def test_condition_dataset_from_a_plain_folder_trains_as_it_is(tmp_path):
    from difftune.data import ControlNetExamples, check_dataset, load_table, resolve_columns

    src = tmp_path / "photos"
    names = _photos(src)
    (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"photo {n}"}) + "\n"
                                                for n in names[:2]))
    (src / "2.txt").write_text("a caption beside the image\n")
    info = write_condition_dataset(src, tmp_path / "out", resolution=64, progress=False)
    out = tmp_path / "out"
    assert info["n"] == 3 and not list(tmp_path.glob("*out.tmp-*"))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["photo 1.png", "a caption beside the image", "photo sub/0.jpg"]
    assert [r["source"] for r in rows] == ["1.png", "2.png", "sub/0.jpg"]  # sorted paths
    manifest = json.loads((out / "difftune_dataset.json").read_text())
    assert manifest["condition"] == "canny" and manifest["conditioner"]["high_threshold"] == 200
    # resized and cropped first, then the edges computed at 64 px: still crisp, and on the image's edges
    image = Image.open(out / rows[0]["image"])
    cond = np.asarray(Image.open(out / rows[0]["conditioning_image"]))
    assert image.size == (64, 64) and set(np.unique(cond)) == {0, 255}
    assert np.array_equal(cond[..., 0] > 0, Canny().edges(np.asarray(image)))
    # the trainer reads it as it is
    table = load_table(train_data_dir=out)
    assert check_dataset(table, *resolve_columns(table.column_names), resolution=64).ok
    item = ControlNetExamples(table, *resolve_columns(table.column_names), resolution=64)[0]
    assert item["caption"] == "photo 1.png" and item["conditioning_pixel_values"].max() == 1.0
    # one caption for all
    write_condition_dataset(src, out, caption="red box", overwrite=True, progress=False)
    assert {json.loads(line)["text"] for line in (out / "metadata.jsonl").read_text().splitlines()} == {"red box"}
    assert Image.open(out / "images" / "00000.png").size == (96, 80)  # no --resolution: sizes kept


def test_captions_in_any_form_a_user_brings_and_hidden_files_left_out(tmp_path, caplog):
    """A folder copied from a Mac (._ files, a .thumbnails folder) failed as a whole; a Latin-1 caption was a
    UnicodeDecodeError traceback; a metadata.jsonl with a byte-order mark, or a metadata.csv, was not read."""
    src = tmp_path / "photos"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(src / name)
    (src / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (src / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(src / ".thumbnails" / "a.png")
    (src / "metadata.jsonl").write_bytes('\ufeff{"file_name": "a.png", "text": "caf\u00e9"}\n'
                                          '{"file_name": "b.png", "text": "b"}\n'.encode("utf-8"))
    with caplog.at_level("WARNING", logger="difftune"):
        info = write_condition_dataset(src, tmp_path / "out", progress=False)
    assert info["n"] == 2 and "left out 2 hidden image file(s)" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["caf\u00e9", "b"]
    (src / "metadata.jsonl").unlink()
    (src / "metadata.csv").write_text("file_name,text\na.png,from the csv\nb.png,b\n", encoding="utf-8")
    write_condition_dataset(src, tmp_path / "csv", progress=False)
    assert json.loads((tmp_path / "csv" / "metadata.jsonl").read_text().splitlines()[0])["text"] == "from the csv"
    (src / "metadata.csv").unlink()
    caplog.clear()
    (src / "metadata.jsonl").write_text('{"file_name": "a.png", "text": " "}\n{"file_name": "b.png", "text": "b"}\n')
    with caplog.at_level("WARNING", logger="difftune"):  # said while converting, as data check says it later
        write_condition_dataset(src, tmp_path / "up", resolution=64, progress=False)
    assert "1 of 2 pictures have an empty caption (a.png)" in caplog.text
    assert "2 of 2 pictures are smaller than --resolution 64 and are upscaled to it (blurred): a.png 16x16" in caplog.text
    (src / "metadata.jsonl").unlink()
    (src / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (src / "b.txt").write_text("b")
    with pytest.raises(DataError, match=r"a\.txt is not UTF-8 text \(line 1: .* at byte 3\) — save it as UTF-8"):
        write_condition_dataset(src, tmp_path / "latin", progress=False)


def test_condition_dataset_errors_name_the_file_and_leave_nothing_behind(tmp_path):
    src = tmp_path / "photos"
    _photos(src)
    (src / "broken.png").write_bytes(b"")  # an unreadable image is named with the missing captions, not after
    with pytest.raises(DataError, match="no caption for 3 of 4 images") as info:  # broken.png: named once, below
        write_condition_dataset(src, tmp_path / "out", progress=False)
    assert "sub/0.jpg" in str(info.value) and "--caption" in str(info.value)
    assert f"Also, 1 image(s) in {src} cannot be read: broken.png" in str(info.value)
    (src / "broken.png").unlink()
    (src / "1.png").write_bytes(b"not a png")
    (src / "2.gif").write_bytes(b"not a gif either")  # a .gif is read too (as training reads it), and every bad file named
    with pytest.raises(DataError, match="2 of the 4 images") as info:
        write_condition_dataset(src, tmp_path / "out", caption="x", progress=False)
    said = str(info.value)
    assert "--input_dir: cannot read file" in said and "move it out of --input_dir" in said
    assert "1.png" in said and "2.gif" in said and "nothing was written" in said
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*out.tmp-*"))
    with pytest.raises(ConfigError, match="inside --input_dir"):
        write_condition_dataset(src, src / "out", caption="x", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        write_condition_dataset(tmp_path / "empty", tmp_path / "o2", caption="x", progress=False)
    (src / "metadata.jsonl").write_text('{"file_name": "1.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="metadata.jsonl line 1 needs 'file_name' and 'text'"):
        write_condition_dataset(src, tmp_path / "out", progress=False)
    (src / "metadata.jsonl").write_text('{"file_name": "1.png", "text": null}\n')  # not the caption "None"
    with pytest.raises(DataError, match=r"metadata.jsonl line 1 \(1.png\): the 'text' is null, not text"):
        write_condition_dataset(src, tmp_path / "out", progress=False)
    (src / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "a"}\n{"file_name": "./1.png", "text": "b"}\n')
    with pytest.raises(DataError, match="lines 1 and 2 both give ./1.png's caption"):
        write_condition_dataset(src, tmp_path / "out", progress=False)


def test_canny_controlnet_end_to_end_through_the_cli(tiny_model_dir, tiny_depth_model, tmp_path, capsys, caplog):
    """Shapes folder -> canny data set -> train -> eval with edge F1 (the metric found from the data set)."""
    from conftest import make_config

    from difftune.api import train_controlnet
    from difftune.cli import main

    assert main(["data", "shapes", "--out", str(tmp_path / "shapes"), "--n", "8"]) == 0
    assert main(["data", "conditions", "--input_dir", str(tmp_path / "shapes"), "--out", str(tmp_path / "canny"),
                 "--low_threshold", "50", "--high_threshold", "150"]) == 0
    assert main(["data", "conditions", "--input_dir", str(tmp_path / "shapes"), "--out", str(tmp_path / "x"),
                 "--low_threshold", "150", "--high_threshold", "50"]) == 2
    assert "need 0 <= low <= high" in capsys.readouterr().err
    run = tmp_path / "cn"
    train_controlnet(make_config(tiny_model_dir, tmp_path / "canny", run, max_train_steps=1))
    with caplog.at_level("WARNING", logger="difftune"):  # (the CLI's stderr handler may hold an earlier test's stream)
        assert main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet",
                     str(run), "--data", str(tmp_path / "canny"), "--n", "12", "--num_inference_steps", "2",
                     "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval_controlnet.json").read_text())
    assert result["metric"] == "edge_f1" and 0 < result["n"] <= 8 and "by_radius" not in result
    assert set(result["controlnet"]) == {"edge_f1", "edge_precision", "edge_recall"}
    assert "base_alone" in result and 0.0 <= result["vae_ceiling"]["edge_f1"] <= 1.0
    said = capsys.readouterr()
    assert "edge_f1" in said.out
    assert f"--n 12: {tmp_path / 'canny'} holds {result['n']} usable conditions" in caplog.text  # fewer: said
    assert result["condition_settings"] == {"condition": "canny", "low_threshold": 50, "high_threshold": 150}
    # no --data: fresh conditions of the kind it trained on, with its data set's edge detector (it was
    # scored as a fill50k ControlNet on circles, silently); another kind is said to be one
    caplog.clear()
    with caplog.at_level("WARNING", logger="difftune"):
        for args in ([], ["--metric", "fill50k"]):
            assert main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet",
                         str(run), "--n", "2", "--num_inference_steps", "1", "--no_baseline", *args,
                         "--out", str(tmp_path / "ev2")]) == 0
            fresh = json.loads((tmp_path / "ev2" / "eval_controlnet.json").read_text())
            if not args:
                assert fresh["metric"] == "edge_f1" and fresh["condition_settings"]["low_threshold"] == 50
                assert "trained on" not in caplog.text
    assert fresh["metric"] == "circle_iou"
    assert "this ControlNet was trained on canny conditions" in caplog.text and "--metric fill50k" not in caplog.text
    # generate from a plain picture: the edges are computed at the output size, as for training
    photo = tmp_path / "shapes" / "00000.png"
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(run),
                 "--image", str(photo), "--condition", "canny", "--prompt", "a square", "--resolution", "32",
                 "--num_inference_steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    cond = np.asarray(Image.open(tmp_path / "g-condition.png"))[..., 0] > 0
    small = np.asarray(Image.open(photo).resize((32, 32), Image.Resampling.BICUBIC))
    assert cond.shape == (32, 32) and np.array_equal(cond, Canny().edges(small))
    assert Image.open(tmp_path / "g.png").size == (32, 32)
    wide = tmp_path / "wide.png"  # a non-square picture keeps its shape (it was centre-cropped to a square)
    Image.open(photo).convert("RGB").resize((96, 64)).save(wide)
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(run),
                 "--image", str(wide), "--condition", "canny", "--prompt", "a square", "--resolution", "32",
                 "--num_inference_steps", "2", "--out", str(tmp_path / "w.jpg")]) == 0
    assert Image.open(tmp_path / "w-condition.png").size == Image.open(tmp_path / "w.jpg").size == (48, 32)
    caplog.clear()
    with caplog.at_level("WARNING", logger="difftune"):
        assert main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(run),
                     "--image", str(photo), "--condition", "depth", "--depth_model", str(tiny_depth_model),
                     "--prompt", "a square", "--resolution", "32", "--num_inference_steps", "2",
                     "--out", str(tmp_path / "d.png")]) == 0
    assert "--condition depth: this ControlNet was trained on canny conditions" in caplog.text
    from difftune.data.conditions import Depth

    assert np.array_equal(np.asarray(Image.open(tmp_path / "d-condition.png")), np.asarray(Depth(str(tiny_depth_model))(
        Image.fromarray(small))))


def test_shapes_folder_is_a_captioned_image_folder(tmp_path):
    info = write_shapes_folder(tmp_path / "s", n=5, resolution=32, seed=3, shapes=("star",))
    rows = [json.loads(line) for line in (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()]
    assert info["n"] == 5 and len(rows) == 5 and all(" star with " in r["text"] for r in rows)
    assert Image.open(tmp_path / "s" / rows[0]["file_name"]).size == (32, 32)
    with pytest.raises(ConfigError, match="unknown hexagon"):
        write_shapes_folder(tmp_path / "t", n=5, shapes=("hexagon",))


def test_blank_conditions_are_reported_by_the_builder_and_by_data_check(tmp_path):
    from difftune.data import check_dataset, load_table, resolve_columns

    src = tmp_path / "photos"
    _photos(src, n=2)
    faint = Image.new("RGB", (64, 64), (100, 100, 100))
    faint.paste((125, 125, 125), (16, 16, 48, 48))  # contrast 25: below canny's 100 / 200
    faint.save(src / "faint.png")
    info = write_condition_dataset(src, tmp_path / "out", caption="x", progress=False)
    assert info["blank_conditions"] == ["faint.png"]
    table = load_table(train_data_dir=tmp_path / "out")
    report = check_dataset(table, *resolve_columns(table.column_names), resolution=64, progress=False)
    assert report.ok and [(w.row, w.kind) for w in report.warnings if w.kind == "blank_condition"] == [(1, "blank_condition")]
    assert "lower --low_threshold" in report.format()


def test_workers_write_the_same_data_set_and_pass_errors_on(tmp_path):
    src = tmp_path / "photos"
    _photos(src, n=6)
    serial = write_condition_dataset(src, tmp_path / "a", caption="x", workers=1, progress=False)
    parallel = write_condition_dataset(src, tmp_path / "b", caption="x", workers=2, progress=False)
    assert serial["n"] == parallel["n"] == 6
    for sub in ("images", "conditioning"):
        for f in sorted((tmp_path / "a" / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / "b" / sub / f.name).read_bytes()
    assert (tmp_path / "a" / "metadata.jsonl").read_text() == (tmp_path / "b" / "metadata.jsonl").read_text()
    (src / "4.png").write_bytes(b"truncated")
    with pytest.raises(DataError, match="4.png"):
        write_condition_dataset(src, tmp_path / "c", caption="x", workers=2, progress=False)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("*c.tmp-*"))


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    """A transformers DPT depth estimator with random weights, built from a config (offline)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    out = tmp_path_factory.mktemp("models") / "tiny-dpt"
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=64, patch_size=16, neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])
    DPTForDepthEstimation(config).save_pretrained(out)
    DPTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def test_depth_condition_data_set_and_metric(tiny_depth_model, tmp_path):
    from difftune.data.conditions import Depth, conditioner_from_settings
    from difftune.eval.metrics import DepthFidelity

    src = tmp_path / "photos"
    _photos(src, n=4)
    info = write_condition_dataset(src, tmp_path / "out", condition="depth", model=str(tiny_depth_model),
                                   caption="x", resolution=64, workers=2, progress=False)
    assert info["condition"] == "depth" and info["conditioner"] == {"condition": "depth",
                                                                   "model": str(tiny_depth_model)}
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    image = Image.open(tmp_path / "out" / rows[0]["image"])
    cond = np.asarray(Image.open(tmp_path / "out" / rows[0]["conditioning_image"]))
    depth = conditioner_from_settings(info["conditioner"])
    assert cond.shape == (64, 64, 3) and cond.max() == 255 and (cond[..., 0] == cond[..., 2]).all()
    assert np.array_equal(cond, np.asarray(depth(image)))  # the map eval would compute for the same picture
    # fidelity: the true picture reads as its own condition, another picture does not
    scores = DepthFidelity(depth).score(np.asarray(image), {"condition": Image.fromarray(cond)})
    assert scores["depth_corr"] > 0.99 and scores["depth_mae"] < 0.01
    others = [render_shape(s, 64) for s in sample_shapes(3, 64, 0)]
    assert max(DepthFidelity(depth).score(np.asarray(o), {"condition": Image.fromarray(cond)})["depth_corr"]
               for o in others) < 0.9
    # eval scores in batches: the same numbers as one at a time
    pictures = [np.asarray(image)] + [np.asarray(o) for o in others]
    targets = [{"condition": Image.fromarray(cond)}] * len(pictures)
    one_by_one = [DepthFidelity(depth).score(im, t) for im, t in zip(pictures, targets)]
    batched = score_all(DepthFidelity(depth), pictures, targets)
    assert all(abs(a[k] - b[k]) < 1e-4 for a, b in zip(one_by_one, batched) for k in a)
    assert Depth(str(tiny_depth_model)).settings()["model"] == str(tiny_depth_model)


def test_depth_runs_pictures_of_any_sizes_as_batches(tiny_depth_model, tmp_path):
    from difftune.data import conditions

    depth = conditions.Depth(str(tiny_depth_model))
    pictures = [_square(), _square(48, 8), _square(64, 20), _square(48, 14)]
    batched = depth.batch(pictures)
    for picture, cond in zip(pictures, batched):  # a batch gives each picture its own map
        assert cond.size == picture.size
        assert np.abs(np.asarray(cond, dtype=int) - np.asarray(depth(picture), dtype=int)).max() <= 1
    src = tmp_path / "photos"  # no --resolution: sizes differ within a batch, and batches straddle the end
    for k, picture in enumerate(pictures * 5):
        (src / f"{k:02d}.png").parent.mkdir(exist_ok=True)
        picture.save(src / f"{k:02d}.png")
    info = write_condition_dataset(src, tmp_path / "out", condition="depth", model=str(tiny_depth_model),
                                   caption="x", progress=False)
    assert info["n"] == 20 > conditions.IN_PROCESS_BATCH
    for k in (0, 1, 17, 19):
        cond = np.asarray(Image.open(tmp_path / "out" / "conditioning" / f"{k:05d}.png"), dtype=int)
        assert np.abs(cond - np.asarray(batched[k % 4], dtype=int)).max() <= 1


def test_eval_targets_refuse_nothing_to_score_and_take_setting_overrides(tiny_depth_model, tmp_path):
    import shutil

    from difftune.cli import build_parser
    from difftune.eval.targets import condition_targets

    with pytest.raises(ConfigError, match="--n 0: evaluate at least one"):
        condition_targets(None, 0, 64, 0, None)
    flat = tmp_path / "flat"  # pictures of one colour: every canny map is blank
    flat.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64), (40 * k, 90, 200)).save(flat / f"{k}.png")
    write_condition_dataset(flat, tmp_path / "flat-canny", caption="x", progress=False)
    with pytest.raises(DataError, match="flat-canny: no held-out condition to evaluate \\(blank conditions"):
        condition_targets(None, 5, 64, 0, tmp_path / "flat-canny")
    with pytest.raises(ConfigError, match="--metric depth: --data .*flat-canny holds canny conditions"):
        condition_targets("depth", 2, 64, 0, tmp_path / "flat-canny")
    with pytest.raises(ConfigError, match="--depth_model: not a setting of the canny metric's detector"):
        condition_targets("canny", 2, 64, 0, None, {"model": "x"})
    with pytest.raises(ConfigError, match="--low_threshold: not a setting of the fill50k"):
        condition_targets("fill50k", 2, 64, 0, None, {"low_threshold": 1})
    # a depth data set whose estimator has moved since: --depth_model points eval at its new place
    moved = tmp_path / "dpt-then"
    shutil.copytree(tiny_depth_model, moved)
    src = tmp_path / "photos"
    _photos(src, n=3)
    write_condition_dataset(src, tmp_path / "d", condition="depth", model=str(moved), caption="x", resolution=64,
                            progress=False)
    shutil.rmtree(moved)
    args = build_parser().parse_args(["eval", "controlnet", "--controlnet", "cn", "--data", str(tmp_path / "d"),
                                      "--depth_model", str(tiny_depth_model), "--out", "o"])
    from difftune.cli import _condition_settings

    settings = _condition_settings(args, None)
    assert settings == {"model": str(tiny_depth_model)}
    scorer, targets = condition_targets(args.metric, 2, 64, 0, args.data, settings)
    assert len(targets) == 2 and scorer.conditioner.model == str(tiny_depth_model)
    assert scorer.score(np.asarray(targets[0]["image"]), targets[0])["depth_corr"] > 0.99


def test_a_depth_data_set_reads_its_model_from_any_folder(tiny_depth_model, tmp_path, monkeypatch, caplog):
    """`data conditions --depth_model ../tiny-dpt` recorded the path as given, so `eval controlnet --data`
    from another folder looked for ../tiny-dpt there and blamed a --depth_model the user never passed."""
    import logging
    import shutil

    from difftune.data.conditions import MANIFEST
    from difftune.errors import ModelLoadError
    from difftune.eval.targets import condition_targets

    shutil.copytree(tiny_depth_model, tmp_path / "tiny-dpt")
    (tmp_path / "A").mkdir()
    _photos(tmp_path / "A" / "ph", n=2)
    monkeypatch.chdir(tmp_path / "A")
    write_condition_dataset("ph", "phd", condition="depth", model="../tiny-dpt", caption="x", resolution=64,
                            progress=False)
    manifest_file = tmp_path / "A" / "phd" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    assert manifest["conditioner"]["model"] == str(tmp_path / "tiny-dpt")  # absolute: reads the same anywhere
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deep")  # where ../tiny-dpt is no folder
    scorer, targets = condition_targets(None, 2, 64, 0, "../../A/phd")
    assert len(targets) == 2 and scorer.conditioner.model == str(tmp_path / "tiny-dpt")
    # a data set made before: the folder as given, relative to where it was made, found from the data set's place
    manifest["conditioner"]["model"] = "../tiny-dpt"
    manifest_file.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="difftune"):
        scorer, targets = condition_targets(None, 2, 64, 0, "../../A/phd")
    assert len(targets) == 2 and scorer.conditioner.model == str(tmp_path / "tiny-dpt")
    assert "records the depth model as ../tiny-dpt, relative to the folder it was made in; read as" in caplog.text
    # a recorded model that is gone is named as the data set's, not as a flag the user gave
    manifest["conditioner"]["model"] = str(tmp_path / "gone")
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"gone \(the depth model \.\./\.\./A/phd/difftune_dataset\.json records; "
                                             r"--depth_model was not given\): not a local folder.*Pass --depth_model"):
        condition_targets(None, 2, 64, 0, "../../A/phd")


def test_depth_model_loads_safetensors_only_and_fails_clearly_offline(tiny_depth_model, tmp_path):
    import shutil

    from transformers import DPTForDepthEstimation

    from difftune.data.conditions import Depth
    from difftune.errors import ModelLoadError

    picture = _square()
    with pytest.raises(ModelLoadError, match="--depth_model no-such/depth-model: not a local folder"):
        Depth("no-such/depth-model")(picture)
    import torch

    pickled = tmp_path / "pickled-dpt"  # the same model, its weights as a pickle (transformers 5 no longer writes one)
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_depth_model / name, pickled)
    torch.save(DPTForDepthEstimation.from_pretrained(tiny_depth_model).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="a folder, but no transformers depth estimator could be read from it"
                                             ".*model.safetensors"):
        Depth(str(pickled))(picture)  # a pickle is never loaded


def test_condition_settings_from_python_are_checked_by_name_and_type(tmp_path):
    """write_condition_dataset's **settings (and eval's condition_settings): another condition's setting, a
    misspelt one or a threshold as a string were bare TypeErrors; the CLI's flags were checked already."""
    from difftune.eval.targets import check_eval_request

    bad = [(dict(low=50), "'low' is not a setting of the canny condition: its settings are low_threshold "
                          "(--low_threshold), high_threshold (--high_threshold)"),
           (dict(model="x"), "'model' (--depth_model) is a setting of the depth condition, not of canny"),
           (dict(low_threshold="50"), "low_threshold (--low_threshold) must be an integer, got '50'"),
           (dict(high_threshold=True), "high_threshold (--high_threshold) must be an integer, got True"),
           (dict(condition="depth", model=5), "model (--depth_model) must be a string, got 5")]
    for settings, message in bad:  # refused before --input_dir (not there) is looked at
        with pytest.raises(ConfigError, match=re.escape(message)):
            write_condition_dataset(tmp_path / "no-input", tmp_path / "out", **settings)
    with pytest.raises(ConfigError, match=re.escape("high_threshold (--high_threshold) must be an integer, got 2.5")):
        check_eval_request("canny", 2, None, {"high_threshold": 2.5})  # before models load
