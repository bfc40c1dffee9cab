"""fill50k generation: deterministic, held-out validation, prompts and pixels that agree."""

from __future__ import annotations

import io
import json
import math
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageColor

from difftune.data.colors import CSS_COLORS, color_rgb
from difftune.data.fill50k import outline_width, radius_range, sample_circles, write_fill50k
from difftune.errors import DataError

N, RES = 12, 32
NAMES = sorted((name for name, _ in CSS_COLORS), key=len, reverse=True)
PROMPT = re.compile(r"^(?P<color>[a-z ]+) circle with (?P<background>[a-z ]+) background$")


@pytest.fixture(scope="module")
def fill_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill50k")
    one = write_fill50k(root / "w1", n=N, resolution=RES, seed=3, workers=1, progress=False, shard_rows=5)
    two = write_fill50k(root / "w2", n=N, resolution=RES, seed=3, workers=2, progress=False, shard_rows=5)
    return root, one, two


def _rows(out):
    tables = [pq.read_table(p) for p in sorted((out / "train").glob("*.parquet"))]
    return [row for t in tables for row in t.to_pylist()]


def _png(cell) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))


def test_layout_and_summary(fill_dirs):
    root, summary, _ = fill_dirs
    out = root / "w1"
    assert summary["n"] == N and summary["resolution"] == RES and summary["path"] == str(out)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"
    ]
    info = json.loads((out / "difftune_dataset.json").read_text())
    assert info["kind"] == "fill50k" and info["n"] == N and info["seed"] == 3 and info["seconds"] >= 0
    prompts = json.loads((out / "validation" / "prompts.json").read_text())
    assert len(prompts) == 4
    for k, entry in enumerate(prompts):
        assert entry["conditioning_image"] == f"conditioning_{k}.png" and entry["image"] == f"image_{k}.png"
        assert Image.open(out / "validation" / entry["image"]).size == (RES, RES)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    # the HF features travel with the parquet, so `datasets` sees images, not structs
    meta = json.loads(pq.read_schema(out / "train" / "train-00000-of-00003.parquet").metadata[b"huggingface"])
    assert meta["info"]["features"]["conditioning_image"]["_type"] == "Image"


def test_plain_load_dataset_reads_only_the_training_rows(fill_dirs, tmp_path):
    # what the diffusers script does with --train_data_dir: the README's YAML keeps the
    # validation PNGs out of it
    import datasets

    loaded = datasets.load_dataset(str(fill_dirs[0] / "w1"), cache_dir=str(tmp_path))
    assert list(loaded) == ["train"] and len(loaded["train"]) == N
    assert loaded["train"].column_names[:3] == ["image", "conditioning_image", "text"]


def test_same_output_for_any_number_of_workers(fill_dirs):
    root, _, _ = fill_dirs
    for shard in sorted((root / "w1" / "train").iterdir()):
        assert shard.read_bytes() == (root / "w2" / "train" / shard.name).read_bytes()
    for file in sorted((root / "w1" / "validation").iterdir()):
        assert file.read_bytes() == (root / "w2" / "validation" / file.name).read_bytes()


def test_validation_is_held_out_and_is_the_last_samples(fill_dirs):
    root, _, _ = fill_dirs
    rows = _rows(root / "w1")
    assert len(rows) == N
    circles = sample_circles(N + 4, RES, seed=3)
    prompts = json.loads((root / "w1" / "validation" / "prompts.json").read_text())
    train_images = {row["image"]["bytes"] for row in rows}
    for k, entry in enumerate(prompts):
        c = circles[N + k]
        assert entry["circle"] == {"cx": c.cx, "cy": c.cy, "r": c.r, "color": list(c.color), "background": list(c.background)}
        assert (root / "w1" / "validation" / f"image_{k}.png").read_bytes() not in train_images
    for row, c in zip(rows, circles):
        assert (row["circle_cx"], row["circle_cy"], row["circle_r"]) == (c.cx, c.cy, c.r)
        assert row["text"] == c.prompt


def test_prompts_name_the_colours_drawn(fill_dirs):
    root, _, _ = fill_dirs
    names = {name for name, _ in CSS_COLORS}
    for row in _rows(root / "w1"):
        match = PROMPT.match(row["text"])
        assert match and match["color"] in names and match["background"] in names, row["text"]
        color, background = color_rgb(match["color"]), color_rgb(match["background"])
        assert color != background  # aqua/cyan share an RGB value: never paired
        assert list(color) == row["circle_color"] and list(background) == row["circle_background"]
        image = _png(row["image"])
        assert tuple(image[row["circle_cy"], row["circle_cx"]]) == color  # the centre is always inside
        ys, xs = np.mgrid[:RES, :RES]
        far = np.hypot(xs - row["circle_cx"], ys - row["circle_cy"]) > row["circle_r"] + 1.5
        if far.any():
            assert (image[far] == background).all()
        assert not (image == background).all(axis=-1).all()  # the circle shows


def test_outline_lies_on_the_circle(fill_dirs):
    root, _, _ = fill_dirs
    low, high = radius_range(RES)
    width = outline_width(RES)
    for row in _rows(root / "w1"):
        assert low <= row["circle_r"] <= high
        outline = _png(row["conditioning_image"])
        assert set(np.unique(outline)) <= {0, 255}
        ys, xs = np.nonzero(outline[..., 0] == 255)
        assert len(ys) > 0
        distance = np.hypot(xs - row["circle_cx"], ys - row["circle_cy"])
        assert np.abs(distance - row["circle_r"]).max() <= width + 1.0
        # it goes round: the centre is in the image, so at least a quarter of the circle shows
        angles = np.arctan2(ys - row["circle_cy"], xs - row["circle_cx"])
        assert np.ptp(angles) >= math.pi / 2 - 0.3


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not empty.*--overwrite") as info:
        write_fill50k(out, n=2, resolution=16, workers=1, progress=False)
    assert str(out) in str(info.value)
    assert (out / "keep.txt").exists()
    write_fill50k(out, n=2, resolution=16, workers=1, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "difftune_dataset.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_colour_table_matches_css():
    names = [name for name, _ in CSS_COLORS]
    assert len(names) == len(set(names)) == 141  # 148 CSS keywords minus 7 "grey" spellings
    assert "pale golden rod" in names and "old lace" in names and "light golden rod yellow" in names
    for name, rgb in CSS_COLORS:  # PIL ships the CSS table too: an independent check
        assert ImageColor.getrgb(name.replace(" ", "")) == rgb, name
    assert color_rgb("PaleGoldenRod") == color_rgb("pale golden rod") == (238, 232, 170)
    assert color_rgb("dark grey") == color_rgb("darkgray") == (169, 169, 169)
    with pytest.raises(DataError, match="unknown colour name 'blurple'"):
        color_rgb("blurple")


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """A data command killed (SIGKILL) while writing left `<out>.tmp-<pid>`, visible, for good: the next run
    removes those of processes that are gone, and leaves a live process's."""
    import os
    import subprocess
    import sys

    from difftune.data import write_fill50k

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # (a pid whose process has ended)
    stale = [tmp_path / f"f.tmp-{gone}", tmp_path / f".f.tmp-{gone}"]
    live = tmp_path / f".f.tmp-{os.getppid()}"
    for p in (*stale, live):
        (p / "train").mkdir(parents=True)
    write_fill50k(tmp_path / "f", n=4, resolution=16, seed=0, workers=1, n_validation=1)
    assert not any(p.exists() for p in stale) and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f", live.name])
