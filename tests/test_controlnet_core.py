"""The ControlNet method and the objective: the properties that make training correct."""

from __future__ import annotations

import torch

from conftest import make_config
from difftune.noising import DiffusionObjective, draw_per_sample
from difftune.surgery import controlnet_from_unet


def _inputs(base, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    ids = base.tokenizer(["red circle with blue background"] * n, padding="max_length",
                         max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
    ehs = base.text_encoder(ids)[0]
    cond = torch.rand(n, 3, 64, 64, generator=g)
    t = torch.tensor([10, 700][:n])
    return latents, ehs, cond, t


@torch.no_grad()
def test_zero_initialised_controlnet_leaves_unet_output_unchanged(tiny_base):
    unet = tiny_base.unet
    controlnet = controlnet_from_unet(unet)
    latents, ehs, cond, t = _inputs(tiny_base)
    plain = unet(latents, t, encoder_hidden_states=ehs).sample
    down, mid = controlnet(latents, t, encoder_hidden_states=ehs, controlnet_cond=cond, return_dict=False)
    assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
    joined = unet(latents, t, encoder_hidden_states=ehs, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid).sample
    assert torch.equal(plain, joined)
    # the copy really is the UNet's encoder
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)


def test_backward_touches_only_controlnet_parameters(tiny_model_dir, fill_dir, tmp_path):
    from difftune.methods.controlnet import ControlNetMethod

    method = ControlNetMethod(make_config(tiny_model_dir, fill_dir, tmp_path))
    batch = method.collate([method.train_dataset()[i] for i in range(2)])
    loss = method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    frozen = [p for m in method.base.frozen_modules() for p in m.parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(not p.requires_grad for p in frozen)
    grads = [p.grad for p in method.controlnet.parameters()]
    assert all(g is not None for g in grads)
    # the zero convolutions receive gradient first: that is how the ControlNet starts learning
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_per_sample_draws_do_not_depend_on_batch_split():
    a = draw_per_sample(torch.Generator().manual_seed(3), 4, (4, 8, 8), 1000)
    g = torch.Generator().manual_seed(3)
    b1, b2 = draw_per_sample(g, 2, (4, 8, 8), 1000), draw_per_sample(g, 2, (4, 8, 8), 1000)
    for name in ("latent_eps", "noise", "timesteps", "uniform"):
        assert torch.equal(getattr(a, name), torch.cat([getattr(b1, name), getattr(b2, name)]))


def test_cubic_timesteps_favour_the_noisy_end_and_keep_the_random_stream(tiny_base):
    from difftune.noising import cubic_timesteps

    t = torch.arange(1000)
    c = cubic_timesteps(t, 1000)
    assert c.min() >= 0 and c.max() == 999 and torch.all(c[1:] <= c[:-1])  # a monotone map onto [0, T)
    assert abs((c >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.01  # P(t >= T/2) = P(u^3 <= 1/2)
    uni = DiffusionObjective(tiny_base.noise_scheduler)
    cub = DiffusionObjective(tiny_base.noise_scheduler, timestep_sampling="cubic")
    a, b = uni.draw(torch.Generator().manual_seed(5), 64, (4, 8, 8)), cub.draw(torch.Generator().manual_seed(5), 64, (4, 8, 8))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.uniform, b.uniform)  # only the timesteps change
    assert torch.equal(b.timesteps, cubic_timesteps(a.timesteps, uni.num_timesteps))
    assert b.timesteps.float().mean() > a.timesteps.float().mean()


def test_min_snr_weights_and_v_target(tiny_base):
    sched = tiny_base.noise_scheduler
    t = torch.tensor([0, 100, 500, 999])
    eps = DiffusionObjective(sched, "epsilon", snr_gamma=5.0)
    v = DiffusionObjective(sched, "v_prediction", snr_gamma=5.0)
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    torch.testing.assert_close(eps.weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(v.weights(t), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert eps.weights(t)[0] < 1 and eps.weights(t)[-1] == 1  # low noise is down-weighted, high noise kept
    assert DiffusionObjective(sched).weights(t) is None
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    expected = a.sqrt().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(v.target(x0, noise, t), expected)
    assert eps.target(x0, noise, t) is noise


def test_conditioning_encoder_lands_on_the_latent_grid_of_any_vae():
    import pytest

    from difftune.surgery import conditioning_embedding_channels

    assert conditioning_embedding_channels(8) == (16, 32, 96, 256)  # diffusers' default, SD's VAE
    assert conditioning_embedding_channels(4) == (16, 32, 96)
    with pytest.raises(ValueError, match="scale factor 6"):
        conditioning_embedding_channels(6)


@torch.no_grad()
def test_controlnet_for_a_factor_4_vae_runs_in_the_diffusers_pipeline(tiny_base):
    """The 16x16-latent tiny-shapes layout (pretrain-base --latent_downsample 4): the ControlNet's
    conditioning encoder must shrink the 64 px outline to 16x16, and the diffusers pipeline must accept it."""
    from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline, UNet2DConditionModel

    from difftune.pretrain import architecture

    torch.manual_seed(0)
    vae_config, unet_config = architecture(4)
    unet = UNet2DConditionModel(**dict(unet_config, cross_attention_dim=32)).eval()  # the tiny text encoder's width
    vae = AutoencoderKL(**vae_config).eval()
    controlnet = controlnet_from_unet(unet, vae_scale_factor=4)
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    ids = tiny_base.tokenizer(["red circle"], padding="max_length", max_length=tiny_base.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
    ehs = tiny_base.text_encoder(ids)[0]
    down, mid = controlnet(latents, 5, encoder_hidden_states=ehs, controlnet_cond=cond, return_dict=False)
    assert down[0].shape[-2:] == (16, 16) and mid.shape[-2:] == (4, 4)
    assert torch.equal(unet(latents, 5, encoder_hidden_states=ehs).sample,
                       unet(latents, 5, encoder_hidden_states=ehs, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=tiny_base.text_encoder, tokenizer=tiny_base.tokenizer, unet=unet, controlnet=controlnet,
        scheduler=tiny_base.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    image = pipe("red circle", image=torch.rand(1, 3, 64, 64, generator=g), num_inference_steps=2, height=64, width=64,
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_checkpointed_conditioning_embedding_keeps_less_and_computes_the_same(tiny_base):
    """--gradient_checkpointing also recomputes the full-resolution conditioning encoder: same
    outputs and gradients, fewer bytes kept for backward, same parameter names, copies still work."""
    import copy

    from difftune.surgery import checkpoint_conditioning_embedding

    latents, ehs, cond, t = _inputs(tiny_base)
    ehs = ehs.detach()
    plain = controlnet_from_unet(tiny_base.unet)
    torch.nn.init.normal_(plain.controlnet_cond_embedding.conv_out.weight, std=0.02)  # so gradients flow into it
    checkpointed = copy.deepcopy(plain)
    checkpoint_conditioning_embedding(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    def run(model):
        kept = []

        def pack(x):
            kept.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            emb = model.controlnet_cond_embedding(cond)
        emb.square().mean().backward()
        return emb.detach(), [p.grad for p in model.controlnet_cond_embedding.parameters()], sum(kept)

    out_plain, grads_plain, kept_plain = run(plain)
    out_ckpt, grads_ckpt, kept_ckpt = run(checkpointed)
    torch.testing.assert_close(out_ckpt, out_plain)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b)
    assert kept_ckpt < kept_plain / 10, (kept_ckpt, kept_plain)  # only the input image is kept
    # a copy stays checkpointed, and without gradients the module runs as before
    twin = copy.deepcopy(checkpointed)
    assert type(twin.controlnet_cond_embedding) is type(checkpointed.controlnet_cond_embedding)
    with torch.no_grad():
        torch.testing.assert_close(twin.controlnet_cond_embedding(cond), out_plain)
