"""A ``--config`` file as one layer of a run config: defaults < recipe < config file < flags.

The file's settings are checked with the file named in every message; a file may choose a recipe
(``recipe: NAME``, which ``--recipe`` overrides). A run's own record (``OUT/difftune_config.json``)
holds its relative paths as typed, relative to the folder that run was started in: given from
another folder, those that do not read from here are read from there (as ``difftune generate``
reads a run's base model, ``recorded.py``). Paths in any other config file are read from the
current folder, as flags are; one that does not exist is refused before any model loads.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_io import METHODS, from_dict, merge, nest, read_config_file
from .errors import ConfigError

RUN_RECORD = "difftune_config.json"
# settings that may name a local file or folder, relative to where training runs (output_dir and logging_dir
# are left alone: a new run writes where it is told); each is resolved only when it reads from nowhere here
PATH_SETTINGS = ("pretrained_model_name_or_path", "controlnet_model_name_or_path", "pretrained_vae_model_name_or_path",
                 "tokenizer_name", "cache_dir", "train_data_dir", "dataset_name", "latent_cache_dir",
                 "validation_image", "resume_from_checkpoint", "instance_data_dir", "class_data_dir", "concepts_list",
                 "concepts_root")
# of those, the ones that can only be local paths: one that does not exist is an error before any model loads
LOCAL_ONLY = ("train_data_dir", "validation_image", "instance_data_dir", "concepts_list")


@dataclass
class ConfigFile:
    """A config file's settings, nested by section, and the recipe it names (if any)."""

    path: Path
    values: dict[str, dict]
    recipe: str | None = None
    started_in: Path | None = None  # a run record's: the folder that run was started in, when it can be told


def build_config(cfg_cls: type, base: dict | None, given: dict, config: str | None = None,
                 recipe_flag: str | None = None) -> Any:
    """The run config of ``base`` (defaults and the --recipe's settings) < the config file < ``given`` (flags,
    nested). A ConfigError about a setting the file set (and no flag overrode) names the file."""
    base = dict(base or {})
    if not config:
        return from_dict(cfg_cls, merge(base, given))
    file = load_config_file(cfg_cls, config)
    base = merge(base, _file_recipe(cfg_cls, file, recipe_flag))
    from_file = sorted({k for sec, kv in file.values.items() for k in kv if k not in given.get(sec, {})})
    values = merge(merge(base, file.values), given)
    flat = _flat(values)
    check_local_paths(file, {k: flat[k] for k in LOCAL_ONLY if k in from_file})
    try:
        return from_dict(cfg_cls, values)
    except ConfigError as e:
        raise ConfigError(_naming_the_file(str(e), from_file, file.path)) from None


def load_config_file(cfg_cls: type, path: str) -> ConfigFile:
    """Read and nest a config file (unknown keys refused, the file named); a run record's relative paths
    that do not read from here are read from the folder its run was started in (said on stderr)."""
    if Path(path).name in ("custom_diffusion.json", "train_summary.json", "config.json", "model_index.json"):
        raise ConfigError(f"--config {path} is what a run or model wrote about itself, not a run config: give a run's "
                          f"{RUN_RECORD} (beside it in a training run's --output_dir) or a config file of your own.")
    data = read_config_file(path)
    recipe = data.pop("recipe", None)
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(f"Config file {path}: 'recipe' names a recipe (recipe: debug), got {recipe!r}.")
    file = ConfigFile(Path(path), nest(cfg_cls, data, source=str(path)), recipe)
    if file.path.name == RUN_RECORD:
        _read_paths_as_recorded(file)
    return file


def _file_recipe(cfg_cls: type, file: ConfigFile, recipe_flag: str | None) -> dict:
    """The settings of the recipe the file names, unless --recipe chose one (flags override the file)."""
    from .recipes import recipes_for

    if file.recipe is None:
        return {}
    usable = recipes_for(cfg_cls)
    if file.recipe not in usable:
        command = METHODS.get(cfg_cls.__name__, ("", "difftune train"))[1]
        raise ConfigError(f"Config file {file.path}: recipe '{file.recipe}' is not one of `{command}`'s: "
                          f"{', '.join(sorted(usable))}.")
    if recipe_flag:
        if recipe_flag != file.recipe:
            print(f"recipe: {recipe_flag} (--recipe), not {file.recipe} (config file {file.path})", file=sys.stderr)
        return {}
    return usable[file.recipe]()


def _read_paths_as_recorded(file: ConfigFile) -> None:
    """A run record's relative paths, read from the folder its run was started in where they do not read
    from here (the run recorded them as typed there)."""
    from .recorded import as_recorded, run_of, training_dir

    file.started_in = training_dir(run_of(file.path), file.values.get("train", {}).get("output_dir"))
    if file.started_in is None:
        return
    moved = []
    for section in file.values.values():
        for key in PATH_SETTINGS:
            value = section.get(key)
            _warn_if_both(file, key, value)
            if isinstance(value, str):
                section[key] = as_recorded(value, file.path, file.values)
            elif isinstance(value, list):
                section[key] = [as_recorded(v, file.path, file.values) if isinstance(v, str) else v for v in value]
            if key in section and section[key] != value:
                moved.append(key)
    data = file.values.get("data", {})
    if data.get("concepts_list") and not data.get("concepts_root"):  # the paths inside it are the run's too
        data["concepts_root"] = str(file.started_in)
    if moved:
        print(f"config file {file.path} is a run's record: {', '.join(moved)} read from {file.started_in}, where that "
              "run was started (its paths are relative to it)", file=sys.stderr)


def _warn_if_both(file: ConfigFile, key: str, value: Any) -> None:
    """A recorded relative path that reads from here and from the recorded run's folder as two different
    things: the one here is used (as the rule says), and that is said, since the run used the other."""
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str) or not item or Path(item).is_absolute() or file.started_in is None:
            continue
        here, there = Path(item).expanduser(), file.started_in / item
        if here.exists() and there.exists() and here.resolve() != there.resolve():
            import logging

            logging.getLogger("difftune").warning(
                "config file %s: %s '%s' reads from here as %s, while the recorded run used %s; using the one here "
                "(give --%s %s for the recorded run's).", file.path, key, item, here.resolve(), there.resolve(), key,
                there.resolve())


def check_local_paths(file: ConfigFile, settings: dict[str, Any]) -> None:
    """Each path the file gives for a local-only setting exists, or the error names the file and setting
    (before any model loads; the run would otherwise fail a minute later without saying where it came from)."""
    for key, value in settings.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and not Path(item).expanduser().exists():
                raise ConfigError(f"Config file {file.path}: {key} '{item}' does not exist{_where_looked(file, item)} "
                                  f"Give --{key} with a path from here to override it.")


def _where_looked(file: ConfigFile, item: str) -> str:
    path = Path(item).expanduser()
    if path.is_absolute():
        return "."
    here = f" (read from the current folder, {Path.cwd()}"
    if file.path.name == RUN_RECORD:
        if file.started_in is None:
            return (here + "; this run record's paths are relative to the folder its run was started in, which "
                    "cannot be told from it: its --output_dir was absolute, or the run folder was moved).")
        return here + f", and from {file.started_in}, where the recorded run was started)."
    beside = file.path.parent / path
    if beside.exists():
        return (here + f"; there is one beside the config file, {beside}: paths in a config file are read from "
                "the current folder, as flags are).")
    return here + ")."


def _flat(values: dict) -> dict:
    return {k: v for sec in values.values() if isinstance(sec, dict) for k, v in sec.items()}


def _naming_the_file(message: str, from_file: list[str], path: Path) -> str:
    """``message`` with the settings it names that came from the config file said to be from there."""
    named = [k for k in from_file if re.search(rf"(--|'){re.escape(k)}\b", message)]
    if not named:
        return message
    return f"{message} (set in config file {path}: {', '.join(named)})"
