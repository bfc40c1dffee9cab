"""Uploading a finished run to the Hugging Face Hub.

The token is passed straight to huggingface_hub and never printed or written. A failed
upload (offline, bad token) raises a clear error and leaves the output folder untouched.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


class HubPushError(UserError):
    pass


# what a run folder holds only to resume or to train faster: checkpoints, logs, the encoded cache,
# a streamed data set's local copy, profiler traces, hidden temporary files
RUN_UPLOAD_IGNORE = ["checkpoints/*", "logs/*", "encoded-cache/*", "stream-cache/*", "profile/*", ".*"]


def ensure_repo(folder: Path, repo_id: str | None, token: str | None) -> str:
    """Create (or find) the Hub repo before training, as diffusers' scripts do, so that a bad token, a name that
    is not yours (or no name: ``a/b/c``), or no network stops the run at its start, before any model loads
    (``api.check_before_loading``), not after hours of training."""
    from huggingface_hub import HfApi

    repo_id = repo_id or Path(folder).resolve().name
    try:
        return HfApi(token=token).create_repo(repo_id, exist_ok=True).repo_id
    except Exception as e:
        msg = str(e).replace(token, "***") if token else str(e)
        raise HubPushError(
            f"--push_to_hub: the Hub repo '{repo_id}' cannot be created or reached ({type(e).__name__}: "
            f"{msg.strip().splitlines()[0] if msg.strip() else 'no message'}), so nothing was trained. Check "
            "--hub_token (or `huggingface-cli login`), --hub_model_id and the network; or train without "
            f"--push_to_hub and upload later with `huggingface-cli upload {repo_id} {folder}`."
        ) from None


def push_folder(folder: Path, repo_id: str | None, token: str | None, ignore: list[str] | None = None) -> str:
    from huggingface_hub import HfApi

    repo_id = repo_id or folder.resolve().name
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=ignore or [])
    except Exception as e:  # network, auth, offline mode: all end the same way for the user
        msg = str(e)
        if token:
            msg = msg.replace(token, "***")
        raise HubPushError(
            f"--push_to_hub to '{repo_id}' failed ({type(e).__name__}: {msg}). Everything is still in {folder}; "
            f"upload it later with `huggingface-cli upload {repo_id} {folder}`."
        ) from None
    return str(getattr(info, "commit_url", info))
