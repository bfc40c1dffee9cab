"""What an adapter's folder records about the run that trained it, read back when sampling or evaluating
with it: the base model (and VAE) it was trained on, and its training data (so that an evaluation can
refuse to score on it). ``difftune generate`` / ``eval`` use these when no base is given, or the recorded one is
named; another base named is read with its own VAE, tokenizer and scheduler (warned about where the run's differ)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .models import DEFAULT_MODEL


def resolve_vae(explicit: str | None, explicit_base: str | None, controlnet: str | Path | None) -> str | None:
    """--pretrained_vae_model_name_or_path for sampling: the one given, else the one the ControlNet's run trained
    with (e.g. an fp16-safe SDXL VAE) when the base is the recorded one (given or not), else None (the base's own)."""
    if explicit or controlnet is None or not on_recorded_base(explicit_base, controlnet=controlnet):
        return explicit
    return _recorded_setting(controlnet, "model", "pretrained_vae_model_name_or_path", "VAE",
                             "--pretrained_vae_model_name_or_path to choose another", path=True)


def recorded_loading(explicit_base: str | None, controlnet: str | Path | None,
                     tokenizer: str | None = None) -> dict[str, str | None]:
    """How the ControlNet's run read its base besides the VAE, for sampling on the recorded base (given or not):
    the tokenizer (``--tokenizer_name``) and ``--prediction_type`` it trained with, each said on stderr where set.
    Empty when another base is given (its own tokenizer and scheduler are the ones that fit it). ``tokenizer``:
    a --tokenizer_name given here, used (and said) over the recorded one."""
    if controlnet is None or not on_recorded_base(explicit_base, controlnet=controlnet):
        return _given_tokenizer(tokenizer)
    return {
        "tokenizer_name": _given_tokenizer(tokenizer).get("tokenizer_name") or
        _recorded_setting(controlnet, "model", "tokenizer_name", "tokenizer", "", path=True),
        "prediction_type": _recorded_setting(controlnet, "loss", "prediction_type", None, ""),  # said where it acts
    }


def _given_tokenizer(tokenizer: str | None) -> dict[str, str | None]:
    if not tokenizer:
        return {}
    print(f"tokenizer: {tokenizer} (--tokenizer_name)", file=sys.stderr)
    return {"tokenizer_name": tokenizer}


def recorded_concept_loading(explicit_base: str | None, custom_diffusion: str | Path | None,
                             tokenizer: str | None = None) -> dict[str, str | None]:
    """As ``recorded_loading``, for a Custom Diffusion folder: the tokenizer and prediction type its run trained
    with, from its custom_diffusion.json. Empty when another base is given; a folder exported before these were
    recorded gives None for each (the base's own, as it was sampled with then)."""
    if custom_diffusion is None or not on_recorded_base(explicit_base, custom_diffusion=custom_diffusion):
        return _given_tokenizer(tokenizer)
    found = _concept_record(custom_diffusion)
    if tokenizer:
        return {**found, **_given_tokenizer(tokenizer)}
    if found.get("tokenizer_name"):
        print(f"tokenizer: {found['tokenizer_name']} (recorded in {Path(custom_diffusion) / 'custom_diffusion.json'})",
              file=sys.stderr)
    return found


def _concept_record(custom_diffusion: str | Path) -> dict[str, str | None]:
    """The tokenizer and prediction type a Custom Diffusion folder's custom_diffusion.json records (None each
    where it records none; empty for a missing or damaged file, which ``read_meta`` names)."""
    import json

    try:
        meta = json.loads((Path(custom_diffusion) / "custom_diffusion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    found = {k: meta.get(k) if isinstance(meta, dict) else None for k in ("tokenizer_name", "prediction_type")}
    return {k: v if isinstance(v, str) and v else None for k, v in found.items()}


def same_model(a: str, b: str) -> bool:
    """Two names of one base model: the same folder once resolved (``./sdxl``, ``sdxl/`` and its absolute path;
    a built-in name and its folder), or the same Hub id."""
    return _identity(a) == _identity(b)


def _identity(name: str) -> str:
    from .errors import ModelLoadError
    from .models import resolve_builtin

    try:
        name = resolve_builtin(name)
    except ModelLoadError:  # (a built-in missing from the install: said when it loads)
        pass
    return local_or_name(name)


def on_recorded_base(explicit_base: str | None, controlnet: str | Path | None = None,
                     custom_diffusion: str | Path | None = None) -> bool:
    """Whether the adapter is sampled on the base its run recorded: none given, or the given one is it (so the
    VAE, tokenizer and prediction type that run read it with apply)."""
    if not explicit_base:
        return True
    found = recorded_base(controlnet, custom_diffusion)
    return found is not None and same_model(explicit_base, found[0])


def one_prediction_type(recorded: dict[str, str | None], own: str, what: str = "the adapters",
                        fix: str = "use adapters trained alike (train one again with the other's "
                                   "--prediction_type), or give another base with --pretrained_model_name_or_path "
                                   "to sample with its own scheduler") -> str | None:
    """The prediction type to sample with for adapters (``{label: what its run recorded}``; None: the base
    scheduler's ``own``, as folders that predate the record trained with): refused when they differ, as the base's
    UNet predicts one thing and an adapter trained toward another target would be sampled wrongly."""
    from .errors import ConfigError

    used = {label: value or own for label, value in recorded.items()}
    if len(set(used.values())) > 1:
        listed = "; ".join(f"{label}: {value}" for label, value in used.items())
        raise ConfigError(f"{what} were trained with different prediction types ({listed}), and they sample "
                          f"with one scheduler: {fix}.")
    return next((v for v in recorded.values() if v), None)


def _recorded_setting(controlnet: str | Path, section: str, key: str, what: str | None, note: str,
                      path: bool = False) -> str | None:
    """One setting of a ControlNet run's difftune_config.json (its own, or for a checkpoint its run's), said on
    stderr as ``what`` when set (unless ``what`` is None); a recorded path reads as ``from_run`` reads it."""
    import json

    folder = Path(controlnet)
    for config in (folder / "difftune_config.json", folder.parent.parent / "difftune_config.json"):
        try:
            saved = json.loads(config.read_text())
            value = saved[section][key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(value, str) or not value:
            return None
        value, where = from_run(value, config, saved) if path else (value, "")
        if what is not None:
            print(f"{what}: {value} (recorded in {config}{where}{'; ' + note if note else ''})", file=sys.stderr)
        return value
    return None


def recorded_base(controlnet: str | Path | None = None, custom_diffusion: str | Path | None = None) -> tuple[str, Path] | None:
    """The base model an adapter folder was trained on, as its run recorded it, and the file that says so:
    a Custom Diffusion folder's custom_diffusion.json, a ControlNet run folder's difftune_config.json (also
    for one of its checkpoints, two levels below). None when nothing records it (e.g. a downloaded ControlNet)."""
    found = _recorded_base(controlnet, custom_diffusion)
    return None if found is None else found[:2]


_SAID_DAMAGED: set[Path] = set()  # run records already warned about (the record is read several times a command)


def _recorded_base(controlnet: str | Path | None, custom_diffusion: str | Path | None) -> tuple[str, Path, str] | None:
    """``recorded_base``, with ``from_run``'s note on where a relative path was read from."""
    import json

    candidates: list[tuple[Path, tuple[str, ...]]] = []
    if custom_diffusion is not None:
        candidates.append((Path(custom_diffusion) / "custom_diffusion.json", ("base_model",)))
    if controlnet is not None:
        folder = Path(controlnet)
        for run in (folder, folder.parent.parent):
            candidates.append((run / "difftune_config.json", ("model", "pretrained_model_name_or_path")))
    for path, keys in candidates:
        try:
            saved = json.loads(path.read_text())
            value: Any = saved
            for key in keys:
                value = value[key]
        except ValueError as e:  # there, but damaged: what it records is not used, and that is said
            import logging

            if path.resolve() not in _SAID_DAMAGED:
                _SAID_DAMAGED.add(path.resolve())
                logging.getLogger("difftune").warning(
                    "%s is not valid JSON (%s): the base model, VAE and training data it records are not used (the "
                    "default base, or --pretrained_model_name_or_path, instead). Restore the file to use them.",
                    path, e)
            continue
        except (OSError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value:
            base, where = from_run(value, path, saved)
            return base, path, where
    return None


def recorded_base_name(controlnet: str | Path | None = None, custom_diffusion: str | Path | None = None) -> str | None:
    """``recorded_base``'s base model alone (None when nothing records one)."""
    found = recorded_base(controlnet, custom_diffusion)
    return None if found is None else found[0]


def local_or_name(name_or_path: str) -> str:
    """A local folder as an absolute path (a run's record is read from other folders later); anything else
    (a Hub id, a built-in name) as given."""
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path


def training_dir(run: Path, output_dir: Any) -> Path | None:
    """The folder a run was started in, from where it is now and its --output_dir as recorded (relative to
    that folder); None when that cannot be told (an absolute or '..' output_dir, a moved run)."""
    out = Path(output_dir) if isinstance(output_dir, str) and output_dir else Path("/")
    run_parts, out_parts = run.resolve().parts, out.parts  # Path drops "." parts
    if out.is_absolute() or not out_parts or ".." in out_parts or run_parts[-len(out_parts):] != out_parts:
        return None
    return Path(*run_parts[: len(run_parts) - len(out_parts)])


def as_recorded(value: str, config: Path, saved: dict) -> str:
    """A path a run's config recorded as typed (relative to where training ran): as it reads from here.
    Kept as it is when it reads from here already, or is no local path there (a Hub id, a built-in name)."""
    if Path(value).expanduser().exists() or Path(value).is_absolute():
        return value
    where = training_dir(run_of(config), (saved.get("train") or {}).get("output_dir"))
    return str(where / value) if where is not None and (where / value).exists() else value


def from_run(value: str, config: Path, saved: dict) -> tuple[str, str]:
    """A path an adapter's run recorded as typed, as ``generate`` / ``eval`` read it: from the folder that run was
    started in where that holds it, else from here; a local folder as an absolute path, anything else (a Hub id,
    a built-in name) as it is. Unlike a ``--config`` file's paths (``as_recorded``: the one here first), the
    adapter was trained on what its run read, so a same-named folder here is not taken for it. With a note for
    stderr on where a relative path was read from ('' when it reads so from here alike)."""
    given = Path(value).expanduser()
    if given.is_absolute():
        return value, ""
    train = saved.get("train")
    where = training_dir(run_of(config), train.get("output_dir") if isinstance(train, dict) else None)
    if where is None or not (where / given).exists():
        return local_or_name(value), ""
    used = (where / given).resolve()
    if given.exists() and given.resolve() != used:
        return str(used), f" as {value}, read from {where}, where its run was started, not {given.resolve()} here"
    return str(used), ""


def run_of(config: Path) -> Path:
    """The run folder of a difftune_config.json: its own folder, or for a checkpoint's copy
    (OUTPUT_DIR/checkpoints/checkpoint-N/), the output folder two levels up."""
    folder = config.parent
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder


def recorded_train_data(controlnet: str | Path) -> Path | None:
    """The folder a ControlNet run (or one of its checkpoints) trained on, as an absolute path: its
    difftune_config.json's --train_data_dir, which a relative path resolves against the folder training ran
    in (where --output_dir, recorded as given, leads to the run). None when nothing records one."""
    import json

    folder = Path(controlnet)
    for config in (folder / "difftune_config.json", folder.parent.parent / "difftune_config.json"):
        run = run_of(config)
        try:
            saved = json.loads(config.read_text())
            data, output_dir = saved["data"]["train_data_dir"], saved["train"]["output_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(data, str) or not data:
            return None
        data_path = Path(data).expanduser()
        if data_path.is_absolute():
            return data_path
        where = training_dir(run, output_dir)
        return None if where is None else where / data_path
    return None


def resolve_base(explicit: str | None, controlnet: str | Path | None = None,
                 custom_diffusion: str | Path | None = None) -> str:
    """--pretrained_model_name_or_path, else the base the adapter was trained on (said on stderr), else
    the built-in tiny-shapes: an adapter is never sampled on a base it was not trained for by default. A given
    base that is the recorded one is said as such: the run's VAE, tokenizer and prediction type apply to it too."""
    if explicit:
        each = (recorded_base(controlnet=controlnet), recorded_base(custom_diffusion=custom_diffusion))
        sources = [str(found[1]) for found in each if found is not None and same_model(explicit, found[0])]
        if sources:
            print(f"base model: {explicit} (--pretrained_model_name_or_path; the one recorded in "
                  f"{' and '.join(sources)}, read as that run read it)", file=sys.stderr)
        return explicit
    found = _recorded_base(controlnet, custom_diffusion)
    if found is None:
        return DEFAULT_MODEL
    base, source, where = found
    print(f"base model: {base} (recorded in {source}{where}; --pretrained_model_name_or_path to choose another)",
          file=sys.stderr)
    return base


def warn_unused_records(explicit_base: str | None, controlnet: str | Path | None = None,
                        custom_diffusion: str | Path | None = None, given: dict[str, str | None] | None = None,
                        uses: tuple[str, ...] = ("vae", "tokenizer_name", "prediction_type")) -> None:
    """Warn, once per adapter, when a base other than the recorded one is given and the adapter's run read its
    base with a VAE, tokenizer or prediction type of its own (which the given base's own replace): the images
    are then not what that run's validation showed. ``given``: the settings given anyway (not warned about);
    ``uses``: the settings the command reads a base with."""
    import logging

    if not explicit_base:
        return
    given = given or {}
    flags = {"vae": "--pretrained_vae_model_name_or_path", "tokenizer_name": "--tokenizer_name"}
    for flag, folder in (("--controlnet", controlnet), ("--custom_diffusion", custom_diffusion)):
        if folder is None:
            continue
        kind = {"controlnet" if flag == "--controlnet" else "custom_diffusion": folder}
        found = recorded_base(**kind)
        if found is None or same_model(explicit_base, found[0]):
            continue
        if flag == "--controlnet":
            recorded = {"vae": _recorded_setting(folder, "model", "pretrained_vae_model_name_or_path", None, "", True),
                        "tokenizer_name": _recorded_setting(folder, "model", "tokenizer_name", None, "", True),
                        "prediction_type": _recorded_setting(folder, "loss", "prediction_type", None, "")}
        else:
            recorded = {"vae": None, **_concept_record(folder)}
        unused = {k: v for k, v in recorded.items() if v and k in uses and not given.get(k)}
        if "prediction_type" in unused and unused["prediction_type"] == (_own_prediction_type(explicit_base)
                                                                        or "epsilon"):
            del unused["prediction_type"]  # (what the given base's scheduler predicts too)
        if not unused:
            continue
        names = {"vae": "VAE", "tokenizer_name": "tokenizer", "prediction_type": "prediction type"}
        listed = ", ".join(f"{names[k]} {v}" for k, v in unused.items())
        restore = " and ".join(f"{flags[k]} {v}" for k, v in unused.items() if k in flags)
        logging.getLogger("difftune").warning(
            "%s %s was trained on %s (%s) with %s; --pretrained_model_name_or_path %s is another base, read with "
            "its own%s. %sLeave out --pretrained_model_name_or_path to sample on the recorded base as that run read "
            "it.", flag, folder, found[0], found[1], listed, explicit_base,
            " scheduler's prediction type" if "prediction_type" in unused else "",
            f"Give {restore} to use the run's here. " if restore else "")


def _own_prediction_type(base: str) -> str | None:
    """What a base's own scheduler config says its UNet predicts (diffusers' default, epsilon, where it says
    nothing); None where that cannot be read before the base loads (a Hub id neither reachable nor cached)."""
    import json

    from .errors import UserError
    from .hub_cache import cached_folder
    from .models import resolve_builtin

    try:
        folder = cached_folder(resolve_builtin(base), None, None, "model_index.json", "", parts=("scheduler",))
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (UserError, OSError, ValueError):
        return None
    value = config.get("prediction_type", "epsilon") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def controlnet_base(given: str | None, controlnet: str | Path, vae: str | None,
                    loading: dict | None, tokenizer: str | None = None) -> tuple[str, str | None, dict | None]:
    """The base a ControlNet folder is sampled on, and its VAE and loading (``recorded_loading``'s keys): the given
    base, else the recorded one, else tiny-shapes (refused first where the ControlNet does not fit it); on the
    recorded base, given by name or not, the VAE and loading its run used where ``vae`` / ``loading`` are None."""
    if not given and recorded_base_name(controlnet=controlnet) is None:
        check_default_base_fits(controlnet)
    base = resolve_base(given, controlnet)
    warn_unused_records(given, controlnet, given={**(loading or {}), "vae": vae,
                                                  **({"tokenizer_name": tokenizer} if tokenizer else {})})
    return (base, resolve_vae(vae, given, controlnet),
            recorded_loading(given, controlnet, tokenizer) if loading is None else loading)


def check_default_base_fits(controlnet: str | Path) -> None:
    """A ControlNet folder that records no base, to be sampled on the default tiny-shapes: refused before any
    model loads when it was made for another base, saying why that base was taken (the fit check alone names
    only the mismatch)."""
    import json

    from .errors import ModelLoadError
    from .models import check_controlnet_fits, resolve_builtin

    try:
        mine = json.loads((Path(controlnet).expanduser() / "config.json").read_text())
        unet = json.loads((Path(resolve_builtin(DEFAULT_MODEL)) / "unet" / "config.json").read_text())
    except (OSError, ValueError, ModelLoadError):
        return  # (an unreadable config is named when the ControlNet loads)
    if not isinstance(mine, dict) or not isinstance(unet, dict):
        return
    try:
        check_controlnet_fits(mine, unet, f"--controlnet {controlnet}")
    except ModelLoadError as e:
        raise ModelLoadError(f"No --pretrained_model_name_or_path was given and nothing in --controlnet {controlnet} "
                             f"records the base it was trained on (no difftune_config.json there, nor in its run's "
                             f"folder), so the default base, {DEFAULT_MODEL}, was taken: {e}") from None


def check_one_base(recorded: dict[str, str | None], explicit: str | None, what: str, why: str) -> None:
    """Adapters (``{label: the base its folder records}``) that record different base models: refused when no
    --pretrained_model_name_or_path says which to use (an adapter fits the base it was trained on), warned
    about when one does. ``what`` names them ("--concepts"), ``why`` says what needs one base."""
    import logging

    from .errors import ConfigError
    from .models import resolve_builtin

    bases = {label: local_or_name(resolve_builtin(base)) for label, base in recorded.items() if base}
    if len(set(bases.values())) < 2:
        return
    listed = "; ".join(f"{label}: {base}" for label, base in bases.items())
    if not explicit:
        raise ConfigError(f"{what} were trained on different base models ({listed}), and {why}: use adapters "
                          "trained on one base, or, if these are one model in two places, name it with "
                          "--pretrained_model_name_or_path.")
    logging.getLogger("difftune").warning("%s were trained on different base models (%s); using "
                                          "--pretrained_model_name_or_path %s as asked.", what, listed, explicit)
