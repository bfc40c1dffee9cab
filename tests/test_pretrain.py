"""`difftune pretrain-base`: the command that builds the bundled base makes a loadable diffusers model."""

from __future__ import annotations

import pytest

from difftune.errors import UserError


def test_pretrain_base_with_16x16_latents_builds_a_loadable_model_and_guards_its_vae(tmp_path, caplog):
    import json
    import logging

    from difftune.models import load_base_model
    from difftune.pipelines import text2image_pipeline
    from difftune.pretrain import pretrain_base

    out = tmp_path / "base"
    model = pretrain_base(out, n_images=64, vae_steps=2, unet_steps=2, stop_at_step=None, latent_downsample=4)
    base = load_base_model(str(model))
    assert base.vae_scale_factor == 4 and base.native_resolution == 64
    image = text2image_pipeline(base)("red circle with blue background", num_inference_steps=2, height=64, width=64,
                                      output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert json.loads((model / "difftune_pretrain.json").read_text())["step"] == 2
    # a second run reuses out/vae, so asking it for another VAE must stop, naming the flags, not mix the two
    with pytest.raises(UserError, match=r"vae was trained with --latent_downsample 4 \(this run: 8\).*new --out"):
        pretrain_base(out, n_images=64, vae_steps=2, unet_steps=2, stop_at_step=None, latent_downsample=8)
    with pytest.raises(UserError, match=r"--latent_channels 4 \(this run: 8\)"):
        pretrain_base(out, n_images=64, vae_steps=2, unet_steps=2, stop_at_step=None, latent_channels=8)
    with pytest.raises(UserError, match=r"--vae_steps 2 \(this run: 8\)"):
        pretrain_base(out, n_images=64, vae_steps=8, unet_steps=2)
    with pytest.raises(UserError, match=r"--n_images 64 \(this run: 128\), --world standard \(this run: wide\), "
                                        r"--seed 0 \(this run: 1\)"):
        pretrain_base(out, n_images=128, vae_steps=2, unet_steps=2, seed=1, world="wide")
    with pytest.raises(UserError, match=r"model was trained with --unet_steps 2 \(this run: 3\)"):  # the UNet too
        pretrain_base(out, n_images=64, vae_steps=2, unet_steps=3)
    # the same command again: already complete, nothing retrained
    log = (out / "pretrain_log.jsonl").read_text()
    with caplog.at_level(logging.INFO, logger="difftune"):
        assert pretrain_base(out, n_images=64, vae_steps=2, unet_steps=2) == model
        assert pretrain_base(out, n_images=64, vae_steps=2, unet_steps=0) == out / "vae"  # its VAE stage alone
    assert (out / "pretrain_log.jsonl").read_text() == log
    assert "already complete" in caplog.text and "already trained" in caplog.text


def test_wider_latents_reach_the_unet_and_a_controlnet_trained_on_them(tmp_path, fill_dir):
    """--latent_channels 8: the VAE, the UNet's input and output, the pipelines and a ControlNet all follow."""
    from conftest import make_config
    from difftune.api import train_controlnet
    from difftune.models import load_base_model
    from difftune.pretrain import pretrain_base

    model = pretrain_base(tmp_path / "base", n_images=32, vae_steps=1, unet_steps=1, unet_batch=8, latent_channels=8)
    base = load_base_model(str(model))
    assert base.latent_channels == 8 == base.unet.config.in_channels == base.unet.config.out_channels
    cfg = make_config(model, fill_dir, tmp_path / "cn", max_train_steps=1)
    assert train_controlnet(cfg)["global_step"] == 1


def test_wide_world_adds_fill50k_geometry_and_keeps_the_standard_half():
    from difftune.data.fill50k import radius_range
    from difftune.data.shapes import sample_shapes
    from difftune.pretrain import RESOLUTION, world_samples

    standard = world_samples(400, seed=3, world="standard")
    assert standard == sample_shapes(400, RESOLUTION, 3)  # what shipped is unchanged
    assert all(s.size <= s.cx <= RESOLUTION - s.size for s in standard)
    wide = world_samples(400, seed=3, world="wide")
    assert wide[:200] == standard[:200]
    extra = wide[200:]
    cut = [s for s in extra if min(s.cx, s.cy) < s.size or max(s.cx, s.cy) > RESOLUTION - s.size]
    assert len(cut) > 50  # cut by the border, as fill50k's circles are
    assert min(s.size for s in extra) < radius_range(RESOLUTION)[0] + 1  # down to fill50k's smallest circle
    with pytest.raises(UserError, match="world"):
        world_samples(4, seed=0, world="round")


def test_pretrain_refuses_a_gpu_it_cannot_see(tmp_path, monkeypatch):
    import torch

    from difftune.pretrain import pretrain_base, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UserError, match="--device cpu"):
        pretrain_base(tmp_path / "b", n_images=8, vae_steps=1, unet_steps=1, vae_batch=4, unet_batch=4, device="cuda")
    assert not (tmp_path / "b").exists()  # a failed start leaves no empty --out behind


KW = dict(n_images=16, vae_steps=4, unet_steps=4, vae_batch=4, unet_batch=4, checkpointing_steps=2, device="cpu")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The model of an uninterrupted run with ``KW``, which killed and stopped runs must reproduce exactly."""
    from difftune.pretrain import pretrain_base

    return pretrain_base(tmp_path_factory.mktemp("whole") / "out", **KW)


def assert_same_weights(a, b) -> None:
    import torch
    from safetensors.torch import load_file

    for part in ("vae", "unet", "text_encoder"):
        (fa,) = (a / part).glob("*.safetensors")
        (fb,) = (b / part).glob("*.safetensors")
        wa, wb = load_file(str(fa)), load_file(str(fb))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), part


def test_a_killed_pretraining_resumes_and_trains_what_the_uninterrupted_run_does(tmp_path, monkeypatch, whole):
    """Each stage checkpoints every --checkpointing_steps; the same command run again continues
    from the newest checkpoint and ends with exactly the uninterrupted run's weights."""
    from difftune import pretrain

    kw = KW
    assert not (whole.parent / "checkpoints-vae").exists()  # a finished stage leaves none behind

    class Killed(Exception):
        pass

    save = pretrain.StageCheckpoints.save

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(pretrain.StageCheckpoints, "save", save_then_die)
    out = tmp_path / "killed"
    with pytest.raises(Killed):  # killed in the VAE stage, just after its step-2 checkpoint
        pretrain.pretrain_base(out, **kw)
    assert (out / "checkpoints-vae" / "checkpoint-2").is_dir() and not (out / "vae").exists()
    with pytest.raises(UserError, match="another run .*differs in: --vae_steps.*delete"):  # never mixed with another run
        pretrain.pretrain_base(out, **{**kw, "vae_steps": 6})
    with pytest.raises(Killed):  # resumes the VAE at step 3, finishes it, is killed in the UNet stage
        pretrain.pretrain_base(out, **kw)
    assert (out / "vae" / "config.json").is_file() and not (out / "checkpoints-vae").exists()
    assert (out / "checkpoints-unet" / "checkpoint-2").is_dir()
    monkeypatch.setattr(pretrain.StageCheckpoints, "save", save)
    resumed = pretrain.pretrain_base(out, **kw)
    assert_same_weights(whole, resumed)
    log = (out / "pretrain_log.jsonl").read_text()
    assert '"resumed_after": 2' in log
    for stage in ("checkpoints-vae", "checkpoints-unet"):  # as a run killed right after an export leaves them
        (out / stage / "checkpoint-2").mkdir(parents=True)
    assert pretrain.pretrain_base(out, **kw) == resumed  # finished: nothing trained, and they are removed
    assert not (out / "checkpoints-vae").exists() and not (out / "checkpoints-unet").exists()


def test_latent_downsample_2_gives_32x32_latents_the_unet_takes():
    """The 32x32-latent experiment's configs: the VAE halves 64 px once, and the UNet maps such latents to their shape."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from difftune.pretrain import RESOLUTION, architecture

    vae_config, unet_config = architecture(2)
    vae = AutoencoderKL(**vae_config)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, RESOLUTION, RESOLUTION)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32)
    unet = UNet2DConditionModel(**unet_config)
    with torch.no_grad():
        out = unet(latents, 10, encoder_hidden_states=torch.zeros(1, 3, unet_config["cross_attention_dim"])).sample
    assert out.shape == latents.shape
    with pytest.raises(UserError, match="2, 4 or 8"):
        architecture(16)


def test_the_vae_schedule_takes_every_step_count():
    """OneCycleLR divided by zero at 20 VAE steps (a one-step warm-up); every count builds and runs now."""
    import math

    import torch

    from difftune.pretrain import one_cycle_pct_start, vae_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    for steps in range(1, 3001):
        opt = torch.optim.AdamW([param], lr=1e-3)
        sched = vae_schedule(opt, 1e-3, steps)
        if steps <= 60:  # the short runs, step by step to the end
            for _ in range(steps):
                opt.step()
                sched.step()
                assert math.isfinite(sched.get_last_lr()[0]) and sched.get_last_lr()[0] > 0, steps
    assert one_cycle_pct_start(1500) == 0.05  # what shipped is unchanged


def test_stop_at_step_exports_there_and_a_later_run_continues_to_the_uninterrupted_model(tmp_path, whole, caplog):
    """--stop_at_step 3 (no export or checkpointing step): the model at step 3, a checkpoint there,
    and the same flags without it train on to exactly the uninterrupted run's model."""
    import json
    import logging

    from difftune.pretrain import pretrain_base

    out = tmp_path / "stopped"
    with caplog.at_level(logging.INFO, logger="difftune"):
        model = pretrain_base(out, **KW, stop_at_step=3)
    assert json.loads((model / "difftune_pretrain.json").read_text())["step"] == 3
    assert [p.name for p in (out / "checkpoints-unet").glob("checkpoint-*")] == ["checkpoint-3"]
    assert "vae step 4/4: mse" in caplog.text and "unet step 3/4: loss" in caplog.text  # progress as it goes
    log = (out / "pretrain_log.jsonl").read_text()
    assert pretrain_base(out, **KW, stop_at_step=3) == model  # there already: nothing trained
    assert (out / "pretrain_log.jsonl").read_text() == log
    with pytest.raises(UserError, match="at UNet step 3, past --stop_at_step 2.*new --out"):
        pretrain_base(out, **KW, stop_at_step=2)
    assert pretrain_base(out, **KW) == model
    assert '"resumed_after": 3' in (out / "pretrain_log.jsonl").read_text()
    assert json.loads((model / "difftune_pretrain.json").read_text())["step"] == 4
    assert_same_weights(whole, model)
    assert not (out / "checkpoints-unet").exists()


def test_impossible_sizes_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from difftune import pretrain_run
    from difftune.cli import main
    from difftune.pretrain import pretrain_base

    out = tmp_path / "b"
    with pytest.raises(UserError, match="--vae_batch 100000000 is more than --n_images 64"):
        pretrain_base(out, n_images=64, vae_batch=100_000_000)
    with pytest.raises(UserError, match=r"--n_images 100000000000 needs about \d+ PB of memory.*lower --n_images"):
        pretrain_base(out, n_images=100_000_000_000)
    monkeypatch.setattr(pretrain_run, "available_memory", lambda: 10_000_000)
    with pytest.raises(UserError, match=r"--n_images 20000 needs about \d+ MB .* 10 MB is available"):
        pretrain_base(out)
    with pytest.raises(UserError, match="--stop_at_step 5 is not a UNet step"):
        pretrain_base(out, n_images=64, unet_steps=4, stop_at_step=5)
    assert main(["pretrain-base", "--out", str(out), "--n_images", "64", "--unet_batch", "65"]) == 2
    assert "error: --unet_batch 65 is more than --n_images 64" in capsys.readouterr().err
    assert not out.exists()  # none of them left an empty --out behind


def test_a_vae_only_run_says_it_built_no_model(tmp_path, caplog):
    import logging

    from difftune.pretrain import pretrain_base

    out = tmp_path / "v"
    with caplog.at_level(logging.INFO, logger="difftune"):
        assert pretrain_base(out, n_images=8, vae_steps=1, vae_batch=4, unet_steps=0, device="cpu") == out / "vae"
    assert (out / "vae" / "difftune_pretrain.json").is_file() and not (out / "model").exists()
    assert "only the VAE was trained" in caplog.text and "holds no model" in caplog.text
