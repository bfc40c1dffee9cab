"""`difftune pretrain-base`: the command that builds the bundled base makes a loadable diffusers model."""

from __future__ import annotations

import pytest


def test_pretrain_base_with_16x16_latents_builds_a_loadable_model_and_guards_its_vae(tmp_path):
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
    # a second run reuses out/vae, so asking it for another latent size must stop, not mix the two
    with pytest.raises(ValueError, match="latent size"):
        pretrain_base(out, n_images=64, vae_steps=2, unet_steps=2, stop_at_step=None, latent_downsample=8)
