"""A model given as a Hub id, read from the Hugging Face cache as a local folder is.

transformers' and diffusers' own look-ups by id ask for files a repository never had (a tokenizer's
``config.json``): offline, a cache filled by diffusers or ``huggingface-cli download`` fails those look-ups
unless the cache also notes their absence. A snapshot that holds every part a load reads is therefore read
as a local folder (the same checks, the same variant choice); only what it lacks is fetched, online.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError
from .model_folders import variant_of

BASE_FOLDER_ADVICE = ("Give --pretrained_model_name_or_path a local diffusers-layout folder (with model_index.json, "
                      "unet/, vae/, text_encoder/, tokenizer/, scheduler/).")


def offline() -> bool:
    """HF_HUB_OFFLINE is set (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name``: anything else that is not a local folder can only be a mistyped path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def hub_hint(name: str, err: Exception, advice: str = BASE_FOLDER_ADVICE) -> ModelLoadError:
    """Why a name that is no local folder could not come from the Hub; ``advice`` says what to pass instead
    (a base model's layout by default: a ControlNet's is another)."""
    why = ("HF_HUB_OFFLINE is set; unset it to download" if offline() else
           "no network or no such repository; with HF_HUB_OFFLINE=1 a machine without network fails at once "
           "instead of after the hub's retries, and uses what is in the Hugging Face cache")
    return ModelLoadError(
        f"Could not load '{name}': it is not a local folder, and it could not be fetched from the "
        f"Hugging Face Hub ({why}). {advice} Underlying error: {type(err).__name__}: {err}"
    )


def hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None, probe: str = "model_index.json",
                 advice: str = BASE_FOLDER_ADVICE) -> Path | None:
    """The Hugging Face cache's folder of a Hub repository at ``revision``, found through its root file ``probe``.

    Online, ``probe`` is fetched (one small request, which also tells which commit the revision is at now);
    offline, or without network, it comes from the cache. A repository without ``probe`` gives its cached
    snapshot, if any, else None. The folder may hold only some of the repository's files: what a caller
    needs is checked with ``cache_lacks``. A repository neither reachable nor cached is refused (``hub_hint``).
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, IncompleteSnapshotError, RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, probe, revision=revision, cache_dir=cache_dir)).parent
    except EntryNotFoundError as e:
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except IncompleteSnapshotError as partial:  # (files the caller does not need may be missing)
            return Path(partial.snapshot_path)
        except Exception:  # noqa: BLE001 — not cached
            if isinstance(e, RemoteEntryNotFoundError):
                return None
            raise hub_hint(repo_id, e, advice) from None
    except Exception as e:  # noqa: BLE001 — the hub's errors have no common base
        raise hub_hint(repo_id, e, advice) from None


def _has_weights(folder: Path, variant: str | None) -> bool:
    """Safetensors weights (of ``variant``, where given) are there, every shard an index names included.
    (``is_file`` follows the cache's links to its blobs: a link whose blob is gone is no file.)"""
    import json

    files = [p for p in folder.glob("*.safetensors") if p.is_file()]
    if variant is not None:
        files = [p for p in files if variant_of(p.name) == variant]
    for index in folder.glob("*.safetensors.index*.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if not all((folder / shard).is_file() for shard in shards):
            return False
    return bool(files)


def cache_lacks(folder: Path, parts: tuple[str, ...], variant: str | None = None, kind: str | None = None) -> list[str]:
    """What a cached Hub snapshot lacks of ``parts`` (sub-folders, or "." for the folder itself): a tokenizer's
    config and vocabulary, a scheduler's config, a model's config and safetensors (of ``variant``, where given).
    A part's kind is told by its name (tokenizer_2 is a tokenizer), or by ``kind``."""
    missing = []
    for part in parts:
        sub = folder / part
        what = kind or ("tokenizer" if part.startswith("tokenizer") else "scheduler" if part == "scheduler" else "model")
        config = sub / {"tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}.get(what, "config.json")
        if not config.is_file():
            missing.append(str(config.relative_to(folder)))
        if what == "tokenizer" and not any((sub / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            missing.append(str((sub / "vocab.json").relative_to(folder)))
        if what == "model" and not _has_weights(sub, variant):
            missing.append(str((sub / f"*{'.' + variant if variant else ''}.safetensors").relative_to(folder)))
    return missing


def complete_snapshot(hub_id: str, snapshot: Path, parts: tuple[str, ...], variant: str | None = None,
                      kind: str | None = None) -> Path | None:
    """``snapshot`` where it holds every part a load reads, to be read as a local folder. Else, online, None: the
    id is loaded, and the libraries download what is missing; offline, an error that names what the cache lacks."""
    if not cache_lacks(snapshot, parts, None if offline() else variant, kind):
        return snapshot
    if not offline():
        return None
    lacks = cache_lacks(snapshot, parts, kind=kind)
    if not lacks:  # only --variant's files are missing: the cached weights are read, as from a local folder
        return snapshot
    raise ModelLoadError(f"'{hub_id}' is only partly in the Hugging Face cache ({snapshot}): it lacks "
                         f"{', '.join(lacks)}, and HF_HUB_OFFLINE is set. Unset it (with network) to download the "
                         "rest, or give a local folder.")


def cached_folder(name: str, revision: str | None, cache_dir: str | None, probe: str, advice: str,
                  kind: str | None = None, parts: tuple[str, ...] | None = None) -> Path:
    """A model (or its ``parts``), VAE, ControlNet or tokenizer given as a local folder or a Hub id: the folder to
    read it from (for an id, its cached snapshot where that holds it), else the id as a path that does not exist
    (the libraries fetch it). Without ``parts``: the snapshot's root, or its vae/ where ``probe`` is there only."""
    local = Path(name).expanduser()
    if local.exists() or not looks_like_hub_id(name):
        return local
    snapshot = hub_snapshot(name, revision, cache_dir, probe, advice)
    if snapshot is None:
        return local
    if parts is None:
        parts = ("vae",) if not (snapshot / probe).is_file() and (snapshot / "vae" / probe).is_file() else (".",)
    return snapshot if complete_snapshot(name, snapshot, parts, kind=kind) else local
