"""Resumable checkpoints that are never half-written.

A checkpoint is a folder ``checkpoint-<step>`` holding only safetensors and JSON (nothing is
unpickled on resume):

    trainable.safetensors    the method's trained weights
    optimizer.safetensors    optimizer state tensors, keyed "<param index>.<name>"
    optimizer.json           optimizer param groups and non-tensor state
    rng.safetensors          the trainer's noise generator and torch's global RNG states (each
                             process's, in a multi-process run)
    scheduler.json           learning-rate scheduler state
    extra.json               (optional) the caller's own JSON state
    ...                      (optional) the method's own files: a ControlNet checkpoint also holds
                             config.json and diffusion_pytorch_model.safetensors (a hard link to
                             trainable.safetensors), so diffusers loads it for inference as it is
    trainer_state.json       step counters; written last, it marks the folder complete

It is written into a hidden temporary folder, flushed to disk, then renamed into place in
one step; only after that does the ``latest`` pointer move. A run killed at any moment
leaves the previous checkpoint intact and ``latest`` never names a partial one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "difftune_config.json"  # the settings of the run that wrote it
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Counters that, with the weights, optimizer and RNG, define where a run is."""

    global_step: int = 0
    micro_batches: int = 0  # micro-batches consumed since the start (data position)
    skipped_samples: int = 0  # unreadable examples skipped
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss (--nan_policy skip)
    seed: int = 0
    method: str | None = None  # the method that wrote it ("controlnet", "custom_diffusion"); None before 2026-12
    last_loss: float | None = None  # the loss of the step it was saved at (a resumed run that trains no step reports it)
    micro_batch_samples: int | None = None  # samples per micro-batch over all processes (None before 2026-12)
    resumed_changes: list[str] = field(default_factory=list)  # settings changed by resumes, "--flag old -> new"
    tracker_runs: dict[str, str] = field(default_factory=dict)  # tracker -> run id (W&B) / experiment key (Comet)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {k: _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return None


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict = {"param_groups": _jsonable(state_dict["param_groups"]), "state": {}}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                rest["state"].setdefault(str(idx), {})[key] = _jsonable(value)
    return tensors, rest


def optimizer_from_files(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in rest["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def scheduler_to_json(state_dict: dict) -> dict:
    out = _jsonable(state_dict)
    if "lr_lambdas" in out:  # functions are rebuilt from the config, not stored
        out["lr_lambdas"] = [None] * len(out["lr_lambdas"] or [])
    return out


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def merge_process_rng(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One ``rng.safetensors`` for a multi-process run: process 0's states under their own names (as a
    single process writes them), process ``r``'s under ``rank<r>.<name>``. Each process draws its own
    noise and timesteps, so each needs its own state back to resume exactly."""
    merged = dict(states[0])
    for rank, state in enumerate(states[1:], start=1):
        merged.update({f"rank{rank}.{k}": v for k, v in state.items()})
    return merged


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator, rank: int = 0) -> bool:
    """Put back process ``rank``'s random states; False (nothing changed) when the checkpoint has none
    for it (saved by a run with fewer processes)."""
    prefix = f"rank{rank}." if rank else ""
    if prefix + "generator" not in tensors:
        return False
    generator.set_state(tensors[prefix + "generator"])
    torch.set_rng_state(tensors[prefix + "torch_cpu"])
    if prefix + "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[prefix + "torch_cuda"])
    return True


def _umask() -> int:
    mask = os.umask(0o077)  # reading it means setting it: briefly the most private one
    os.umask(mask)
    return mask


def umask_mode(*paths: Path) -> None:
    """Give files (every file below a folder) the permissions ``open()`` would have: 0o666 less the umask.

    safetensors 0.8 writes through a temporary file created 0o600 whatever the umask
    (safetensors issue #782), and diffusers' ``save_pretrained`` goes through it: exported
    weights were readable by their owner only, so a teammate, a container's user or a
    serving account could not load them while ``config.json`` beside them was readable.
    """
    if os.name != "posix":  # pragma: no cover - other systems keep their own ACLs
        return
    mode = 0o666 & ~_umask()
    for path in map(Path, paths):
        for f in [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]:
            os.chmod(f, mode)


def first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` (itself included) that does not exist yet: what making it creates."""
    return next((p for p in [*reversed(Path(path).parents), Path(path)] if not p.exists()), None)


def remove_if_no_files(folder: Path | None) -> None:
    """Remove ``folder`` (made by a start that then failed) when nothing was written into it."""
    if folder is not None and folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write(path: Path, write) -> Path:
    """``write(tmp)`` a file beside ``path``, fsync it, rename it over ``path``, fsync the folder:
    a reader sees the old file or the whole new one, never a half-written one. The file gets the
    umask's permissions (``umask_mode``), whatever library wrote it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    umask_mode(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def first_nonfinite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinite values, or None: one read back
    from the device for all of them, so checking every checkpoint costs little beside writing it."""
    floats = [(k, v) for k, v in weights.items() if v.is_floating_point()]
    if not floats:
        return None
    device = floats[0][1].device
    finite = torch.stack([torch.isfinite(v).all().to(device) for _, v in floats])
    if bool(finite.all()):
        return None
    return floats[int((~finite).nonzero()[0, 0])][0]


def save_checkpoint(
    root: Path,
    state: TrainState,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    generator: torch.Generator,
    total_limit: int | None = None,
    extra: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    write_more: Callable[[Path], None] | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, move ``latest`` to it, prune old ones.

    ``extra``: JSON-able state of the caller's own (``extra.json``), e.g. a NumPy generator's.
    ``rng``: the random states to store (``merge_process_rng``); by default this process's.
    ``write_more(folder)``: the method's own files (e.g. what makes the folder loadable for inference),
    written into the folder before it is marked complete. ``config``: the run's settings (``CONFIG_FILE``),
    which a resume compares its own with."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f".checkpoint-{state.global_step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_rest = optimizer_to_files(optimizer_state)
    files = {
        "trainable.safetensors": lambda p: save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(p)
        ),
        "optimizer.safetensors": lambda p: save_file(opt_tensors, str(p)),
        "optimizer.json": lambda p: p.write_text(json.dumps(opt_rest)),
        "rng.safetensors": lambda p: save_file(rng if rng is not None else rng_tensors(generator), str(p)),
        "scheduler.json": lambda p: p.write_text(json.dumps(scheduler_to_json(scheduler_state))),
        **({"extra.json": lambda p: p.write_text(json.dumps(extra))} if extra is not None else {}),
        **({CONFIG_FILE: lambda p: p.write_text(json.dumps(config, indent=2))} if config is not None else {}),
        STATE_FILE: lambda p: p.write_text(json.dumps(asdict(state), indent=2)),  # last: marks complete
    }
    for name, write in files.items():
        if name == STATE_FILE and write_more is not None:
            write_more(tmp)
            for p in tmp.iterdir():
                if p.name not in files:
                    _fsync_file(p)
        write(tmp / name)
        _fsync_file(tmp / name)
    umask_mode(tmp)
    _fsync_dir(tmp)
    # ``latest`` moves first: killed before the rename, it names a checkpoint not there yet and resuming takes
    # the newest complete one; after the rename it already names this one. (The other order left a window in
    # which it named the previous checkpoint beside a newer complete one, which resuming then set aside.)
    atomic_write(root / "latest", lambda p: p.write_text(final.name + "\n"))
    if final.exists():  # re-saving a step (after a resume): swap, never delete first
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    if total_limit:
        for old in list_checkpoints(root)[:-total_limit]:
            remove_checkpoint(old)
    return final


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half-deleted one that still looks complete:
    renamed out of sight first (one atomic step), then deleted (``clean_partial`` ends a killed deletion)."""
    trash = folder.parent / f".trash-{folder.name}-{os.getpid()}"
    folder.rename(trash)
    _fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def supersede_later(root: Path, step: int) -> Path | None:
    """Resuming at ``step`` in a run whose ``root`` holds later checkpoints (``--resume_from_checkpoint
    checkpoint-5`` beside checkpoint-10 and -20, or another run's checkpoint-5) starts a new line of the run:
    the later checkpoints belong to the old one. ``latest`` first names the newest checkpoint left (the one
    resumed from, when it is in ``root``; none left: no pointer), so that a kill partway never points back
    into the old line; then they move, whole, into ``superseded-from-<step>`` (kept, not deleted: out of
    ``latest``, pruning and listing). Only ``root`` is touched. Returns the folder they went to, or None."""
    def step_of(p: Path) -> int:
        return int(_NAME.match(p.name).group(1))

    done = list_checkpoints(root)
    later = [p for p in done if step_of(p) > step]
    if not later:
        return None
    kept = [p for p in done if step_of(p) <= step]
    if kept:
        atomic_write(root / "latest", lambda p: p.write_text(kept[-1].name + "\n"))
    else:
        (root / "latest").unlink(missing_ok=True)
        _fsync_dir(root)
    dest, n = root / f"superseded-from-{step}", 1
    while dest.exists():
        n += 1
        dest = root / f"superseded-from-{step}-{n}"
    dest.mkdir()
    for p in later:
        p.rename(dest / p.name)
    _fsync_dir(root)
    return dest


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while saving."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".checkpoint-", ".trash-", ".latest.tmp")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")  # atomic_write's temporary names: .<name>.tmp-<pid>


def clean_stale_temp_files(*folders: Path) -> None:
    """Remove the temporary files another process (one killed while writing a validation grid or an
    export file) left in ``folders``; this process's own are left alone."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMP.match(p.name)
            if m and int(m.group(1)) != os.getpid():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def foreign_checkpoints(out: Path) -> list[Path]:
    """``OUT/checkpoint-N`` folders of diffusers' training scripts (accelerate's ``save_state``: pickled
    optimizer and random states, the ControlNet in ``controlnet/``), oldest first."""
    found = []
    for p in out.glob("checkpoint-*") if out.is_dir() else []:
        m = _NAME.match(p.name)
        if m and p.is_dir() and not (p / STATE_FILE).is_file() and (
                (p / "controlnet").is_dir() or any(p.glob("*.pkl")) or any(p.glob("optimizer*.bin"))):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _refuse_foreign(out: Path, spec: str, found: list[Path]) -> None:
    newest = found[-1]
    weights = (f"--controlnet_model_name_or_path {newest / 'controlnet'}" if (newest / "controlnet").is_dir() else
               "its weights (e.g. --controlnet_model_name_or_path CHECKPOINT/controlnet for a ControlNet)")
    raise ConfigError(
        f"--resume_from_checkpoint {spec}: {out} holds checkpoints of a diffusers training script "
        f"({', '.join(p.name for p in found)}), not difftune's (in {out / 'checkpoints'}). Their optimizer and random "
        f"state are pickles, which difftune does not load. To go on from the newest one's weights, start a run in a "
        f"new --output_dir with {weights}: the optimizer and the learning-rate schedule start anew.")


_SAID_INCOMPLETE: set[tuple[Path, str]] = set()


def resolve_resume(root: Path, spec: str | None) -> Path | None:
    """The checkpoint folder that ``--resume_from_checkpoint`` names (None: start fresh). Checkpoints of
    diffusers' scripts beside ``root`` are refused with the way to go on from their weights (``latest``
    started afresh over them)."""
    if not spec:
        return None
    if spec == "latest":
        pointer = root / "latest"
        done = list_checkpoints(root)
        if pointer.is_file():
            named = root / pointer.read_text().strip()
            if (named / STATE_FILE).is_file():
                return named
            if done and (pointer, named.name) not in _SAID_INCOMPLETE:  # (resolved twice per run: seed, trainer)
                _SAID_INCOMPLETE.add((pointer, named.name))
                logging.getLogger("difftune").warning("%s names %s, which is no complete checkpoint (a run killed while "
                                                      "saving it): resuming from the newest complete one, %s",
                                                      pointer, named.name, done[-1].name)
        if not done and (foreign := foreign_checkpoints(root.parent)):
            _refuse_foreign(root.parent, spec, foreign)
        return done[-1] if done else None  # nothing yet: start fresh, as diffusers does
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = root / spec
    if not (path / STATE_FILE).is_file():
        if path.resolve() in [p.resolve() for p in foreign_checkpoints(path.parent)] or \
                (root.parent / spec).resolve() in [p.resolve() for p in foreign_checkpoints(root.parent)]:
            _refuse_foreign(path.parent if path.exists() else root.parent,
                            spec, foreign_checkpoints(path.parent) or foreign_checkpoints(root.parent))
        what = (f"{path} is not a complete difftune checkpoint (no {STATE_FILE})" if path.exists()
                else f"there is no {spec}" + (f" (nor {root / spec})" if Path(spec).name == spec else ""))
        raise ConfigError(
            f"--resume_from_checkpoint {spec}: {what}. Use 'latest' or one of: "
            f"{', '.join(p.name for p in list_checkpoints(root)) or 'none yet'}."
        )
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint folder (safetensors and JSON only); a damaged one is a ConfigError that names
    the file and the intact checkpoints beside it."""
    try:
        return _read_checkpoint(path)
    except Exception as e:  # truncated safetensors, broken JSON, a missing file: all the same to the user
        others = [p.name for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
        raise ConfigError(
            f"Cannot resume from {path}: it is damaged ({e if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'}). "
            "Checkpoints are written atomically, so something changed it afterwards. Resume from an intact one with "
            f"--resume_from_checkpoint {others[-1] if others else 'CHECKPOINT'} (there: {', '.join(others) or 'none'}), "
            "or remove the damaged folder."
        ) from None


def _read_checkpoint(path: Path) -> dict:
    def read(name: str, reader):
        try:
            return reader(path / name)
        except Exception as e:  # say which file: a JSON error alone names none
            raise ValueError(f"{path / name}: {type(e).__name__}: {e}") from None

    as_json = lambda p: json.loads(p.read_text())  # noqa: E731
    as_tensors = lambda p: load_file(str(p))  # noqa: E731
    return {
        "state": TrainState(**read(STATE_FILE, as_json)),
        "weights": read("trainable.safetensors", as_tensors),
        "optimizer": optimizer_from_files(read("optimizer.safetensors", as_tensors), read("optimizer.json", as_json)),
        "scheduler": read("scheduler.json", as_json),
        "rng": read("rng.safetensors", as_tensors),
        "extra": read("extra.json", as_json) if (path / "extra.json").is_file() else {},
    }
