"""The machinery that turns typed config dataclasses into command-line flags and back.

Every config field becomes a flag with the diffusers script's name, grouped by section, its default
suppressed so that only what the user gave overrides a recipe or a ``--config`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import typing


def at_least(minimum: int):
    """An argparse ``type``: an integer no smaller than ``minimum`` (counts, steps, batch sizes), so
    ``--n 0`` is refused with the flag's name instead of failing later on an empty list."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its messages
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number (``nan`` and ``inf`` parse as floats, and gave NaN images and
    scores that JSON cannot hold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


finite_float.__name__ = "finite number"


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a time limit in seconds, more than 0 and finite (a network client refuses a
    negative one with a traceback, and takes 0 as "fail at once")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds more than 0, not {text}")
    return value


positive_seconds.__name__ = "seconds"


def _unwrap(tp):
    """(base type, is_list) of an annotation like ``int | None`` or ``list[str] | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_launcher_flags(parser: argparse.ArgumentParser) -> None:
    """``--local_rank``, which diffusers' scripts take and ``python -m torch.distributed.launch`` passes (as
    ``--local-rank``): accepted and unused, since each process finds its rank in the launcher's environment."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="accepted for torch.distributed.launch; the launcher's LOCAL_RANK is what counts")


def add_config_flags(parser: argparse.ArgumentParser, cfg_cls: type, defaults: dict | None = None) -> None:
    """One flag per config field, grouped by section; defaults suppressed to tell what was given.
    ``defaults`` ({section: {field: value}}): a command's own defaults over the fields', as --help shows them."""
    for section in dataclasses.fields(cfg_cls):
        sec_cls = section.default_factory().__class__  # type: ignore[misc]
        group = parser.add_argument_group(section.name)
        hints = typing.get_type_hints(sec_cls)
        for f in dataclasses.fields(sec_cls):
            base, is_list = _unwrap(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            helptext = f.metadata.get("help", "")
            if f.name in (defaults or {}).get(section.name, {}):  # this command's default replaces the field's own
                default = defaults[section.name][f.name]
                helptext = re.sub(r"\s*\(default: [^()]*\)(?=\.?$)", "", helptext)
            helptext += f" (default: {default})" if default not in (None, False) else ""
            kwargs: dict = dict(dest=f"{section.name}.{f.name}", default=argparse.SUPPRESS, help=helptext)
            if base is bool and (f.name.startswith("no_") or f.name == "noaug"):  # negations: no --no-no_ twin
                kwargs["action"] = "store_true"
            elif base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction  # --flag, and --no-flag to undo a recipe's
            else:
                kwargs["type"] = base
                if not f.metadata.get("choices"):
                    kwargs["metavar"] = f.name.upper()  # not the dest's SECTION.NAME
                if is_list:
                    kwargs["nargs"] = "+"
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
                if f.metadata.get("bare") is not None:  # the flag alone means this value
                    kwargs.update(nargs="?", const=f.metadata["bare"])
            group.add_argument(f"--{f.name}", **kwargs)


def config_from_args(cfg_cls: type, args: argparse.Namespace, recipe: dict | None = None):
    """defaults < recipe < --config file < explicit flags (``recipe``: the settings of --recipe, if any, over
    the command's defaults; a config file may name a recipe, used when --recipe is not given)."""
    from .config_file import build_config

    given: dict = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            given.setdefault(section, {})[name] = value
    return build_config(cfg_cls, recipe, given, getattr(args, "config", None), getattr(args, "recipe", None))


@contextlib.contextmanager
def out_dir(path: str, flag: str = "--out"):
    """Make an output folder before any work (sampling can take minutes): a clear error if it cannot be.
    Work that fails inside ``with`` leaves no folder it made (nor one above it) that holds no file."""
    from pathlib import Path

    from .errors import ConfigError

    from .checkpoint import first_missing, remove_if_no_files

    folder = Path(path)
    made = first_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a path through a file, no permission
        raise ConfigError(f"{flag} {folder}: cannot make this folder ({e.strerror or e}); give another path.") from None
    try:
        yield folder
    except BaseException:
        remove_if_no_files(made)
        raise


def add_vae_flag(parser: argparse.ArgumentParser) -> None:
    """``--pretrained_vae_model_name_or_path`` for commands that sample with a trained ControlNet."""
    parser.add_argument("--pretrained_vae_model_name_or_path",
                        help="a VAE in place of the base's (e.g. an fp16-safe SDXL VAE; default: the one the "
                             "ControlNet's run recorded, when the base is too)")


def add_tokenizer_flag(parser: argparse.ArgumentParser) -> None:
    """``--tokenizer_name`` for commands that use a trained adapter (it stands in for a base's missing tokenizer/)."""
    parser.add_argument("--tokenizer_name",
                        help="a tokenizer folder or hub id in place of the base's (default: the one the adapter's "
                             "run recorded, when the base is too)")


# ----------------------------------------------------------------------------- unknown flags
def _sub_choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-commands as an action; no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command's own parser, with the words that reach it (``("train", "controlnet")``)."""
    subs = _sub_choices(parser)
    if not subs:
        yield path, parser
    for name, sub in subs.items():
        yield from _leaves(sub, (*path, name))


def _leaf_for(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    path: tuple[str, ...] = ()
    rest = list(argv)
    while subs := _sub_choices(parser):
        i = next((i for i, tok in enumerate(rest) if tok in subs), None)
        if i is None:
            break
        path, parser, rest = (*path, rest[i]), subs[rest[i]], rest[i + 1:]
    return path, parser


def refuse_unknown(parser: argparse.ArgumentParser, argv: list[str], unknown: list[str]) -> typing.NoReturn:
    """argparse's "unrecognized arguments" said by the command at fault, with its usage, and with what
    the user probably meant: a flag of the same command spelled nearly so (``--train_batchsize``), or a
    flag that belongs to another command (``--modifier_token`` given to ``train controlnet``)."""
    import difflib

    path, leaf = _leaf_for(parser, argv)
    known = [s for s in leaf._option_string_actions if s.startswith("--")]
    elsewhere: dict[str, list[str]] = {}
    for other_path, other in _leaves(parser):
        if other_path != path:
            for flag in other._option_string_actions:
                elsewhere.setdefault(flag, []).append("difftune " + " ".join(other_path))
    flags = [tok for tok in unknown if tok.startswith("-") and not re.fullmatch(r"-[\d.]+(e-?\d+)?", tok)]
    if not flags:
        leaf.error(f"unexpected argument(s) {' '.join(map(repr, unknown))}: a value with spaces needs quotes "
                   "(--prompt \"a red circle\")")
    command = " ".join(("difftune", *path))
    lines = []
    for tok in flags:
        name = tok.split("=", 1)[0]
        hint = ""
        if name in elsewhere:
            cmds = elsewhere[name]
            hint = f": it is a flag of `{cmds[0]}`" + (f" (and {len(cmds) - 1} other commands)" if len(cmds) > 1 else "")
        elif close := difflib.get_close_matches(name, known, n=2, cutoff=0.75):
            hint = f": did you mean {' or '.join(close)}?"
        lines.append(f"{name} is not a flag of `{command}`{hint}")
    leaf.error("; ".join(lines) + f" (`{command} --help` lists its flags)")
