"""What a run writes loads in diffusers itself and samples the same images."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_config


@pytest.fixture(scope="module")
def trained(tiny_model_dir, fill_dir, tmp_path_factory):
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.trainer import Trainer
    from difftune.api import resolve_seed

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = resolve_seed(make_config(tiny_model_dir, fill_dir, out, max_train_steps=3))
    method = ControlNetMethod(cfg)
    Trainer(method, cfg).fit()
    return method, out


def test_export_loads_in_diffusers_and_samples_like_in_memory(trained, tiny_model_dir, fill_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    method, out = trained
    loaded = ControlNetModel.from_pretrained(out)
    for k, v in method.controlnet.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # training changed the weights (the zero convolutions are no longer zero)
    assert torch.count_nonzero(loaded.controlnet_mid_block.weight) > 0

    cond = Image.open(fill_dir / "validation" / "conditioning_0.png").convert("RGB")
    prompt = "red circle with blue background"
    ours = method.sample([prompt], [cond], num_images=1, seed=5, steps=3)[0][0]

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_model_dir, controlnet=loaded, safety_checker=None)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt, image=cond, num_inference_steps=3, height=64, width=64,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_written_weights_get_the_permissions_of_the_umask(trained, tmp_path):
    """safetensors 0.8 creates files 0o600 whatever the umask; exports and checkpoints must not."""
    import os
    import stat

    from difftune.checkpoint import TrainState, save_checkpoint

    method, _ = trained
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    old = os.umask(0o027)
    try:
        written = method.export(tmp_path / "export")
        ckpt = save_checkpoint(tmp_path / "ckpts", TrainState(global_step=1), {"w": torch.ones(2)}, opt.state_dict(),
                               {}, torch.Generator())
    finally:
        os.umask(old)
    files = [*written, *ckpt.iterdir(), tmp_path / "ckpts" / "latest"]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}


def test_generate_cli_is_repeatable(trained, tiny_model_dir, fill_dir, tmp_path):
    from difftune.cli import main

    _, out = trained
    cond = fill_dir / "validation" / "conditioning_1.png"
    args = ["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(out),
            "--image", str(cond), "--prompt", "red circle with blue background", "--num_inference_steps", "3",
            "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    assert main(args[:-1] + ["8", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{x}.png")) for x in "abc")
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_checkpoint_loads_for_inference_as_it_is(trained, tiny_model_dir, fill_dir, tmp_path, capsys):
    import os

    from diffusers import ControlNetModel

    from difftune.cli import main

    method, out = trained
    ckpt = out / "checkpoints" / "checkpoint-3"  # the last step: the same weights as the export
    loaded = ControlNetModel.from_pretrained(ckpt)
    for k, v in method.controlnet.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # diffusers' file name is the checkpoint's own weights, not a second copy of them
    assert os.stat(ckpt / "diffusion_pytorch_model.safetensors").st_ino == os.stat(ckpt / "trainable.safetensors").st_ino
    cond = fill_dir / "validation" / "conditioning_1.png"
    args = ["generate", "--image", str(cond), "--prompt", "red circle with blue background", "--num_inference_steps", "2"]
    # no --pretrained_model_name_or_path: the base the run recorded (for a checkpoint, its run's)
    assert main(args + ["--controlnet", str(ckpt), "--out", str(tmp_path / "ckpt.png")]) == 0
    assert f"base model: {tiny_model_dir} (recorded in {ckpt / 'difftune_config.json'}" in capsys.readouterr().err
    assert main(args + ["--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(out),
                        "--out", str(tmp_path / "export.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")) for x in ("ckpt", "export"))
    assert np.array_equal(a, b)


def test_a_non_square_condition_is_sampled_at_its_own_aspect(trained, tiny_model_dir, fill_dir, tmp_path):
    from difftune.cli import main

    _, out = trained
    tall = tmp_path / "tall.png"
    Image.open(fill_dir / "validation" / "conditioning_1.png").convert("RGB").resize((64, 96)).save(tall)
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(out),
                 "--image", str(tall), "--prompt", "red circle", "--num_inference_steps", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (64, 96)  # not stretched into a 64x64 square
    from difftune.pipelines import output_size

    assert output_size(Image.new("RGB", (2000, 40)), 64) == (64, 3200)  # a strip keeps its shape (and is warned about)
    assert output_size(Image.new("RGB", (40, 100)), 64) == (160, 64)


def test_many_images_are_made_a_few_at_a_time_each_from_its_own_seed(trained, tiny_model_dir, fill_dir, tmp_path,
                                                                      capsys):
    """--num_images 100000 ran as one batch: memory grew without bound, nothing was saved, Ctrl-C did not stop
    it. Now four per call, each saved as it is made; image i is seed + i's, so it does not depend on how many
    were asked for (up to a level of rounding from batching)."""
    from difftune.cli import main

    _, out = trained
    args = ["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(out), "--image",
            str(fill_dir / "validation" / "conditioning_1.png"), "--prompt", "red circle", "--num_inference_steps", "2"]
    assert main([*args, "--num_images", "5", "--seed", "3", "--out", str(tmp_path / "m.png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"m-{i}.png") for i in range(5)]
    for seed, i in ((3, 0), (4, 1), (7, 4)):
        assert main([*args, "--seed", str(seed), "--out", str(tmp_path / f"one-{seed}.png")]) == 0
        one, of_five = (np.asarray(Image.open(tmp_path / name), dtype=int) for name in (f"one-{seed}.png", f"m-{i}.png"))
        assert np.abs(one - of_five).max() <= 2


def test_generate_missing_image_is_a_clear_error(trained, tiny_model_dir, tmp_path, capsys):
    from difftune.cli import main

    _, out = trained
    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(out),
                 "--image", str(tmp_path / "nope.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "nope.png does not exist" in capsys.readouterr().err


def test_generate_refuses_a_condition_setting_it_would_ignore(trained, tiny_model_dir, tmp_path, capsys):
    from difftune.cli import main

    _, out = trained
    image = tmp_path / "c.png"
    Image.new("RGB", (64, 64)).save(image)
    base = ["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(out),
            "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert main([*base, "--low_threshold", "50"]) == 2  # no --condition: the image is used as it is
    assert "--low_threshold is a canny setting, but this command computes no --condition" in capsys.readouterr().err
    assert main([*base, "--condition", "depth", "--high_threshold", "50"]) == 2
    assert "computes --condition depth" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def _unet_calls_during(pipe, mode, guidance_scale, cond, prompt):
    """(encoder_hidden_states, residuals) of each UNet call while ``pipe`` samples under ``mode``."""
    from difftune.pipelines import controlnet_in_guidance

    calls = []

    def spy(module, args, kwargs):
        residuals = [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]]
        calls.append((kwargs["encoder_hidden_states"].clone(), [r.clone() for r in residuals]))

    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with controlnet_in_guidance(pipe, mode):
            image = pipe(prompt, image=cond, num_inference_steps=2, height=64, width=64, output_type="np",
                         guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        handle.remove()
    return calls, image


def test_cond_control_guidance_gives_the_controlnet_to_the_prompted_half_only(trained, fill_dir):
    """--control_guidance cond: in each guided UNet call, the rows that carry the empty prompt get no
    residuals and the rows that carry the prompt get the ControlNet's; `both` gives them to all rows;
    without guidance the two modes sample the same image; the hook is gone after sampling."""
    from difftune.pipelines import controlnet_pipeline

    method, _ = trained
    pipe = controlnet_pipeline(method.base, method.controlnet)
    cond = Image.open(fill_dir / "validation" / "conditioning_0.png").convert("RGB")
    prompt = "red circle with blue background"
    empty = pipe.encode_prompt("", "cpu", 1, False)[0][0]
    prompted = pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]

    calls, cond_image = _unet_calls_during(pipe, "cond", 7.5, cond, prompt)
    assert len(calls) == 2
    for hidden, residuals in calls:
        assert hidden.shape[0] == 2
        rows = {i: "empty" if torch.equal(hidden[i], empty) else "prompt" for i in range(2)}
        assert sorted(rows.values()) == ["empty", "prompt"] and torch.equal(hidden[[*rows.values()].index("prompt")],
                                                                               prompted)
        for i, kind in rows.items():
            sizes = [float(r[i].abs().sum()) for r in residuals]
            assert (all(s == 0 for s in sizes) if kind == "empty" else all(s > 0 for s in sizes)), (kind, sizes)

    calls, both_image = _unet_calls_during(pipe, "both", 7.5, cond, prompt)
    assert all(float(r[i].abs().sum()) > 0 for _, residuals in calls for r in residuals for i in range(2))
    assert not np.array_equal(cond_image, both_image)

    _, a = _unet_calls_during(pipe, "cond", 1.0, cond, prompt)
    _, b = _unet_calls_during(pipe, "both", 1.0, cond, prompt)
    assert np.array_equal(a, b)

    side = 64 // method.base.vae_scale_factor
    sample = torch.randn(2, method.controlnet.config.in_channels, side, side)
    with torch.no_grad():
        down, mid = method.controlnet(sample, torch.tensor([10, 10]), encoder_hidden_states=torch.stack([empty, prompted]),
                                      controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
    assert float(mid[0].abs().sum()) > 0  # no hook left behind on the trained module


def test_control_guidance_is_checked_before_loading_anything(tmp_path):
    from difftune.api import generate
    from difftune.errors import ConfigError, UserError

    with pytest.raises(ConfigError, match="--control_guidance 'uncond' is not one of both, cond"):
        generate(str(tmp_path / "no-model"), str(tmp_path / "no-cn"), None, "x", control_guidance="uncond")
    with pytest.raises(UserError, match="it needs --controlnet"):
        generate(str(tmp_path / "no-model"), None, None, "x", custom_diffusion=str(tmp_path), control_guidance="cond")


def test_validation_samples_with_the_configured_control_guidance(trained, fill_dir):
    import dataclasses

    from difftune.pipelines import controlnet_pipeline, run_controlnet_pipeline

    method, _ = trained
    cond = Image.open(fill_dir / "validation" / "conditioning_0.png").convert("RGB")
    prompt = "red circle with blue background"
    original = method.cfg
    try:
        method.cfg = dataclasses.replace(
            original, validation=dataclasses.replace(original.validation, validation_control_guidance="cond"))
        ours = np.asarray(method.sample([prompt], [cond], num_images=1, seed=4, steps=2)[0][0])
    finally:
        method.cfg = original
    pipe = controlnet_pipeline(method.base, method.controlnet)
    cond_ref, both_ref = (np.asarray(run_controlnet_pipeline(pipe, [prompt], [cond], 1, 4, 2, 64, control_guidance=m)[0][0])
                          for m in ("cond", "both"))
    assert np.array_equal(ours, cond_ref) and not np.array_equal(ours, both_ref)


@pytest.mark.parametrize("extra, message", [
    (["--out", "g10.txt"], "--out {tmp}/g10.txt: PIL cannot write RGB images as '.txt'; end the file name with .png"),
    (["--out", "g10"], "--out {tmp}/g10: it has no extension"),
    (["--resolution", "60", "--out", "g.png"], "--resolution 60 is not divisible by 8"),
    (["--controlnet", "nope_cn", "--out", "g.png"], "--controlnet nope_cn does not exist; give a ControlNet folder"),
    (["--image", "missing.png", "--out", "g.png"], "--image missing.png does not exist"),
])
def test_generate_arguments_are_checked_before_anything_is_generated(extra, message, tmp_path, capsys):
    """Checked before the base model loads (it does not exist here: a load would fail first), so no image is
    generated to be lost to an unwritable --out, and no 60 px request silently gives 56 px."""
    from difftune.cli import main

    cn = tmp_path / "cn"
    cn.mkdir()
    (cn / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    argv = ["generate", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--controlnet", str(cn),
            "--image", str(tmp_path / "c.png"), "--prompt", "x", "--num_inference_steps", "1"]
    extra = [str(tmp_path / v) if i and extra[i - 1] == "--out" else v for i, v in enumerate(extra)]
    err_code = main(argv + extra)
    err = capsys.readouterr().err
    assert err_code == 2 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err
    assert not list(tmp_path.glob("g*"))


def test_generate_resolution_must_fit_the_base_vae():
    from difftune.api import _check_latent_multiple
    from difftune.errors import ConfigError

    _check_latent_multiple(64, 8)
    with pytest.raises(ConfigError, match="--resolution 72 is not a multiple of 16, the base model's VAE scale "
                                          "factor: use 64 or 80"):
        _check_latent_multiple(72, 16)


def test_the_model_cards_code_runs_for_the_built_in_base(fill_dir, tmp_path):
    """"tiny-shapes" is no Hub id: the card's snippet finds the base inside difftune and loads in diffusers."""
    import re

    from difftune.api import train_controlnet
    from conftest import make_config

    out = tmp_path / "cn"
    train_controlnet(make_config("tiny-shapes", fill_dir, out, max_train_steps=1))
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert "resolve_builtin(\"tiny-shapes\")" in code
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own example, as a user would paste it
    assert scope["pipe"].unet.config.sample_size * 4 == 64 and scope["pipe"].controlnet is not None


def test_generate_from_python_checks_its_arguments_like_the_cli(tmp_path):
    from difftune.api import generate
    from difftune.errors import ConfigError

    bad = [(dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),  # decoded noise
           (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
           (dict(num_images=0), "num_images must be an integer >= 1, got 0"),  # a reshape error
           (dict(guidance_scale="7"), "guidance_scale must be a finite number, got '7'"),
           (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),  # black images
           (dict(seed=-1), "seed must be >= 0"),
           (dict(pretrained_model_name_or_path="red circle with blue background", prompt=None),
            "the first argument is the base model; pass the prompt as prompt="),
           (dict(prompt=["a", "b"]), "prompt must be a string"),
           (dict(image=None), "a ControlNet needs a conditioning image")]
    for change, message in bad:  # all refused before any model loads (the folders do not exist)
        kw = {"pretrained_model_name_or_path": str(tmp_path / "no-model"), "controlnet": str(tmp_path / "no-cn"),
              "image": str(tmp_path / "c.png"), "prompt": "x", **change}
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            generate(**kw)


def test_generate_refuses_a_bad_condition_or_device_before_any_warning_or_model(tmp_path, caplog, monkeypatch):
    """From Python: an unknown condition, a setting its detector does not take or a device torch cannot use was
    said only after the base had loaded (a raw TypeError or torch's RuntimeError; 'sobel' after the warning that
    the ControlNet was trained on canny). Here the base does not exist: a load would fail first."""
    import json
    import logging

    from difftune.api import generate
    from difftune.errors import ConfigError

    data, run = tmp_path / "edges", tmp_path / "cn"  # a ControlNet run that trained on canny conditions
    data.mkdir()
    (data / "difftune_dataset.json").write_text(json.dumps({"kind": "conditions", "condition": "canny"}))
    run.mkdir()
    (run / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (run / "difftune_config.json").write_text(json.dumps({"data": {"train_data_dir": str(data)},
                                                          "train": {"output_dir": str(run)}}))
    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bad = [(dict(condition="sobel"), "unknown condition 'sobel'; known: canny, depth"),
           (dict(condition="canny", condition_settings={"low": 5}),
            "'low' is not a setting of the canny condition: its settings are low_threshold (--low_threshold), "
            "high_threshold (--high_threshold)"),
           (dict(condition="canny", condition_settings={"model": "x"}),
            "'model' (--depth_model) is a setting of the depth condition, not of canny"),
           (dict(condition="canny", condition_settings={"low_threshold": "50"}),
            "low_threshold (--low_threshold) must be an integer, got '50'"),
           (dict(condition_settings={"low_threshold": 50}), "condition_settings {'low_threshold': 50} without a "
                                                             "condition"),
           (dict(device="tpu"), "--device 'tpu' is not a torch device"),
           (dict(device="cuda"), "--device cuda: no CUDA GPU is visible to torch here")]
    for change, message in bad:
        kw = {"pretrained_model_name_or_path": str(tmp_path / "no-model"), "controlnet": str(run),
              "image": str(tmp_path / "c.png"), "prompt": "x", **change}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difftune"):
            with pytest.raises(ConfigError, match=re.escape(message)):
                generate(**kw)
        assert not caplog.records, change  # no word of the canny training before the refusal
