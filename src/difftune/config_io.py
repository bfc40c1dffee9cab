"""Run configs to and from plain data: nested or flat dicts (each value checked against its field's
type), config files (YAML, TOML, JSON), and the resolved config saved beside a run, secrets removed."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError

SECRET_FIELDS = frozenset({"hub_token"})


def shown(name: str, value: Any) -> str:
    """``value`` as an error message may show it: a secret setting's (a token given as a list or a number by
    mistake) by its type alone, since messages reach terminals, logs and CI output."""
    if name in SECRET_FIELDS:
        return f"a value of type {type(value).__name__} (not shown: it is a secret)"
    return repr(value)


def sections(cfg_cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a run-config class."""
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(cfg_cls)}  # type: ignore[misc]


def to_dict(cfg: Any, redact: bool = True) -> dict:
    """Nested plain dict of a config; secrets are dropped."""
    out = dataclasses.asdict(cfg)
    if redact:
        for sec in out.values():
            if isinstance(sec, dict):
                for key in SECRET_FIELDS & sec.keys():
                    sec[key] = None
    return out


def nest(cfg_cls: type, values: dict, source: str | None = None) -> dict[str, dict]:
    """``{section: {field: v}}`` from a nested or flat (``{field: v}``) dict, or a mix.

    Unknown keys are rejected, each with what was probably meant: a typo in a config file must not
    be silently ignored. ``source``: the config file the values come from, named in the message.
    """
    secs = sections(cfg_cls)
    owner = _owners(cfg_cls)
    nested: dict[str, dict] = {s: {} for s in secs}
    unknown: list[tuple[str, str | None, Any]] = []  # (key, section it was under, value)
    twice: list[str] = []  # given flat and under its section: which one counts would be an accident of order
    for key, value in values.items():
        if key in secs and isinstance(value, dict):
            for k, v in value.items():
                if owner.get(k) == key:
                    twice += [k] if k in nested[key] else []
                    nested[key][k] = v
                else:
                    unknown.append((k, key, v))
        elif key in owner:
            twice += [key] if key in nested[owner[key]] else []
            nested[owner[key]][key] = value
        else:
            unknown.append((key, None, value))
    if unknown:
        raise ConfigError(unknown_settings_message(cfg_cls, unknown, source))
    if twice:
        where = f"Config file {source}: " if source else ""
        raise ConfigError(f"{where}{', '.join(repr(k) for k in twice)} given twice, flat and under its section "
                          f"({owner[twice[0]]}: {twice[0]}: ...): give each setting once.")
    return nested


def _owners(cfg_cls: type) -> dict[str, str]:
    """Setting name -> the section that holds it."""
    return {f.name: s for s, c in sections(cfg_cls).items() for f in dataclasses.fields(c)}


# the run configs difftune trains, by class name: the method's name and its command
METHODS = {"ControlNetConfig": ("ControlNet", "difftune train controlnet"),
           "CustomDiffusionConfig": ("Custom Diffusion", "difftune train custom-diffusion")}


def _other_methods_settings(cfg_cls: type) -> dict[str, str]:
    """Setting and section names of the other methods' run configs that ``cfg_cls`` lacks -> the class name
    of the run config that has them: a ControlNet run's config given to Custom Diffusion, or the reverse."""
    from .config import ControlNetConfig
    from .config_custom_diffusion import CustomDiffusionConfig

    own = set(_owners(cfg_cls)) | set(sections(cfg_cls))
    found: dict[str, str] = {}
    for other in (ControlNetConfig, CustomDiffusionConfig):
        if other is not cfg_cls:
            for name in (*_owners(other), *sections(other)):
                if name not in own:
                    found.setdefault(name, other.__name__)
    return found


def unknown_settings_message(cfg_cls: type, unknown: list[tuple[str, str | None, Any]], source: str | None) -> str:
    """What is wrong with each unknown key, and first, when keys belong to another method's run config, which."""
    method, command = METHODS.get(cfg_cls.__name__, (cfg_cls.__name__, "difftune train"))
    where = f"Config file {source}" if source else "The config"
    lines = []
    foreign = _other_methods_settings(cfg_cls)
    theirs = [k for k, _, _ in unknown if k in foreign]
    if theirs:
        other_method, other_command = METHODS[foreign[theirs[0]]]
        shown = ", ".join(theirs[:4]) + (f" and {len(theirs) - 4} more" if len(theirs) > 4 else "")
        target = f" --config {source}" if source else ""
        lines.append(f"{where} holds {other_method} settings ({shown}), not {method} ones: it looks like a "
                     f"{other_method} run's config. Train it with `{other_command}{target}`, or leave those out.")
    rest = [_advice(cfg_cls, k, sec, v) for k, sec, v in unknown if k not in foreign]
    if rest:
        lines.append(f"{where}: " + "; ".join(rest) + f" (`{command} --help` lists every setting by section).")
    return "\n".join(lines)


def _advice(cfg_cls: type, key: str, section: str | None, value: Any) -> str:
    """One unknown key: what it probably should be."""
    import difflib

    secs, owner = sections(cfg_cls), _owners(cfg_cls)
    name = f"{section}.{key}" if section else str(key)
    plain = str(key).lstrip("-").replace("-", "_")
    if plain != key and (plain in owner or plain in secs):
        how = "without the leading dashes" if str(key).startswith("-") else "with underscores, as the flag is"
        return f"'{name}' is written '{plain}' in a config file ({how})"
    if key == "recipe" and section is None:
        return ("'recipe' is no setting: a recipe is chosen with --recipe NAME (a config file may name one as "
                "'recipe: NAME'; from Python, merge difftune.recipes.RECIPES[NAME]() under your settings)")
    if section is None and key in secs:
        return f"'{key}' is a section: put its settings under it, indented ({key}:\n  SETTING: VALUE)"
    if section is not None and key in owner:
        return f"'{name}' belongs in section '{owner[key]}' (the groups of --help say where each flag is), or give it " \
               f"flat, as '{key}'"
    if section is None and isinstance(value, dict):
        close = difflib.get_close_matches(str(key), list(secs), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"'{key}' is not a section{hint}: the sections are {', '.join(secs)}"
    pool = [n for n, s in owner.items() if s == section] if section else list(owner)
    close = difflib.get_close_matches(str(key), pool, n=3, cutoff=0.6)
    if close:
        return f"unknown setting '{name}': did you mean {' or '.join(repr(c) for c in close)}?"
    if section is not None:
        return f"unknown setting '{name}': the settings of '{section}' are {', '.join(pool)}"
    return f"unknown setting '{name}'"


_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def typed_value(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the field's annotated type, or a ConfigError naming the setting.

    Flags arrive typed by argparse; config files do not: YAML reads ``1e-5`` as a string, and a
    ``train_batch_size: "two"`` would otherwise fail far away as "'<' not supported between str
    and int". Numbers written as strings are converted; anything else of the wrong kind is refused.
    """
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional or hint is Any:
            return None
        raise ConfigError(f"Setting '{name}' needs a value, got null/None.")
    if optional and len(args) == 1:
        hint = args[0]
    if hint is str or typing.get_args(hint) == (str,):  # a folder given as a pathlib.Path, as the sections take it
        value = [_fspath(v) for v in value] if isinstance(value, (list, tuple)) else _fspath(value)
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"Setting '{name}' must be a string or a list of strings, got {shown(name, value)}.")
    if hint not in _KIND:
        return value
    if hint in (int, float) and isinstance(value, str):  # a number written as a string
        try:
            value = hint(value.strip())
        except ValueError:
            pass
    if hint is bool or isinstance(value, bool):  # a bool is an int to Python, never a count, rate or name here
        ok = hint is bool and isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        got = shown(name, value) if name in SECRET_FIELDS else f"{value!r} ({type(value).__name__})"
        raise ConfigError(f"Setting '{name}' must be {_KIND[hint]}, got {got}.")
    return value


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _typed_section(section_cls: type, values: dict) -> dict:
    hints = typing.get_type_hints(section_cls)
    # a boolean for a field with choices (YAML reads a bare ``mixed_precision: no`` as false; ``cuda_graphs:
    # true``) goes to the section as it is: ``config.check_fields`` maps it to 'no' / 'yes' or names the setting
    choices = {f.name for f in dataclasses.fields(section_cls) if f.metadata.get("choices")}
    return {k: v if k in choices and isinstance(v, bool) else typed_value(k, hints.get(k, Any), v)
            for k, v in values.items()}


def from_dict(cfg_cls: type, values: dict) -> Any:
    """Build a run config from a nested or flat dict (see ``nest``), each value checked against its field's type."""
    if not dataclasses.is_dataclass(cfg_cls) or not all(
            f.default_factory is not dataclasses.MISSING for f in dataclasses.fields(cfg_cls)):
        raise ConfigError(f"from_dict builds a whole run config (difftune.ControlNetConfig or "
                          f"difftune.CustomDiffusionConfig), not {getattr(cfg_cls, '__name__', cfg_cls)!s}: its "
                          "settings go in the same flat dict.")
    secs = sections(cfg_cls)
    nested = nest(cfg_cls, values)
    try:
        built = {s: secs[s](**_typed_section(secs[s], nested[s])) for s in secs}
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(str(e)) from None
    return cfg_cls(**built)


def merge(base: dict, override: dict) -> dict:
    """Nested dict ``base`` updated with ``override`` (both as from ``to_dict``)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML, TOML or JSON config file (by its extension, in any case) into a dict. A key given twice in
    one mapping is refused: YAML and JSON would otherwise keep the last value without a word."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    suffix = p.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"Config file {p}: use .yaml, .yml, .toml or .json.")
    text = p.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_key_yaml_loader()) or {}  # a SafeLoader underneath
        elif suffix == ".toml":  # TOML itself forbids a key given twice: tomllib refuses it
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text, object_pairs_hook=_unique_json_object)
    except _DuplicateKey as e:
        raise ConfigError(f"Config file {p}: {e} Keep one of them.") from None
    except Exception as e:
        if any(secret in text for secret in SECRET_FIELDS):  # YAML's message quotes the line: it may hold the token
            for mark in (getattr(e, "context_mark", None), getattr(e, "problem_mark", None)):
                if mark is not None:
                    mark.buffer = None  # (the line and column stay)
        raise ConfigError(f"Config file {p} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a mapping of settings.")
    return data


class _DuplicateKey(Exception):
    pass


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"'{key}' is given twice (in the same object).")
        out[key] = value
    return out


def _unique_key_yaml_loader() -> type:
    """PyYAML's SafeLoader, refusing a key given twice in one mapping (keys merged in with ``<<`` may be
    overridden, as YAML means them to be)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    hash(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if key in seen:
                    raise _DuplicateKey(f"'{key}' is given twice (lines {seen[key]} and {line}).")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def save_resolved(cfg: Any, folder: str | os.PathLike, name: str = "difftune_config.json") -> Path:
    """Write the fully resolved config (secrets removed) next to the run."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
