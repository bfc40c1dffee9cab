"""Custom Diffusion: surgery, augmentation, training through the generic loop, export and diffusers interop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_same_training
from custom_diffusion_helpers import cd_config, write_concept
from difftune import checkpoint as ckpt
from difftune.api import train_custom_diffusion
from difftune.custom_diffusion import data as cd
from difftune.custom_diffusion import surgery
from difftune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def star_dir(tmp_path_factory):
    return write_concept(tmp_path_factory.mktemp("cd") / "star")


@pytest.fixture(scope="module")
def heart_dir(tmp_path_factory):
    return write_concept(tmp_path_factory.mktemp("cd") / "heart", "heart", (220, 20, 60), (240, 255, 240))


def _unet_out(unet, tiny_base, prompt="star with red background"):
    from difftune.noising import encode_prompt, tokenize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = encode_prompt(tiny_base.text_encoder, tokenize(tiny_base.tokenizer, [prompt, ""]))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=emb).sample


@pytest.mark.parametrize("freeze_model", ["crossattn_kv", "crossattn"])
def test_fresh_processors_reproduce_base_attention(tiny_base, freeze_model):
    import copy

    unet = copy.deepcopy(tiny_base.unet)
    before = _unet_out(unet, tiny_base)
    trainable = surgery.install_processors(unet, freeze_model)
    assert trainable and all(name.endswith("attn2.processor") for name in trainable)
    names = {k.split(".processor.")[1] for k in surgery.processor_state_dict(unet)}
    expected = {"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"}
    if freeze_model == "crossattn":
        expected |= {"to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias"}
    assert names == expected
    torch.testing.assert_close(_unet_out(unet, tiny_base), before, rtol=0, atol=1e-6)


def test_initializer_must_be_one_token(tiny_base):
    # 'ktn' is several tokens; tokenizer.encode(['ktn']) has length 1 under transformers 5 and fooled diffusers
    assert len(tiny_base.tokenizer.encode(["ktn"], add_special_tokens=False)) == 1
    with pytest.raises(ConfigError, match=r"--initializer_token 'ktn' is 3 tokens"):
        surgery.single_token_id(tiny_base.tokenizer, "ktn")
    assert surgery.single_token_id(tiny_base.tokenizer, "star") > 0


@pytest.mark.parametrize("resolution", [64, 512])
def test_augmentation_mask_never_empty_and_prompts_say_the_scale(resolution):
    stored = torch.full((3, int(np.ceil(1.4 * resolution))), 200, dtype=torch.uint8)[..., None].expand(-1, -1, int(np.ceil(1.4 * resolution)))
    g = torch.Generator().manual_seed(0)
    prefixes = set()
    for _ in range(200):
        a = cd.augment_instance(stored, "<new1> star", cd.draw_augmentation(g), resolution, 8, aug=True, hflip=True)
        assert a.pixels.shape == (3, resolution, resolution) and a.mask.shape == (1, resolution // 8, resolution // 8)
        assert a.mask.sum() >= 1
        prefixes.add(a.prompt.replace("<new1> star", ""))
    assert prefixes == {"", "a far away ", "very small ", "zoomed in ", "close up "}
    # the smallest rescale at 64 px: diffusers' mask has no cell left (NaN loss); ours keeps one
    assert cd.valid_cells(0, 64 // 3, 8, 8)[1] > cd.valid_cells(0, 64 // 3, 8, 8)[0]



def test_augmentation_stays_on_the_image_device():
    """A prepared data loader puts the instance images on the GPU; the padded canvas of a
    zoomed-out crop must be made there too. 'meta' stands in for the accelerator (it refuses
    mixing with CPU tensors the same way)."""
    stored = torch.zeros(3, 72, 72, dtype=torch.uint8, device="meta")
    shrink = torch.tensor([0.9, 0.1, 0.0, 0.5, 0.5, 0.9, 0.0, 0.0, 0.9], dtype=torch.float64)  # u[1] < 0.66: smaller
    grow = shrink.clone()
    grow[1] = 0.9  # larger than the crop
    for u in (shrink, grow):
        a = cd.augment_instance(stored, "<new1> star", u, 64, 8, aug=True, hflip=True)
        assert a.pixels.device.type == "meta" and a.mask.device.type == "meta"
    assert cd.crop_class(stored, shrink, 64, hflip=True).device.type == "meta"

def test_one_step_changes_only_kv_and_new_rows(tiny_base, tiny_model_dir, star_dir, tmp_path):
    from difftune.methods.custom_diffusion import CustomDiffusionMethod
    from difftune.trainer import Trainer

    cfg = cd_config(tiny_model_dir, tmp_path / "run", instance_data_dir=str(star_dir), instance_prompt="<new1> star",
                    max_train_steps=1, adam_weight_decay=0.5)
    method = CustomDiffusionMethod(cfg, base=tiny_base)
    start = {k: v.clone() for k, v in surgery.processor_state_dict(method.base.unet).items()}
    Trainer(method, cfg).fit()
    assert len(tiny_base.tokenizer) + 1 == len(method.base.tokenizer)  # the caller's model is untouched
    procs = surgery.processor_state_dict(method.base.unet)
    assert all(not torch.equal(procs[k], start[k]) for k in procs)  # every K/V copy trained
    proc_ids = {id(p) for p in method.base.unet.parameters() if p.requires_grad}
    base_params = dict(tiny_base.unet.named_parameters())
    for name, p in method.base.unet.named_parameters():
        if id(p) not in proc_ids:
            assert torch.equal(p, base_params[name]), name  # the UNet's own weights: untouched
    old = tiny_base.text_encoder.get_input_embeddings().weight
    new = method.base.text_encoder.get_input_embeddings().weight
    assert torch.equal(new[: old.shape[0]], old)  # every old row bit-identical, despite weight decay 0.5
    star = tiny_base.tokenizer.convert_tokens_to_ids("star</w>")
    assert not torch.equal(new[method.token_ids[0]], old[star])  # the new row (initialised from 'star') moved
    base_te = dict(tiny_base.text_encoder.named_parameters())
    for name, p in method.base.text_encoder.named_parameters():
        if "token_embedding" not in name:
            assert torch.equal(p, base_te[name]), name


def test_bad_inputs_give_clear_errors(tiny_base, tiny_model_dir, star_dir, tmp_path):
    from difftune.methods.custom_diffusion import CustomDiffusionMethod

    def build(**kw):
        cfg = cd_config(tiny_model_dir, tmp_path / "o", **kw)
        return CustomDiffusionMethod(cfg, base=tiny_base).train_dataset()

    with pytest.raises(ConfigError, match="contains none of the modifier tokens"):  # a token named, not used
        build(instance_data_dir=str(star_dir), instance_prompt="a star", modifier_token="<new1>")
    with pytest.raises(ConfigError, match=r"has the token <new2>, which --modifier_token does not list .* "
                                          r"--modifier_token '<new1>\+<new2>'"):  # a concept's own token, unlisted
        build(instance_data_dir=str(star_dir), instance_prompt="a <new2> star", modifier_token="<new1>")
    with pytest.raises(ConfigError, match=r"gives 2 word\(s\) for 1 modifier token\(s\)"):  # diffusers drops one
        build(instance_data_dir=str(star_dir), instance_prompt="<new1> star", modifier_token="<new1>",
              initializer_token="star+cat")
    with pytest.raises(ConfigError, match="'ktn' is 3 tokens"):
        build(instance_data_dir=str(star_dir), instance_prompt="<new1> star", initializer_token="ktn")
    with pytest.raises(ConfigError, match=r"default initializer \(no --initializer_token\) 'thing' is 3 tokens.*"
                                          r"single token here, e.g. 'star'") as info:  # the prompt's noun; examples
        build(instance_data_dir=str(star_dir), instance_prompt="<new1> thing")  # true of this tokenizer
    assert "'cat'" not in str(info.value) and "leave the flag out" not in str(info.value)  # not the way it came
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build(instance_data_dir=str(tmp_path / "empty"), instance_prompt="<new1> star", initializer_token="star")
    bad = write_concept(tmp_path / "bad")
    (bad / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"cannot read image .*9\.png"):
        build(instance_data_dir=str(bad), instance_prompt="<new1> star")
    (bad / "8.png").write_bytes(b"not an image")  # every bad file at once, not one per run
    with pytest.raises(DataError, match=r"2 images cannot be read; fix or remove each:\n .*8\.png.*\n .*9\.png"):
        build(instance_data_dir=str(bad), instance_prompt="<new1> star")
    (tmp_path / "c.json").write_text("[{'instance_prompt': 1}")
    with pytest.raises(ConfigError, match=r"--concepts_list .*c\.json is not valid JSON"):
        build(concepts_list=str(tmp_path / "c.json"))
    (tmp_path / "d.json").write_text(json.dumps([{"instance_prompt": "<new1> star"}]))
    with pytest.raises(ConfigError, match="entry 0 has no 'instance_data_dir'"):
        build(concepts_list=str(tmp_path / "d.json"))
    (tmp_path / "e.json").write_text(json.dumps([{"instance_prompt": 5, "instance_data_dir": str(star_dir)}]))
    with pytest.raises(ConfigError, match=r"entry 0: 'instance_prompt' must be text, not int \(5\)"):
        build(concepts_list=str(tmp_path / "e.json"))
    with pytest.raises(ConfigError, match=r"^the instance prompt 'a star' contains none"):  # given by flags: no prefix
        build(instance_data_dir=str(star_dir), instance_prompt="a star", modifier_token="<new1>")
    with pytest.raises(ConfigError, match="<new2> appears in no instance prompt"):
        build(instance_data_dir=str(star_dir), instance_prompt="<new1> star", modifier_token="<new1>+<new2>")
    with pytest.raises(ConfigError, match="--with_prior_preservation needs --class_prompt"):
        cd_config(tiny_model_dir, tmp_path, instance_data_dir="x", instance_prompt="<new1> star",
                  with_prior_preservation=True, class_data_dir="c")
    # a plain word as the token would take the word's place in every prompt (CLIP spells words 'star</w>')
    with pytest.raises(ConfigError, match=r"--modifier_token 'star' is a word the tokenizer already knows"):
        build(instance_data_dir=str(star_dir), instance_prompt="star shape", modifier_token="star",
              initializer_token="circle")
    with pytest.raises(ConfigError, match=r"--modifier_token 'star' is a word"):  # before the initializer's error
        build(instance_data_dir=str(star_dir), instance_prompt="star shape", modifier_token="star")
    for flag in ("validation_steps", "num_validation_images", "num_validation_inference_steps"):
        with pytest.raises(ConfigError, match=f"--{flag} must be >= 1, got 0"):  # not a crash at the first validation
            cd_config(tiny_model_dir, tmp_path, instance_data_dir="x", instance_prompt="<new1> star", **{flag: 0})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--class_data_dir .*afile is a file, not a folder"):
        from difftune.custom_diffusion.class_images import ensure_class_images

        ensure_class_images(tiny_base, tmp_path / "afile", "star", 1, 64)


def test_multi_concept_with_generated_prior(tiny_model_dir, star_dir, heart_dir, tmp_path):
    concepts = [
        {"instance_prompt": "<new1> star", "class_prompt": "star", "instance_data_dir": str(star_dir),
         "class_data_dir": str(tmp_path / "cls-star")},
        {"instance_prompt": "<new2> heart", "class_prompt": "heart", "instance_data_dir": str(heart_dir),
         "class_data_dir": str(tmp_path / "cls-heart")},
    ]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    out = tmp_path / "run"
    summary = train_custom_diffusion(cd_config(
        tiny_model_dir, out, concepts_list=str(tmp_path / "concepts.json"), modifier_token="<new1>+<new2>",
        with_prior_preservation=True, num_class_images=3, validation_prompt=["<new1> star and <new2> heart"],
        num_validation_images=1, num_validation_inference_steps=2))
    assert summary["global_step"] == 2 and np.isfinite(summary["final_loss"])
    assert len(list((tmp_path / "cls-star").glob("class-*.png"))) == 3
    meta = json.loads((out / "custom_diffusion.json").read_text())
    assert meta["modifier_tokens"] == ["<new1>", "<new2>"] and meta["initializer_tokens"] == ["star", "heart"]
    assert (out / "<new1>.safetensors").is_file() and (out / "<new2>.safetensors").is_file()
    assert "<new2>" in (out / "README.md").read_text()


def test_class_images_resume_keeps_existing(tiny_base, tmp_path, caplog):
    import logging

    from difftune.custom_diffusion.class_images import ensure_class_images

    kw = dict(resolution=64, sample_batch_size=2, steps=2, seed=0, progress=False)
    first = ensure_class_images(tiny_base, tmp_path / "a", "star", 2, **kw)
    kept = {p.name: p.read_bytes() for p in first}
    resumed = ensure_class_images(tiny_base, tmp_path / "a", "star", 3, **kw)
    once = ensure_class_images(tiny_base, tmp_path / "b", "star", 3, **kw)
    assert all(p.read_bytes() == kept[p.name] for p in resumed[:2])
    assert [p.read_bytes() for p in resumed] == [p.read_bytes() for p in once]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difftune"):  # a folder made for another prompt: used, and said
        assert ensure_class_images(tiny_base, tmp_path / "a", "circle", 3, **kw) == resumed
    assert "holds class images generated for another prompt (3 for 'star')" in caplog.text


@pytest.mark.parametrize("safe", [True, False])
def test_outputs_load_in_diffusers_and_give_the_same_image(tiny_model_dir, star_dir, tmp_path, safe):
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from difftune.custom_diffusion.export import load_custom_diffusion
    from difftune.methods.custom_diffusion import CustomDiffusionMethod
    from difftune.trainer import Trainer

    out = tmp_path / "run"
    cfg = cd_config(tiny_model_dir, out, instance_data_dir=str(star_dir), instance_prompt="<new1> star",
                    no_safe_serialization=not safe, learning_rate=5e-2)
    method = CustomDiffusionMethod(cfg)
    Trainer(method, cfg).fit()
    ext = "safetensors" if safe else "bin"
    prompt = "<new1> star with white background"
    ours = np.asarray(method.sample([prompt], [None], 1, seed=3, steps=4)[0][0], dtype=np.int16)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    plain = pipe(prompt="star", num_inference_steps=4, generator=torch.Generator().manual_seed(3), height=64,
                 width=64).images[0]
    # diffusers' own loaders; _pipeline=pipe works around huggingface/diffusers#9320 (a no-op otherwise)
    pipe.unet.load_attn_procs(str(out), weight_name=f"pytorch_custom_diffusion_weights.{ext}", _pipeline=pipe)
    pipe.load_textual_inversion(str(out), weight_name=f"<new1>.{ext}")
    kinds = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert kinds == {"CustomDiffusionAttnProcessor"}
    theirs = pipe(prompt=prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(3), height=64,
                  width=64).images[0]
    diff = np.abs(np.asarray(theirs, dtype=np.int16) - ours)
    assert diff.max() <= 2, diff.max()  # SDPA vs. baddbmm attention: rounding only
    assert plain.size == theirs.size

    pipe2 = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe2.scheduler = UniPCMultistepScheduler.from_config(pipe2.scheduler.config)
    assert load_custom_diffusion(pipe2, out) == ["<new1>"]
    again = pipe2(prompt=prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(3), height=64,
                  width=64).images[0]
    assert np.abs(np.asarray(again, dtype=np.int16) - ours).max() <= 1


def test_resume_equals_uninterrupted(tiny_model_dir, star_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    kw = dict(instance_data_dir=str(star_dir), instance_prompt="<new1> star", max_train_steps=5, checkpointing_steps=2,
              with_prior_preservation=True, class_prompt="star", class_data_dir=str(tmp_path / "cls"),
              num_class_images=3, hflip=True, lr_scheduler="cosine")
    train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "full", **kw))
    real = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "part", **kw))
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    from difftune.api import generate
    from difftune.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"has not finished, but each checkpoint loads: give .*checkpoint-2"):
        generate(str(tiny_model_dir), None, None, "<new1> star", num_inference_steps=2,
                 custom_diffusion=tmp_path / "part")
    (image,) = generate(str(tiny_model_dir), None, None, "<new1> star", num_inference_steps=2,  # as the seed's
                        custom_diffusion=tmp_path / "part" / "checkpoints" / "checkpoint-2")  # inference from one
    assert image.size == (64, 64)
    (same,) = generate(prompt="<new1> star", num_inference_steps=2,  # by keywords alone: the run's recorded base
                       custom_diffusion=tmp_path / "part" / "checkpoints" / "checkpoint-2")
    assert np.array_equal(np.asarray(same), np.asarray(image))
    train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "part", resume_from_checkpoint="latest", **kw))
    for name in ("pytorch_custom_diffusion_weights.safetensors", "<new1>.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        last = load_file(str(tmp_path / "part" / "checkpoints" / "checkpoint-5" / name))  # the last step's checkpoint
        assert all(torch.equal(a[k], last[k]) for k in a), name  # holds what was exported


def test_accumulation_2x2_equals_batch_4(tiny_model_dir, star_dir, tmp_path):
    from safetensors.torch import load_file

    kw = dict(instance_data_dir=str(star_dir), instance_prompt="<new1> star", max_train_steps=1, max_grad_norm=0.0)
    train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "b4", train_batch_size=4, **kw))
    train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "b2x2", train_batch_size=2,
                                     gradient_accumulation_steps=2, **kw))
    name = "pytorch_custom_diffusion_weights.safetensors"
    a, b = load_file(str(tmp_path / "b4" / name)), load_file(str(tmp_path / "b2x2" / name))
    assert_same_training(a, b, lr=1e-3)


def test_embedding_learning_rate_moves_only_the_new_rows_faster(tiny_base, tiny_model_dir, star_dir, tmp_path):
    """--embedding_learning_rate: the new tokens' rows train at their own rate (Adam's first step
    moves each weight by about the learning rate), the K/V copies at --learning_rate; --scale_lr
    and the schedule act on both alike."""
    from difftune.methods.custom_diffusion import CustomDiffusionMethod
    from difftune.optim import build_lr_scheduler, build_optimizer
    from difftune.trainer import Trainer

    def first_step(**kw):
        cfg = cd_config(tiny_model_dir, tmp_path / f"run{len(kw)}", instance_data_dir=str(star_dir),
                        instance_prompt="<new1> star", max_train_steps=1, learning_rate=1e-5, **kw)
        method = CustomDiffusionMethod(cfg, base=tiny_base)
        row = method.embedding[method.token_ids[0]].detach().clone()
        kv = {k: v.clone() for k, v in surgery.processor_state_dict(method.base.unet).items()}
        Trainer(method, cfg).fit()
        after = surgery.processor_state_dict(method.base.unet)
        kv_move = max((after[k] - kv[k]).abs().max().item() for k in kv)
        return (method.embedding[method.token_ids[0]] - row).abs().max().item(), kv_move

    row_same, kv_same = first_step()
    row_fast, kv_fast = first_step(embedding_learning_rate=1e-3)
    assert row_same < 2e-5 and row_fast > 50 * row_same, (row_same, row_fast)
    assert kv_fast == pytest.approx(kv_same, rel=1e-3)

    cfg = cd_config(tiny_model_dir, tmp_path / "o", instance_data_dir=str(star_dir), instance_prompt="<new1> star",
                    learning_rate=1e-5, embedding_learning_rate=1e-3, scale_lr=True, lr_warmup_steps=10,
                    lr_scheduler="constant_with_warmup")
    optimizer = build_optimizer(CustomDiffusionMethod(cfg, base=tiny_base).param_groups(), cfg.optim, 4e-5, "cpu")
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([4e-5, 4e-3])  # 4 images per step
    schedule = build_lr_scheduler(optimizer, cfg.optim, 100)
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([4e-6, 4e-4])  # warm-up: 1/10 of each
    with pytest.raises(ConfigError, match="--embedding_learning_rate must be > 0"):
        cd_config(tiny_model_dir, tmp_path, embedding_learning_rate=0.0)


def test_without_modifier_tokens_only_the_cross_attention_trains(tiny_model_dir, star_dir, tmp_path):
    """diffusers' script run without --modifier_token: no new token, the text encoder frozen, the
    processors trained on the prompt's own words; the folder loads with load_attn_procs alone."""
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from safetensors.torch import load_file

    from difftune.methods.custom_diffusion import CustomDiffusionMethod
    from difftune.trainer import Trainer

    out = tmp_path / "run"
    cfg = cd_config(tiny_model_dir, out, instance_data_dir=str(star_dir), instance_prompt="star with white background",
                    learning_rate=5e-2, max_train_steps=2, checkpointing_steps=2)
    method = CustomDiffusionMethod(cfg)
    table_before = method.base.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(method.base.tokenizer)
    Trainer(method, cfg).fit()
    assert method.modifier_tokens == [] and len(method.base.tokenizer) == vocab
    assert torch.equal(method.base.text_encoder.get_input_embeddings().weight.detach().float(), table_before.float())
    meta = json.loads((out / "custom_diffusion.json").read_text())
    assert meta["modifier_tokens"] == [] and meta["embeddings"] == {}
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["pytorch_custom_diffusion_weights.safetensors"]
    saved = load_file(str(out / "checkpoints" / "checkpoint-2" / "trainable.safetensors"))
    assert not any(k.startswith("text_embeddings.") for k in saved)

    prompt = "star with white background"
    ours = np.asarray(method.sample([prompt], [None], 1, seed=3, steps=4)[0][0], dtype=np.int16)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=4, height=64, width=64)
    plain = np.asarray(pipe(prompt=prompt, generator=torch.Generator().manual_seed(3), **kw).images[0], dtype=np.int16)
    pipe.unet.load_attn_procs(str(out), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)
    theirs = np.asarray(pipe(prompt=prompt, generator=torch.Generator().manual_seed(3), **kw).images[0], dtype=np.int16)
    assert np.abs(theirs - ours).max() <= 2  # the same model in diffusers
    assert np.abs(theirs - plain).max() > 10  # and it trained

    # a checkpoint of it does not resume into a run that has tokens (and the reverse), by name
    with pytest.raises(ConfigError, match="modifier tokens"):
        CustomDiffusionMethod(cd_config(tiny_model_dir, tmp_path / "o", instance_data_dir=str(star_dir),
                                        instance_prompt="<new1> star")).load_state_tensors(saved)


def test_tokens_written_in_the_prompt_are_the_modifier_tokens_without_the_flag(tiny_model_dir, star_dir, tmp_path):
    from difftune.methods.custom_diffusion import CustomDiffusionMethod

    method = CustomDiffusionMethod(cd_config(tiny_model_dir, tmp_path, instance_data_dir=str(star_dir),
                                             instance_prompt="photo of a <sks-star> star"))
    assert method.modifier_tokens == ["<sks-star>"] and method.initializers == ["star"]
    assert method.cfg.custom.modifier_token is None
    with pytest.raises(ConfigError, match="--modifier_token is empty"):
        cd_config(tiny_model_dir, tmp_path, instance_data_dir=str(star_dir), instance_prompt="x", modifier_token=" ")


def test_a_checkpoint_of_another_method_is_refused_by_name(tiny_model_dir, fill_dir, star_dir, tmp_path):
    from conftest import make_config

    from difftune.api import train_controlnet

    train_controlnet(make_config(tiny_model_dir, fill_dir, tmp_path / "cn", max_train_steps=1, train_batch_size=2))
    cn_checkpoint = tmp_path / "cn" / "checkpoints" / "checkpoint-1"
    assert json.loads((cn_checkpoint / "trainer_state.json").read_text())["method"] == "controlnet"
    with pytest.raises(ConfigError, match="written by a controlnet run; this is a custom_diffusion run"):
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "cd", instance_data_dir=str(star_dir),
                                         instance_prompt="<new1> star", resume_from_checkpoint=str(cn_checkpoint)))


def test_an_export_over_an_earlier_one_removes_what_is_no_longer_its_own(tiny_base, tmp_path):
    """--overwrite_output_dir (or a rerun) with other tokens or another weight format: the earlier run's token
    files would sit beside weights whose custom_diffusion.json does not list them (load_textual_inversion of a
    stale <new1>); only files an earlier custom_diffusion.json listed are removed."""
    import torch

    from difftune.custom_diffusion.export import META, WEIGHTS_BIN, WEIGHTS_SAFE, read_meta, save_custom_diffusion
    from difftune.errors import ModelLoadError

    out = tmp_path / "out"
    save_custom_diffusion(out, tiny_base.unet, {}, {"<new1>": torch.zeros(4), "<new9>": torch.ones(4)}, {})
    (out / "notes.txt").write_text("mine")
    save_custom_diffusion(out, tiny_base.unet, {}, {"<new2>": torch.zeros(4)}, {}, safe=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([META, WEIGHTS_BIN, "<new2>.bin", "notes.txt"])
    save_custom_diffusion(out, tiny_base.unet, {}, {}, {})  # no tokens: no embedding files
    assert sorted(p.name for p in out.iterdir()) == sorted([META, WEIGHTS_SAFE, "notes.txt"])
    assert read_meta(out)["embeddings"] == {}
    with pytest.raises(ModelLoadError, match="no such folder"):
        read_meta(tmp_path / "nope")
    (out / WEIGHTS_SAFE).unlink()  # said before any model loads (eval loaded the base twice first)
    with pytest.raises(ModelLoadError, match=f"the weight file {WEIGHTS_SAFE} that {META} names is missing"):
        read_meta(out)


def test_an_export_killed_half_way_is_refused_not_read_with_the_earlier_embeddings(tiny_base, tmp_path,
                                                                                   monkeypatch):
    """Export again over an earlier export (a resumed run), killed after the new weights: the earlier
    embedding and settings would load with them as one concept. The folder is refused as unfinished."""
    import torch

    import difftune.custom_diffusion.export as export
    from difftune.errors import ModelLoadError

    out = tmp_path / "out"
    export.save_custom_diffusion(out, tiny_base.unet, {}, {"<new1>": torch.zeros(4)}, {})
    real = export.save_file

    def killed_at_the_embedding(tensors, path, **kw):
        if "<new1>" in tensors:
            raise KeyboardInterrupt
        real(tensors, path, **kw)

    monkeypatch.setattr(export, "save_file", killed_at_the_embedding)
    with pytest.raises(KeyboardInterrupt):
        export.save_custom_diffusion(out, tiny_base.unet, {}, {"<new1>": torch.ones(4)}, {})
    with pytest.raises(ModelLoadError, match="its export did not finish .*--resume_from_checkpoint latest"):
        export.read_meta(out)
    monkeypatch.setattr(export, "save_file", real)
    export.save_custom_diffusion(out, tiny_base.unet, {}, {"<new1>": torch.ones(4)}, {})  # the resumed export
    assert export.read_meta(out)["embeddings"] == {"<new1>": "<new1>.safetensors"}
    assert torch.equal(export.read_embedding(out, "<new1>", "<new1>.safetensors"), torch.ones(4))


def test_resume_refuses_another_set_of_trained_weights_and_ignores_the_file_format(tiny_model_dir, tmp_path):
    from difftune.config import to_dict
    from difftune.guards import warn_changed_settings

    kw = dict(instance_data_dir="x", instance_prompt="<new1> star", modifier_token="<new1>")
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "difftune_config.json").write_text(json.dumps(to_dict(cd_config(tiny_model_dir, tmp_path, **kw))))
    assert warn_changed_settings(tmp_path, cd_config(tiny_model_dir, tmp_path, no_safe_serialization=True, **kw),
                                 checkpoint) == []  # only the files' format: the run is the same
    with pytest.raises(ConfigError, match=r"--freeze_model crossattn differs from the run that wrote .*"
                                          r"\(crossattn_kv\).*Resume with --freeze_model crossattn_kv"):
        warn_changed_settings(tmp_path, cd_config(tiny_model_dir, tmp_path, freeze_model="crossattn", **kw),
                              checkpoint)


def test_a_folder_exported_before_the_prediction_type_was_recorded_samples_as_it_did(tmp_path):
    """An older custom_diffusion.json has no prediction_type or tokenizer_name: the base's own, as before."""
    from difftune.recorded import one_prediction_type, recorded_concept_loading

    (tmp_path / "custom_diffusion.json").write_text(json.dumps({"base_model": "tiny-shapes", "weight_name": "w"}))
    assert recorded_concept_loading(None, tmp_path) == {"tokenizer_name": None, "prediction_type": None}
    assert recorded_concept_loading("another-base", tmp_path) == {}  # a base given: its own scheduler and tokenizer
    assert one_prediction_type({"old": None}, "epsilon") is None
    assert one_prediction_type({"old": None, "new": "epsilon"}, "epsilon") == "epsilon"
    with pytest.raises(ConfigError, match="different prediction types"):
        one_prediction_type({"old": None, "new": "v_prediction"}, "epsilon")
