"""Loading, transforming, checking and batching ControlNet data — offline, tiny, real files."""

from __future__ import annotations

import io
import json
import re
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from difftune.data import (
    ControlNetExamples,
    ImageLoadError,
    StreamingControlNetExamples,
    Table,
    check_dataset,
    check_resolution,
    collate_examples,
    conditioning_to_tensor,
    image_to_tensor,
    load_image,
    load_table,
    resize_center_crop,
    resolve_columns,
    select_samples,
    write_fill50k,
)
from difftune.errors import ConfigError, DataError

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def small_fill_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "fill"
    write_fill50k(out, n=6, resolution=16, workers=1, progress=False)
    return out


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def _save(path, size=(16, 16), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


def _metadata_folder(root, rows):
    """A folder of images + metadata.jsonl whose image columns are relative paths."""
    for row in rows:
        for key in ("image", "conditioning_image"):
            spec = row.pop(f"_{key}", {})
            if spec is not None and not (root / row[key]).exists():
                _save(root / row[key], **spec)
    with open(root / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return root


# --- transforms ---------------------------------------------------------------------------


def test_resize_center_crop_and_tensor_ranges():
    wide = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3)))
    square = resize_center_crop(wide, 16)
    assert square.size == (16, 16)
    same = Image.new("RGB", (16, 16))
    assert resize_center_crop(same, 16) is same
    assert resize_center_crop(Image.new("RGB", (8, 24)), 16).size == (16, 16)  # upscaled, tall
    pixels, control = image_to_tensor(square), conditioning_to_tensor(square)
    assert pixels.shape == control.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and control.min() >= 0 and control.max() <= 1
    assert torch.allclose(pixels, control * 2 - 1, atol=1e-6)
    white = conditioning_to_tensor(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.all(white == 1) and torch.all(image_to_tensor(Image.new("RGB", (8, 8))) == -1)


@pytest.mark.parametrize("bad", [100, 0, -8, 12])
def test_resolution_must_be_a_positive_multiple_of_8(bad):
    with pytest.raises(ConfigError, match=f"--resolution {bad}"):
        check_resolution(bad)
    check_resolution(64)
    with pytest.raises(ConfigError, match="not divisible by 8: .*96 or 104"):
        check_resolution(100)


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    gray = _save(tmp_path / "gray.png", size=(8, 8), mode="L")
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(rgba)
    palette = tmp_path / "palette.gif"
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(palette)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(deep)
    for value in (str(gray), rgba.name, {"bytes": palette.read_bytes(), "path": None}, deep):
        image = load_image(value, base_dir=str(tmp_path))
        assert image.mode == "RGB" and np.asarray(image).shape == (8, 8, 3)
    assert np.asarray(load_image(rgba, str(tmp_path)))[0, 0].tolist() == [10, 20, 30]  # alpha dropped
    assert np.asarray(load_image(deep))[0, 0].tolist() == [255, 255, 255]  # 16-bit scaled, not clipped
    assert np.asarray(load_image(np.zeros((4, 5), dtype=np.float32))).shape == (4, 5, 3)
    assert np.asarray(load_image(np.full((4, 4, 4), 7, dtype=np.uint8)))[0, 0].tolist() == [7, 7, 7]


def test_flag_images_read_as_the_training_data_is(tmp_path):
    """--image and --validation_image go through the same loader: a 16-bit depth map is scaled, not
    clipped to white (PIL's convert alone), and a 32-bit TIFF holding 0-255 keeps its values."""
    from types import SimpleNamespace

    from difftune.data.images import read_image_file
    from difftune.validation import load_validation_images

    depth = np.full((8, 8), 10000, dtype=np.uint16)
    depth[2:6, 2:6] = 30000
    Image.fromarray(depth).save(tmp_path / "depth16.png")
    Image.fromarray(np.full((8, 8), 126, dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    assert np.asarray(read_image_file(tmp_path / "depth16.png", "--image"))[[0, 3], [0, 3], 0].tolist() == [39, 117]
    assert np.asarray(read_image_file(tmp_path / "i32.tif", "--image")).mean() == 126
    cfg = SimpleNamespace(validation_prompt=["a prompt"], validation_image=["x"], pairs=lambda: [("a prompt", str(tmp_path / "depth16.png"))])
    ((prompt, image),) = load_validation_images(cfg)
    assert np.asarray(image)[[0, 3], [0, 3], 0].tolist() == [39, 117]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"--image: cannot read image .*bad\.png"):
        read_image_file(tmp_path / "bad.png", "--image")
    with pytest.raises(DataError, match="--validation_image .*nope.png does not exist"):
        read_image_file(tmp_path / "nope.png", "--validation_image")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="--validation_image .*dir.png is a folder, not an image file"):
        read_image_file(tmp_path / "dir.png", "--validation_image")


def test_load_image_names_row_column_and_file(tmp_path):
    broken = tmp_path / "broken.png"
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, format="PNG")
    broken.write_bytes(good.getvalue()[:60])  # truncated
    with pytest.raises(ImageLoadError) as info:
        load_image("broken.png", base_dir=str(tmp_path), where="row 17, column 'conditioning_image'")
    message = str(info.value)
    assert isinstance(info.value, DataError)
    assert "row 17, column 'conditioning_image'" in message and str(broken) in message
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))


# --- load_table -------------------------------------------------------------------------------


def test_load_fill50k_parquet_folder(small_fill_dir, cache):
    table = load_table(train_data_dir=str(small_fill_dir), cache_dir=cache)
    assert len(table.dataset) == 6 and table.base_dir == str(small_fill_dir)
    assert isinstance(table.dataset.features["image"], datasets.Image)
    assert table.dataset.features["image"].decode is False  # decoded per sample, later
    assert resolve_columns(table.column_names) == ("image", "conditioning_image", "text")
    with pytest.raises(DataError, match=r"no conditions, make the conditions: `difftune data conditions .*"
                                        r"--conditioning_image_column"):
        resolve_columns(["image", "text"])  # a captioned picture folder: the tool that makes its conditions is named
    single = load_table(train_data_dir=str(next((small_fill_dir / "train").glob("*.parquet"))), cache_dir=cache)
    assert single.dataset["text"] == table.dataset["text"]
    streamed = load_table(train_data_dir=str(small_fill_dir), streaming=True)
    assert streamed.streaming and [row["text"] for row in streamed.dataset] == table.dataset["text"]


def test_load_save_to_disk_folders(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")})
    cell = {"bytes": png.getvalue(), "path": None}
    dataset = datasets.Dataset.from_dict({"image": [cell] * 3, "conditioning_image": [cell] * 3, "text": ["a", "b", "c"]}, features=features)
    dataset.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load_table(train_data_dir=tmp_path / "flat").dataset["text"] == ["a", "b", "c"]
    table = load_table(train_data_dir=tmp_path / "dict", split="test")
    assert len(table.dataset) == 1 and table.dataset.features["image"].decode is False
    with pytest.raises(DataError, match="no split 'validation'; it has: train, test"):
        load_table(train_data_dir=tmp_path / "dict", split="validation")


def test_load_metadata_jsonl_with_relative_paths(tmp_path, cache):
    root = _metadata_folder(tmp_path / "pairs", [
        {"image": "targets/0.png", "conditioning_image": "controls/0.png", "text": "a red square"},
        {"image": "targets/1.png", "conditioning_image": "controls/1.png", "text": "another"},
    ])
    table = load_table(train_data_dir=root, cache_dir=cache)
    assert table.dataset["image"] == ["targets/0.png", "targets/1.png"]  # strings kept as paths
    examples = ControlNetExamples(table, *resolve_columns(table.column_names), resolution=8)
    item = examples[0]
    assert item["pixel_values"].shape == (3, 8, 8) and item["caption"] == "a red square"


def test_paths_written_from_the_current_folder_are_pointed_out(tmp_path, monkeypatch):
    """A table at data/train.jsonl whose rows say 'data/img/0.png' (relative to where the user runs, as some
    tutorials write them): every row was skipped as missing, with no word of why."""
    from difftune.data.images import ImageLoadError, load_image

    _save(tmp_path / "data" / "img" / "0.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageLoadError, match=r"relative paths are read from the data file's folder, data; "
                                             r"data/img/0.png is a file from the current folder"):
        load_image("data/img/0.png", "data", "row 0, column 'image'")
    assert load_image("img/0.png", "data").size == (16, 16)


def test_image_cells_holding_paths_from_the_current_folder_are_read_as_datasets_reads_them(tmp_path, monkeypatch,
                                                                                             caplog):
    """A parquet written by `Dataset.from_dict({"image": paths}, features=Image()).to_parquet("pq/...")` holds
    {"bytes": None, "path": "img/0.png"}, relative to where it ran: datasets and the diffusers script read it
    from there, difftune refused every row (read from pq/ only)."""
    import logging

    from difftune.data import images
    from difftune.data.images import files_signature

    monkeypatch.setattr(images, "_FROM_HERE_SAID", set())
    for k in range(2):
        _save(tmp_path / "img" / f"{k}.png", color=(255, 0, 0))
        _save(tmp_path / "img" / f"c{k}.png", color=(0, 0, 255))
    monkeypatch.chdir(tmp_path)
    features = datasets.Features(image=datasets.Image(), conditioning_image=datasets.Image(),
                                 text=datasets.Value("string"))
    datasets.Dataset.from_dict({"image": ["img/0.png", "img/1.png"], "conditioning_image": ["img/c0.png", "img/c1.png"],
                                "text": ["a", "b"]}, features=features).to_parquet("pq/data.parquet")
    table = load_table(train_data_dir="pq", cache_dir=str(tmp_path / "cache"))
    assert table.dataset[0]["image"] == {"bytes": None, "path": "img/0.png"}
    with caplog.at_level(logging.WARNING, logger="difftune"):
        report = check_dataset(table, "image", "conditioning_image", "text", resolution=8, progress=False)
    assert report.ok and report.rows_checked == 2
    said = [r.getMessage() for r in caplog.records if "relative to the current folder" in r.getMessage()]
    assert len(said) == 1 and "as datasets does" in said[0]  # once, not per row
    here = files_signature(table.dataset, ["image", "conditioning_image"], table.base_dir)
    _save(tmp_path / "pq" / "img" / "0.png", color=(0, 255, 0))  # one beside the data wins, as for a path cell always
    assert load_image(table.dataset[0]["image"], table.base_dir).getpixel((0, 0)) == (0, 255, 0)
    assert files_signature(table.dataset, ["image", "conditioning_image"], table.base_dir) != here
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ImageLoadError, match=r"relative paths are read from pq, then from the current folder, "
                                             + re.escape(str(tmp_path / "elsewhere"))):
        load_image(table.dataset[1]["image"], table.base_dir)


def test_load_imagefolder(tmp_path, cache):
    root = tmp_path / "folder"
    for k in range(2):
        _save(root / f"{k}.png")
        _save(root / "control" / f"{k}.png", color=(255, 255, 255))
    with open(root / "metadata.jsonl", "w") as handle:
        for k in range(2):
            handle.write(json.dumps({"file_name": f"{k}.png", "conditioning_image_file_name": f"control/{k}.png", "caption": f"square {k}"}) + "\n")
    table = load_table(train_data_dir=root, cache_dir=cache)
    columns = resolve_columns(table.column_names)
    assert columns == ("image", "conditioning_image", "caption")
    assert len(table.dataset) == 2 and table.dataset.features["image"].decode is False
    batch = collate_examples([ControlNetExamples(table, *columns, resolution=8)[k] for k in range(2)])
    assert batch["conditioning_pixel_values"].min() == 1.0 and batch["captions"] == ["square 0", "square 1"]


def test_load_table_errors_say_what_to_do(tmp_path, cache):
    with pytest.raises(DataError, match="does not exist") as info:
        load_table(train_data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "metadata.jsonl" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to load \\(it is empty\\).*parquet"):
        load_table(train_data_dir=tmp_path / "empty")
    _save(tmp_path / "pics" / "a.png")
    with pytest.raises(DataError, match="found only .png files"):
        load_table(train_data_dir=tmp_path / "pics")
    with pytest.raises(ConfigError, match="exactly one of --dataset_name .* --train_data_dir.*both"):
        load_table(dataset_name="fusing/fill50k", train_data_dir=tmp_path)
    with pytest.raises(ConfigError, match="neither"):
        load_table()
    with pytest.raises(DataError) as info:
        load_table(dataset_name="fusing/fill50k", cache_dir=cache)
    assert "'fusing/fill50k'" in str(info.value) and "offline?" in str(info.value)
    assert "--train_data_dir" in str(info.value) and "difftune data fill50k --out DIR" in str(info.value)


# --- columns and sample selection -------------------------------------------------------------


def test_resolve_columns():
    assert resolve_columns(["target", "prompt", "source"]) == ("target", "source", "prompt")  # diffusers order
    fill = ["circle_cx", "image", "conditioning_image", "text", "circle_r"]
    assert resolve_columns(fill) == ("image", "conditioning_image", "text")
    assert resolve_columns(["a", "b", "c"], caption_column="a") == ("b", "c", "a")
    with pytest.raises(DataError) as info:
        resolve_columns(["image", "conditioning_image", "text"], caption_column="caption")
    assert str(info.value).startswith("--caption_column 'caption' not in the data set's columns: image, conditioning_image, text")
    with pytest.raises(DataError, match="only 2 column"):
        resolve_columns(["image", "text"])


def _image_text_parquet(path):
    """A parquet of two image columns and a caption, named so no role is found by name: tgt, ctrl, cap."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(png, format="PNG")
    cell = {"bytes": png.getvalue(), "path": None}
    features = datasets.Features({"tgt": datasets.Image(), "ctrl": datasets.Image(), "cap": datasets.Value("string")})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"tgt": [cell] * 2, "ctrl": [cell] * 2, "cap": ["a", "b"]}, features=features).to_parquet(
        str(path))
    return path


def test_positions_that_do_not_fit_the_column_types_suggest_a_mapping(tmp_path):
    """tgt, ctrl, cap (images, images, text) by diffusers' positions made the image column 'ctrl' the caption:
    the run failed on 'caption is dict ({'bytes': b'\\x89PNG...)' with no word of the right flags."""
    from difftune.data.columns import table_column_kinds

    table = load_table(train_data_dir=_image_text_parquet(tmp_path / "data" / "train.parquet"))
    kinds = table_column_kinds(table)
    assert kinds == {"tgt": "image", "ctrl": "image", "cap": "text"}
    with pytest.raises(DataError) as info:
        resolve_columns(table.column_names, kinds=kinds)
    message = str(info.value)
    assert "caption 'ctrl' holds images" in message and "conditioning image 'cap' holds text" in message
    assert "pass --image_column tgt --conditioning_image_column ctrl --caption_column cap" in message
    assert "PNG" not in message and "bytes" not in message
    assert resolve_columns(table.column_names, "tgt", "ctrl", "cap", kinds=kinds) == ("tgt", "ctrl", "cap")
    # a caption flag pointing at images: the error shows the cell's size, not its bytes
    with pytest.raises(DataError, match=r"caption is an image \(\d+ bytes\), expected a string") as info:
        ControlNetExamples(table, "tgt", "cap", "ctrl", resolution=8)
    assert "PNG" not in str(info.value)


def test_kinds_refuse_only_a_clear_positional_misfit():
    three_images = {"a": "image", "b": "image", "c": "image"}
    with pytest.raises(DataError, match=r"The columns hold: a \(images\), b \(images\), c \(images\) — name each"):
        resolve_columns(["a", "b", "c"], kinds=three_images)
    # paths without an extension read as text: with no image column anywhere, positions stand
    assert resolve_columns(["a", "b", "c"], kinds={"a": "text", "b": "text", "c": "text"}) == ("a", "c", "b")
    assert resolve_columns(["a", "b", "c"], kinds={"a": "image", "b": "text", "c": "image"}) == ("a", "c", "b")
    # roles found by name or given are not second-guessed by kind
    assert resolve_columns(["image", "conditioning_image", "text"], kinds=three_images) == \
        ("image", "conditioning_image", "text")


def test_a_flag_naming_a_column_of_the_wrong_kind_is_said_as_that_flag():
    """--image_column text was refused as 'the columns were matched by position, as diffusers does ...: caption
    'image' holds images': the user had named the column, and nothing said so."""
    columns = ["image", "text", "conditioning_image"]
    kinds = {"image": "image", "text": "text", "conditioning_image": "image"}
    with pytest.raises(DataError) as info:
        resolve_columns(columns, image_column="text", kinds=kinds)
    assert str(info.value).startswith("--image_column text holds text, not images; the image columns are image, "
                                      "conditioning_image — give --image_column the column meant")
    assert "by position" not in str(info.value)
    with pytest.raises(DataError, match=r"^--conditioning_image_column text holds text, not images; the image"):
        resolve_columns(columns, conditioning_image_column="text", kinds=kinds)
    with pytest.raises(DataError, match=r"^--caption_column image holds images, not text; the text column is text "):
        resolve_columns(columns, caption_column="image", kinds=kinds)
    with pytest.raises(DataError, match=r"^--caption_column a holds images, not text; no column holds text \(the columns: a, b, c\)"):
        resolve_columns(["a", "b", "c"], caption_column="a", kinds={"a": "image", "b": "image", "c": "image"})


def test_describe_value_never_prints_raw_bytes():
    from difftune.data.columns import describe_value

    assert describe_value({"bytes": b"\x89PNG" + bytes(100), "path": None}) == "an image (104 bytes)"
    assert describe_value(b"\x00" * 7) == "7 bytes"
    assert describe_value("x" * 100) == repr("x" * 100)[:57] + "..."
    assert describe_value(3, typed=True) == "int (3)"


def test_resolve_columns_recognises_role_names(caplog):
    # the original fill50k layout: source = control, target = image; position alone would swap them
    with caplog.at_level("INFO", logger="difftune"):
        assert resolve_columns(["source", "target", "prompt"]) == ("target", "source", "prompt")
    assert "image 'target' (by name), conditioning image 'source' (by name), caption 'prompt' (by name)" in caplog.text
    assert resolve_columns(["source", "target", "prompt"], caption_column="prompt") == ("target", "source", "prompt")
    assert resolve_columns(["hint", "caption", "target_image"]) == ("target_image", "hint", "caption")
    assert resolve_columns(["control", "file_name", "x", "text"]) == ("file_name", "control", "text")
    # explicit flags win over names
    assert resolve_columns(["source", "target", "prompt"], image_column="source",
                           conditioning_image_column="target") == ("source", "target", "prompt")
    # unrecognised names keep the diffusers positions, and say so
    caplog.clear()
    with caplog.at_level("INFO", logger="difftune"):
        assert resolve_columns(["a", "b", "c"]) == ("a", "c", "b")
    assert "image 'a' (by position)" in caplog.text


def _source_target_folder(root, rows):
    """The original fill50k layout: metadata.jsonl with source (control), target (image), prompt."""
    for row in rows:
        for key in ("source", "target"):
            if isinstance(row[key], str) and row[key].endswith(".png"):
                _save(root / row[key])
    with open(root / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return root


def test_check_dataset_prints_the_column_mapping(tmp_path, cache):
    root = _source_target_folder(tmp_path / "st", [
        {"source": f"cond/{k}.png", "target": f"img/{k}.png", "prompt": f"circle {k}"} for k in range(2)
    ])
    table = load_table(train_data_dir=root, cache_dir=cache)
    report = check_dataset(table, *resolve_columns(table.column_names), resolution=16, progress=False)
    assert report.ok
    assert "image column: target, conditioning: source, caption: prompt" in report.format()
    assert report.to_dict()["columns"] == {"image": "target", "conditioning_image": "source", "caption": "prompt"}


def test_mixed_up_columns_are_refused(tmp_path, cache):
    # unrecognised names, text first: by position the caption gets the image paths
    root = _source_target_folder(tmp_path / "mixed", [
        {"a": f"circle {k}", "source": f"img/{k}.png", "target": f"cond/{k}.png"} for k in range(2)
    ])
    table = load_table(train_data_dir=root, cache_dir=cache)
    report = check_dataset(table, "a", "target", "source", resolution=16, progress=False)
    assert not report.ok and report.rows_checked == 0
    (issue,) = report.errors
    assert issue.kind == "mixed_up_columns" and "column 'a' holds text ('circle 0')" in issue.message
    assert "caption column 'source' holds image paths" in issue.message
    with pytest.raises(DataError, match="the image column 'a' holds text"):
        ControlNetExamples(table, "a", "target", "source", resolution=8)
    # a numeric column is never an image
    with pytest.raises(DataError, match="conditioning image column 'n' holds numbers"):
        ControlNetExamples(Table(datasets.Dataset.from_list([{"i": "x.png", "n": 1, "t": "hi"}]), None, "t"),
                           "i", "n", "t", resolution=8)
    # file names as captions with real image columns: trains, but warn
    report = check_dataset(table, "source", "target", "target", resolution=16, progress=False)
    assert report.ok and "caption_is_path" in {i.kind for i in report.warnings}


def test_broken_metadata_jsonl_names_file_and_line(tmp_path, cache):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "metadata.jsonl").write_text("")
    with pytest.raises(DataError) as info:
        load_table(train_data_dir=root, cache_dir=cache)
    assert str(info.value).startswith(f"{root / 'metadata.jsonl'} is empty — it must hold one JSON object per line")
    assert "StopIteration" not in str(info.value)
    root = tmp_path / "bad"
    root.mkdir()
    lines = [json.dumps({"image": f"{k}.png", "conditioning_image": f"c{k}.png", "text": "x"}) for k in range(4)]
    lines[2] = lines[2][:-3]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_table(train_data_dir=root, cache_dir=cache)
    assert str(info.value).startswith(f"{root / 'metadata.jsonl'}, line 3: invalid JSON (Unterminated string")
    (root / "metadata.jsonl").write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        load_table(train_data_dir=root / "metadata.jsonl", cache_dir=cache)


def test_select_samples(small_fill_dir, tmp_path, cache):
    table = load_table(train_data_dir=small_fill_dir, cache_dir=cache)
    first = select_samples(table, 3, seed=1).dataset["text"]
    assert len(first) == 3 and first == select_samples(table, 3, seed=1).dataset["text"]
    assert set(first) <= set(table.dataset["text"])
    assert len(select_samples(table, 100, seed=1).dataset) == 6
    assert select_samples(table, None, seed=1) is table
    # (a jsonl stream: `datasets` sleeps 5 s when a shuffled *parquet* stream stops early)
    root = _metadata_folder(tmp_path / "pairs", [
        {"image": f"t{k}.png", "conditioning_image": f"c{k}.png", "text": f"caption {k}"} for k in range(6)
    ])
    streamed = select_samples(load_table(train_data_dir=root, streaming=True), 4, seed=1)
    captions = [row["text"] for row in streamed.dataset]
    assert len(captions) == 4 and captions == [row["text"] for row in streamed.dataset]
    with pytest.raises(ConfigError, match="--max_train_samples 0"):
        select_samples(table, 0, seed=1)


def test_a_csv_is_read_as_the_text_it_holds(tmp_path, cache, caplog):
    import logging

    root = tmp_path / "pairs"
    for k in range(3):
        _save(root / f"t{k}.png")
        _save(root / f"c{k}.png")
    # spaces after the commas, a caption that looks like a number, an empty caption, an empty image cell
    (root / "metadata.csv").write_text("image, conditioning_image, text\nt0.png, c0.png, 007\n"
                                       "t1.png, c1.png,\nt2.png,, a red circle\n")
    table = load_table(train_data_dir=root, cache_dir=cache)
    assert table.column_names == ["image", "conditioning_image", "text"]
    assert table.dataset["text"] == ["007", "", "a red circle"]  # "" is an unconditional sample, as in JSON Lines
    examples = ControlNetExamples(table, *resolve_columns(table.column_names), resolution=8)
    assert examples[0]["caption"] == "007" and examples[1]["caption"] == ""
    with caplog.at_level(logging.WARNING, logger="difftune"):
        assert examples[2] is None
    assert "row 2, column 'conditioning_image': no image: the cell is empty or the row lacks this column" in caplog.text
    (tmp_path / "header.csv").write_text("image,conditioning_image,text\n")
    with pytest.raises(DataError, match="header.csv has a header line but no rows"):
        load_table(train_data_dir=tmp_path / "header.csv", cache_dir=cache)


def test_csv_and_jsonl_as_spreadsheets_and_editors_write_them(tmp_path, cache, caplog):
    import logging

    def folder(name, text, encoding="utf-8", file="metadata.csv"):
        root = tmp_path / name
        _save(root / "t.png")
        _save(root / "c.png")
        (root / file).write_bytes(text.encode(encoding))
        return root

    rows = "t.png,c.png,007\r\n"
    bom = load_table(train_data_dir=folder("bom", "image,conditioning_image,text\r\n" + rows, "utf-8-sig"),
                     cache_dir=cache)  # Excel's "CSV UTF-8"
    assert bom.column_names == ["image", "conditioning_image", "text"] and bom.dataset["text"] == ["007"]
    pandas = load_table(train_data_dir=folder("pandas", ",image,conditioning_image,text\n0," + rows), cache_dir=cache)
    assert pandas.column_names == ["Unnamed: 0", "image", "conditioning_image", "text"]  # DataFrame.to_csv's index
    assert resolve_columns(pandas.column_names) == ("image", "conditioning_image", "text")
    semicolons = load_table(train_data_dir=folder("semicolons", "image;conditioning_image;text\nt.png;c.png;a\n"),
                            cache_dir=cache)  # (German Excel's default separator)
    with pytest.raises(DataError, match=r"seems separated by ';', not commas"):
        resolve_columns(semicolons.column_names)
    with pytest.raises(DataError, match=r"the header names 'text' more than once"):
        load_table(train_data_dir=folder("twice", "image,conditioning_image,text,text\nt.png,c.png,a,b\n"),
                   cache_dir=cache)
    with pytest.raises(DataError, match=r"latin.metadata.csv is not UTF-8 text .* save it as UTF-8"):
        load_table(train_data_dir=folder("latin", "image,conditioning_image,text\nt.png,c.png,café\n", "latin-1"),
                   cache_dir=cache)
    jsonl = load_table(train_data_dir=folder("notepad", '{"image": "t.png", "conditioning_image": "c.png", "text": '
                                             '"a"}\n', "utf-8-sig", "metadata.jsonl"), cache_dir=cache)
    assert jsonl.dataset["text"] == ["a"]
    (tmp_path / "notepad" / "metadata.csv").write_text("image,conditioning_image,text\nt.png,c.png,b\n")
    with pytest.raises(DataError, match=r"notepad has both metadata.jsonl and metadata.csv"):
        load_table(train_data_dir=tmp_path / "notepad", cache_dir=cache)
    # an imagefolder's metadata.csv is read as text too (datasets' imagefolder would guess numbers and NA)
    root = tmp_path / "imagefolder"
    for k in range(3):
        _save(root / f"{k}.png")
        _save(root / f"c{k}.png")
    (root / "metadata.csv").write_text("file_name,conditioning_image_file_name,text\n0.png,c0.png,007\n"
                                       "1.png,c1.png,\n2.png,c2.png,1e3\n")
    table = load_table(train_data_dir=root, cache_dir=cache)
    assert table.dataset["text"] == ["007", "", "1e3"]
    assert resolve_columns(table.column_names) == ("image", "conditioning_image", "text")
    # one column in two roles is refused; a known name in another role is pointed out
    with pytest.raises(DataError, match="--image_column and --conditioning_image_column name the same column 'image'"):
        resolve_columns(["image", "conditioning_image", "text"], image_column="image", conditioning_image_column="image")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difftune"):
        assert resolve_columns(["image", "conditioning_image", "text"], conditioning_image_column="image") == \
            ("conditioning_image", "image", "text")
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith("the conditioning image column is 'image' (given), a name for the image")
    caplog.clear()
    paths = load_table(train_data_dir=folder("paths", "image,conditioning_image,text\nt.png,c.png,t.png\n"),
                       cache_dir=cache)
    with caplog.at_level(logging.WARNING, logger="difftune"):
        ControlNetExamples(paths, "image", "conditioning_image", "text", resolution=8)
    assert "the caption column 'text' of" in caplog.text and "holds image file names" in caplog.text


def test_a_cell_with_a_path_and_no_bytes_says_where_it_was_looked_for(tmp_path):
    with pytest.raises(ImageLoadError, match=r"holds a path and no image bytes; relative paths are read from "
                                             + re.escape(str(tmp_path))):
        load_image({"bytes": None, "path": "elsewhere/0.png"}, base_dir=str(tmp_path))


def test_messages_name_the_row_of_the_data_set_after_max_train_samples(pairs_with_a_corrupt_file, caplog):
    import logging

    import numpy as np

    table = pairs_with_a_corrupt_file
    picked = select_samples(table, 3, seed=0)
    # the rows Dataset.shuffle(seed) would pick (diffusers' semantics), and where each came from
    assert picked.dataset["text"] == table.dataset.shuffle(seed=0, keep_in_memory=True)["text"]
    assert list(picked.row_numbers) == np.random.default_rng(0).permutation(3).tolist()
    position = picked.row_numbers.index(1)
    assert position != 1  # (else this test would not tell the two numbers apart)
    examples = ControlNetExamples(picked, "image", "conditioning_image", "text", resolution=8)
    with caplog.at_level(logging.WARNING, logger="difftune"):
        assert examples[position] is None
    assert "row 1, column 'conditioning_image'" in caplog.text and f"row {position}," not in caplog.text


# --- examples and batches ---------------------------------------------------------------------


@pytest.fixture
def pairs_with_a_corrupt_file(tmp_path):
    root = _metadata_folder(tmp_path / "pairs", [
        {"image": "t0.png", "conditioning_image": "c0.png", "text": ["first", "second", "third"]},
        {"image": "t1.png", "conditioning_image": "c1.png", "text": "fine", "_conditioning_image": None},
        {"image": "t2.png", "conditioning_image": "c2.png", "text": "fine too"},
    ])
    (root / "c1.png").write_bytes(b"not a png at all")
    return load_table(train_data_dir=root, cache_dir=str(tmp_path / "cache"))


def test_corrupt_sample_is_skipped_and_counted(pairs_with_a_corrupt_file):
    table = pairs_with_a_corrupt_file
    examples = ControlNetExamples(table, "image", "conditioning_image", "text", resolution=8)
    items = [examples[k] for k in range(len(examples))]
    assert items[1] is None
    batch = collate_examples(items)
    assert batch["n_skipped"] == 1 and batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["indices"].tolist() == [0, 2] and batch["pixel_values"].is_contiguous()
    assert items[0]["caption"] in {"first", "second", "third"}
    assert examples[0]["caption"] == items[0]["caption"]  # several captions: a deterministic pick
    assert collate_examples([None, None]) == {"empty": True, "n_skipped": 2}


def test_an_image_and_condition_of_other_shapes_are_named_once(tmp_path, caplog):
    import logging

    root = _metadata_folder(tmp_path / "pairs", [
        {"image": "t0.png", "conditioning_image": "c0.png", "text": "same shape"},
        {"image": "t1.png", "conditioning_image": "c1.png", "text": "wide", "_image": {"size": (32, 16)}},
        {"image": "t2.png", "conditioning_image": "c2.png", "text": "wide too", "_image": {"size": (32, 16)}},
    ])
    table = load_table(train_data_dir=root, cache_dir=str(tmp_path / "cache"))
    examples = ControlNetExamples(table, "image", "conditioning_image", "text", resolution=8)
    with caplog.at_level(logging.WARNING):
        items = [examples[k] for k in range(len(examples))]
    assert all(item is not None for item in items)  # trained all the same, as diffusers would
    said = [r.getMessage() for r in caplog.records if "no longer line up" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("row 1 ") and "32x16" in said[0] and "16x16" in said[0]
    assert not any("upscaled" in r.getMessage() for r in caplog.records)  # 16 px and up, at --resolution 8
    caplog.clear()
    examples = ControlNetExamples(table, "image", "conditioning_image", "text", resolution=24)
    with caplog.at_level(logging.WARNING):
        items = [examples[k] for k in range(len(examples))]
    said = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("row 0 ") and "smaller than --resolution 24" in said[0]


@pytest.mark.parametrize("captions, message", [
    ([42], "row 0, column 'text'.*caption is int"),
    (["a", "b", None, "d"], ("row 2, column 'text'.*: no caption: the row has no 'text' value \\(the key is "
                             "missing, or null\\)")),  # a string column with a gap, or a JSON line without the key
])
def test_a_caption_that_is_not_text_is_refused_before_training(captions, message, tmp_path):
    rows = [{"image": "t.png", "conditioning_image": "c.png", "text": c} for c in captions]
    table = load_table(train_data_dir=_metadata_folder(tmp_path / "pairs", rows), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):  # when the data set is opened, not when the row is drawn
        ControlNetExamples(table, "image", "conditioning_image", "text", resolution=8)
    report = check_dataset(table, "image", "conditioning_image", "text", resolution=8, progress=False)
    said = [i.message for i in report.errors if i.kind == "bad_caption"]  # data check in the same words
    assert len(said) == 1 and re.match(message.split(".*")[-1].lstrip(": "), said[0])


def _stream_to_cache(root, cache_dir, max_train_samples, seed=1):
    from difftune.data.materialize import materialize

    table = select_samples(load_table(train_data_dir=root, streaming=True), max_train_samples, seed=seed)
    return materialize(table, cache_dir)


def test_stream_cache_is_reused_by_a_rerun_and_rebuilt_for_other_data(tmp_path, monkeypatch, caplog):
    """A resumed --streaming run streamed (downloaded) its rows again into a new folder: the cache was
    keyed by datasets' fingerprint of the generator, which differs between runs."""
    import difftune.data.materialize as materialize_module

    pulled = []

    def counted(stream):
        for row in stream:
            pulled.append(row["text"])
            yield row

    monkeypatch.setattr(materialize_module, "_rows", counted)
    root = _metadata_folder(tmp_path / "pairs", [
        {"image": f"t{k}.png", "conditioning_image": f"c{k}.png", "text": f"caption {k}"} for k in range(4)
    ])
    cache_dir = tmp_path / "out" / "stream-cache"
    first = _stream_to_cache(root, cache_dir, 3)
    assert len(pulled) == 3 and first.dataset["text"] == pulled
    assert not list(cache_dir.rglob("*.lock"))  # datasets' empty lock files, removed in a one-process run
    again = _stream_to_cache(root, cache_dir, 3)
    assert len(pulled) == 3, "a rerun with the same data and flags streamed the rows again"
    assert again.dataset["text"] == first.dataset["text"] and again.dataset._fingerprint == first.dataset._fingerprint
    assert len(list(cache_dir.rglob("*.arrow"))) == 1

    _stream_to_cache(root, cache_dir, 2)  # another --max_train_samples: other rows
    assert len(pulled) == 5 and len(list(cache_dir.rglob("*.arrow"))) == 2
    with open(root / "metadata.jsonl", "a") as handle:  # the data changed: streamed again, the new row in it
        handle.write(json.dumps({"image": "t0.png", "conditioning_image": "c0.png", "text": "new row"}) + "\n")
    with caplog.at_level("INFO", logger="difftune"):
        changed = _stream_to_cache(root, cache_dir, 8)
    assert len(changed.dataset) == 5 and "new row" in changed.dataset["text"]
    assert len(list(cache_dir.rglob("*.arrow"))) == 3
    # a stream that ends before --max_train_samples is said, as for a table with fewer rows
    assert "--max_train_samples 8: the data set has 5 rows; training on all of them" in caplog.text


def test_stream_cache_key_ignores_the_run_folder_inside_the_data(tmp_path):
    """An --output_dir inside --train_data_dir: its checkpoints and caches are not the data."""
    from difftune.data.materialize import stream_cache_key

    root = _metadata_folder(tmp_path / "pairs", [{"image": "t.png", "conditioning_image": "c.png", "text": "a"}])
    table = select_samples(load_table(train_data_dir=root, streaming=True), 1, seed=0)
    key = stream_cache_key(table, root / "run" / "stream-cache")
    _save(root / "run" / "checkpoints" / "x.png")
    assert stream_cache_key(table, root / "run" / "stream-cache") == key
    _save(root / "extra.png")
    assert stream_cache_key(table, root / "run" / "stream-cache") != key


def test_streaming_examples_match_and_resume(small_fill_dir):
    table = load_table(train_data_dir=small_fill_dir, streaming=True)
    columns = ("image", "conditioning_image", "text")
    stream = StreamingControlNetExamples(table, *columns, resolution=8)
    items = list(stream)
    assert [i["index"] for i in items] == list(range(6))
    mapped = ControlNetExamples(load_table(train_data_dir=small_fill_dir), *columns, resolution=8)
    assert torch.equal(items[4]["pixel_values"], mapped[4]["pixel_values"])
    assert [i["index"] for i in stream.skip(4)] == [4, 5]
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_examples)
    seen = sorted(k for batch in loader for k in batch["indices"].tolist())
    assert seen == list(range(6))  # split by example across workers: each once


# --- check_dataset ----------------------------------------------------------------------------


@pytest.fixture
def clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"), model_max_length=8)


def test_check_dataset_reports_each_problem(tmp_path, clip_tokenizer):
    root = _metadata_folder(tmp_path / "pairs", [
        {"image": "ok.png", "conditioning_image": "ok_c.png", "text": "ok"},
        {"image": "t1.png", "conditioning_image": "bad.png", "text": "ok", "_conditioning_image": None},
        {"image": "wide.png", "conditioning_image": "c2.png", "text": "ok", "_image": {"size": (32, 16)}},
        {"image": "big.png", "conditioning_image": "c3.png", "text": "ok", "_image": {"size": (32, 32)}},
        {"image": "tiny.png", "conditioning_image": "tiny_c.png", "text": "ok",
         "_image": {"size": (8, 8)}, "_conditioning_image": {"size": (8, 8)}},
        {"image": "t5.png", "conditioning_image": "c5.png", "text": "  "},
        {"image": "t6.png", "conditioning_image": "c6.png", "text": "a very long caption"},
    ])
    (root / "bad.png").write_bytes(b"\x89PNG garbage")
    table = load_table(train_data_dir=root, cache_dir=str(tmp_path / "cache"))
    report = check_dataset(table, "image", "conditioning_image", "text", resolution=16, tokenizer=clip_tokenizer, progress=False)
    assert report.rows_checked == 7 and not report.ok
    kinds = {(i.kind, i.row) for i in report.errors}
    assert kinds == {("unreadable_image", 1)}
    unreadable = next(i for i in report.errors if i.kind == "unreadable_image")
    assert unreadable.column == "conditioning_image" and unreadable.file == str(root / "bad.png")
    warnings = {(i.kind, i.row) for i in report.warnings}
    assert {("aspect_mismatch", 2), ("size_mismatch", 3), ("small_image", 4), ("empty_caption", 5),
            ("long_caption", 6)} <= warnings
    # a pair of other shapes trains (as in diffusers), with a warning: the words training says it with
    assert next(i.message for i in report.warnings if i.kind == "aspect_mismatch").startswith(
        "the image is 32x16 but its conditioning image 16x16; cropped to squares they no longer line up")
    assert ("long_caption", 0) not in warnings
    assert len(clip_tokenizer("a very long caption").input_ids) == 18  # 16 letters + start/end
    assert "18 tokens" in next(i.message for i in report.warnings if i.kind == "long_caption")
    text = report.format()
    assert "row 1, column 'conditioning_image', file " + str(root / "bad.png") in text and "NOT OK" in text
    assert report.to_dict()["errors"][0]["row"] is not None


def test_check_dataset_missing_column_lists_existing(small_fill_dir, cache):
    table = load_table(train_data_dir=small_fill_dir, cache_dir=cache)
    report = check_dataset(table, "image", "conditioning_image", "caption", resolution=16, progress=False)
    assert not report.ok and report.rows_checked == 0
    assert "'caption' not in the data set's columns: image, conditioning_image, text, circle_cx" in report.errors[0].message
    ok = check_dataset(table, "image", "conditioning_image", "text", resolution=16, limit=3, progress=False)
    assert ok.ok and ok.rows_checked == 3 and not ok.warnings and "OK" in ok.format()


def test_overwrite_never_replaces_a_model_a_run_an_input_or_the_folder_it_runs_in(tmp_path, monkeypatch):
    """`compress --output_dir BASE --overwrite` replaced a base model folder with four files, and
    `--output_dir RUN --overwrite` with a checkpoint of RUN as input deleted the whole training run."""
    from difftune.data.writing import check_out_dir

    def refused(out, why, **kw):
        with pytest.raises(DataError, match=f"--out {out} {why}: --overwrite replaces the whole folder"):
            check_out_dir(out, True, **kw)

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    refused(model, r"holds a base model \(model_index.json\)")
    check_out_dir(model, True, model_folder_ok=True)  # make-tiny-model replacing its own kind
    (model / "unet").mkdir()
    (model / "unet" / "config.json").write_text("{}")
    refused(model / "unet", f"is a part of the base model in {model}")
    from difftune.errors import ConfigError
    from difftune.guards import claim_output_dir

    with pytest.raises(ConfigError, match="is a model folder, or a part of one"):  # a training run's --output_dir
        claim_output_dir(model / "unet", model / "unet" / "checkpoints", overwrite=True)
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    refused(run, r"holds a training run \(checkpoints/\)")
    photos = tmp_path / "shoot" / "photos"
    photos.mkdir(parents=True)
    (photos / "a.png").write_bytes(b"x")
    refused(tmp_path / "shoot", f"holds {photos}, which this command reads", inputs=(photos,))
    monkeypatch.chdir(photos)
    refused(tmp_path / "shoot", "is the folder this command runs in, or holds it")
    earlier = tmp_path / "earlier-output"
    earlier.mkdir()
    (earlier / "weights.safetensors").write_bytes(b"x")
    check_out_dir(earlier, True)  # what --overwrite is for
    with pytest.raises(DataError, match="already exists and is not empty"):
        check_out_dir(earlier, False)
