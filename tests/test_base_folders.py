"""The shapes a user's base model folder comes in: weights saved in fp16 only, a part given by another flag,
an inpainting UNet, a scheduler that says another prediction type, a weight file cut short; and adapters of
different bases."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from conftest import make_config


def _fp16_only(src, dst):
    """A copy of a model folder as `save_pretrained(..., variant="fp16")` alone leaves it."""
    shutil.copytree(src, dst)
    for part in ("unet", "vae", "text_encoder"):
        for f in (dst / part).glob("*.safetensors"):
            f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    return dst


def test_a_folder_saved_in_fp16_only_loads_without_a_flag_and_its_card_says_so(tiny_model_dir, fill_dir, tmp_path,
                                                                               caplog):
    from difftune.errors import ModelLoadError
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.models import load_base_model

    fp16 = _fp16_only(tiny_model_dir, tmp_path / "sd-fp16")
    with caplog.at_level(logging.INFO, logger="difftune"):
        base = load_base_model(str(fp16))  # (generate, eval and merge pass no --variant)
    assert base.variant == "fp16" and "*.fp16.safetensors only" in caplog.text
    with pytest.raises(ModelLoadError, match=r"--variant bf16: .*text_encoder has no bf16 weights, only "
                                             r"model.fp16.safetensors: give --variant fp16, or leave --variant out"):
        load_base_model(str(fp16), variant="bf16")
    with pytest.raises(ModelLoadError, match="--variant fp16: .* has no fp16 weights in text_encoder, unet, vae: "
                                             "leave --variant out"):
        load_base_model(str(tiny_model_dir), variant="fp16")
    assert load_base_model(str(tiny_model_dir)).variant is None

    method = ControlNetMethod(make_config(fp16, fill_dir, tmp_path / "run"))
    card = method.model_card(tmp_path / "run", {"global_step": 1, "final_loss": 0.1})
    assert 'controlnet=controlnet, variant="fp16"' in card  # diffusers reads fp16-only folders only when told


def test_another_flag_stands_in_for_a_missing_tokenizer_or_vae(tiny_model_dir, tmp_path, caplog):
    from difftune.errors import ModelLoadError
    from difftune.models import load_base_model

    partial = tmp_path / "no-tokenizer-no-vae"
    shutil.copytree(tiny_model_dir, partial)
    shutil.rmtree(partial / "tokenizer")
    shutil.rmtree(partial / "vae")
    (partial / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing sub-folder\(s\) vae, tokenizer\. .*or give "
                                             r"--pretrained_vae_model_name_or_path for vae/ and --tokenizer_name"):
        load_base_model(str(partial))
    with caplog.at_level(logging.WARNING, logger="difftune"):
        base = load_base_model(str(partial), tokenizer_name=str(tiny_model_dir / "tokenizer"),
                               vae_name_or_path=str(tiny_model_dir / "vae"), revision="v1.0")
    assert base.tokenizer is not None and base.vae is not None
    assert "--revision v1.0: " in caplog.text and "has no revisions" in caplog.text
    assert "has no model_index.json" in caplog.text  # the model card's from_pretrained needs it


def test_an_inpainting_unet_is_refused_when_it_loads(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from difftune.errors import ModelLoadError
    from difftune.models import load_base_model

    inpaint = tmp_path / "inpaint"
    shutil.copytree(tiny_model_dir, inpaint)
    config = dict(UNet2DConditionModel.load_config(inpaint / "unet"), in_channels=9)
    UNet2DConditionModel.from_config(config).save_pretrained(inpaint / "unet")
    # (it failed at the first step: "expected input[2, 4, 8, 8] to have 9 channels")
    with pytest.raises(ModelLoadError, match="UNet takes 9 input channels and its VAE makes 4-channel latents: an "
                                             "inpainting"):
        load_base_model(str(inpaint))


def _cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # (an interrupted download or copy)


@pytest.mark.parametrize("part, file", [("unet", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors")])  # (transformers' error was a traceback)
def test_a_truncated_weight_file_is_named_as_damaged(tiny_model_dir, tmp_path, part, file):
    from difftune.errors import ModelLoadError
    from difftune.models import load_base_model

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    _cut_short(cut / part / file)
    with pytest.raises(ModelLoadError, match=rf"Could not load {part} of the model in {cut}: {cut / part / file} is "
                                             r"damaged: not a readable safetensors file \(.*\), e.g. truncated .*"
                                             r"re-download the model"):
        load_base_model(str(cut))


def test_a_truncated_controlnet_is_named_as_damaged_not_as_the_wrong_folder(tiny_base, tmp_path):
    """It said "could not load the ControlNet (Unable to load weights ...); give a ControlNet folder: config.json +
    diffusion_pytorch_model.safetensors": what the user had given."""
    from diffusers import ControlNetModel

    from difftune.errors import ModelLoadError
    from difftune.models import load_controlnet

    folder = tmp_path / "cn"
    ControlNetModel.from_unet(tiny_base.unet).save_pretrained(folder)
    _cut_short(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match=r"--controlnet .*cn: could not load the ControlNet: .*cn/"
                                             r"diffusion_pytorch_model.safetensors is damaged.*export the ControlNet "
                                             r"again") as err:
        load_controlnet(str(folder), flag="--controlnet")
    assert "give a ControlNet folder" not in str(err.value)


def test_the_prediction_type_is_resolved_recorded_and_sampled_with(tiny_base, tiny_model_dir, fill_dir, tmp_path,
                                                                   caplog):
    from difftune.errors import ConfigError
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.models import with_prediction_type
    from difftune.noising import DiffusionObjective
    from difftune.recorded import recorded_loading

    method = ControlNetMethod(make_config(tiny_model_dir, fill_dir, tmp_path / "run"), base=tiny_base)
    assert method.cfg.loss.prediction_type == "epsilon"  # the scheduler's, in difftune_config.json and the card
    assert "- Loss: epsilon target, uniform timesteps" in method.model_card(tmp_path / "run", {"global_step": 1})
    with caplog.at_level(logging.WARNING, logger="difftune"):
        method = ControlNetMethod(make_config(tiny_model_dir, fill_dir, tmp_path / "v", prediction_type="v_prediction",
                                              snr_gamma=5.0), base=tiny_base)
    assert "--prediction_type v_prediction: the base's scheduler says epsilon" in caplog.text
    assert method.base.noise_scheduler.config.prediction_type == "v_prediction"  # validation samples with it
    assert tiny_base.noise_scheduler.config.prediction_type == "epsilon"  # the caller's base is left alone
    assert method.objective.prediction_type == "v_prediction"
    card = method.model_card(tmp_path / "v", {})
    assert "- Loss: v_prediction target, Min-SNR-gamma 5 weighting" in card
    assert 'from_config(pipe.scheduler.config, prediction_type="v_prediction")' in card  # the card samples as trained

    run = tmp_path / "recorded"
    run.mkdir()
    (run / "difftune_config.json").write_text(json.dumps({"model": {"tokenizer_name": None},
                                                          "loss": {"prediction_type": "v_prediction"}}))
    loading = recorded_loading(None, run)
    assert loading == {"tokenizer_name": None, "prediction_type": "v_prediction"}
    assert recorded_loading(str(tiny_model_dir), run) == {}  # another base: its own scheduler
    assert with_prediction_type(tiny_base, loading["prediction_type"], recorded=True) \
        .noise_scheduler.config.prediction_type == "v_prediction"

    sample = type(tiny_base.noise_scheduler).from_config(tiny_base.noise_scheduler.config, prediction_type="sample")
    with pytest.raises(ConfigError, match=r"predicts 'sample' .*scheduler_config.json.* --prediction_type "
                                          r"epsilon\|v_prediction overrides it"):
        DiffusionObjective(sample)


def test_adapters_of_other_bases_or_families_are_named(tiny_base, tiny_model_dir, tmp_path):
    from difftune.config import ControlNetConfig, from_dict
    from difftune.custom_diffusion.export import check_base_family
    from difftune.errors import ConfigError
    from difftune.guards import warn_changed_settings
    from difftune.recorded import check_one_base
    from difftune.tiny import save_tiny_sdxl_model

    with pytest.raises(ConfigError, match=r"--controlnet and --custom_diffusion were trained on different base models "
                                          r"\(--controlnet cn: /a; --custom_diffusion cd: /b\)"):
        check_one_base({"--controlnet cn": "/a", "--custom_diffusion cd": "/b"}, None,
                       "--controlnet and --custom_diffusion", "both steer one base model")
    check_one_base({"--controlnet cn": "/a", "--custom_diffusion cd": None}, None, "x", "y")  # one records nothing

    sdxl = save_tiny_sdxl_model(tmp_path / "sdxl", seed=0)
    from diffusers import UNet2DConditionModel

    with pytest.raises(ConfigError, match="cd1: Custom Diffusion supports SD 1.x/2.x bases, and this base is SDXL"):
        check_base_family(UNet2DConditionModel.from_pretrained(sdxl / "unet"), "cd1")
    check_base_family(tiny_base.unet, "cd1")

    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "difftune_config.json").write_text(json.dumps(
        {"model": {"model_family": "sdxl", "pretrained_model_name_or_path": str(sdxl)}}))
    now = from_dict(ControlNetConfig, {"pretrained_model_name_or_path": str(tiny_model_dir), "model_family": "sd",
                                       "output_dir": str(tmp_path / "out"), "train_data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"checkpoint-2 was trained on an SDXL base \({sdxl}\); this run's base "
                                          rf"\({tiny_model_dir}\) is SD 1.x/2.x.*--pretrained_model_name_or_path {sdxl}"):
        warn_changed_settings(tmp_path / "out", now, ckpt)


def test_what_fails_without_the_models_is_said_before_they_load(fill_dir, tmp_path):
    """The base model named here does not exist: each error below comes before any model loads."""
    from difftune import train_controlnet
    from difftune.errors import ConfigError, DataError

    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run's checkpoints"):
        train_controlnet(make_config(tmp_path / "no-model", fill_dir, tmp_path / "run"))
    with pytest.raises(DataError, match="--validation_image .*nope.png does not exist"):
        train_controlnet(make_config(tmp_path / "no-model", fill_dir, tmp_path / "new",
                                     validation_image=[str(tmp_path / "nope.png")], validation_prompt=["red circle"]))
    assert not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="--output_dir .*a-file is a file: give a folder"):
        train_controlnet(make_config(tmp_path / "no-model", fill_dir, tmp_path / "a-file"))
    diffusers_run = tmp_path / "diffusers-run" / "checkpoint-100"
    (diffusers_run / "controlnet").mkdir(parents=True)
    (diffusers_run / "random_states_0.pkl").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds checkpoints of a diffusers training script \(checkpoint-100\)"):
        train_controlnet(make_config(tmp_path / "no-model", fill_dir, tmp_path / "diffusers-run"))


def test_diffusers_empty_keep_in_fp32_notice_is_dropped_and_a_real_one_kept(caplog):
    """diffusers warns 'modules ... should be kept in float32: []' on every dtype cast (bf16 runs repeated it):
    difftune drops that empty notice, not one that names modules."""
    import logging

    import difftune.models  # noqa: F401  (installs the filter)

    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.WARNING, logger="diffusers.models.modeling_utils"):
        diffusers_log.warning("There are modules in UNet2DConditionModel that should be kept in float32: [].")
        diffusers_log.warning("There are modules in T5 that should be kept in float32: ['wo'].")
    assert [r.getMessage().endswith("['wo'].") for r in caplog.records] == [True]
