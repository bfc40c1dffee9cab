"""What an adapter's folder records about the run that trained it, read back when sampling or evaluating
with it: the base model (and VAE) it was trained on, and its training data (so that an evaluation can
refuse to score on it). ``difftune generate`` / ``eval`` use these when no base is given."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .models import DEFAULT_MODEL


def resolve_vae(explicit: str | None, explicit_base: str | None, controlnet: str | Path | None) -> str | None:
    """--pretrained_vae_model_name_or_path for sampling: the one given, else the one the ControlNet's run trained
    with (e.g. an fp16-safe SDXL VAE) when the base is also the recorded one, else None (the base's own VAE)."""
    if explicit or explicit_base or controlnet is None:
        return explicit
    return _recorded_setting(controlnet, "model", "pretrained_vae_model_name_or_path", "VAE",
                             "--pretrained_vae_model_name_or_path to choose another", path=True)


def recorded_loading(explicit_base: str | None, controlnet: str | Path | None) -> dict[str, str | None]:
    """How the ControlNet's run read its base besides the VAE, for sampling on the recorded base: the tokenizer
    (``--tokenizer_name``) and ``--prediction_type`` it trained with, each said on stderr where set. Empty when
    another base is given (its own tokenizer and scheduler are the ones that fit it)."""
    if explicit_base or controlnet is None:
        return {}
    return {
        "tokenizer_name": _recorded_setting(controlnet, "model", "tokenizer_name", "tokenizer", "", path=True),
        "prediction_type": _recorded_setting(controlnet, "loss", "prediction_type", None, ""),  # said where it acts
    }


def recorded_concept_loading(explicit_base: str | None, custom_diffusion: str | Path | None) -> dict[str, str | None]:
    """As ``recorded_loading``, for a Custom Diffusion folder: the tokenizer and prediction type its run trained
    with, from its custom_diffusion.json. Empty when another base is given; a folder exported before these were
    recorded gives None for each (the base's own, as it was sampled with then)."""
    import json

    if explicit_base or custom_diffusion is None:
        return {}
    path = Path(custom_diffusion) / "custom_diffusion.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # (read_meta names a missing or damaged file)
    found = {k: meta.get(k) if isinstance(meta, dict) else None for k in ("tokenizer_name", "prediction_type")}
    found = {k: v if isinstance(v, str) and v else None for k, v in found.items()}
    if found["tokenizer_name"]:
        print(f"tokenizer: {found['tokenizer_name']} (recorded in {path})", file=sys.stderr)
    return found


def one_prediction_type(recorded: dict[str, str | None], own: str, what: str = "the adapters",
                        fix: str = "use adapters trained alike, or give --pretrained_model_name_or_path to sample "
                                   "with that base's own scheduler") -> str | None:
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
    stderr as ``what`` when set (unless ``what`` is None); a recorded path reads as it does from here."""
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
        value = as_recorded(value, config, saved) if path else value
        if what is not None:
            print(f"{what}: {value} (recorded in {config}{'; ' + note if note else ''})", file=sys.stderr)
        return value
    return None


def recorded_base(controlnet: str | Path | None = None, custom_diffusion: str | Path | None = None) -> tuple[str, Path] | None:
    """The base model an adapter folder was trained on, as its run recorded it, and the file that says so:
    a Custom Diffusion folder's custom_diffusion.json, a ControlNet run folder's difftune_config.json (also
    for one of its checkpoints, two levels below). None when nothing records it (e.g. a downloaded ControlNet)."""
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

            logging.getLogger("difftune").warning(
                "%s is not valid JSON (%s): the base model, VAE and training data it records are not used (the "
                "default base, or --pretrained_model_name_or_path, instead). Restore the file to use them.", path, e)
            continue
        except (OSError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value:
            return as_recorded(value, path, saved), path
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
    the built-in tiny-shapes: an adapter is never sampled on a base it was not trained for by default."""
    if explicit:
        return explicit
    found = recorded_base(controlnet, custom_diffusion)
    if found is None:
        return DEFAULT_MODEL
    base, source = found
    print(f"base model: {base} (recorded in {source}; --pretrained_model_name_or_path to choose another)",
          file=sys.stderr)
    return base


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
