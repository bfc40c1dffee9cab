"""SDXL as a model family of the same ControlNet method: the SD 1.x battery, on a tiny SDXL.

The tiny SDXL (``difftune.tiny.save_tiny_sdxl_model``) has SDXL's layout at toy size: two
text encoders (the second with projection), a ``text_time`` UNet, DDPM with leading spacing.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_config
from difftune import checkpoint as ckpt

PROMPT = "red circle with blue background"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from difftune.tiny import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def sdxl_base(tiny_sdxl_dir):
    from difftune.models import load_base_model

    return load_base_model(str(tiny_sdxl_dir))


def _inputs(base, n=2):
    from difftune.families import FAMILIES, MicroConditions

    fam = FAMILIES["sdxl"]
    g = torch.Generator().manual_seed(0)
    prompt = fam.encode_prompts(base, [PROMPT, ""][:n], torch.device("cpu"))
    micro = MicroConditions(torch.tensor([[64, 96], [80, 64]][:n]), torch.tensor([[0, 16], [8, 0]][:n]), (64, 64))
    added = fam.added_cond_kwargs(prompt, micro, torch.float32)
    return torch.randn(n, 4, 8, 8, generator=g), prompt.encoder_hidden_states, added, torch.rand(n, 3, 64, 64, generator=g)


def test_family_detection_loading_and_resolution(tiny_sdxl_dir, tiny_model_dir, sdxl_base, fill_dir, tmp_path,
                                                 monkeypatch):
    from difftune.errors import ModelLoadError
    from difftune.families import detect_family
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.models import load_base_model

    assert detect_family(str(tiny_sdxl_dir)) == "sdxl" and detect_family(str(tiny_model_dir)) == "sd"
    assert sdxl_base.family == "sdxl" and sdxl_base.tokenizer_2.pad_token == "!"
    assert sdxl_base.vae_in_fp32 and len(sdxl_base.frozen_modules()) == 4
    with pytest.raises(ModelLoadError, match="SDXL UNet.*--model_family is sd"):
        load_base_model(str(tiny_sdxl_dir), family="sd")
    with pytest.raises(ModelLoadError, match="--model_family sdxl: .* has no text_encoder_2 or tokenizer_2, so it "
                                             "is not an sdxl model — use --model_family auto"):
        load_base_model(str(tiny_model_dir), family="sdxl")
    # --tokenizer_name replaces the (first) tokenizer; a part that cannot be read is named
    assert len(load_base_model(str(tiny_sdxl_dir), tokenizer_name=str(tiny_sdxl_dir / "tokenizer_2")).tokenizer) \
        == len(sdxl_base.tokenizer_2)
    with pytest.raises(ModelLoadError, match="--tokenizer_name .*nowhere: there is no such folder"):
        load_base_model(str(tiny_sdxl_dir), tokenizer_name=str(tmp_path / "nowhere"))
    monkeypatch.chdir(tiny_sdxl_dir.parent)  # a typo in a relative path is that, not a Hub id
    with pytest.raises(ModelLoadError, match="--tokenizer_name .*/tokenizr: there is no such folder"):
        load_base_model(str(tiny_sdxl_dir), tokenizer_name=f"{tiny_sdxl_dir.name}/tokenizr")
    with pytest.raises(ModelLoadError, match=r"is a model folder: give its tokenizer, --tokenizer_name .*/tokenizer\."):
        load_base_model(str(tiny_sdxl_dir), tokenizer_name=str(tiny_sdxl_dir))
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_sdxl_dir, damaged)
    for weights in (damaged / "text_encoder_2").glob("model*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="Could not load text_encoder_2 / tokenizer_2 of the model in .*damaged"):
        load_base_model(str(damaged))
    # a separate VAE (folder with vae/ or the VAE at its root) is trusted in the weight dtype
    assert not load_base_model(str(tiny_sdxl_dir), vae_name_or_path=str(tiny_sdxl_dir / "vae")).vae_in_fp32
    # --resolution defaults to the family's: 1024 for SDXL (diffusers' SDXL script), 512 for SD; a base whose
    # own size is smaller (these tiny ones, tiny-shapes' 64) trains at its own size, not upscaled to those
    from types import SimpleNamespace

    from difftune.models import default_resolution

    assert [default_resolution(family, SimpleNamespace(native_resolution=own))
            for family, own in ((1024, 1024), (512, 512), (512, 768), (512, 64))] == [1024, 512, 512, 64]
    method = ControlNetMethod(make_config(tiny_sdxl_dir, fill_dir, tmp_path, resolution=None), base=sdxl_base)
    own = sdxl_base.native_resolution
    assert own < 1024 and method.resolution == own and method.cfg.model.model_family == "sdxl"
    assert method.cfg.data.resolution == own  # what the saved config records
    sd = ControlNetMethod(make_config(tiny_model_dir, fill_dir, tmp_path, resolution=None))
    assert sd.resolution == sd.base.native_resolution < 512


def test_a_controlnet_made_for_another_base_is_refused_before_any_step(tiny_model_dir, tiny_sdxl_dir, sdxl_base,
                                                                      tiny_base, fill_dir, tmp_path):
    from diffusers import ControlNetModel

    from difftune.api import generate
    from difftune.errors import ModelLoadError
    from difftune.methods.controlnet import ControlNetMethod

    sd_controlnet = tmp_path / "sd-controlnet"
    ControlNetModel.from_unet(tiny_base.unet).save_pretrained(sd_controlnet)
    cfg = make_config(tiny_sdxl_dir, fill_dir, tmp_path / "run", controlnet_model_name_or_path=str(sd_controlnet))
    # (it failed inside diffusers at the first step: "The size of tensor a (8) must match ...")
    with pytest.raises(ModelLoadError, match=r"--controlnet_model_name_or_path .*sd-controlnet was made for another "
                                             r"base model: an SD 1.x/2.x ControlNet on an SDXL base "
                                             r"\(cross_attention_dim 32 in the ControlNet, 64 in the base; "):
        ControlNetMethod(cfg, base=sdxl_base)
    with pytest.raises(ModelLoadError, match="--controlnet .*made for another base"):
        generate(str(tiny_sdxl_dir), sd_controlnet, fill_dir / "validation" / "conditioning_0.png", PROMPT,
                 num_inference_steps=1)
    ControlNetMethod(make_config(tiny_model_dir, fill_dir, tmp_path / "ok",  # its own base: fine
                                 controlnet_model_name_or_path=str(sd_controlnet)), base=tiny_base)


@torch.no_grad()
def test_prompt_embeds_pooled_and_time_ids_match_the_diffusers_pipeline(sdxl_base):
    from diffusers import StableDiffusionXLPipeline

    from difftune.families import FAMILIES, MicroConditions

    b = sdxl_base
    pipe = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2,
                                     tokenizer=b.tokenizer, tokenizer_2=b.tokenizer_2, unet=b.unet,
                                     scheduler=b.noise_scheduler, add_watermarker=False)
    ours = FAMILIES["sdxl"].encode_prompts(b, [PROMPT, ""], torch.device("cpu"))
    # '' (a dropped caption) goes through both encoders alike, as in the pipeline
    embeds, _, pooled, _ = pipe.encode_prompt([PROMPT, ""], device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.encoder_hidden_states, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.encoder_hidden_states.shape == (2, 77, 64) and ours.pooled.shape == (2, 32)

    sizes, crops, target = [(64, 96), (1024, 768)], [(0, 16), (128, 0)], (64, 64)
    micro = MicroConditions(torch.tensor(sizes), torch.tensor(crops), target)
    added = FAMILIES["sdxl"].added_cond_kwargs(ours, micro, torch.float32)
    for i in range(2):
        theirs = pipe._get_add_time_ids(sizes[i], crops[i], target, dtype=torch.float32,
                                        text_encoder_projection_dim=b.text_encoder_2.config.projection_dim)
        assert torch.equal(added["time_ids"][i : i + 1], theirs)
    assert added["text_embeds"] is not None and torch.equal(added["text_embeds"], ours.pooled)


@torch.no_grad()
def test_zero_initialised_controlnet_leaves_sdxl_unet_output_unchanged(sdxl_base):
    from difftune.surgery import controlnet_from_unet

    unet = sdxl_base.unet
    controlnet = controlnet_from_unet(unet)
    assert controlnet.config.addition_embed_type == "text_time"
    latents, ehs, added, cond = _inputs(sdxl_base)
    t = torch.tensor([10, 700])
    plain = unet(latents, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    down, mid = controlnet(latents, t, encoder_hidden_states=ehs, controlnet_cond=cond, added_cond_kwargs=added,
                           return_dict=False)
    assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
    joined = unet(latents, t, encoder_hidden_states=ehs, added_cond_kwargs=added,
                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(plain, joined)
    # the size/crop conditioning reaches the UNet: other time ids, other output
    other = dict(added, time_ids=added["time_ids"] + 8)
    assert not torch.equal(plain, unet(latents, t, encoder_hidden_states=ehs, added_cond_kwargs=other).sample)
    assert torch.equal(controlnet.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)


def test_backward_touches_only_controlnet_parameters_and_vae_stays_fp32(tiny_sdxl_dir, sdxl_base, fill_dir, tmp_path):
    from difftune.methods.controlnet import ControlNetMethod

    method = ControlNetMethod(make_config(tiny_sdxl_dir, fill_dir, tmp_path, proportion_empty_prompts=0.5))
    batch = method.collate([method.train_dataset()[i] for i in range(2)])
    assert batch["original_sizes"].tolist() == [[64, 64]] * 2 and batch["crop_top_lefts"].tolist() == [[0, 0]] * 2
    loss = method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    frozen = [p for m in method.base.frozen_modules() for p in m.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    grads = [p.grad for p in method.controlnet.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # mixed precision: the stock SDXL VAE stays fp32 (it overflows in fp16), the rest goes bf16
    # (what setup reads of an Accelerator; a real one would fix accelerate's process-wide state to bf16)
    method.setup(SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16"))
    assert method.base.vae.dtype == torch.float32 and method.base.unet.dtype == torch.bfloat16
    assert method.base.text_encoder_2.dtype == torch.bfloat16 and method.controlnet.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.isfinite(method.loss(batch, torch.Generator().manual_seed(0)))


def test_examples_carry_original_size_and_crop_offsets(tmp_path):
    from difftune.data import ControlNetExamples, collate_examples, load_table
    from difftune.families import micro_conditions

    root = tmp_path / "wide"
    root.mkdir()
    Image.new("RGB", (96, 64), (255, 0, 0)).save(root / "t.png")
    Image.new("RGB", (96, 64), (255, 255, 255)).save(root / "c.png")
    (root / "metadata.jsonl").write_text(json.dumps({"image": "t.png", "conditioning_image": "c.png", "text": "x"}))
    table = load_table(train_data_dir=root, cache_dir=str(tmp_path / "cache"))
    item = ControlNetExamples(table, "image", "conditioning_image", "text", resolution=32, interpolation="lanczos")[0]
    # 96x64 -> 48x32, centre crop 32x32 starts 8 px from the left
    assert item["original_size"] == (64, 96) and item["crop_top_left"] == (0, 8)
    batch = collate_examples([item])
    assert micro_conditions(batch, 32).crop_top_lefts.tolist() == [[0, 8]]
    fixed = micro_conditions(batch, 32, crop_h=0, crop_w=0)  # --crops_coords_top_left_h/_w, as diffusers
    assert fixed.crop_top_lefts.tolist() == [[0, 0]] and fixed.original_sizes.tolist() == [[64, 96]]
    assert micro_conditions(batch, 32, crop_h=5).crop_top_lefts.tolist() == [[5, 8]]  # the other stays real


def test_resume_equals_uninterrupted(tiny_sdxl_dir, fill_dir, tmp_path, monkeypatch):
    from difftune.api import train_controlnet

    kw = dict(max_train_steps=4, checkpointing_steps=2, train_batch_size=2, proportion_empty_prompts=0.5,
              lr_scheduler="cosine", max_train_samples=6)
    train_controlnet(make_config(tiny_sdxl_dir, fill_dir, tmp_path / "full", **kw))
    part = tmp_path / "part"
    real = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_controlnet(make_config(tiny_sdxl_dir, fill_dir, part, **kw))
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    summary = train_controlnet(make_config(tiny_sdxl_dir, fill_dir, part, resume_from_checkpoint="latest", **kw))
    assert summary["global_step"] == 4
    full, resumed = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (tmp_path / "full", part))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.fixture(scope="module")
def cli_trained(tiny_sdxl_dir, fill_dir, tmp_path_factory):
    """An SDXL ControlNet trained through the CLI with diffusers' SDXL flags."""
    from difftune.cli import main

    out = tmp_path_factory.mktemp("sdxl") / "run"
    code = main(["train", "controlnet", "--pretrained_model_name_or_path", str(tiny_sdxl_dir),
                 "--pretrained_vae_model_name_or_path", str(tiny_sdxl_dir / "vae"), "--train_data_dir", str(fill_dir),
                 "--output_dir", str(out), "--resolution", "64", "--crops_coords_top_left_h", "0",
                 "--crops_coords_top_left_w", "0", "--image_interpolation_mode", "bicubic", "--train_batch_size", "4",
                 "--max_train_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
                 "--validation_prompt", PROMPT, "--validation_image", str(fill_dir / "validation" / "conditioning_0.png"),
                 "--num_validation_images", "1", "--num_validation_inference_steps", "2"])
    assert code == 0
    return out


def test_cli_run_exports_a_controlnet_that_loads_in_the_sdxl_pipeline(cli_trained, tiny_sdxl_dir, fill_dir, tmp_path,
                                                                      capsys):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

    from difftune.api import generate
    from difftune.cli import main

    out = cli_trained
    saved = json.loads((out / "difftune_config.json").read_text())
    assert saved["model"]["model_family"] == "sdxl" and saved["data"]["crops_coords_top_left_h"] == 0
    assert saved["train"]["tracker_project_name"] == "sd_xl_train_controlnet"  # diffusers' SDXL name
    assert (out / "validation" / "step-0000002.png").is_file()
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLControlNetPipeline" in card and f"- VAE: `{tiny_sdxl_dir / 'vae'}`" in card
    snippet = card.split("```python\n")[1].split("```")[0]  # the card's code runs, with the run's VAE
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 — our own generated text
    assert namespace["pipe"].vae is namespace["vae"]
    loaded = ControlNetModel.from_pretrained(out)
    assert torch.count_nonzero(loaded.controlnet_mid_block.weight) > 0

    cond = Image.open(fill_dir / "validation" / "conditioning_1.png").convert("RGB")
    ours = generate(str(tiny_sdxl_dir), out, cond, PROMPT, num_inference_steps=3, seed=5, device="cpu")[0]
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir, controlnet=loaded)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, image=cond, num_inference_steps=3, height=64, width=64, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs)) and ours.size == (64, 64)
    args = ["generate", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--controlnet", str(out), "--image",
            str(fill_dir / "validation" / "conditioning_1.png"), "--prompt", PROMPT, "--num_inference_steps", "3",
            "--seed", "5", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    assert main(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(ours))
    assert main(args[:-1] + [str(tmp_path / "c.png"), "--control_guidance", "cond"]) == 0  # guidance amplifies control
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(ours))
    capsys.readouterr()
    assert main(args[:1] + args[3:-1] + [str(tmp_path / "r.png")]) == 0  # no base given: the run's base, and the VAE it trained with
    assert f"VAE: {tiny_sdxl_dir / 'vae'} (recorded in" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")), np.asarray(ours))  # (the same VAE weights)
    assert main(args[:-1] + [str(tmp_path / "n.png"), "--pretrained_vae_model_name_or_path", str(tmp_path / "nope")]) == 2


def test_the_recorded_base_given_by_name_keeps_the_runs_vae(cli_trained, tiny_sdxl_dir, fill_dir, tmp_path,
                                                             monkeypatch, capsys, caplog):
    """Naming the recorded base (./sdxl/, an absolute path) samples as leaving it out does: with the VAE the run
    trained with; another base is read with its own VAE, and that is warned about with the flag that restores it.
    eval's JSON says which VAE it used. A ControlNet that records no base names why the default was tried."""
    from difftune.cli import main
    from difftune.eval.run import eval_controlnet
    from difftune.tiny import save_tiny_sdxl_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_sdxl_dir, "sdxl")
    save_tiny_sdxl_model(tmp_path / "other", seed=1)  # another VAE of the same shape
    run = tmp_path / "runs" / "cn"
    run.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(cli_trained / name, run / name)
    (run / "difftune_config.json").write_text(json.dumps({  # a run started here, recorded as typed
        "model": {"pretrained_model_name_or_path": "sdxl", "pretrained_vae_model_name_or_path": "other/vae"},
        "loss": {"prediction_type": "epsilon"}, "train": {"output_dir": "runs/cn"}}))
    args = ["generate", "--controlnet", "runs/cn", "--image", str(fill_dir / "validation" / "conditioning_1.png"),
            "--prompt", PROMPT, "--num_inference_steps", "2", "--device", "cpu"]
    assert main(args + ["--out", "none.png"]) == 0
    capsys.readouterr()
    for i, base in enumerate(["./sdxl/", str(tmp_path / "sdxl")]):
        assert main(args + ["--pretrained_model_name_or_path", base, "--out", f"named{i}.png"]) == 0
        said = capsys.readouterr().err
        assert f"VAE: {tmp_path / 'other' / 'vae'} (recorded in" in said and "the one recorded in" in said, said
        assert np.array_equal(np.asarray(Image.open(f"named{i}.png")), np.asarray(Image.open("none.png")))
    caplog.clear()
    assert main(args + ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--out", "other.png"]) == 0
    assert "VAE:" not in capsys.readouterr().err
    assert f"--pretrained_vae_model_name_or_path {tmp_path / 'other' / 'vae'} to use the run's" in caplog.text
    assert not np.array_equal(np.asarray(Image.open("other.png")), np.asarray(Image.open("none.png")))
    result = eval_controlnet("sdxl", "runs/cn", n=1, steps=1, baseline=False)
    assert result["vae"] == str(tmp_path / "other" / "vae")
    assert eval_controlnet(str(tiny_sdxl_dir), "runs/cn", n=1, steps=1, baseline=False)["vae"] is None

    (run / "difftune_config.json").unlink()  # nothing records its base: the default's mismatch says why it was taken
    assert main(args + ["--out", "bare.png"]) == 2
    said = capsys.readouterr().err
    assert "nothing in --controlnet runs/cn records the base it was trained on" in said
    assert "the default base, tiny-shapes, was taken: --controlnet runs/cn was made for another base model" in said


def test_in_memory_sampling_equals_the_exported_model(tiny_sdxl_dir, sdxl_base, fill_dir, tmp_path):
    from diffusers import ControlNetModel

    from difftune.api import resolve_seed
    from difftune.methods.controlnet import ControlNetMethod
    from difftune.trainer import Trainer

    cfg = resolve_seed(make_config(tiny_sdxl_dir, fill_dir, tmp_path / "run", max_train_steps=1, train_batch_size=2))
    method = ControlNetMethod(cfg)
    Trainer(method, method.cfg).fit()
    loaded = ControlNetModel.from_pretrained(tmp_path / "run")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in method.controlnet.state_dict().items())
    cond = Image.open(fill_dir / "validation" / "conditioning_0.png").convert("RGB")
    ours = method.sample([PROMPT], [cond], num_images=1, seed=3, steps=2)[0][0]
    from difftune.pipelines import controlnet_pipeline, run_controlnet_pipeline

    # validation samples at the SDXL pipeline's own guidance, 5.0, as diffusers' SDXL script does
    theirs = run_controlnet_pipeline(controlnet_pipeline(sdxl_base, loaded), [PROMPT], [cond], 1, 3, 2, 64,
                                     guidance_scale=5.0)[0][0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_eval_controlnet_runs_on_an_sdxl_base(cli_trained, tiny_sdxl_dir, tmp_path):
    from difftune.cli import main

    # the base-alone baseline too: difftune.pipelines.text2image_pipeline builds the SDXL text-to-image pipeline
    assert main(["eval", "controlnet", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--controlnet",
                 str(cli_trained), "--n", "2", "--num_inference_steps", "2", "--out", str(tmp_path),
                 "--control_guidance", "both", "cond"]) == 0
    result = json.loads((tmp_path / "eval_controlnet.json").read_text())
    assert result["n"] == 2
    for row in ("controlnet", "controlnet_cond", "base_alone", "vae_ceiling"):
        assert 0.0 <= result[row]["iou"] <= 1.0, row


def test_cached_latents_and_embeddings_train_the_same_sdxl_controlnet(tiny_sdxl_dir, fill_dir, tmp_path):
    """The encoded cache holds SDXL's pooled embeddings and each image's size/crop conditioning too."""
    import json

    from difftune.api import train_controlnet

    kw = dict(max_train_steps=3, train_batch_size=2, proportion_empty_prompts=0.5, max_train_samples=6,
              max_grad_norm=0.0)
    train_controlnet(make_config(tiny_sdxl_dir, fill_dir, tmp_path / "plain", **kw))
    train_controlnet(make_config(tiny_sdxl_dir, fill_dir, tmp_path / "cached", cache_latents=True, **kw))
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("plain", "cached")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    (folder,) = (tmp_path / "cached" / "encoded-cache").iterdir()
    text = load_file(str(folder / "text.safetensors"))
    assert text["pooled"].shape[0] == text["hidden"].shape[0]


@pytest.mark.parametrize("crop_flags", [{}, {"crop_h": 0, "crop_w": 4}])
def test_time_ids_stay_on_the_batch_device(crop_flags):
    """A prepared data loader puts the batch on the GPU: every time-id part must follow it there
    (an H200 run stopped at the first step with a CPU tensor in the concatenation). 'meta'
    stands in for the accelerator: it refuses CPU tensors the same way."""
    from difftune.families import SDXLFamily, micro_conditions

    batch = {"captions": ["a", "b"], "original_sizes": torch.tensor([[64, 96], [32, 32]], device="meta"),
             "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long, device="meta")}
    micro = micro_conditions(batch, 32, **crop_flags)
    ids = SDXLFamily.time_ids(micro)
    assert ids.device.type == "meta" and ids.shape == (2, 6)
