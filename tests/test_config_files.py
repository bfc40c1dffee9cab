"""--config files: mistakes named with the file and what was meant, a recipe named in the file, a run's
recorded config reused from another folder, extensions in any case, keys given twice."""

from __future__ import annotations

import json
import logging

import pytest

from difftune.cli import build_parser
from difftune.config import ControlNetConfig, from_dict, read_config_file, save_resolved
from difftune.config_custom_diffusion import CustomDiffusionConfig
from difftune.errors import ConfigError


def _build(cfg_cls, *argv: str):
    """The config `difftune train METHOD ARGV` would train with (the command run, its training replaced)."""
    command = "controlnet" if cfg_cls is ControlNetConfig else "custom-diffusion"
    args = build_parser().parse_args(["train", command, *argv])
    built = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("train_controlnet", "train_custom_diffusion"):
            mp.setattr(f"difftune.api.{name}", lambda cfg: built.append(cfg) or {})
        args.func(args)
    return built[0]


def _write(path, text: str):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, said", [
    ("trainer:\n  train_batch_size: 2\n",
     r"'trainer' is not a section \(did you mean 'train'\?\): the sections are model, data, optim, loss, train, "
     r"validation"),
    ("train-data-dir: d\n", r"'train-data-dir' is written 'train_data_dir' in a config file \(with underscores"),
    ("--train_data_dir: d\n", r"'--train_data_dir' is written 'train_data_dir' in a config file \(without the leading"),
    ("train: 8\n", r"'train' is a section: put its settings under it"),
    ("learning_rat: 0.1\nfoo_bar_baz: 1\n",
     r"did you mean 'learning_rate'\?; unknown setting 'foo_bar_baz' \(`difftune train controlnet --help` lists"),
])
def test_config_file_mistakes_are_named_with_the_file_and_what_was_meant(text, said, tmp_path):
    path = _write(tmp_path / "typo.yaml", text)
    with pytest.raises(ConfigError, match=rf"Config file {path}: .*{said}") as err:
        _build(ControlNetConfig, "--config", path)
    assert "Valid settings" not in str(err.value)  # no list of 90 names


def test_a_run_config_given_to_the_other_method_says_which_method_it_is_for(tmp_path):
    cn = _write(tmp_path / "cn.yaml", "model:\n  controlnet_model_name_or_path: cn0\n  model_family: sd\n")
    with pytest.raises(ConfigError, match=r"holds ControlNet settings \(controlnet_model_name_or_path, model_family\)"
                                          rf".*`difftune train controlnet --config {cn}`"):
        _build(CustomDiffusionConfig, "--config", cn)
    cd = _write(tmp_path / "cd.yaml", "instance_prompt: a <new1> cat\ncustom:\n  modifier_token: <new1>\n")
    with pytest.raises(ConfigError, match=r"holds Custom Diffusion settings \(instance_prompt, custom\).*"
                                          r"`difftune train custom-diffusion"):
        _build(ControlNetConfig, "--config", cd)


def test_a_bad_value_from_a_file_is_said_to_come_from_it_and_a_flag_over_it_is_not(tmp_path):
    path = _write(tmp_path / "run.yaml", f"train_data_dir: {tmp_path}\nnan_policy: skp\nresolution: 100\n")
    with pytest.raises(ConfigError, match=rf"--nan_policy 'skp': choose from stop, skip.* \(set in config file {path}: "
                                          r"nan_policy\)"):
        _build(ControlNetConfig, "--config", path, "--resolution", "64")
    with pytest.raises(ConfigError, match=r"--resolution 100 is not a positive multiple of 8") as err:
        _build(ControlNetConfig, "--config", path, "--nan_policy", "skip", "--resolution", "100")
    assert "set in config file" not in str(err.value)  # the flag gave it, not the file


@pytest.mark.parametrize("text", ["hub_token: [hf_SECRETTOKEN123456]\n", "hub_token: 12345\n",
                                  "hub_token: hf_SECRETTOKEN123456: x\n"])  # (YAML's parse error quotes the line)
def test_a_hub_token_of_the_wrong_kind_is_refused_without_showing_it(text, tmp_path):
    path = _write(tmp_path / "run.yaml", f"train_data_dir: {tmp_path}\n{text}")
    with pytest.raises(ConfigError) as err:
        _build(ControlNetConfig, "--config", path)
    assert "SECRET" not in str(err.value) and "12345" not in str(err.value)
    assert "not shown: it is a secret" in str(err.value) or "line 2, column" in str(err.value)
    with pytest.raises(ConfigError, match="not shown") as err:  # from Python, as from a file
        from_dict(ControlNetConfig, {"train_data_dir": "d", "hub_token": ["hf_SECRETTOKEN123456"]})
    assert "SECRET" not in str(err.value)


def test_a_config_file_may_name_a_recipe_and_the_flag_overrides_it(tmp_path):
    path = _write(tmp_path / "run.yaml", f"recipe: debug\ntrain_data_dir: {tmp_path}\ntrain_batch_size: 3\n")
    cfg = _build(ControlNetConfig, "--config", path)
    assert cfg.train.max_train_steps == 4 and cfg.train.train_batch_size == 3  # the recipe's, under the file's own
    cfg = _build(ControlNetConfig, "--config", path, "--recipe", "controlnet_tiny_demo")
    assert cfg.train.max_train_steps == 800 and cfg.train.train_batch_size == 3
    cd = _write(tmp_path / "cd.yaml", f"recipe: debug\ninstance_data_dir: {tmp_path}\ninstance_prompt: a <new1>\n")
    cfg = _build(CustomDiffusionConfig, "--config", cd)
    assert cfg.train.max_train_steps == 4 and cfg.optim.learning_rate == 1e-5  # over Custom Diffusion's defaults
    _write(tmp_path / "cd.yaml", f"recipe: fast\ninstance_data_dir: {tmp_path}\ninstance_prompt: a <new1>\n")
    with pytest.raises(ConfigError, match=r"recipe 'fast' is not one of `difftune train custom-diffusion`'s: debug"):
        _build(CustomDiffusionConfig, "--config", cd)
    with pytest.raises(ConfigError, match=r"'recipe' is no setting: a recipe is chosen with --recipe NAME"):
        from_dict(ControlNetConfig, {"recipe": "debug", "train_data_dir": "d"})


def test_config_file_extensions_in_any_case_and_keys_given_twice(tmp_path):
    assert _build(ControlNetConfig, "--config", _write(tmp_path / "up.YAML", f"train_data_dir: {tmp_path}\n"))
    assert _build(ControlNetConfig, "--config", _write(tmp_path / "up.Json", json.dumps({"train_data_dir": str(tmp_path)})))
    twice = _write(tmp_path / "twice.yaml", f"train_data_dir: {tmp_path}\ntrain:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=rf"Config file {twice}: 'seed' is given twice \(lines 3 and 4\)"):
        _build(ControlNetConfig, "--config", twice)
    on_one_line = _write(tmp_path / "flow.yml", f"train_data_dir: {tmp_path}\ntrain: {{seed: 1, seed: 2}}\n")
    with pytest.raises(ConfigError, match="'seed' is given twice"):
        _build(ControlNetConfig, "--config", on_one_line)
    in_json = _write(tmp_path / "twice.json", f'{{"train_data_dir": "{tmp_path}", "seed": 1, "seed": 2}}')
    with pytest.raises(ConfigError, match=rf"Config file {in_json}: 'seed' is given twice"):
        _build(ControlNetConfig, "--config", in_json)
    in_toml = _write(tmp_path / "twice.toml", f'train_data_dir = "{tmp_path}"\nseed = 1\nseed = 2\n')
    with pytest.raises(ConfigError, match=rf"Config file {in_toml} could not be parsed"):
        _build(ControlNetConfig, "--config", in_toml)
    # a key merged in with YAML's << is meant to be overridden: no key given twice
    merged = _write(tmp_path / "merged.yaml", "base: &b {seed: 1, max_train_steps: 2}\ntrain:\n  <<: *b\n  seed: 5\n")
    assert read_config_file(merged)["train"] == {"seed": 5, "max_train_steps": 2}


def _record_a_run(work, output_dir: str):
    """A ControlNet run's difftune_config.json as training started in ``work`` records it: paths as typed."""
    (work / "fill" / "validation").mkdir(parents=True)
    (work / "fill" / "validation" / "conditioning_0.png").write_bytes(b"")
    (work / "latents").mkdir()
    cfg = from_dict(ControlNetConfig, {"train_data_dir": "fill", "output_dir": output_dir, "latent_cache_dir": "latents",
                                       "validation_prompt": ["a red circle"],
                                       "validation_image": ["fill/validation/conditioning_0.png"]})
    run = work / output_dir if not output_dir.startswith("/") else output_dir
    return save_resolved(cfg, run)


def test_a_runs_recorded_config_reads_its_paths_from_where_the_run_started(tmp_path, monkeypatch, capsys, caplog):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    record = _record_a_run(work, "runs/cn")
    monkeypatch.chdir(elsewhere)
    cfg = _build(ControlNetConfig, "--config", str(record), "--output_dir", str(tmp_path / "new"))
    assert cfg.data.train_data_dir == str(work / "fill")
    assert cfg.validation.validation_image == [str(work / "fill" / "validation" / "conditioning_0.png")]
    assert cfg.train.latent_cache_dir == str(work / "latents") and cfg.train.output_dir == str(tmp_path / "new")
    assert f"train_data_dir, latent_cache_dir, validation_image read from {work}" in capsys.readouterr().err
    (elsewhere / "fill").mkdir()  # a path that reads from here is taken from here, as it always was, and said
    with caplog.at_level(logging.WARNING, logger="difftune"):
        assert _build(ControlNetConfig, "--config", str(record)).data.train_data_dir == "fill"
    assert f"train_data_dir 'fill' reads from here as {elsewhere / 'fill'}, while the recorded run used " \
           f"{work / 'fill'}" in caplog.text
    # a checkpoint's copy of the record is read against the same folder
    copy = record.parent / "checkpoints" / "checkpoint-2" / "difftune_config.json"
    copy.parent.mkdir(parents=True)
    copy.write_text(record.read_text())
    assert _build(ControlNetConfig, "--config", str(copy)).train.latent_cache_dir == str(work / "latents")


def test_a_path_from_a_config_file_that_does_not_exist_is_refused_early_with_the_file(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    record = _record_a_run(work, str(tmp_path / "abs-run"))  # an absolute --output_dir: where it started is unknown
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match=rf"Config file {record}: train_data_dir 'fill' does not exist .*cannot be "
                                          r"told from it.*Give --train_data_dir with a path from here"):
        _build(ControlNetConfig, "--config", str(record))
    with pytest.raises(ConfigError, match=r"validation_image 'fill/validation/conditioning_0.png' does not exist"):
        _build(ControlNetConfig, "--config", str(record), "--train_data_dir", str(work / "fill"))
    # a file of one's own: paths are read from the current folder, and one beside the file is pointed out
    mine = _write(work / "mine.yaml", "train_data_dir: fill\n")
    with pytest.raises(ConfigError, match=rf"Config file {mine}: train_data_dir 'fill' does not exist \(read from the "
                                          rf"current folder, {elsewhere}; there is one beside the config file"):
        _build(ControlNetConfig, "--config", mine)
    monkeypatch.chdir(work)
    assert _build(ControlNetConfig, "--config", mine).data.train_data_dir == "fill"


def test_a_setting_given_flat_and_in_its_section_or_a_models_own_record_is_refused(tmp_path):
    path = _write(tmp_path / "mixed.yaml", "resolution: 64\ndata:\n  resolution: 32\n")  # (32 won, silently)
    with pytest.raises(ConfigError, match=rf"Config file {path}: 'resolution' given twice, flat and under its "
                                          r"section \(data: resolution"):
        _build(ControlNetConfig, "--config", path)
    meta = _write(tmp_path / "custom_diffusion.json", '{"base_model": "tiny-shapes"}')
    with pytest.raises(ConfigError, match=r"is what a run or model wrote about itself, not a run config: give a run's "
                                          r"difftune_config.json"):
        _build(CustomDiffusionConfig, "--config", meta)
    with pytest.raises(ConfigError, match="--variant is empty"):
        _build(ControlNetConfig, "--train_data_dir", str(tmp_path), "--variant", "")


def test_from_dict_takes_pathlib_paths_where_a_string_is_expected(tmp_path):
    """As the dataclasses themselves do: a folder from Python is often a pathlib.Path (lists of them too)."""
    cfg = from_dict(ControlNetConfig, {"train_data_dir": tmp_path / "shc", "output_dir": tmp_path / "out",
                                       "validation_prompt": "a red circle",
                                       "validation_image": [tmp_path / "a.png", "b.png"]})
    assert cfg.data.train_data_dir == str(tmp_path / "shc") and cfg.train.output_dir == str(tmp_path / "out")
    assert cfg.validation.validation_image == [str(tmp_path / "a.png"), "b.png"]
    one = from_dict(ControlNetConfig, {"train_data_dir": "d", "validation_prompt": "x", "validation_image": tmp_path})
    assert one.validation.validation_image == [str(tmp_path)]
    cd = from_dict(CustomDiffusionConfig, {"instance_data_dir": tmp_path, "instance_prompt": "a <new1> star"})
    assert cd.data.instance_data_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="'learning_rate' must be a number"):  # a path is still no number
        from_dict(ControlNetConfig, {"train_data_dir": "d", "learning_rate": tmp_path})


def test_the_training_calls_refuse_what_is_no_run_config_of_their_method(tmp_path):
    """A dict, a config file's name or the other method's config failed as "'dict' object has no attribute
    'optim'": said as a TypeError that names from_dict."""
    import difftune

    cn = from_dict(ControlNetConfig, {"train_data_dir": str(tmp_path)})
    calls = [(difftune.train_controlnet, {"train_data_dir": "shc"},
              r"train_controlnet takes a difftune.ControlNetConfig, got dict: from_dict\(ControlNetConfig, \{...\}\)"),
             (difftune.train_custom_diffusion, "cd.yaml", r"got str: from_dict\(CustomDiffusionConfig, "
                                                           r"read_config_file\(path\)\) reads a config file"),
             (difftune.train_custom_diffusion, cn, "got a ControlNetConfig: train that with difftune.train_controlnet")]
    for call, cfg, message in calls:
        with pytest.raises(TypeError, match=message):
            call(cfg)
    assert not list(tmp_path.iterdir())


def test_a_concepts_list_runs_record_reads_the_lists_own_folders_from_where_the_run_started(tmp_path, monkeypatch,
                                                                                           capsys):
    """Repeated from another folder, the list was read from the run's folder but its relative instance_data_dir
    from the current one ('entry 0: instance_data_dir star is not a folder')."""
    from difftune.custom_diffusion.concepts import resolve_concepts

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "star").mkdir(parents=True)
    elsewhere.mkdir()
    (work / "concepts.json").write_text(json.dumps([{"instance_prompt": "a <new1> star", "instance_data_dir": "star",
                                                     "class_data_dir": "to-make"}]))
    monkeypatch.chdir(work)
    cfg = _build(CustomDiffusionConfig, "--concepts_list", "concepts.json", "--output_dir", "runs/cd")
    assert cfg.data.concepts_root is None  # (a list given by flag: its folders are read from here)
    save_resolved(cfg, work / "runs" / "cd")
    monkeypatch.chdir(elsewhere)
    cfg = _build(CustomDiffusionConfig, "--config", str(work / "runs" / "cd" / "difftune_config.json"),
                 "--output_dir", str(tmp_path / "new"))
    assert cfg.data.concepts_root == str(work)  # the repeated run records it, so that it repeats too
    concept, = resolve_concepts(cfg.data, [])
    assert concept.instance_data_dir == str(work / "star")
    assert concept.class_data_dir == "to-make"  # made where it is not found (here), as a flag's path is
    assert f"entry 0: instance_data_dir star read from {work}" in capsys.readouterr().err
    (elsewhere / "star").mkdir()  # one that reads from here is taken from here, as the record's other paths are
    assert resolve_concepts(cfg.data, [])[0].instance_data_dir == "star"
