"""What a run refuses or warns about before and while it trains, so that nothing is lost or mixed.

A fresh run never writes into another run's checkpoints; a resumed run names the settings that
changed since the checkpoint; a launch that would shard the optimizer state (which difftune's
checkpoints hold whole) is refused; a run over mostly unreadable samples stops instead of
"finishing" on nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import to_dict
from .errors import ConfigError, DataError, LaunchError

log = logging.getLogger("difftune")


def claim_output_dir(out: Path, root: Path, overwrite: bool) -> bool:
    """A fresh run never mixes into another run's checkpoints: refuse, unless --overwrite_output_dir.

    Returns whether an earlier run is there to clear. Nothing is deleted here: ``clear_earlier_run``
    does that once the new run's models, data and validation images have loaded, so a typo in a flag
    (a wrong column, a missing file) fails with the earlier run intact.
    """
    if (out / "model_index.json").is_file() or (out.resolve().parent / "model_index.json").is_file():
        raise ConfigError(f"--output_dir {out} is a model folder, or a part of one (model_index.json): training "
                          "there would mix the run into it. Choose another --output_dir.")
    earlier = ckpt.list_checkpoints(root)
    foreign = ckpt.foreign_checkpoints(out)
    if foreign and not overwrite:  # a diffusers script's run: a new run beside it would look like its continuation
        raise ConfigError(
            f"--output_dir {out} holds checkpoints of a diffusers training script ({', '.join(p.name for p in foreign)})"
            ", which difftune cannot continue (their optimizer and random state are pickles). Pick another "
            f"--output_dir (to go on from their weights: --controlnet_model_name_or_path {foreign[-1] / 'controlnet'}),"
            " or pass --overwrite_output_dir to train there beside them (they are left as they are).")
    if not earlier:
        model = finished_model_file(out)
        if model is None:
            return False
        if not overwrite:
            raise ConfigError(
                f"--output_dir {out} already holds a trained model ({model}) and no checkpoint to continue from: "
                "training there would replace it. Pick another --output_dir, or pass --overwrite_output_dir to "
                "replace it.")
        return True
    if not overwrite:
        raise ConfigError(
            f"--output_dir {out} already holds a run's checkpoints ({', '.join(p.name for p in earlier)}). "
            "Continue that run with --resume_from_checkpoint latest, pick another --output_dir, or pass "
            "--overwrite_output_dir to delete them and start over.")
    return True


# files a finished export leaves in its folder: ControlNet, Custom Diffusion (trained, merged,
# compressed), any difftune run, or a base model
FINISHED_MODEL_FILES = ("train_summary.json", "custom_diffusion.json", "diffusion_pytorch_model.safetensors",
                        "diffusion_pytorch_model.bin", "pytorch_custom_diffusion_weights.safetensors",
                        "pytorch_custom_diffusion_weights.bin", "model_index.json")


def finished_model_file(out: Path) -> str | None:
    """The first file in ``out`` that shows a model was exported there, or None."""
    return next((name for name in FINISHED_MODEL_FILES if (out / name).is_file()), None)


def _our_model_card(path: Path) -> bool:
    """A README.md difftune wrote (its front matter tags it), not the user's own."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:600]
    except OSError:
        return False
    return head.startswith("---") and "difftune]" in head


def _earlier_logging_dir(out: Path, new_logs: Path | None) -> Path | None:
    """The tracker log folder the earlier run in ``out`` recorded (its difftune_config.json), when it is inside
    ``out`` and is not the new run's (that one the new trackers write to; its earlier logs were set aside)."""
    try:
        recorded = json.loads((out / "difftune_config.json").read_text(encoding="utf-8"))["train"]["logging_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(recorded, str) or not recorded:
        return None
    from .trackers import logs_inside

    logs = logs_inside(out, out / recorded)
    if logs is None or not logs.is_dir() or (new_logs is not None and logs.resolve() == Path(new_logs).resolve()):
        return None
    return logs


def earlier_outputs(out: Path, new_logs: Path | None = None) -> list[Path]:
    """What an earlier difftune run or export wrote in ``out`` (the user's own files are not listed):
    checkpoints, metrics, validation grids, the exported model of either method and its model card,
    merge/compress notes, and its tracker logs (set aside by ``trackers.start_trackers`` when they are inside
    ``out``; those of another --logging_dir inside ``out`` than the new run's ``new_logs`` too)."""
    from .custom_diffusion.export import LOWRANK
    from .trackers import EARLIER_LOGS

    names = {"metrics.jsonl", "train_summary.json", "merge_info.json", "config.json", *FINISHED_MODEL_FILES, LOWRANK}
    names.discard("model_index.json")  # a base model's folder: claim_output_dir refuses it
    if not any((out / n).is_file() for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
        names.discard("config.json")  # only a ControlNet export's
    try:  # a Custom Diffusion export's token embeddings, as its custom_diffusion.json lists them
        meta = json.loads((out / "custom_diffusion.json").read_text(encoding="utf-8"))
        names |= {f for f in (meta.get("embeddings") or {}).values() if isinstance(f, str) and Path(f).name == f}
    except (OSError, ValueError, AttributeError):
        pass
    found = [out / n for n in sorted(names) if (out / n).is_file()]
    found += [out / "README.md"] if _our_model_card(out / "README.md") else []
    found += sorted((out / "validation").glob("step-*.png"))
    # (the encoded and stream caches stay: each is keyed by what it was made from, and a new run reuses it)
    logs = _earlier_logging_dir(out, new_logs)
    return found + [out / d for d in ("checkpoints", "profile", EARLIER_LOGS) if (out / d).is_dir()] \
        + ([logs] if logs is not None else [])


def clear_earlier_run(accelerator: Any, out: Path, root: Path, new_logs: Path | None = None) -> None:
    """--overwrite_output_dir, once the new run has started well: what the earlier run wrote goes, so that
    nothing of it (a model of the other method, an old validation grid) stays beside the new one."""
    if accelerator.is_main_process:
        from .trackers import EARLIER_LOGS

        gone = earlier_outputs(out, new_logs)
        names = ["tracker logs" if p.name == EARLIER_LOGS else p.name for p in gone]
        log.warning("--overwrite_output_dir: deleting the earlier run in %s (%s)", out,
                    ", ".join(names[:8]) + (f" and {len(gone) - 8} more" if len(gone) > 8 else ""))
        for path in gone:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def refuse_unreadable_start(dataset: Any, out: Path, earlier: bool) -> None:
    """Before the run is recorded (and an earlier one deleted, --overwrite_output_dir): the data must yield
    something. Paths that do not resolve show only when samples are read; the first few tell."""
    import itertools

    import torch

    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = list(itertools.islice(iter(dataset), UNREADABLE_MIN_SEEN))
    else:
        items = [dataset[i] for i in range(min(UNREADABLE_MIN_SEEN, len(dataset)))]
    if items and all(item is None for item in items):
        kept = f", so the earlier run in {out} was left as it was" if earlier else ""
        raise DataError(
            f"none of the first {len(items)} training samples could be loaded (each is named in a 'skipping a "
            f"sample' warning above){kept}. Most often the columns are not the ones meant (give --image_column, "
            "--conditioning_image_column and --caption_column) or the image paths do not resolve; `difftune data "
            "check --train_data_dir ...` lists every problem.")


def refuse_unreadable_data(readable: int, unreadable: int, step: int, root: Path) -> None:
    """Stop once most samples cannot be read: a run over nothing (wrong columns, paths that do not
    resolve) would otherwise "succeed" with a loss of 0. A few bad rows are skipped and counted."""
    if unreadable <= readable or readable + unreadable < UNREADABLE_MIN_SEEN:
        return
    last = ckpt.list_checkpoints(root)
    raise DataError(
        f"{unreadable} of the {readable + unreadable} training samples read so far could not be loaded (each is "
        "named in a 'skipping a sample' warning above), so training stopped at step "
        f"{step} (last checkpoint: {last[-1].name if last else 'none'}). Most often the columns are not the ones "
        "meant (give --image_column, --conditioning_image_column and --caption_column) or the image paths do not "
        "resolve; `difftune data check --train_data_dir ...` lists every problem before training.")


UNREADABLE_MIN_SEEN = 8  # samples seen before the share of unreadable ones is judged


# settings a resumed run may change without changing what it trains
RESUMABLE_CHANGES = frozenset({
    "max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "overwrite_output_dir", "output_dir", "logging_dir", "report_to", "tracker_project_name", "push_to_hub",
    "hub_model_id", "hub_token", "dataloader_num_workers", "profile_steps", "profile_start", "nan_policy",
    "cache_dir", "latent_cache_dir",
    "seed",  # a resumed run keeps the checkpoint's seed whatever is passed
    "no_safe_serialization",  # the format of the files written, not what trains
})
# settings that decide which weights train: a checkpoint of one cannot load into the other
FIXED_ON_RESUME = frozenset({"freeze_model", "modifier_token"})


def warn_changed_settings(out: Path, run_config: Any, resume_from: Path) -> list[str]:
    """Say which settings differ from those of the run that wrote the checkpoint, and what resuming does
    with them: the checkpoint's own ``difftune_config.json`` (the output folder's, read before this run
    replaces it, for a checkpoint from before 2026-12 that holds none)."""
    saved_path = resume_from / "difftune_config.json"
    if not saved_path.is_file():
        saved_path = out / "difftune_config.json"
    if not saved_path.is_file():
        return []
    try:
        saved = json.loads(saved_path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # (json.JSONDecodeError is a ValueError)
        log.warning("could not read %s (%s): settings changed since the checkpoint cannot be listed; resuming with "
                    "the flags given.", saved_path, exc)
        return []
    now = json.loads(json.dumps(to_dict(run_config)))  # as saved: tuples become lists
    changes = []
    for section, values in now.items():
        if not isinstance(values, dict) or section == "validation":
            continue
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key, value)
            if key == "model_family" and old != value:
                _refuse_other_family(saved, now, resume_from)
            if key in FIXED_ON_RESUME and old != value:
                raise ConfigError(
                    f"--{key} {value} differs from the run that wrote {resume_from} ({old}): it decides which "
                    f"weights train, so that checkpoint cannot continue with it. Resume with --{key} {old}, or "
                    "start a new run in another --output_dir.")
            if key == "prediction_type" and old is None:  # recorded unresolved (before 2026-12-03): the scheduler's
                continue
            if key not in RESUMABLE_CHANGES and old != value:
                changes.append(f"--{key} {'(unset)' if old is None else old} -> {'(unset)' if value is None else value}")
    _warn_replanned_schedule(saved, now, resume_from)
    if changes:
        log.warning(
            "resuming from %s with settings that differ from the run that wrote it: %s. The checkpoint's optimizer "
            "state and learning-rate schedule continue (its learning rate, not a new --learning_rate), and the "
            "data resumes after the samples already seen; the rest takes the new values, so the run is no "
            "longer the uninterrupted one.", resume_from, "; ".join(changes))
    return changes


def _refuse_other_family(saved: dict, now: dict, resume_from: Path) -> None:
    """A checkpoint of an SDXL ControlNet cannot continue on an SD 1.x base (nor the reverse): said by name,
    before its weights fail to load tensor by tensor."""
    names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
    old, new = saved["model"]["model_family"], now["model"]["model_family"]
    base = saved["model"].get("pretrained_model_name_or_path")
    raise ConfigError(
        f"{resume_from} was trained on an {names.get(old, old)} base ({base}); this run's base "
        f"({now['model'].get('pretrained_model_name_or_path')}) is {names.get(new, new)}, which its weights do not fit. "
        f"Resume with --pretrained_model_name_or_path {base}, or start a new run in another --output_dir.")


def _warn_replanned_schedule(saved: dict, now: dict, resume_from: Path) -> None:
    """A decaying learning-rate schedule is planned over the run's length: resuming with another
    --max_train_steps (or --num_train_epochs) replans it, so the rate jumps at the resume point."""
    schedule = (now.get("optim") or {}).get("lr_scheduler")
    if schedule in ("constant", "constant_with_warmup"):
        return
    before, after = saved.get("train") or {}, now.get("train") or {}
    length = [f"--{key} {before[key]} -> {after.get(key)}" for key in ("max_train_steps", "num_train_epochs")
              if key in before and before[key] != after.get(key)]
    if length:
        log.warning("resuming from %s with %s: the %s learning-rate schedule is planned anew over the new length, so "
                    "the rate jumps at the resume point to where a run of that length would be (not where the "
                    "checkpoint's schedule was going).", resume_from, " and ".join(length), schedule)


def refuse_sharded_launch() -> None:
    """Stop before training starts when ``accelerate launch`` asks for DeepSpeed or FSDP.

    Both shard the optimizer state (and FSDP the weights) across processes; difftune's checkpoints
    and exports read them whole from one process, so a sharded run would fail at its first
    checkpoint or save a part. What they are used for (fitting a card) the low-memory recipe does
    on one GPU without sharding."""
    from accelerate.utils import parse_flag_from_env

    for env, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if parse_flag_from_env(env):
            raise ConfigError(
                f"This launch asks for {name} ({env} is set by your `accelerate config`), which difftune does not "
                "support: its checkpoints hold the whole optimizer state, which sharding splits across processes. "
                "For less GPU memory use `--recipe low_memory --use_8bit_adam --fp8_frozen_unet` (SD 1.5 at 512 px, "
                "batch 4: 3.95 GiB peak on an H200); for several GPUs, data parallel: `accelerate launch --multi_gpu`.")


def refuse_lost_processes(num_processes: int) -> None:
    """Stop when the launcher started more processes than accelerate joined into one run.

    On a machine without a GPU, ``accelerate launch --multi_gpu --num_processes 2`` starts two
    processes, and without ``ACCELERATE_USE_CPU=1`` each sets itself up as a run of its own: two
    whole trainings writing the same checkpoints and export into one folder, each thinking it is
    the only one, and a clean exit."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > num_processes:
        raise LaunchError(
            f"This launch started {launched} processes (WORLD_SIZE={launched}), but accelerate joined {num_processes}"
            " into the run: each would train the whole run alone into the same --output_dir. Without a GPU, set "
            f"ACCELERATE_USE_CPU=1: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} "
            "-m difftune train ...` (`accelerate launch --cpu --num_processes N` starts one process).")


def quiet_other_processes() -> None:
    """Progress messages and model-loading bars from the first process only (warnings from every one):
    with several processes each line would otherwise be printed once per process. Read from the
    launcher's RANK, as the base model loads before accelerate is set up."""
    if os.environ.get("RANK", "0") == "0":
        return
    logging.getLogger("difftune").setLevel(logging.WARNING)
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
