"""What resuming a run does: put a checkpoint's state back into a freshly set-up run.

The trainer sets up as for a new run, then ``restore`` loads the checkpoint into it: the
method's weights, the optimizer and learning-rate schedule, the random states, the counters
and the data position. Checkpoints that follow the one resumed from belong to an abandoned line
of the run and are moved aside (``checkpoint.supersede_later``). Settings that differ from the
checkpoint's own are warned about and remembered (``TrainState.resumed_changes``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .errors import ConfigError

log = logging.getLogger("difftune")


def check_fits(resumed: dict, resume_from: Path, method: Any) -> None:
    """Before anything of the new run is written: the checkpoint was made by this method, its weights
    have this run's names and shapes (not another base model's or family's), and hold finite values (a
    file damaged on disk without changing its size would otherwise resume, or export, NaNs)."""
    written_by = resumed["state"].method
    if written_by is not None and written_by != method.name:
        raise ConfigError(f"{resume_from} was written by a {written_by} run; this is a {method.name} "
                          "run. Resume it with the command that trained it, or use a new --output_dir.")
    ours, theirs = method.state_tensors(), resumed["weights"]
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = [k for k in ours if k in theirs and tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or shapes:
        what = (f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else
                f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}" if unexpected else
                f"{shapes[0]} is {tuple(theirs[shapes[0]].shape)} there, {tuple(ours[shapes[0]].shape)} here")
        raise ConfigError(f"{resume_from}'s weights do not fit this run's model ({what}): it was made with another "
                          "base model (or model family) or method. Resume with that run's settings, or use a new "
                          "--output_dir.")
    bad = ckpt.first_nonfinite(theirs)
    if bad is not None:
        raise ConfigError(f"{resume_from} is damaged: {bad} holds NaN or infinite values, which difftune never "
                          f"saves (a file changed on disk?). Resume from an earlier checkpoint "
                          f"(--resume_from_checkpoint checkpoint-N), or use a new --output_dir.")


def restore(resumed: dict, resume_from: Path, root: Path, method: Any, optimizer, lr_scheduler, generator,
            accelerator, changes: list[str]) -> ckpt.TrainState:
    """Load checkpoint ``resumed`` (read from ``resume_from``) into the run whose checkpoints go to ``root``; its
    TrainState, to continue from. ``changes``: the settings that differ from the checkpoint's run
    (``guards.warn_changed_settings``)."""
    method.load_state_tensors(resumed["weights"])  # names and shapes: ``check_fits`` has compared them
    try:
        optimizer.load_state_dict(resumed["optimizer"])
    except (ValueError, KeyError) as e:
        raise ConfigError(
            f"{resume_from}'s optimizer state does not fit this run's trained parameters ({e}): it was made "
            "by a run with other trained parts (another method, model or parameter grouping such as "
            "--embedding_learning_rate). Resume with that run's settings, or use a new --output_dir."
        ) from None
    lr_scheduler.load_state_dict(resumed["scheduler"])
    state = dataclasses.replace(resumed["state"], method=method.name,
                                resumed_changes=[*resumed["state"].resumed_changes, *changes])
    if not accelerator.is_main_process:  # the saved count is the run's: the processes' counts add up to it
        state.skipped_samples = 0
    if not ckpt.restore_rng(resumed["rng"], generator, accelerator.process_index):
        # saved by a run with fewer processes: this one's stream cannot be continued, so start
        # a fresh one of its own (never a copy of another process's noise)
        generator.manual_seed(state.seed + 7919 * accelerator.process_index + 104729 * state.global_step)
        log.warning("%s holds no random state for process %d (it was saved by a run with fewer "
                    "processes): that process continues with new noise draws", resume_from,
                    accelerator.process_index)
    if accelerator.is_main_process:
        moved = ckpt.supersede_later(root, state.global_step)
        if moved is not None:
            log.warning("resuming at step %d from %s, which later checkpoints in %s follow: they belong to the run "
                        "that went on from there, so they were moved to %s (kept; delete it when you no longer need "
                        "them).", state.global_step, resume_from, root, moved)
    log.info("resumed from %s at step %d", resume_from, state.global_step)
    return state


def data_position(state: ckpt.TrainState, n_samples: int, micro_batch_samples: int) -> int:
    """Micro-batches to skip so the data resumes after the samples the checkpoint's run had seen, when that
    run drew another number of samples per micro-batch (another --train_batch_size or number of processes):
    the epoch's sample order does not depend on it, the count of micro-batches into it does."""
    old = state.micro_batch_samples
    if old is None or old == micro_batch_samples or n_samples <= 0:
        return state.micro_batches
    epoch, into = divmod(state.micro_batches, math.ceil(n_samples / old))
    seen = min(into * old, n_samples)
    start = epoch * math.ceil(n_samples / micro_batch_samples) + seen // micro_batch_samples
    again = seen % micro_batch_samples
    log.warning("the checkpoint's run drew %d samples per micro-batch, this one %d: the data resumes at sample %d "
                "of epoch %d%s.", old, micro_batch_samples, seen - again, epoch,
                f" ({again} sample(s) of the last micro-batch are seen again)" if again else "")
    return start


def learning_rate_used(optimizer, lr: float, before: float | None) -> float:
    """The peak learning rate a resumed run trains with: the checkpoint's schedule continues, so a new
    --learning_rate does not apply. ``before``: the first parameter group's ``initial_lr`` before loading."""
    after = optimizer.param_groups[0].get("initial_lr")
    return lr * after / before if before and after else lr


def nothing_left_to_train(resume_from: Path, step: int, max_steps: int) -> None:
    """A checkpoint at or past --max_train_steps is exported as it is; past it, say which checkpoint holds
    the step asked for, if one does."""
    if step == max_steps:
        log.info("%s is at step %d of %d: nothing left to train; exporting it.", resume_from, step, max_steps)
        return
    earlier = [p.name for p in ckpt.list_checkpoints(resume_from.parent) if p.name == f"checkpoint-{max_steps}"]
    log.warning("%s is at step %d, past --max_train_steps %d: nothing left to train; exporting its step-%d weights%s.",
                resume_from, step, max_steps, step,
                f" (for step {max_steps}'s: --resume_from_checkpoint {earlier[0]})" if earlier else "")


def config_to_record(config: dict, resume_from: Path | None) -> dict:
    """The settings a checkpoint records (``difftune_config.json``): this run's, but the learning rate that
    resuming keeps (the checkpoint's schedule continues), so that a later resume compares with what was used."""
    import json

    if resume_from is None:
        return config
    try:
        saved = json.loads((resume_from / ckpt.CONFIG_FILE).read_text())["optim"]
    except (OSError, ValueError, KeyError, TypeError):
        return config
    kept = {k: saved[k] for k in ("learning_rate", "scale_lr") if k in saved}
    return {**config, "optim": {**config.get("optim", {}), **kept}}
