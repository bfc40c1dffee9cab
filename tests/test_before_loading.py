"""Input a run or tool can refuse without any model is refused before the base model loads (tens of seconds
on SD 1.5/SDXL): each test makes loading one a failure of the test."""

from __future__ import annotations

import json

import pytest

from difftune.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any load of a base model fails the test (every name it is imported under)."""
    from difftune import models
    from difftune.methods import controlnet, custom_diffusion

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the input was checked")

    for module in (models, controlnet, custom_diffusion):
        monkeypatch.setattr(module, "load_base_model", refuse)


def _fake_concept(folder, **meta):
    """A folder that reads as a Custom Diffusion output (its record and a weight file; no real weights)."""
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(b"")
    (folder / "custom_diffusion.json").write_text(json.dumps({"weight_name": "w.safetensors",
                                                              "freeze_model": "crossattn_kv",
                                                              "modifier_tokens": ["<new1>"], **meta}))
    return str(folder)


def test_merge_arguments_are_checked_before_the_base_loads(no_loading, tiny_model_dir, tmp_path, capsys):
    one = _fake_concept(tmp_path / "c7")
    cases = [
        ([one], "merge needs at least two Custom Diffusion folders."),
        ([one, _fake_concept(tmp_path / "all", freeze_model="crossattn")], "was trained with --freeze_model crossattn"),
        ([one, _fake_concept(tmp_path / "plain", modifier_tokens=[])], "was trained without modifier tokens"),
    ]
    for concepts, said in cases:
        argv = ["custom-diffusion", "merge", "--concepts", *concepts, "--pretrained_model_name_or_path",
                str(tiny_model_dir), "--output_dir", str(tmp_path / "merged")]
        assert main(argv) == 2, concepts
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
