"""A model given by Hub id whose files are all in the Hugging Face cache loads offline, as diffusers loads it:
transformers' own look-up by id asked for a tokenizer/config.json no SD repository has, and offline that failed
unless the cache happened to note its absence (one filled by diffusers or `huggingface-cli download` does not)."""

from __future__ import annotations

import hashlib
import shutil

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(hub, repo_id: str, folder, skip: tuple[str, ...] = ()):
    """``folder`` as huggingface_hub caches repository ``repo_id`` at main: blobs, and links to them in a
    snapshot (no note of files the repository lacks); ``skip``: files left out, as an interrupted download."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel in skip:
            continue
        blob = repo / "blobs" / hashlib.sha256(rel.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = repo / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (huggingface_hub reads its cache folder at import: patched there)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_model_loads_offline_as_a_local_folder(hub, tiny_model_dir, tiny_base, tmp_path):
    import torch

    from difftune.models import load_base_model, load_controlnet, load_tokenizer, load_vae, training_resolution

    _cache(hub, "me/tiny", tiny_model_dir)
    _cache(hub, "me/vae", tiny_model_dir / "vae")
    _cache(hub, "me/tok", tiny_model_dir / "tokenizer")
    base = load_base_model("me/tiny", revision="main", tokenizer_name="me/tok", vae_name_or_path="me/vae")
    assert base.source == "me/tiny" and base.tokenizer("a circle").input_ids == tiny_base.tokenizer("a circle").input_ids
    assert torch.equal(base.unet.conv_in.weight, tiny_base.unet.conv_in.weight)
    assert type(load_vae("me/tiny")).__name__ == "AutoencoderKL"  # a model's vae/, as from a folder
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(tiny_base.unet).save_pretrained(tmp_path / "cn")
    _cache(hub, "me/cn", tmp_path / "cn")
    assert load_controlnet("me/cn", unet=base.unet) is not None
    # data check reads the same cache: the tokenizer, and the base's own size as the default resolution
    assert load_tokenizer("me/tiny") is not None and training_resolution("me/tiny") == tiny_base.native_resolution


def test_a_cached_hub_sdxl_model_loads_offline(hub, tmp_path):
    from difftune.models import load_base_model
    from difftune.tiny import save_tiny_sdxl_model

    _cache(hub, "me/tiny-xl", save_tiny_sdxl_model(tmp_path / "xl", seed=0))
    base = load_base_model("me/tiny-xl")
    assert base.family == "sdxl" and base.tokenizer_2 is not None and base.source == "me/tiny-xl"


def test_a_partly_cached_or_uncached_hub_model_is_refused_offline_saying_why(hub, tiny_model_dir):
    from difftune.errors import ModelLoadError
    from difftune.models import load_base_model, training_resolution

    _cache(hub, "me/half", tiny_model_dir, skip=("unet/diffusion_pytorch_model.safetensors",))
    with pytest.raises(ModelLoadError, match=r"'me/half' is only partly in the Hugging Face cache .*: it lacks "
                                             r"unet/\*\.safetensors, and HF_HUB_OFFLINE is set"):
        load_base_model("me/half")
    with pytest.raises(ModelLoadError, match="Could not load 'me/absent': .*HF_HUB_OFFLINE is set"):
        load_base_model("me/absent")
    with pytest.raises(ModelLoadError, match="Could not load 'me/absent': .*HF_HUB_OFFLINE is set"):
        training_resolution("me/absent")  # (was a raw LocalEntryNotFoundError)


def test_data_check_refuses_a_base_it_cannot_read_instead_of_assuming_its_size(hub, fill_dir, tiny_model_dir,
                                                                               tmp_path, capsys):
    """An uncached Hub id offline crashed with a traceback; a folder without unet/ was checked at 512, "the training
    default" for it, and said "ready to train"."""
    from difftune.cli import main

    assert main(["data", "check", "--train_data_dir", str(fill_dir), "--pretrained_model_name_or_path",
                 "me/absent"]) == 2
    assert "Could not load 'me/absent'" in capsys.readouterr().err
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    for resolution in ([], ["--resolution", "64"]):  # training could not load it either way
        assert main(["data", "check", "--train_data_dir", str(fill_dir), "--pretrained_model_name_or_path",
                     str(broken), *resolution]) == 2
        err = capsys.readouterr().err
        assert "the UNet's config" in err and "(it is missing)" in err and "ready to train" not in err
    (broken / "unet").mkdir()
    (broken / "unet" / "config.json").write_text("{not json")
    assert main(["data", "check", "--train_data_dir", str(fill_dir), "--pretrained_model_name_or_path",
                 str(broken)]) == 2
    assert "cannot be read (JSONDecodeError" in capsys.readouterr().err
