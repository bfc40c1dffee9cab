"""Shared fixtures: a tiny SD model and a tiny fill50k, built once per test session, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: on a 2-core machine, two test processes (or a test run beside a training run)
# with two OpenMP threads each slow each other down several-fold.
torch.set_num_threads(int(os.environ.get("DIFFTUNE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from difftune.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def fill_dir(tmp_path_factory):
    from difftune.data import write_fill50k

    out = tmp_path_factory.mktemp("data") / "fill"
    write_fill50k(out, n=48, resolution=64, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    from difftune.models import load_base_model

    return load_base_model(str(tiny_model_dir))


def write_data_with_a_corrupt_image(data):
    """Eight 64 px ControlNet samples in ``data`` (metadata.jsonl); image 3 is not a readable PNG."""
    import json

    from PIL import Image

    (data / "img").mkdir(parents=True)
    rows = []
    for i in range(8):
        Image.new("RGB", (64, 64), (i * 30, 0, 0)).save(data / "img" / f"{i}.png")
        Image.new("L", (64, 64), 0).save(data / "img" / f"c{i}.png")
        rows.append({"image": f"img/{i}.png", "conditioning_image": f"img/c{i}.png", "text": f"red circle {i}"})
    (data / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def make_config(model_dir, data_dir, out_dir, **overrides):
    """A small ControlNet config; overrides are flat flag names."""
    from difftune.config import ControlNetConfig, from_dict

    values = dict(
        pretrained_model_name_or_path=str(model_dir),
        train_data_dir=str(data_dir),
        output_dir=str(out_dir),
        resolution=64,
        train_batch_size=4,
        max_train_steps=4,
        checkpointing_steps=100,
        learning_rate=1e-3,
        lr_warmup_steps=0,
        seed=0,
    )
    values.update(overrides)
    return from_dict(ControlNetConfig, values)


def assert_same_training(a: dict, b: dict, lr: float) -> None:
    """Two runs that should train the same weights, up to float summation order.

    Adam's first steps move each weight by about ``lr`` whatever the gradient's size, so a
    gradient that is ~0 can tip either way between two summation orders (this differs between
    CPUs). What a real mistake (a missing or extra optimizer step, a batch seen twice) does is
    move most weights by ~lr; so: no weight apart by lr/4, and almost all within 1e-5.
    """
    import torch

    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a if a[k].numel()])
    worst, off = float(diffs.max()), float((diffs > 1e-5).float().mean())
    assert worst < lr / 4 and off < 0.01, f"max difference {worst:.3g}, {off:.2%} of weights differ by > 1e-5"
