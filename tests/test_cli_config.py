"""The CLI's flag set, config files, recipes and every bad-input message."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conftest import make_config
from difftune.cli import build_parser, main
from difftune.config import ControlNetConfig, from_dict
from difftune.errors import ConfigError, ModelLoadError, UserError

# Locked: removing or renaming a flag breaks users' scripts. Add new flags here deliberately.
TRAIN_CONTROLNET_FLAGS = sorted("""
adam_beta1 adam_beta2 adam_epsilon adam_weight_decay allow_tf32 cache_dir caption_column checkpointing_steps
checkpoints_total_limit conditioning_image_column config controlnet_model_name_or_path dataloader_num_workers
dataset_config_name dataset_name enable_xformers_memory_efficient_attention gradient_accumulation_steps
gradient_checkpointing hub_model_id hub_token image_column learning_rate logging_dir lr_num_cycles lr_power
lr_scheduler lr_warmup_steps max_grad_norm max_train_samples max_train_steps mixed_precision nan_policy
num_train_epochs num_validation_images num_validation_inference_steps output_dir prediction_type
pretrained_model_name_or_path proportion_empty_prompts push_to_hub recipe report_to resolution
resume_from_checkpoint revision scale_lr seed set_grads_to_none snr_gamma streaming tokenizer_name
tracker_project_name train_batch_size train_data_dir use_8bit_adam validation_image validation_prompt
validation_steps variant
model_family pretrained_vae_model_name_or_path crops_coords_top_left_h crops_coords_top_left_w image_interpolation_mode
cache_latents latent_cache_dir channels_last torch_compile optimizer_in_backward fp8_frozen_unet profile_steps profile_start cuda_graphs
timestep_sampling validation_control_guidance overwrite_output_dir local_rank local-rank enable_npu_flash_attention
""".split())  # SDXL support (issue 6), speed and memory options (issue 5), T2I-Adapter's timestep bias, cond guidance,
# starting over in a run folder (diffusers' scripts overwrite silently)


def _subparser(*path):
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def test_train_controlnet_flag_set_is_locked():
    flags = sorted(
        opt[2:] for a in _subparser("train", "controlnet")._actions for opt in a.option_strings
        if opt.startswith("--") and not opt.startswith("--no-")  # each switch's --no- twin is tested below
    )
    flags.remove("help")
    assert flags == TRAIN_CONTROLNET_FLAGS


def test_flags_parse_into_typed_config():
    from difftune.cli import config_from_args

    args = _subparser("train", "controlnet").parse_args([
        "--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--train_batch_size", "2",
        "--learning_rate", "1e-5", "--validation_prompt", "a", "b", "--validation_image", "x.png",
        "--gradient_checkpointing", "--snr_gamma", "5", "--mixed_precision", "bf16",
    ])
    cfg = config_from_args(ControlNetConfig, args)
    assert cfg.train.train_batch_size == 2 and cfg.optim.learning_rate == 1e-5
    assert cfg.validation.pairs() == [("a", "x.png"), ("b", "x.png")]
    assert cfg.train.gradient_checkpointing and cfg.loss.snr_gamma == 5.0 and cfg.train.mixed_precision == "bf16"
    assert cfg.train.checkpointing_steps == 500  # untouched defaults stay the diffusers ones


def test_a_recipe_switch_is_undone_by_its_no_flag():
    from difftune.cli import config_from_args
    from difftune.recipes import RECIPES

    parser = _subparser("train", "controlnet")
    recipe = RECIPES["controlnet_tiny_demo"]()
    on = config_from_args(ControlNetConfig, parser.parse_args(["--recipe", "controlnet_tiny_demo", "--train_data_dir", "d"]), recipe)
    off = config_from_args(ControlNetConfig, parser.parse_args(["--recipe", "controlnet_tiny_demo",
                                                                "--no-cache_latents", "--train_data_dir", "d"]), recipe)
    assert on.train.cache_latents is True and off.train.cache_latents is False
    switches = [a for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)]
    assert {"--gradient_checkpointing", "--no-gradient_checkpointing"} <= {o for a in switches for o in a.option_strings}


def test_config_file_with_flag_override(tmp_path):
    from difftune.cli import config_from_args

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"pretrained_model_name_or_path: m\ntrain_data_dir: {tmp_path}\ntrain:\n  train_batch_size: 8\n"
                         "learning_rate: 0.001\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(f'pretrained_model_name_or_path = "m"\ntrain_data_dir = "{tmp_path}"\n[optim]\nlearning_rate = 0.5\n')
    p = _subparser("train", "controlnet")
    cfg = config_from_args(ControlNetConfig, p.parse_args(["--config", str(yaml_file), "--learning_rate", "0.01"]))
    assert cfg.train.train_batch_size == 8 and cfg.optim.learning_rate == 0.01
    cfg = config_from_args(ControlNetConfig, p.parse_args(["--config", str(toml_file), "--recipe", "debug"]),
                           recipe={"train": {"max_train_steps": 4}})
    assert cfg.optim.learning_rate == 0.5 and cfg.train.max_train_steps == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"Config file .*bad.yaml: unknown setting 'learning_rat': did you mean "
                                          r"'learning_rate'\?"):
        config_from_args(ControlNetConfig, p.parse_args(["--config", str(bad)]))
    bad.write_text("train:\n  optimizer_in_backward: true\n")  # in the wrong section: which one it belongs in
    with pytest.raises(ConfigError, match=r"bad.yaml: 'train.optimizer_in_backward' belongs in section 'optim'"):
        config_from_args(ControlNetConfig, p.parse_args(["--config", str(bad)]))
    bad.write_text("loss:\n  snr: 5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'loss.snr': the settings of 'loss' are snr_gamma, "):
        config_from_args(ControlNetConfig, p.parse_args(["--config", str(bad)]))
    # YAML reads 1e-5 (no dot) as a string: it is still the number meant
    sci = tmp_path / "sci.yaml"
    sci.write_text(f"pretrained_model_name_or_path: m\ntrain_data_dir: {tmp_path}\nlearning_rate: 1e-5\n")
    assert config_from_args(ControlNetConfig, p.parse_args(["--config", str(sci)])).optim.learning_rate == 1e-5
    for text, message in (("train_batch_size: two", "'train_batch_size' must be an integer, got 'two'"),
                          ("gradient_checkpointing: maybe", "'gradient_checkpointing' must be true or false"),
                          ("validation_steps: 2.5", "'validation_steps' must be an integer, got 2.5")):
        bad.write_text(f"pretrained_model_name_or_path: m\ntrain_data_dir: {tmp_path}\n{text}\n")
        with pytest.raises(ConfigError, match=message + r".* \(set in config file .*bad.yaml: "):  # where it came from
            config_from_args(ControlNetConfig, p.parse_args(["--config", str(bad)]))


@pytest.mark.parametrize("overrides, message", [
    (dict(resolution=100), "--resolution 100 is not a positive multiple of 8"),
    (dict(streaming=True), "--streaming needs --max_train_samples"),
    (dict(proportion_empty_prompts=1.5), "--proportion_empty_prompts must be in"),
    (dict(validation_prompt=["a"]), "--validation_prompt and --validation_image go together"),
    (dict(validation_control_guidance="uncond"), "--validation_control_guidance 'uncond': choose from both, cond"),
    (dict(validation_prompt=["a", "b"], validation_image=["1", "2", "3"]), "give one of either"),
    (dict(train_data_dir=None), "No training data"),
    (dict(pretrained_model_name_or_path=None), "No base model"),
    (dict(dataset_name="x/y"), "either --dataset_name or --train_data_dir"),
    (dict(report_to="mlflow"), "--report_to 'mlflow'"),
    (dict(snr_gamma=-1.0), "--snr_gamma must be > 0"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1"),
    (dict(validation_steps=0), "--validation_steps must be >= 1, got 0"),  # not a crash at step 1
    (dict(num_validation_images=0), "--num_validation_images must be >= 1, got 0"),  # nor after the last step
    (dict(num_validation_inference_steps=0), "--num_validation_inference_steps must be >= 1"),
    # choices hold however the config is made (a typo'd nan_policy used to turn off both stop and skip)
    (dict(nan_policy="skp"), "--nan_policy 'skp': choose from stop, skip"),
    (dict(torch_compile="nope"), "--torch_compile 'nope': choose from no, blocks, full"),
    (dict(lr_scheduler="cosinee"), "--lr_scheduler 'cosinee': choose from linear, cosine"),
    (dict(model_family="sd3"), "--model_family 'sd3'"),
    (dict(max_grad_norm=-1.0), "--max_grad_norm must be >= 0"),
    (dict(lr_warmup_steps=-3), "--lr_warmup_steps must be >= 0"),
    (dict(lr_num_cycles=0), "--lr_num_cycles must be >= 1"),
    (dict(seed=-5), "--seed must be in"),
    (dict(max_train_samples=0), "--max_train_samples must be >= 1"),
])
def test_bad_configs_are_rejected_with_the_flag_name(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_config("m", "d", tmp_path, **overrides)


def test_config_sections_made_in_code_are_checked_too():
    from difftune.config import DataConfig, OptimConfig, TrainConfig, ValidationConfig
    from difftune.config_custom_diffusion import CustomDiffusionModelConfig

    with pytest.raises(ConfigError, match=r"'resolution' \(--resolution\) must be an integer, got '64'"):
        DataConfig(resolution="64")
    with pytest.raises(ConfigError, match="'learning_rate' .* must be a number"):
        OptimConfig(learning_rate="1e-5")
    with pytest.raises(ConfigError, match="'train_batch_size' .* must be an integer, got True"):
        TrainConfig(train_batch_size=True)
    with pytest.raises(ConfigError, match="--freeze_model 'all': choose from crossattn_kv, crossattn"):
        CustomDiffusionModelConfig(freeze_model="all")
    with pytest.raises(ConfigError, match=r"Section 'data' must be a DataConfig, got dict — .*from_dict"):
        ControlNetConfig(data={"train_data_dir": "d"})
    one = ValidationConfig(validation_prompt="a red circle", validation_image="c.png")  # not 12 and 5 'items'
    assert one.pairs() == [("a red circle", "c.png")]
    assert TrainConfig(output_dir=Path("out")).output_dir == "out"
    # YAML's bare `no` is a boolean: for a choice of 'no' it means the word
    bare = from_dict(ControlNetConfig, {"train_data_dir": "d", "mixed_precision": False, "torch_compile": False})
    assert (bare.train.mixed_precision, bare.train.torch_compile) == ("no", "no")
    with pytest.raises(ConfigError, match="from_dict builds a whole run config .* not ControlNetTrainConfig"):
        from_dict(type(bare.train), {"seed": 1})


def test_missing_model_folder_and_offline_hub_id(tmp_path, fill_dir, monkeypatch):
    from difftune.models import load_base_model

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(str(tmp_path / "no-such-model"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing sub-folder"):
        load_base_model(str(tmp_path / "half"))
    (tmp_path / "work" / "model").mkdir(parents=True)  # pretrain-base's --out: the model is in OUT/model
    (tmp_path / "work" / "model" / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"It holds one, though: give --pretrained_model_name_or_path .*work/model"):
        load_base_model(str(tmp_path / "work"))
    import transformers

    def no_part_is_tried(*args, **kwargs):  # each would wait out the hub's retries again without a network
        raise AssertionError("a part was loaded from a hub id that could not be reached")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", no_part_is_tried)
        with pytest.raises(ModelLoadError, match=r"could not be fetched from the Hugging Face Hub \(HF_HUB_OFFLINE is "
                                                 r"set; unset it to download\)\. Give --pretrained_model_name_or_path "
                                                 r"a local"):
            load_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_cli_reports_user_errors_without_traceback(tmp_path, fill_dir, capsys):
    code = main(["train", "controlnet", "--pretrained_model_name_or_path", str(tmp_path / "missing"),
                 "--train_data_dir", str(fill_dir), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err  # (the data set opens first, before the base: datasets' progress may come first)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and str(tmp_path / "missing") in errors[0]


def test_a_failed_start_records_no_run(tiny_model_dir, fill_dir, tmp_path, capsys):
    out = tmp_path / "o"  # a bad column is found when the data loads: no difftune_config.json for a run that never was
    assert main(["train", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                 str(fill_dir), "--caption_column", "nope", "--output_dir", str(out)]) == 2
    assert "--caption_column" in capsys.readouterr().err
    assert not out.exists()  # nor the empty folder it would have been in
    assert main(["train", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                 str(fill_dir), "--optimizer_in_backward", "--output_dir", str(out)]) == 2  # refused by the optimizer
    assert "--max_grad_norm" in capsys.readouterr().err and not out.exists()
    moved = tmp_path / "moved"  # data whose image paths do not resolve: found before the run is recorded
    moved.mkdir()
    (moved / "metadata.jsonl").write_text("".join(json.dumps({"image": f"gone/{i}.png", "conditioning_image":
                                                              f"gone/c{i}.png", "text": "x"}) + "\n" for i in range(8)))
    assert main(["train", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                 str(moved), "--output_dir", str(tmp_path / "new" / "a" / "b")]) == 2
    assert "none of the first 8 training samples could be loaded" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the folders it made above it
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder the user made stays, with what is in it
    assert main(["train", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                 str(fill_dir), "--caption_column", "nope", "--output_dir", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_make_tiny_model_keeps_a_folder_unless_told(tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["make-tiny-model", "--out", str(out)]) == 2
    assert f"--out {out} already exists and is not empty" in capsys.readouterr().err
    assert main(["make-tiny-model", "--out", str(out), "--overwrite"]) == 0
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("argv, flag", [
    (["data", "fill50k", "--out", "x", "--n", "0"], "--n: must be at least 1, not 0"),
    (["data", "shapes", "--out", "x", "--n", "-3"], "--n: must be at least 1, not -3"),
    (["eval", "base", "--per_prompt", "0"], "--per_prompt: must be at least 1"),
    (["eval", "controlnet", "--controlnet", "c", "--n", "0"], "--n: must be at least 1"),
    (["eval", "custom-diffusion", "--custom_diffusion", "c", "--num_inference_steps", "0"],
     "--num_inference_steps: must be at least 1"),
    (["generate", "--controlnet", "c", "--image", "i", "--prompt", "p", "--num_images", "two"],
     "--num_images: 'two' is not an integer"),
    (["bench", "--steps", "0"], "--steps: must be at least 1"),
    (["bench", "--timeout", "0"], "--timeout: must be a finite number of seconds more than 0, not 0"),  # every run
    # would 'time out' at once; retrieve's went to urllib as it was (-1: a traceback, 0: every request failed)
    *[(["retrieve", "--class_prompt", "cat", "--class_data_dir", "r", "--timeout", t],
       f"--timeout: must be a finite number of seconds more than 0, not {t}") for t in ("-1", "0", "inf")],
    (["eval", "controlnet", "--controlnet", "c", "--controlnet_conditioning_scale", "nan"],  # NaN images, NaN JSON
     "--controlnet_conditioning_scale: must be a finite number, not nan"),
    (["eval", "base", "--guidance_scale", "inf"], "--guidance_scale: must be a finite number, not inf"),
])
def test_counts_below_their_minimum_are_refused_with_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["train", "controlnet", "--train_batchsize", "2"],  # a typo: the near spelling
     "difftune train controlnet: error: --train_batchsize is not a flag of `difftune train controlnet`: did you "
     "mean --train_batch_size?"),
    (["train", "controlnet", "--modifier_token", "<new1>"],  # the other trainer's flag
     "--modifier_token is not a flag of `difftune train controlnet`: it is a flag of `difftune train "
     "custom-diffusion`"),
    (["train", "custom-diffusion", "--controlnet_model_name_or_path", "x"],
     "it is a flag of `difftune train controlnet`"),
    (["data", "fill50k", "--out", "x", "--resolutoin=64"], "did you mean --resolution?"),
    (["generate", "--prompt", "a", "red", "circle"], "unexpected argument(s) 'red' 'circle': a value with spaces "
     "needs quotes"),
])
def test_unknown_flags_are_named_with_what_was_meant(argv, said, capsys):
    from difftune.cli import parse_command

    with pytest.raises(SystemExit) as exit_:
        parse_command(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_optional_packages_give_install_hints(tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    import importlib.util

    from difftune.api import train_controlnet
    from difftune.methods.controlnet import ControlNetMethod

    if importlib.util.find_spec("bitsandbytes") is None:
        with monkeypatch.context() as patch:  # refused before any model loads (or latent cache fills)
            patch.setattr(ControlNetMethod, "__init__", lambda *a, **k: pytest.fail("loaded the model first"))
            with pytest.raises(ConfigError, match=r"pip install 'difftune\[bnb\]'"):
                train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "a", use_8bit_adam=True))
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard"):
            train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "b", report_to="tensorboard"))
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ConfigError, match="xformers"):
            train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "c",
                                         enable_xformers_memory_efficient_attention=True))
    with pytest.raises(ConfigError, match="--enable_npu_flash_attention needs an Ascend NPU"):  # diffusers' flag
        train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "d", enable_npu_flash_attention=True))


def test_fp16_without_a_gpu_is_refused_with_the_alternative(tiny_model_dir, fill_dir, tmp_path):
    import torch

    from difftune.api import train_controlnet

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    with pytest.raises(UserError, match="--mixed_precision fp16 needs a GPU.*bf16"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "fp16", mixed_precision="fp16"))


@pytest.mark.parametrize("env,name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_a_sharded_launch_is_refused_with_the_alternative(env, name, tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    from difftune.api import train_controlnet

    monkeypatch.setenv(env, "true")  # what `accelerate launch` sets from an accelerate config asking for it
    with pytest.raises(ConfigError, match=f"asks for {name}.*--recipe low_memory"):
        train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "run", max_train_steps=1))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_push_to_hub_offline_fails_clearly_and_keeps_outputs(tiny_model_dir, fill_dir, tmp_path, monkeypatch):
    from difftune.api import train_controlnet

    from huggingface_hub.utils import filter_repo_objects

    from difftune import hub
    from difftune.hub import RUN_UPLOAD_IGNORE

    out = tmp_path / "run"
    # offline from the start: refused before any training, as diffusers creates the repo first
    with pytest.raises(UserError, match=r"--push_to_hub: the Hub repo 'me/cn' cannot be created.*nothing was trained"
                       ) as info:
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=1, push_to_hub=True,
                                     hub_model_id="me/cn", hub_token="hf_TOPSECRET"))
    assert "hf_TOPSECRET" not in str(info.value) and not (out / "checkpoints").exists()
    # the repo was there at the start, the upload fails at the end (the network went): the outputs stay
    monkeypatch.setattr(hub, "ensure_repo", lambda folder, repo_id, token: repo_id)
    with pytest.raises(UserError, match="--push_to_hub") as info:
        train_controlnet(make_config(tiny_model_dir, fill_dir, out, max_train_steps=1, push_to_hub=True,
                                     hub_model_id="me/cn", hub_token="hf_TOPSECRET", cache_latents=True,
                                     checkpointing_steps=1, max_train_samples=8))
    assert "hf_TOPSECRET" not in str(info.value)
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "difftune_config.json").read_text())["train"]["hub_token"] is None
    # what would have gone up: the model and its card, not the checkpoints or the encoded cache
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert any(f.startswith("encoded-cache/") for f in files) and any(f.startswith("checkpoints/") for f in files)
    uploaded = set(filter_repo_objects(files, ignore_patterns=RUN_UPLOAD_IGNORE))
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= uploaded
    assert all(f.split("/")[0] not in ("encoded-cache", "checkpoints") for f in uploaded), uploaded


def test_every_recipe_builds():
    from difftune.recipes import RECIPES

    for name, recipe in RECIPES.items():
        values = recipe()
        values.setdefault("model", {})["pretrained_model_name_or_path"] = "m"
        values.setdefault("data", {})["train_data_dir"] = "d"
        assert isinstance(from_dict(ControlNetConfig, values), ControlNetConfig), name


def test_custom_diffusion_offers_only_recipes_it_can_run():
    from difftune.config_custom_diffusion import CustomDiffusionConfig
    from difftune.recipes import recipes_for

    usable = recipes_for(CustomDiffusionConfig)
    assert "debug" in usable and "fast" not in usable  # fast caches encoders: ControlNet only
    assert "low_memory" not in usable
    assert "controlnet_fill50k" not in usable and "controlnet_tiny_demo" not in usable  # ControlNet's data and rates


def test_data_check_cli(fill_dir, tiny_model_dir, capsys):
    assert main(["data", "check", "--train_data_dir", str(fill_dir), "--resolution", "64",
                 "--pretrained_model_name_or_path", str(tiny_model_dir)]) == 0
    assert "ready to train" in capsys.readouterr().out
    assert main(["data", "check", "--train_data_dir", str(fill_dir), "--resolution", "128"]) == 0  # warnings only
    assert "smaller than" in capsys.readouterr().out
    # without --resolution: what training would use with that base (64 for the tiny-shapes default, not 512)
    assert main(["data", "check", "--train_data_dir", str(fill_dir)]) == 0
    captured = capsys.readouterr()
    assert "smaller than" not in captured.out and "--resolution 64: the training default for tiny-shapes" in captured.err
    from difftune.models import load_base_model, training_resolution

    assert training_resolution(str(tiny_model_dir)) == load_base_model(str(tiny_model_dir)).native_resolution


def test_data_check_of_a_data_set_it_cannot_read_is_a_failed_check(tmp_path, capsys):
    """A missing folder exited 2 and two columns 1, and with --json neither printed JSON."""
    from PIL import Image

    assert main(["data", "check", "--train_data_dir", str(tmp_path / "gone"), "--resolution", "64", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["errors"][0]["kind"] == "unreadable_data_set"
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    assert main(["data", "check", "--train_data_dir", str(tmp_path), "--resolution", "64", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["errors"][0]["kind"] == "columns"
    assert main(["data", "check", "--train_data_dir", str(tmp_path), "--resolution", "64"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_data_check_measures_captions_with_the_default_bases_tokenizer(tmp_path, capsys):
    """Without --pretrained_model_name_or_path, captions are checked against tiny-shapes' text encoder (24
    tokens), the one training would use, not skipped."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "img" / "a.png")
    long = "a " + " and ".join(["red circle with blue background"] * 6)
    (tmp_path / "metadata.jsonl").write_text(json.dumps(
        {"image": "img/a.png", "conditioning_image": "img/a.png", "text": long}) + "\n")
    assert main(["data", "check", "--train_data_dir", str(tmp_path)]) == 0  # a warning, not an error
    assert "more than the text encoder's 24" in capsys.readouterr().out


TRAIN_CUSTOM_DIFFUSION_FLAGS = sorted("""
adam_beta1 adam_beta2 adam_epsilon adam_weight_decay allow_tf32 cache_dir center_crop checkpointing_steps
checkpoints_total_limit class_data_dir class_prompt concepts_list concepts_root config overwrite_output_dir
dataloader_num_workers enable_xformers_memory_efficient_attention freeze_model gradient_accumulation_steps
gradient_checkpointing hflip hub_model_id hub_token initializer_token instance_data_dir instance_prompt
learning_rate logging_dir lr_num_cycles lr_power lr_scheduler lr_warmup_steps max_grad_norm max_train_steps
mixed_precision modifier_token nan_policy no_safe_serialization noaug num_class_images
num_class_inference_steps num_train_epochs num_validation_images num_validation_inference_steps output_dir
prediction_type pretrained_model_name_or_path prior_generation_precision prior_loss_weight push_to_hub
real_prior recipe report_to resolution resume_from_checkpoint revision sample_batch_size scale_lr seed
set_grads_to_none snr_gamma tokenizer_name tracker_project_name train_batch_size use_8bit_adam
validation_prompt validation_steps variant with_prior_preservation
channels_last torch_compile optimizer_in_backward profile_steps profile_start
embedding_learning_rate timestep_sampling local_rank local-rank enable_npu_flash_attention
""".split())  # speed and memory options (issue 5); a learning rate of the embeddings alone; T2I-Adapter's timestep bias


def test_train_custom_diffusion_flag_set_is_locked():
    flags = sorted(
        opt[2:] for a in _subparser("train", "custom-diffusion")._actions for opt in a.option_strings
        if opt.startswith("--") and not opt.startswith("--no-")
    )
    flags.remove("help")
    assert flags == TRAIN_CUSTOM_DIFFUSION_FLAGS


@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rate=-1.0), "--learning_rate must be > 0, got -1.0"),
    (dict(learning_rate=0.0), "--learning_rate must be > 0"),
    (dict(learning_rate=float("nan")), "--learning_rate must be a finite number, got nan"),
    (dict(learning_rate=float("inf")), "--learning_rate must be a finite number, got inf"),  # trained NaN weights
    (dict(adam_epsilon=float("inf")), "--adam_epsilon must be a finite number"),
    (dict(lr_power=float("-inf")), "--lr_power must be a finite number"),
    (dict(snr_gamma=float("inf")), "--snr_gamma must be a finite number"),
    (dict(adam_beta1=1.0), r"--adam_beta1 must be in \[0, 1\)"),
    (dict(adam_beta2=-0.5), r"--adam_beta2 must be in \[0, 1\)"),
    (dict(adam_epsilon=0.0), "--adam_epsilon must be > 0"),
    (dict(adam_weight_decay=-0.1), "--adam_weight_decay must be >= 0"),
])
def test_optimizer_settings_are_refused_with_the_flag_name(overrides, message, tmp_path):
    """Caught with the config, not as the optimizer's bare ValueError once the model has loaded."""
    with pytest.raises(ConfigError, match=message):
        make_config("m", "d", tmp_path, **overrides)


def test_an_infinite_max_grad_norm_is_no_clipping_as_in_diffusers(tmp_path):
    assert make_config("m", "d", tmp_path, max_grad_norm=float("inf")).optim.max_grad_norm == 0.0


def test_negative_learning_rate_on_the_command_line_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "controlnet", "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                 "--learning_rate", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--learning_rate must be > 0, got -1.0" in err and "Traceback" not in err


def test_controlnet_mixups_are_named_with_what_to_pass_instead(tiny_model_dir, tmp_path):
    """A UNet, the base model, a training checkpoint or a missing folder given as the ControlNet: each is
    refused before diffusers half-loads it (a UNet ended in 'Cannot copy out of meta tensor')."""
    import re

    from difftune.models import load_controlnet

    with pytest.raises(ModelLoadError, match=r"--controlnet_model_name_or_path .*unet is a UNet2DConditionModel "
                                             r"folder \(the base model's.*give a ControlNet folder: config.json"):
        load_controlnet(str(tiny_model_dir / "unet"))
    with pytest.raises(ModelLoadError, match="--controlnet .* is a base model folder .* which goes to "
                                             "--pretrained_model_name_or_path; give a ControlNet folder"):
        load_controlnet(str(tiny_model_dir), flag="--controlnet")
    with pytest.raises(ModelLoadError, match=r"--controlnet nope_cn does not exist; give a ControlNet folder: "
                                             r"config.json \+ diffusion_pytorch_model.safetensors"):
        load_controlnet("nope_cn", flag="--controlnet")
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(b"")
    run = re.escape(str(tmp_path / "run"))
    with pytest.raises(ModelLoadError, match=f"training checkpoint.*Give the run's output folder {run} instead.*"
                                             "finish the run"):
        load_controlnet(str(ckpt))
    (tmp_path / "run" / "config.json").write_text("{}")  # the run finished: no advice to finish it
    with pytest.raises(ModelLoadError, match="training checkpoint") as refused:
        load_controlnet(str(ckpt))
    assert "finish the run" not in str(refused.value)
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(ModelLoadError, match="weights-only is not a ControlNet: it has no config.json"):
        load_controlnet(str(tmp_path / "weights-only"))
    (ckpt / "config.json").write_text("{}")  # (a checkpoint of a ControlNet run holds it)
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"is a run's checkpoints/ folder: give one checkpoint in it, e.g. "
                                             f"{re.escape(str(ckpt))}"):
        load_controlnet(str(ckpt.parent), flag="--controlnet")
    (tmp_path / "concept").mkdir()
    (tmp_path / "concept" / "custom_diffusion.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"is a Custom Diffusion folder \(custom_diffusion.json\), which goes "
                                             "to --custom_diffusion"):
        load_controlnet(str(tmp_path / "concept"), flag="--controlnet")


def test_training_from_a_unet_folder_as_controlnet_is_a_clear_error(tiny_model_dir, fill_dir, tmp_path, capsys):
    code = main(["train", "controlnet", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                 str(fill_dir), "--output_dir", str(tmp_path / "o"), "--resolution", "64", "--max_train_steps", "1",
                 "--controlnet_model_name_or_path", str(tiny_model_dir / "unet")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--controlnet_model_name_or_path" in err and "UNet2DConditionModel folder" in err


@pytest.mark.parametrize("method", ["controlnet", "custom-diffusion"])
def test_the_launchers_local_rank_flag_is_taken_and_left_out_of_the_config(method):
    from difftune.cli import config_from_args
    from difftune.config import to_dict
    from difftune.config_custom_diffusion import CustomDiffusionConfig

    for flag in (["--local_rank", "1"], ["--local-rank=1"]):  # diffusers' spelling, torch.distributed.launch's
        data = ["--train_data_dir", "d"] if method == "controlnet" else ["--instance_data_dir", "d",
                                                                         "--instance_prompt", "a <new1> dog"]
        args = build_parser().parse_args(["train", method, *data, *flag])
        cfg = config_from_args(ControlNetConfig if method == "controlnet" else CustomDiffusionConfig, args)
        assert "local_rank" not in json.dumps(to_dict(cfg))


def test_sigterm_ends_a_command_like_ctrl_c_with_a_resume_hint(monkeypatch, capsys, tmp_path):
    """A scheduler's SIGTERM stops a training run with a line saying what it saved and how to resume (on its
    own line, after any progress bar), exit status 143; the handler is put back when main returns."""
    import os
    import signal

    import difftune.cli as cli
    from difftune.checkpoint import STATE_FILE

    def run(args):
        args.run_output_dir = str(tmp_path)
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_train_controlnet", run)
    assert main(["train", "controlnet", "--output_dir", str(tmp_path)]) == 143
    assert capsys.readouterr().err.endswith(f"\nterminated: no checkpoint was saved yet in {tmp_path}, so a rerun "
                                            "starts from the beginning\n")
    (tmp_path / "checkpoints" / "checkpoint-16").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-16" / STATE_FILE).write_text("{}")
    assert main(["train", "controlnet", "--output_dir", str(tmp_path)]) == 143
    assert capsys.readouterr().err.endswith(f"\nterminated: the newest checkpoint is {tmp_path}/checkpoints/"
                                            "checkpoint-16 (step 16); resume from it with the same command and "
                                            "--resume_from_checkpoint latest\n")
    assert signal.getsignal(signal.SIGTERM) is before


def test_data_conditions_refuses_a_caption_and_a_caption_column_together(tmp_path, capsys):
    assert main(["data", "conditions", "--input_dir", str(tmp_path), "--out", str(tmp_path / "o"), "--caption", "x",
                 "--caption_column", "prompt"]) == 2
    assert "exclude each other" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _report_sigterm(queue) -> None:
    import signal

    queue.put(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)


def test_processes_forked_during_a_command_keep_the_default_sigterm(monkeypatch):
    """A forked pool worker with the CLI's Python-level SIGTERM handler can miss Pool.terminate's SIGTERM
    while blocked on a queue's semaphore, and the pool's exit then waits for ever (seen in a full test run)."""
    import multiprocessing as mp

    import difftune.cli as cli

    seen = []

    def fork_a_worker(args):
        ctx = mp.get_context("fork")
        queue = ctx.SimpleQueue()
        worker = ctx.Process(target=_report_sigterm, args=(queue,))
        worker.start()
        worker.join(timeout=60)
        seen.append(queue.get())
        return 0

    monkeypatch.setattr(cli, "cmd_train_controlnet", fork_a_worker)
    assert main(["train", "controlnet", "--output_dir", "x"]) == 0
    assert seen == [True]


def test_weights_are_read_from_safetensors_only(tiny_model_dir, tmp_path):
    """A model part or ControlNet whose weights are only a .bin (a pickle) is refused with the way to convert
    it, not unpickled (diffusers fell back to it with 'Defaulting to unsafe serialization')."""
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel

    from difftune.models import load_base_model, load_controlnet

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(model / "unet", safe_serialization=False)
    with pytest.raises(ModelLoadError, match=r"Could not load unet of the model in .* Its weights are only in "
                                             r"diffusion_pytorch_model\.bin, a pickle, which difftune does not load"):
        load_base_model(str(model))
    controlnet = tmp_path / "cn"
    ControlNetModel.from_unet(unet).save_pretrained(controlnet, safe_serialization=False)
    with pytest.raises(ModelLoadError, match=r"save_pretrained\(DIR, safe_serialization=True\)"):
        load_controlnet(str(controlnet), flag="--controlnet")


def test_the_command_line_starts_without_loading_torch():
    """`difftune --help` took 8 s (the bench's parser pulled torch in through difftune.tiny), and a Ctrl-C in
    that time was a KeyboardInterrupt traceback."""
    import subprocess
    import sys

    probe = "import sys; from difftune.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
