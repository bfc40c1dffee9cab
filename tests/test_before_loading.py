"""Input a run or tool can refuse without any model is refused before the base model loads (tens of seconds
on SD 1.5/SDXL): each test makes loading one a failure of the test."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import make_config
from custom_diffusion_helpers import cd_config, write_concept
from PIL import Image

from difftune.cli import main
from difftune.errors import ConfigError, DataError, UserError


@pytest.fixture
def no_loading(monkeypatch):
    """Any load of a base model fails the test (every name it is imported under)."""
    from difftune import models
    from difftune.methods import controlnet, custom_diffusion

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the input was checked")

    for module in (models, controlnet, custom_diffusion):
        monkeypatch.setattr(module, "load_base_model", refuse)


@pytest.fixture(scope="module")
def star_dir(tmp_path_factory):
    return write_concept(tmp_path_factory.mktemp("concept") / "star")


def _prior(folder, n: int, captioned: int | None = None):
    """A real prior folder of ``n`` images, the first ``captioned`` (all by default) with a .txt caption."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 32), (i * 50, 90, 90)).save(folder / f"p{i}.png")
        if captioned is None or i < captioned:
            (folder / f"p{i}.txt").write_text(f"a star number {i}\n")
    return folder


def test_custom_diffusion_concepts_and_images_are_checked_before_the_base_loads(no_loading, tiny_model_dir, star_dir,
                                                                                tmp_path):
    from difftune.api import train_custom_diffusion

    def train(**settings):
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "run", **settings))

    (tmp_path / "bad.json").write_text("[{'instance_prompt': 1}")
    with pytest.raises(ConfigError, match=r"--concepts_list .*bad\.json is not valid JSON"):
        train(concepts_list=str(tmp_path / "bad.json"))
    for name, entry, said in (("lacking", {"instance_prompt": "<new1> star"}, "entry 0 has no 'instance_data_dir'"),
                              ("unknown", {"instance_prompt": "<new1> star", "instance_data_dir": str(star_dir),
                                           "instance_dir": "x"}, r"entry 0: unknown key\(s\) instance_dir")):
        (tmp_path / f"{name}.json").write_text(json.dumps([entry]))
        with pytest.raises(ConfigError, match=said):
            train(concepts_list=str(tmp_path / f"{name}.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="--instance_data_dir .*empty holds no images"):
        train(instance_data_dir=str(tmp_path / "empty"), instance_prompt="<new1> star")
    with pytest.raises(DataError, match="--instance_data_dir .*nowhere is not a folder"):
        train(instance_data_dir=str(tmp_path / "nowhere"), instance_prompt="<new1> star")
    broken = write_concept(tmp_path / "broken")
    (broken / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"cannot read image .*9\.png"):
        train(instance_data_dir=str(broken), instance_prompt="<new1> star")
    real = dict(instance_data_dir=str(star_dir), instance_prompt="<new1> star", with_prior_preservation=True,
                real_prior=True, num_class_images=3)
    with pytest.raises(DataError, match=r"--real_prior: --class_data_dir .*gone does not exist"):
        train(class_data_dir=str(tmp_path / "gone"), **real)
    with pytest.raises(DataError, match=r"--real_prior: .*bare has neither images\.txt \+ caption\.txt nor images"):
        train(class_data_dir=str(_prior(tmp_path / "bare", 0)), **real)
    with pytest.raises(DataError, match=r"holds 2 real class image\(s\), fewer than --num_class_images 3"):
        train(class_data_dir=str(_prior(tmp_path / "few", 2)), **real)
    with pytest.raises(ConfigError, match="is the concept's instance_data_dir"):
        train(class_data_dir=str(star_dir), **real)


def test_custom_diffusion_data_checked_early_is_what_trains_and_warns_once(tiny_model_dir, star_dir, tmp_path,
                                                                           monkeypatch, caplog):
    """The early check's result is what the run trains on: its folders are listed, and their warnings said, once."""
    from difftune.api import train_custom_diffusion
    from difftune.custom_diffusion import concepts
    from difftune.trainer import Trainer

    listed = []
    real_prior_pairs = concepts.real_prior_pairs
    monkeypatch.setattr(concepts, "real_prior_pairs", lambda folder: listed.append(folder) or real_prior_pairs(folder))
    datasets = []
    monkeypatch.setattr(Trainer, "fit", lambda self: datasets.append(self.method.train_dataset()) or {})
    prior = _prior(tmp_path / "prior", 4, captioned=3)  # one image without a caption: said, and left out
    with caplog.at_level(logging.WARNING, logger="difftune"):
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "run", instance_data_dir=str(star_dir),
                                         instance_prompt="<new1> star", with_prior_preservation=True, real_prior=True,
                                         class_data_dir=str(prior), num_class_images=3))
    assert len(listed) == 1
    assert sum("have no same-name .txt caption" in r.getMessage() for r in caplog.records) == 1
    (dataset,) = datasets
    assert len(dataset.instances) == 4 and [p.name for p, _ in dataset.classes] == ["p0.png", "p1.png", "p2.png"]


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


def test_controlnet_data_set_and_hub_repo_are_checked_before_the_base_loads(no_loading, tiny_model_dir, fill_dir,
                                                                           tmp_path, monkeypatch):
    from difftune import hub
    from difftune.api import train_controlnet

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))  # nothing cached; offline (conftest)
    with pytest.raises(DataError, match=r"could not load data set 'nobody/no-such-set' from the Hugging Face Hub "
                                        r"\(offline\?\)"):
        train_controlnet(make_config(tiny_model_dir, None, tmp_path / "run", train_data_dir=None,
                                     dataset_name="nobody/no-such-set"))
    with pytest.raises(DataError, match="--train_data_dir .*nowhere does not exist"):
        train_controlnet(make_config(tiny_model_dir, tmp_path / "nowhere", tmp_path / "run"))
    for repo_id, said in (("a/b/c", "must be in the form 'repo_name' or 'namespace/repo_name'"),
                          ("bad name!", "must use alphanumeric chars"), ("me/cn", "offline mode is enabled")):
        with pytest.raises(UserError, match=rf"--push_to_hub: the Hub repo '{repo_id}' cannot be created.*{said}"):
            train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "run", push_to_hub=True,
                                         hub_model_id=repo_id))
    # the repo is made once the rest has passed: not for a run that its data stops
    made = []
    monkeypatch.setattr(hub, "ensure_repo", lambda folder, repo_id, token: made.append(repo_id))
    with pytest.raises(DataError, match="does not exist"):
        train_controlnet(make_config(tiny_model_dir, tmp_path / "nowhere", tmp_path / "run", push_to_hub=True,
                                     hub_model_id="me/cn"))
    assert made == [] and not (tmp_path / "run").exists()
