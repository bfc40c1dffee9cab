"""The one generic training loop: accumulate, clip, step, schedule, log, checkpoint, validate.

It knows nothing about ControlNet or Custom Diffusion: a ``Method`` (``methods/base.py``)
supplies the trainable modules, the data set and the loss. Determinism is by construction:
the data order is a per-epoch permutation seeded by (seed, epoch), every random draw of the
objective comes from one explicit generator saved in checkpoints, and the data position is
counted in micro-batches, so a resumed run continues exactly where the killed one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .batches import DeviceScalars, EpochSampler, Lookahead, images_in
from .config import OptimConfig, TrainConfig, ValidationConfig, save_resolved, to_dict
from .errors import UserError
from .guards import (claim_output_dir, clear_earlier_run, refuse_lost_processes,
                     refuse_sharded_launch, refuse_unreadable_data, refuse_unreadable_start, warn_changed_settings)
from .optim import (batch_text, build_lr_scheduler, build_optimizer, check_optimizer_in_backward,
                    effective_learning_rate)
from .profiling import StepProfiler
from .resuming import (check_fits, config_to_record, data_position, learning_rate_used, nothing_left_to_train,
                       restore)
from .trackers import drop_metrics_after, requested_trackers, say_picked, start_trackers
from .validation import Validator, load_validation_images


log = logging.getLogger("difftune")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite under ``--nan_policy stop``."""


def autocast_cache_enabled(cfg: TrainConfig) -> bool:
    """Whether autocast keeps its low-precision copies of the trained weights until the forward ends.

    Off with gradient checkpointing: the cache would hold a bf16 copy of every trained weight
    (0.67 GiB for SD 1.5's ControlNet) through the whole forward, which is what checkpointing
    saves otherwise, and it buys nothing: each weight is used once per forward, and the cache
    is emptied before backward recomputes anyway. The casts are the same, so is the training.
    """
    return not cfg.gradient_checkpointing


def make_accelerator(cfg: TrainConfig, trackers: list[str]):
    from accelerate import Accelerator
    from accelerate.utils import (AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs,
                                  ProjectConfiguration)

    refuse_sharded_launch()
    out = Path(cfg.output_dir)
    kwargs: dict[str, Any] = dict(
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        # the prepared loader moves each batch to the GPU from pinned memory without holding the host
        # (a blocking copy waits for all queued GPU work first: the host could not run ahead)
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    if cfg.mixed_precision is not None:
        kwargs["mixed_precision"] = cfg.mixed_precision
    # several processes: each gradient is a view into DDP's all-reduce bucket instead of a second
    # copy of it (the trained model's gradient size per GPU: 1.35 GiB for SD 1.5's ControlNet)
    kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]
    if not autocast_cache_enabled(cfg):
        kwargs["kwargs_handlers"].append(AutocastKwargs(cache_enabled=False))
    fp16_refused = UserError("--mixed_precision fp16 needs a GPU: this run is on the CPU, which has no fp16 "
                             "autocast. Use --mixed_precision bf16 or no.")
    if cfg.mixed_precision == "fp16" and not _has_gpu():
        raise fp16_refused
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError as e:  # e.g. a second run in one process asking for another precision
        raise UserError(f"--mixed_precision {cfg.mixed_precision}: {e}") from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise fp16_refused
    refuse_lost_processes(accelerator.num_processes)
    return accelerator


def _has_gpu() -> bool:
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (torch.cuda.is_available() or bool(xpu and xpu.is_available())
            or bool(mps and mps.is_available()))


class Trainer:
    def __init__(self, method: Any, run_config: Any):
        self.method = method
        self.run_config = run_config
        self.cfg: TrainConfig = run_config.train
        self.optim_cfg: OptimConfig = run_config.optim
        self.val_cfg: ValidationConfig = run_config.validation
        self.out = Path(self.cfg.output_dir)

    # ------------------------------------------------------------------ set-up
    def _data(self, accelerator, seed: int):
        dataset = self.method.train_dataset()
        self.sampler = EpochSampler(len(dataset), seed)
        workers = self.run_config.data.dataloader_num_workers
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.train_batch_size,
            sampler=self.sampler,
            collate_fn=self.method.collate,
            num_workers=workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        return loader

    def _micro_batches(self, accelerator, loader, start: int) -> "Lookahead":
        return Lookahead(self._epochs(accelerator, loader, start), limit=len(loader))

    def _epochs(self, accelerator, loader, start: int):
        """Endless micro-batch stream over epochs, starting ``start`` micro-batches in."""
        per_epoch = len(loader)
        epoch, skip = divmod(start, per_epoch)
        while True:
            it = accelerator.skip_first_batches(loader, skip) if skip else loader
            # accelerate's loaders count their own epochs and push them into the sampler on
            # every iteration: tell the loader, or it would replay epoch 0's order.
            if hasattr(it, "set_epoch"):
                it.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            for batch in it:
                yield batch
            epoch, skip = epoch + 1, 0

    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        cfg = self.cfg
        tracker_names = requested_trackers(cfg.report_to)
        accelerator = make_accelerator(cfg, tracker_names)
        if accelerator.is_main_process:
            say_picked(cfg.report_to, tracker_names)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        root = self.out / "checkpoints"
        resume_from = ckpt.resolve_resume(root, cfg.resume_from_checkpoint)
        changes: list[str] = []
        self._resumed_from = resume_from
        clear_earlier = False
        if resume_from is None:
            clear_earlier = claim_output_dir(self.out, root, cfg.overwrite_output_dir)
            if cfg.resume_from_checkpoint and accelerator.is_main_process:
                log.info("--resume_from_checkpoint %s: no checkpoint in %s yet; starting a new run.",
                         cfg.resume_from_checkpoint, root)
        else:
            changes = warn_changed_settings(self.out, self.run_config, resume_from)
        resumed = ckpt.load_checkpoint(resume_from) if resume_from else None
        seed = resumed["state"].seed if resumed else int(cfg.seed)
        torch.manual_seed(seed)
        made_out = ckpt.first_missing(self.out)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(root)
            ckpt.clean_stale_temp_files(self.out, self.out / "validation")

        t_setup = time.perf_counter()
        try:
            check_optimizer_in_backward(self.optim_cfg, cfg.gradient_accumulation_steps, accelerator.mixed_precision,
                                        accelerator.num_processes)
            modules = self.method.setup(accelerator)
            if resumed:
                check_fits(resumed, resume_from, self.method)
            loader = self._data(accelerator, seed)
            validation_pairs = load_validation_images(self.val_cfg)
            lr = effective_learning_rate(
                self.optim_cfg, cfg.train_batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes
            )
            if self.optim_cfg.scale_lr:  # a method whose examples carry several images (e.g. + a class image)
                lr *= float(getattr(self.method, "lr_scale", 1.0))
            optimizer = build_optimizer(self.method.param_groups(), self.optim_cfg, lr, accelerator.device.type)
            refuse_unreadable_start(loader.dataset, self.out, clear_earlier)
        except BaseException:  # a failed start leaves no empty --output_dir (nor folders above it) behind
            if accelerator.is_main_process:
                ckpt.remove_if_no_files(made_out)
            raise
        if len(loader.dataset) < cfg.train_batch_size * accelerator.num_processes and accelerator.is_main_process:
            log.warning("The data set has %d samples, fewer than one batch across processes (--train_batch_size %d x %d "
                        "processes): accelerate fills each batch by repeating samples.", len(loader.dataset),
                        cfg.train_batch_size, accelerator.num_processes)
        *prepared, optimizer, loader = accelerator.prepare(*modules, optimizer, loader)
        self.method.bind(prepared)
        steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
        lr_scheduler = build_lr_scheduler(optimizer, self.optim_cfg, max_steps)
        generator = torch.Generator().manual_seed(seed + 7919 * accelerator.process_index)

        state = ckpt.TrainState(seed=seed, method=self.method.name)
        micro_batch_samples = cfg.train_batch_size * accelerator.num_processes
        if resumed:
            lr_before = optimizer.param_groups[0].get("initial_lr")
            state = restore(resumed, resume_from, root, self.method, optimizer, lr_scheduler, generator,
                            accelerator, changes)
            lr = learning_rate_used(optimizer, lr, lr_before)
            state.micro_batches = data_position(state, len(self.sampler), micro_batch_samples)
        state.micro_batch_samples = micro_batch_samples
        if accelerator.is_main_process:
            log.info("%d optimizer steps of %s", max_steps,
                     batch_text(cfg.train_batch_size, accelerator.num_processes, cfg.gradient_accumulation_steps))

        if resumed and state.global_step >= max_steps and accelerator.is_main_process:
            nothing_left_to_train(resume_from, state.global_step, max_steps)
        trackers = self._start_trackers(accelerator, tracker_names, state, clear_earlier, made_out)
        if accelerator.is_main_process:  # steps logged after the checkpoint by the run that was killed: redone now
            drop_metrics_after(self.out / "metrics.jsonl", state.global_step)
        if clear_earlier:  # only now: a flag, file or tracker at fault has failed above with the earlier run intact
            clear_earlier_run(accelerator, self.out, root, new_logs=self.out / cfg.logging_dir)
        if accelerator.is_main_process:  # after the models, data, optimizer and trackers: a failed start records no run
            save_resolved(self.run_config, self.out)
        validator = Validator(self.val_cfg, self.method, self.out, trackers, seed, validation_pairs)
        if resumed and 0 < state.global_step < max_steps and accelerator.is_main_process \
                and validator.interrupted(state.global_step):
            log.info("validation at step %d was interrupted (no grid in %s): running it now.", state.global_step,
                     validator.folder)
            validator.run(state.global_step)
        setup_seconds = time.perf_counter() - t_setup
        setup_peak = None
        if torch.cuda.is_available():  # the loop's peak apart from the set-up's (e.g. a latent-cache build)
            setup_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        summary = self._loop(accelerator, prepared, optimizer, lr_scheduler, loader, generator, state, max_steps,
                             trackers, validator, root)
        summary["processes"] = accelerator.num_processes  # (the batch per step: the model card says it)
        summary["learning_rate"] = lr  # the peak rate used: --learning_rate (the checkpoint's), scaled with --scale_lr
        if state.resumed_changes:
            summary["resumed_changes"] = state.resumed_changes
        summary["setup_seconds"] = round(setup_seconds, 3)
        if setup_peak is not None:
            summary["setup_peak_allocated_gib"] = setup_peak
        if getattr(self.method, "cache_build_seconds", None) is not None:
            summary["cache_build_seconds"] = round(self.method.cache_build_seconds, 3)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            summary["exported"] = [str(p) for p in self.method.export(self.out)]  # first: a failing sampler loses nothing
            # (no validation pairs this session, e.g. resumed without them: the run's newest grid, from before)
            grid = validator.run(state.global_step) or max(validator.folder.glob("step-*.png"), default=None)
            summary["validation_grid"] = str(grid) if grid else None
            card = self.method.model_card(self.out, summary)
            if state.resumed_changes:  # the card's settings are the last resume's
                card += ("\nResumed with settings changed from the run before: " + "; ".join(state.resumed_changes)
                         + ".\n")
            (self.out / "README.md").write_text(card, encoding="utf-8")
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.wait_for_everyone()  # every process returns with the exported model in place
        trackers.close()
        if cfg.push_to_hub and accelerator.is_main_process:  # once, after the export, without what only resumes
            from . import hub

            summary["hub_url"] = hub.push_folder(self.out, cfg.hub_model_id, cfg.hub_token,
                                                 ignore=hub.RUN_UPLOAD_IGNORE)
        return summary

    def _start_trackers(self, accelerator, names: list[str], state: ckpt.TrainState, clear_earlier: bool,
                        made_out: Path | None):
        """Start the trackers, continuing the checkpoint's tracker runs on a resume; their run ids go into
        ``state`` (and so into every checkpoint). A failed start leaves nothing it made in the output folder."""
        cfg = self.cfg
        try:
            trackers = start_trackers(accelerator, self.out, self.out / cfg.logging_dir, clear_earlier,
                                      names=names, project=cfg.tracker_project_name or self.method.name,
                                      config=to_dict(self.run_config), resume_step=state.global_step,
                                      runs=state.tracker_runs)
        except BaseException:
            if accelerator.is_main_process:
                ckpt.remove_if_no_files(made_out)
            raise
        state.tracker_runs = {**state.tracker_runs, **trackers.run_ids()}
        return trackers

    def _loop(self, accelerator, modules, optimizer, lr_scheduler, loader, generator, state, max_steps,
              trackers, validator, root) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        params = [p for g in optimizer.param_groups for p in g["params"]]
        stream = self._micro_batches(accelerator, loader, state.micro_batches)
        bar = tqdm(total=max_steps, initial=state.global_step, desc="train", unit="step",
                   disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        t_start, images_seen = time.perf_counter(), 0
        last_loss = state.last_loss if state.last_loss is not None else float("nan")
        readable = unreadable = 0  # this process's samples since the run (re)started
        # this process's share of the run's skipped samples, on the device: summed with the loss each step
        skipped = torch.tensor(float(state.skipped_samples), device=accelerator.device)
        pending = None  # --nan_policy stop: the last step's record, its loss still on the way from the device
        profiler = StepProfiler(self.out / "profile", cfg.profile_steps, cfg.profile_start, state.global_step,
                                enabled=accelerator.is_main_process, device_type=accelerator.device.type)
        with profiler:
            while state.global_step < max_steps:
                t_step = time.perf_counter()
                data_wait = 0.0
                loss_sum = torch.zeros((), device=accelerator.device)
                step_images = used = 0  # images trained on; micro-batches that trained (weight > 0)
                for micro in range(accum):
                    t_data = time.perf_counter()
                    batch = next(stream)
                    data_wait += time.perf_counter() - t_data
                    state.micro_batches += 1
                    if batch.get("n_skipped"):
                        state.skipped_samples += int(batch["n_skipped"])
                        unreadable += int(batch["n_skipped"])
                        skipped += int(batch["n_skipped"])  # (a host number into a device add: no wait)
                    readable += 0 if batch.get("empty") else images_in(batch)
                    if unreadable:
                        refuse_unreadable_data(readable, unreadable, state.global_step, root)
                    sync = micro == accum - 1
                    weight = 1.0
                    if batch.get("empty"):  # no sample of this micro-batch could be read
                        if not (sync and accelerator.num_processes > 1):
                            continue
                        # Every process must join this backward's gradient all-reduce, or the others wait
                        # for it forever: it runs the next batch it will read, weighted 0 (adds nothing).
                        batch, weight = stream.next_readable(), 0.0
                    with contextlib.ExitStack() as stack:
                        if not sync:
                            for m in modules:
                                stack.enter_context(accelerator.no_sync(m))
                        with accelerator.autocast():
                            loss = self.method.loss(batch, generator)
                        accelerator.backward(loss * (weight / accum))
                    loss_sum += loss.detach().float() * weight  # (a non-finite stand-in still counts as one)
                    step_images += images_in(batch) if weight else 0
                    used += weight > 0
                if not used and accelerator.num_processes == 1:
                    continue  # nothing of this step's batches could be read: no step, no loss of 0 logged
                # the loss summed over processes (is it finite everywhere? its mean is logged), the run's
                # skipped samples (every process's count), and the micro-batches that trained (all processes')
                used_now = torch.zeros((), device=accelerator.device) + used  # (a kernel, not a host copy)
                total, run_skipped, run_used = accelerator.reduce(torch.stack([loss_sum, skipped, used_now]),
                                                                  reduction="sum")
                if not used and not run_used.item():  # (a wait, on a process that read nothing only)
                    optimizer.zero_grad(set_to_none=self.optim_cfg.set_grads_to_none)
                    continue  # no process could read its batches: no step anywhere (all of them agree)
                reading = DeviceScalars(torch.stack([total, run_used, run_skipped]))
                if cfg.nan_policy == "skip":  # the host decides whether to step: it waits for the loss here
                    if math.isfinite(reading.get()[0]):
                        self._step(accelerator, optimizer, lr_scheduler, params)
                    else:
                        state.nonfinite_steps += 1
                else:
                    # stop: the step is taken at once and its loss checked during the next step (before that
                    # one's update), so the host prepares each step while the GPU still works on the last.
                    # A step that is checkpointed, validated or last is checked before anything is saved.
                    if pending is not None:
                        last_loss = self._report(pending, trackers, bar, root)
                        pending = None
                    self._step(accelerator, optimizer, lr_scheduler, params)
                optimizer.zero_grad(set_to_none=self.optim_cfg.set_grads_to_none)
                state.global_step += 1
                images_seen += step_images * accelerator.num_processes
                now = time.perf_counter()
                record = {"step": state.global_step, "reading": reading, "nonfinite_steps": state.nonfinite_steps,
                          "scalars": {"lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_seen / (now - t_start),
                                      "step_seconds": round(now - t_step, 5), "data_wait_seconds": round(data_wait, 5)}}
                bar.update(1)
                save = state.global_step % cfg.checkpointing_steps == 0 or state.global_step == max_steps
                validate = validator.should_run(state.global_step) and state.global_step != max_steps
                if cfg.nan_policy == "skip" or save or validate:
                    last_loss = self._report(record, trackers, bar, root)
                else:
                    pending = record
                profiler.step()  # before saving and validating: the profile is of training steps alone
                if save:
                    state.last_loss = last_loss if math.isfinite(last_loss) else None
                    with torch.profiler.record_function("difftune: save checkpoint"):  # named in a profile
                        self._save(accelerator, optimizer, lr_scheduler, generator, state, root)
                if validate:
                    if accelerator.is_main_process:
                        validator.run(state.global_step)
        bar.close()
        summary = {
            "global_step": state.global_step,
            "final_loss": last_loss if math.isfinite(last_loss) else None,  # (JSON has no NaN)
            "seconds": round(time.perf_counter() - t_start, 3),
            "images_per_s_this_session": images_seen / max(time.perf_counter() - t_start, 1e-9),
            "skipped_samples": self._run_skipped(accelerator, state),
            "nonfinite_steps": state.nonfinite_steps,
            "seed": state.seed,
        }
        if cfg.profile_steps and profiler.summary is None and accelerator.is_main_process:
            log.warning("--profile_steps: nothing was recorded: the run ended at step %d, before step %d where "
                        "recording starts (--profile_start + 1 step of profiler warm-up).",
                        state.global_step, cfg.profile_start + 2)
        if profiler.summary is not None:
            summary["profile"] = {"dir": str(profiler.out), **{k: v for k, v in profiler.summary.items() if k != "top_ops"}}
        if torch.cuda.is_available():
            summary["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            summary["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return summary

    def _step(self, accelerator, optimizer, lr_scheduler, params) -> None:
        if self.optim_cfg.max_grad_norm > 0 and not self.optim_cfg.optimizer_in_backward:
            accelerator.clip_grad_norm_(params, self.optim_cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()

    def _report(self, record: dict, trackers, bar, root: Path) -> float:
        """Read a step's loss (waiting for it if need be), stop on a non-finite one (``--nan_policy stop``),
        log the step's scalars; returns the loss."""
        total, micro_batches, skipped = record["reading"].get()
        loss = total / max(micro_batches, 1)  # the mean over every process's micro-batches that could be read
        if not math.isfinite(total) and self.cfg.nan_policy == "stop":
            last = ckpt.list_checkpoints(root)
            raise TrainingDiverged(
                f"The loss is {loss} at step {record['step']}. Training stopped there, and nothing after the "
                f"last checkpoint ({last[-1] if last else 'none'}) was saved. Try a lower --learning_rate, "
                "--mixed_precision bf16 instead of fp16, or --nan_policy skip to skip such steps."
            )
        scalars = {"loss": loss, **record["scalars"]}
        if skipped:
            scalars["skipped_samples"] = int(skipped)
        if record["nonfinite_steps"]:
            scalars["nonfinite_steps"] = record["nonfinite_steps"]
        trackers.log_scalars(scalars, record["step"])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['lr']:.2e}", img_s=f"{scalars['images_per_s']:.1f}")
        return loss

    @staticmethod
    def _refuse_nonfinite(weights: dict, step: int, root: Path) -> None:
        """Stop before a checkpoint of NaN/inf weights is written. A finite loss does not make finite weights (an
        update that overflows, a learning rate of 1e300), and the last step is always checkpointed before the
        export: so no checkpoint, nor the exported model, holds weights that make black images."""
        bad = ckpt.first_nonfinite(weights)
        if bad is None:
            return
        last = ckpt.list_checkpoints(root)
        kept = f"the last checkpoint, {last[-1]}, is intact" if last else "no checkpoint was saved before it"
        raise TrainingDiverged(
            f"The trained weights hold NaN or infinite values at step {step} ({bad}, perhaps among others). "
            f"Training stopped there without saving or exporting them; {kept}. Try a lower --learning_rate, "
            "--max_grad_norm 1.0 if clipping is off, or --mixed_precision bf16 instead of fp16."
        )

    @staticmethod
    def _run_skipped(accelerator, state) -> int:
        """Unreadable samples skipped by all processes (each counts its own share of the data)."""
        if accelerator.num_processes == 1:
            return state.skipped_samples
        count = torch.tensor(state.skipped_samples, device=accelerator.device)
        return int(accelerator.reduce(count, reduction="sum"))

    def _save(self, accelerator, optimizer, lr_scheduler, generator, state, root) -> None:
        # every process checks (their weights are the same): all of them stop, none waits for the others below
        weights = self.method.state_tensors()
        self._refuse_nonfinite(weights, state.global_step, root)
        accelerator.wait_for_everyone()
        state = dataclasses.replace(state, skipped_samples=self._run_skipped(accelerator, state))
        rng = ckpt.rng_tensors(generator)
        if accelerator.num_processes > 1:  # every process draws its own noise: keep each one's state
            from accelerate.utils import gather_object

            rng = ckpt.merge_process_rng(gather_object([rng]))
        if accelerator.is_main_process:
            ckpt.save_checkpoint(
                root,
                state,
                weights,
                optimizer.state_dict(),
                lr_scheduler.state_dict(),
                generator,
                self.cfg.checkpoints_total_limit,
                rng=rng,
                write_more=getattr(self.method, "checkpoint_extras", None),
                config=config_to_record(to_dict(self.run_config), self._resumed_from),
            )
        accelerator.wait_for_everyone()
