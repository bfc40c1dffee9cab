"""--config files: mistakes named with the file and what was meant, extensions in any case, keys given twice."""

from __future__ import annotations

import json

import pytest

from difftune.cli import build_parser
from difftune.config import ControlNetConfig, read_config_file
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
