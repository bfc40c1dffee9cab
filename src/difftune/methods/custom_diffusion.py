"""Custom Diffusion (Kumari et al. 2023, arXiv 2212.04488) as a method of the generic loop.

Trainable (fp32): the cross-attention K/V projections (all cross-attention weights with
``--freeze_model crossattn``), held by Custom Diffusion attention processors inside the UNet,
and the new tokens' rows of the text encoder's embedding table. Frozen: everything else. A run
without modifier tokens (diffusers' script without ``--modifier_token``) trains the processors
alone; its text encoder is frozen whole.

Loss (paper eq. 1 plus prior preservation, sec. 3.1):
    L = E ||eps - eps_theta(x_t, t, c)||^2 over the augmentation mask (instance images)
      + prior_loss_weight * E ||eps - eps_theta(x'_t, t', c')||^2 (class images).
Both terms are per-element means. (diffusers sums the masked instance term over the four
latent channels but averages the prior term, which weights the prior 4x less than the flag
says; the paper's code treats both alike, and so do we.)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ..config_custom_diffusion import CustomDiffusionConfig
from ..custom_diffusion import concepts as cc
from ..custom_diffusion import data as cd
from ..custom_diffusion import surgery
from ..custom_diffusion.class_images import ensure_class_images, text2image_pipeline
from ..custom_diffusion.export import save_custom_diffusion
from ..errors import ConfigError
from ..models import BaseModel, default_resolution, load_base_model, with_prediction_type
from ..noising import DiffusionObjective, latent_moments, sample_latents, to_device, tokenize
from ..recorded import local_or_name
from ..speed import apply_compile, to_channels_last
from .controlnet import weight_dtype_for

EMBED_PREFIX = "text_embeddings."

log = logging.getLogger("difftune")


def _absolute_dirs(concept: dict) -> dict:
    return dict(concept, **{k: str(Path(concept[k]).resolve()) for k in ("instance_data_dir", "class_data_dir")
                            if concept.get(k)})


class CustomDiffusionMethod:
    name = "custom_diffusion"

    def __init__(self, cfg: CustomDiffusionConfig, base: BaseModel | None = None, data: cc.ConceptData | None = None):
        self.cfg = cfg
        m, c = cfg.model, cfg.custom
        # the concepts and their images, read before the base loads (``data``: as ``check_data`` already read them)
        self.data = data if data is not None else self.check_data(cfg)
        self.concepts = self.data.concepts
        # surgery changes the tokenizer, the embedding table and the UNet's processors: never
        # those of a model object the caller keeps using
        loaded = copy.deepcopy(base) if base is not None else load_base_model(
            m.pretrained_model_name_or_path, m.revision, m.variant, m.tokenizer_name, m.cache_dir,
            stand_ins=("tokenizer",))  # (no --pretrained_vae_model_name_or_path here)
        self.base = with_prediction_type(loaded, cfg.loss.prediction_type)
        # --prediction_type over the base scheduler's: the model card's sampler is told it too
        self.overridden_prediction = cfg.loss.prediction_type if self.base is not loaded else None
        if getattr(self.base, "family", "sd") != "sd":  # one text encoder is assumed throughout (tokens, embeddings, eval)
            raise ConfigError(f"Custom Diffusion supports SD 1.x/2.x bases; {m.pretrained_model_name_or_path} is "
                              "SDXL, which is not supported yet.")
        # resolved here: the saved config, card and summary name the size and objective used
        self.cfg = cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, resolution=cfg.data.resolution or default_resolution(512, self.base)),
            loss=dataclasses.replace(cfg.loss, prediction_type=self.base.noise_scheduler.config.prediction_type))
        d = cfg.data
        if not d.with_prior_preservation and (d.class_prompt or d.class_data_dir):
            log.warning("--class_prompt / --class_data_dir are not used without --with_prior_preservation: "
                        "training on the instance images alone.")
        self.modifier_tokens = c.modifier_tokens() or cc.tokens_in_prompts(self.concepts)
        self.token_ids: list[int] = []
        self.initializers: list[str] = []
        self.embedding: torch.nn.Parameter | None = None  # the embedding table, when new tokens train in it
        if self.modifier_tokens:
            inits = c.initializer_tokens() or cc.default_initializers(self.concepts, self.modifier_tokens)
            flag = "--initializer_token" if c.initializer_tokens() else "the default initializer (no --initializer_token)"
            self.token_ids = surgery.add_modifier_tokens(self.base.tokenizer, self.base.text_encoder,
                                                         self.modifier_tokens, inits, flag)
            self.initializers = inits[: len(self.modifier_tokens)]
            self.embedding = self.base.text_encoder.get_input_embeddings().weight
            self.embedding.requires_grad_(True)
            self._hook = surgery.restrict_to_rows(self.embedding, self.token_ids)
        else:
            log.info("no modifier tokens (no --modifier_token, no <token> in the prompts): training the "
                     "cross-attention alone, on the prompts' own words")
        self.processors = surgery.install_processors(self.base.unet, c.freeze_model,
                                                     cfg.train.enable_xformers_memory_efficient_attention)
        self.objective = DiffusionObjective(self.base.noise_scheduler, cfg.loss.prediction_type, cfg.loss.snr_gamma,
                                            cfg.loss.timestep_sampling)
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32
        self.unet, self.text_encoder = self.base.unet, self.base.text_encoder  # possibly wrapped by prepare
        self._accelerator = None
        # --scale_lr: each example also carries a class image with prior preservation (diffusers' x2)
        self.lr_scale = 2.0 if cfg.data.with_prior_preservation else 1.0

    @staticmethod
    def check_data(cfg: CustomDiffusionConfig) -> cc.ConceptData:
        """The run's concepts, instance images and real prior, checked without any model (``api`` calls it
        before loading the base, and passes the result in as ``data``)."""
        return cc.check_concept_data(cfg.data, cfg.custom.modifier_tokens())

    # ---------------------------------------------------------------- plumbing for the loop
    def setup(self, accelerator: Any) -> list[torch.nn.Module]:
        self._accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype_for(accelerator.mixed_precision)
        if self.cfg.train.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ConfigError("--enable_xformers_memory_efficient_attention needs xformers: pip install "
                                  "'difftune[xformers]'. PyTorch's scaled-dot-product attention is the default.") from None
        if self.cfg.train.enable_npu_flash_attention:  # (diffusers' Custom Diffusion script has no such flag)
            raise ConfigError("--enable_npu_flash_attention would replace the Custom Diffusion attention processors "
                              "that this method trains; leave it out (it is a ControlNet training flag).")
        self.base.vae.to(self.device)
        if self.weight_dtype != torch.float32:  # (diffusers warns at any dtype given to .to(), even its own)
            self.base.vae.to(dtype=self.weight_dtype)
        # processors are registered sub-modules of the UNet: its own weights go to the weight
        # dtype, the processors' trainable copies stay fp32 masters
        trainable = {id(p) for proc in self.processors.values() for p in proc.parameters()}
        for prm in self.base.unet.parameters():
            if id(prm) not in trainable:
                prm.data = prm.data.to(self.device, self.weight_dtype)
        for proc in self.processors.values():
            proc.to(self.device, torch.float32)
        for module in self.base.unet.modules():
            for name, buf in module.named_buffers(recurse=False):
                setattr(module, name, buf.to(self.device))
        trains_text = bool(self.modifier_tokens)
        # fp32 while its embedding table trains; frozen whole (no tokens) in the weight dtype, as the VAE
        self.base.text_encoder.to(self.device, torch.float32 if trains_text else self.weight_dtype)
        if self.cfg.train.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            if trains_text:
                self.base.text_encoder.gradient_checkpointing_enable()
        if self.cfg.train.channels_last:
            to_channels_last(self.base.unet)
        apply_compile(self.cfg.train.torch_compile, self.base.unet)
        self.base.unet.train()
        self.base.text_encoder.train(trains_text)
        return [self.base.unet, self.base.text_encoder] if trains_text else [self.base.unet]

    def bind(self, prepared: list[torch.nn.Module]) -> None:
        self.unet = prepared[0]
        if len(prepared) > 1:
            self.text_encoder = prepared[1]

    def param_groups(self) -> list[dict]:
        procs = [p for proc in self.processors.values() for p in proc.parameters()]
        if not self.modifier_tokens:
            return [{"params": procs}]
        # no weight decay on the table: decay would move the rows that must stay bit-identical
        embedding = {"params": [self.embedding], "weight_decay": 0.0}
        if self.cfg.custom.embedding_learning_rate is not None:  # relative, so that --scale_lr scales both alike
            embedding["lr_multiplier"] = self.cfg.custom.embedding_learning_rate / self.cfg.optim.learning_rate
        return [{"params": procs}, embedding]

    def train_dataset(self):
        d = self.cfg.data
        classes = self._class_images() if d.with_prior_preservation else None
        return cd.CustomDiffusionExamples(self.data.instances, classes, d.resolution, d.center_crop, aug=not d.noaug)

    def _class_images(self) -> list[tuple[Path, str]]:
        """Real prior images as ``check_data`` found them; else class images generated (where missing) with the base."""
        d, acc = self.cfg.data, self._accelerator
        if self.data.real_prior is not None:
            return self.data.real_prior
        pairs: list[tuple[Path, str]] = []
        for c in self.concepts:
            flag = cc.concept_flag(c, "class_data_dir")
            if acc is None or acc.is_main_process:
                ensure_class_images(self.base, c.class_data_dir, c.class_prompt, d.num_class_images, d.resolution,
                                    d.sample_batch_size, d.num_class_inference_steps, self.cfg.train.seed or 0,
                                    d.prior_generation_precision, self.device)
            if acc is not None:
                acc.wait_for_everyone()
            files = cc.list_images(c.class_data_dir, flag)[: d.num_class_images]
            cc.check_images(files, flag)
            pairs += [(f, c.class_prompt) for f in files]
        return pairs

    def collate(self, items: list) -> dict:
        return cd.collate(items)

    # ---------------------------------------------------------------- the objective
    def _draw(self, generator: torch.Generator, n: int, latent_shape: tuple[int, ...], prior: bool):
        """Per sample, in this order: augmentation, instance noise, class noise (accumulation-exact)."""
        aug, inst, cls = [], [], []
        for _ in range(n):
            aug.append(cd.draw_augmentation(generator))
            inst.append(self.objective.draw(generator, 1, latent_shape))
            if prior:
                cls.append(self.objective.draw(generator, 1, latent_shape))
        return aug, inst, cls

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = to_device(tokenize(self.base.tokenizer, captions), self.device)
        return self.text_encoder(ids, return_dict=False)[0]

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        d = self.cfg.data
        R, f = d.resolution, self.base.vae_scale_factor
        prior = "class_images" in batch
        n = batch["pixel_values"].shape[0]
        shape = (self.base.latent_channels, R // f, R // f)
        aug, inst, cls = self._draw(generator, n, shape, prior)
        done = [cd.augment_instance(im, p, u, R, f, not d.noaug, d.hflip)
                for im, p, u in zip(batch["pixel_values"], batch["instance_prompts"], aug)]
        pixels = [a.pixels for a in done]
        captions = [a.prompt for a in done]
        draws = inst
        if prior:
            pixels += [cd.crop_class(im, u, R, d.hflip) for im, u in zip(batch["class_images"], aug)]
            captions += list(batch["class_prompts"])
            draws = inst + cls
        pixels_t = to_device(torch.stack(pixels), self.device, self.weight_dtype)
        eps = torch.cat([x.latent_eps for x in draws])
        noise = to_device(torch.cat([x.noise for x in draws]), self.device)
        timesteps = to_device(torch.cat([x.timesteps for x in draws]), self.device)
        mean, std = latent_moments(self.base.vae, pixels_t)
        latents = sample_latents(mean, std, eps, self.base.scaling_factor)
        noise = noise.to(latents.dtype)
        noisy = self.objective.add_noise(latents, noise, timesteps)
        prompt_embeds = self.encode_text(captions)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=prompt_embeds.to(self.weight_dtype),
                         return_dict=False)[0]
        target = self.objective.target(latents, noise, timesteps)
        mask = to_device(torch.stack([a.mask for a in done]), self.device)
        loss = self.objective.loss(pred[:n], target[:n], timesteps[:n], mask=mask)
        if prior:
            loss = loss + d.prior_loss_weight * self.objective.loss(pred[n:], target[n:], timesteps[n:])
        return loss

    # ---------------------------------------------------------------- state and outputs
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().clone() for k, v in surgery.processor_state_dict(self.base.unet).items()}
        for token, row in surgery.learned_embeddings(self.base.text_encoder, self.modifier_tokens,
                                                     self.token_ids).items():
            out[EMBED_PREFIX + token] = row
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        weights = {k: v for k, v in tensors.items() if not k.startswith(EMBED_PREFIX)}
        surgery.load_processor_state_dict(self.base.unet, weights)
        missing = [t for t in self.modifier_tokens if EMBED_PREFIX + t not in tensors]
        extra = [k[len(EMBED_PREFIX):] for k in tensors if k.startswith(EMBED_PREFIX)
                 and k[len(EMBED_PREFIX):] not in self.modifier_tokens]
        if missing or extra:
            raise ConfigError(f"The checkpoint's token embeddings ({', '.join(extra) or 'none'} not in this run; "
                              f"{', '.join(missing) or 'none'} missing) do not match this run's modifier tokens "
                              f"({', '.join(self.modifier_tokens) or 'none'}): it was made with other "
                              "--modifier_token values or prompts.")
        surgery.set_embeddings(self.base.text_encoder, self.token_ids,
                               [tensors[EMBED_PREFIX + t] for t in self.modifier_tokens])

    def metadata(self) -> dict:
        c = self.cfg
        return {
            "format": "difftune-custom-diffusion/1",
            "base_model": local_or_name(c.model.pretrained_model_name_or_path),  # absolute: read from anywhere
            # how the base was read and what the UNet was trained to predict: `generate` and `eval` read it alike
            **({"tokenizer_name": local_or_name(c.model.tokenizer_name)} if c.model.tokenizer_name else {}),
            "prediction_type": c.loss.prediction_type,
            "modifier_tokens": self.modifier_tokens,
            "initializer_tokens": self.initializers,
            "freeze_model": c.custom.freeze_model,
            "resolution": c.data.resolution,
            "concepts": [_absolute_dirs(dataclasses.asdict(x)) for x in self.concepts],  # eval reads them from anywhere
        }

    def checkpoint_extras(self, folder: Path) -> None:
        """Make a checkpoint usable as it is, like the final output: ``generate --custom_diffusion``,
        ``eval``, ``merge`` and diffusers' ``load_attn_procs`` + ``load_textual_inversion`` all read it."""
        self.export(folder)

    def export(self, output_dir: Path) -> list[Path]:
        embeddings = surgery.learned_embeddings(self.base.text_encoder, self.modifier_tokens, self.token_ids)
        return save_custom_diffusion(output_dir, self.base.unet, surgery.processor_state_dict(self.base.unet),
                                     embeddings, self.metadata(), safe=not self.cfg.custom.no_safe_serialization)

    @torch.no_grad()
    def sample(self, prompts: list[str], images: list, num_images: int, seed: int, steps: int,
               guidance_scale: float = 7.5) -> list[list]:
        was_training = self.base.unet.training
        self.base.unet.eval()
        self.base.text_encoder.eval()
        try:
            pipe = text2image_pipeline(self.base)
            ctx = self._accelerator.autocast() if self._accelerator else torch.autocast("cpu", enabled=False)
            out = []
            with ctx:
                for prompt in prompts:
                    gen = torch.Generator().manual_seed(seed)
                    out.append(list(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                                         height=self.cfg.data.resolution, width=self.cfg.data.resolution,
                                         num_images_per_prompt=num_images, generator=gen).images))
            return out
        finally:
            self.base.unet.train(was_training)
            self.base.text_encoder.train(was_training and bool(self.modifier_tokens))

    def model_card(self, output_dir: Path, summary: dict) -> str:
        from ..custom_diffusion.card import model_card

        return model_card(self, output_dir, summary)
