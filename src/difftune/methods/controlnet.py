"""ControlNet (Zhang & Agrawala 2023, arXiv 2302.05543) as a method of the generic loop.

Trainable: a copy of the UNet's encoder with zero-initialised output convolutions, in fp32
master weights. Frozen, in the weight dtype: VAE, text encoder(s), UNet. The loss is the base
model's own denoising objective with the ControlNet's residuals added to the UNet's skip
connections. What depends on the base (SD 1.x/2.x or SDXL: text conditioning, SDXL's
size/crop time ids, an fp32 VAE) is asked of its model family (``difftune.families``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import umask_mode
from ..cuda_graphs import GraphedModule, no_autocast_cache, use_cuda_graphs
from ..config import ControlNetConfig
from ..data import ControlNetExamples, collate_examples, load_table, resolve_columns, select_samples
from ..data.sources import Table
from ..data.images import files_signature
from ..data.columns import table_column_kinds
from ..data.materialize import materialize
from ..errors import ConfigError
from ..families import family_of, micro_conditions
from ..models import (BaseModel, base_in_code, default_resolution, load_base_model, load_controlnet,
                      with_prediction_type)
from ..noising import (DiffusionObjective, drop_captions, latent_moments, objective_text, per_sample_error,
                       sample_latents, to_device)
from ..optim import batch_text, learning_rate_text
from ..pipelines import controlnet_pipeline, run_controlnet_pipeline
from ..encoded_cache import (
    CachedExamples, LatentCache, TextCache, build_latent_shards, build_text_cache, cache_key, distinct_captions,
    encoded_before, is_complete, load_text_cache, weights_probe, write_meta,
)
from ..speed import apply_compile, to_channels_last
from ..surgery import checkpoint_conditioning_embedding, controlnet_from_unet, count_parameters

log = logging.getLogger("difftune")

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    return WEIGHT_DTYPES.get(mixed_precision or "no", torch.float32)


class Denoiser(torch.nn.Module):
    """A micro-batch's model work: prepared tensors in, per-sample squared errors out.

    The trained ControlNet's residuals go into the frozen UNet's skip connections; the UNet's
    prediction is compared with the target. Positional tensors only (SDXL's ``text_embeds`` and
    ``time_ids`` last, named by ``added_keys``): the form ``torch.cuda.make_graphed_callables``
    captures (``--cuda_graphs``). Everything random or host-side happens before it, in
    ``ControlNetMethod.loss``.

    ``trained`` is what the loop prepared (DDP-wrapped on several processes), run under the
    loop's autocast. With ``graph_autocast`` set (graphs: one process, nothing wrapped), the
    ControlNet's own forward runs under an autocast of that dtype without a cast cache instead:
    accelerate's wrapper of it opens one with a cache, which a graph would replay stale.
    """

    def __init__(self, trained: torch.nn.Module, controlnet: torch.nn.Module, unet: torch.nn.Module,
                 weight_dtype: torch.dtype):
        super().__init__()
        # registered: their parameters are the captured graphs' inputs, the ControlNet's with gradients
        self.controlnet, self.unet = controlnet, unet
        self._trained = [trained]  # in a list: the same module, not registered twice
        self.weight_dtype = weight_dtype
        self.added_keys: tuple[str, ...] = ()
        self.graph_autocast: tuple[str, torch.dtype | None] | None = None

    def forward(self, noisy, timesteps, encoder_hidden_states, cond, target, *added_values):
        added = dict(zip(self.added_keys, added_values)) if added_values else None
        kwargs = dict(encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond, added_cond_kwargs=added,
                      return_dict=False)
        if self.graph_autocast is None:
            down, mid = self._trained[0](noisy, timesteps, **kwargs)
        else:
            with no_autocast_cache(*self.graph_autocast):
                down, mid = type(self.controlnet).forward(self.controlnet, noisy, timesteps, **kwargs)
        with torch.autocast(noisy.device.type, enabled=False):  # the frozen UNet runs in its own dtype
            pred = self.unet(
                noisy,
                timesteps,
                encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs=added,
                down_block_additional_residuals=[r.to(self.weight_dtype) for r in down],
                mid_block_additional_residual=mid.to(self.weight_dtype),
                return_dict=False,
            )[0]
        return per_sample_error(pred, target)


class ControlNetMethod:
    name = "controlnet"

    def __init__(self, cfg: ControlNetConfig, base: BaseModel | None = None, data: Table | None = None):
        self.cfg = cfg
        self._table = data  # as ``check_data`` opened it before the base loaded; None: opened by train_dataset
        m = cfg.model
        loaded = base or load_base_model(
            m.pretrained_model_name_or_path, m.revision, m.variant, m.tokenizer_name, m.cache_dir,
            family=m.model_family, vae_name_or_path=m.pretrained_vae_model_name_or_path,
        )
        self.base = with_prediction_type(loaded, cfg.loss.prediction_type)
        # --prediction_type over the base scheduler's: the model card's sampler is told it too
        self.overridden_prediction = cfg.loss.prediction_type if self.base is not loaded else None
        self.family = family_of(self.base)
        crops = [f"--{f}" for f in ("crops_coords_top_left_h", "crops_coords_top_left_w") if getattr(cfg.data, f) is not None]
        if crops and self.family.name != "sdxl":
            log.warning("%s: SDXL's crop micro-conditioning; this base is SD 1.x/2.x, which has none, so the flag does "
                        "nothing here.", " and ".join(crops))
        self.resolution = cfg.data.resolution or default_resolution(self.family.default_resolution, self.base)
        # the resolved config (what Trainer saves) names the family, resolution and tracker project used
        project = cfg.train.tracker_project_name or self.family.controlnet_tracker_project
        self.cfg = cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(m, model_family=self.family.name),
            loss=dataclasses.replace(cfg.loss, prediction_type=self.base.noise_scheduler.config.prediction_type),
            data=dataclasses.replace(cfg.data, resolution=self.resolution),
            train=dataclasses.replace(cfg.train, tracker_project_name=project),
        )
        if m.controlnet_model_name_or_path:
            self.controlnet = load_controlnet(m.controlnet_model_name_or_path, cache_dir=m.cache_dir,
                                              unet=self.base.unet)
        else:
            # the conditioning embedding is randomly initialised: same seed, same ControlNet
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed or 0)
                self.controlnet = controlnet_from_unet(self.base.unet, vae_scale_factor=self.base.vae_scale_factor)
        self.controlnet.requires_grad_(True)
        self.objective = DiffusionObjective(self.base.noise_scheduler, cfg.loss.prediction_type, cfg.loss.snr_gamma,
                                            cfg.loss.timestep_sampling)
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32
        self.trained = self.controlnet  # the (possibly DDP-wrapped) module used in forward
        self._use_denoiser(self.controlnet)
        self._accelerator = None
        self.use_graphs = False  # --cuda_graphs, as ``setup`` resolves it for this device and run
        self.text_cache: TextCache | None = None
        self.cache_build_seconds: float | None = None

    # ---------------------------------------------------------------- plumbing for the loop
    def setup(self, accelerator: Any) -> list[torch.nn.Module]:
        self._accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype_for(accelerator.mixed_precision)
        t = self.cfg.train
        for module in self.base.frozen_modules():
            # with an encoded cache the encoders only go to the device to fill it (train_dataset)
            if not (t.cache_latents and module in self._encoders()):
                module.to(self.device)
            if self.weight_dtype != torch.float32 and not (module is self.base.vae and self.base.vae_in_fp32):
                module.to(dtype=self.weight_dtype)
        self.controlnet.to(self.device)
        if t.channels_last:
            to_channels_last(self.base.unet, self.controlnet)
        if t.fp8_frozen_unet:  # after every dtype and layout change: those would undo the float8 storage
            from ..fp8 import store_in_fp8

            store_in_fp8(self.base.unet)
        if t.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            checkpoint_conditioning_embedding(self.controlnet)
            self.base.unet.enable_gradient_checkpointing()
        if t.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--enable_xformers_memory_efficient_attention needs xformers: pip install 'difftune[xformers]'. "
                    "PyTorch's scaled-dot-product attention is already used without it."
                ) from None
            self.base.unet.enable_xformers_memory_efficient_attention()
            self.controlnet.enable_xformers_memory_efficient_attention()
        if t.enable_npu_flash_attention:
            npu = getattr(torch, "npu", None)  # torch_npu registers it
            if npu is None or not npu.is_available() or self.device.type != "npu":
                raise ConfigError("--enable_npu_flash_attention needs an Ascend NPU with torch_npu installed (as in "
                                  f"diffusers' script); this run is on {self.device.type}. Leave the flag out: "
                                  "PyTorch's scaled-dot-product attention is the default on GPUs and CPUs.")
            self.base.unet.enable_npu_flash_attention()
            self.controlnet.enable_npu_flash_attention()
        apply_compile(t.torch_compile, self.base.unet, self.controlnet)
        self.use_graphs = t.cuda_graphs != "no" and use_cuda_graphs(
            t.cuda_graphs, self.device, gradient_checkpointing=t.gradient_checkpointing,
            optimizer_in_backward=self.cfg.optim.optimizer_in_backward, processes=accelerator.num_processes,
            accumulation=t.gradient_accumulation_steps, torch_compile=t.torch_compile)
        self.controlnet.train()
        self._use_denoiser(self.controlnet)  # in the weight dtype just chosen
        return [self.controlnet]

    def _encoders(self) -> list[torch.nn.Module]:
        """The frozen parts an encoded cache replaces during training: VAE and text encoder(s)."""
        return [m for m in (self.base.vae, self.base.text_encoder, self.base.text_encoder_2) if m is not None]

    @contextlib.contextmanager
    def _encoders_on_device(self):
        """Encoders on the training device for a while (filling the cache, validation), then back to the host."""
        if not self.cfg.train.cache_latents:
            yield
            return
        for m in self._encoders():
            m.to(self.device)
        try:
            yield
        finally:
            for m in self._encoders():
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE's latent distribution of ``pixels`` in [-1, 1] (unscaled)."""
        with self._frozen():  # also keeps a VAE held in fp32 (stock SDXL) computing in fp32
            return latent_moments(self.base.vae, pixels.to(self.device, self.base.vae.dtype))

    def _frozen(self):
        """Frozen modules compute in the dtype they are held in, outside the loop's autocast, as
        diffusers' scripts run them: autocast would run their normalisations in fp32 (twice the
        bytes through the largest activations, kept for backward too) and add a cast per op.
        Only the trained ControlNet runs under autocast, over its fp32 master weights."""
        return torch.autocast(self.device.type, enabled=False)

    def _use_denoiser(self, trained: torch.nn.Module) -> None:
        self.denoiser = Denoiser(trained, self.controlnet, self.base.unet, self.weight_dtype)
        self._denoise = self.denoiser

    def bind(self, prepared: list[torch.nn.Module]) -> None:
        self.trained = prepared[0]
        self._use_denoiser(self.trained)
        if self.use_graphs:
            mp = self._accelerator.mixed_precision if self._accelerator else "no"
            self.denoiser.graph_autocast = (self.device.type, WEIGHT_DTYPES.get(mp))
            self._denoise = GraphedModule(self.denoiser, fallback=self.cfg.train.cuda_graphs == "auto")

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.controlnet.parameters() if p.requires_grad]}]

    @staticmethod
    def check_data(cfg: ControlNetConfig) -> Table:
        """The training data set, opened without any model (``api`` calls it before loading the base, and
        passes it in as ``data``): a missing folder, a layout not understood, or a Hub data set that cannot be
        had (offline and not cached, a wrong name) is said before minutes of loading."""
        d = cfg.data
        return load_table(dataset_name=d.dataset_name, dataset_config_name=d.dataset_config_name,
                          train_data_dir=d.train_data_dir, cache_dir=cfg.model.cache_dir, streaming=d.streaming)

    def train_dataset(self):
        d = self.cfg.data
        table = self._table if self._table is not None else self.check_data(self.cfg)
        table = select_samples(table, d.max_train_samples, self.cfg.train.seed or 0)
        acc = self._accelerator
        table = materialize(table, Path(self.cfg.train.output_dir) / "stream-cache",
                            single_process=acc is None or acc.num_processes == 1)
        columns = resolve_columns(
            table.column_names, d.image_column, d.conditioning_image_column, d.caption_column,
            kinds=table_column_kinds(table),
        )
        examples = ControlNetExamples(table, *columns, resolution=self.resolution,
                                      interpolation=d.image_interpolation_mode)
        if not self.cfg.train.cache_latents:
            return examples
        return self._cached(examples, table, columns)

    def _cached(self, examples: ControlNetExamples, table, columns) -> CachedExamples:
        """Fill (or reuse) the encoded cache of this model + data, and read training examples from it."""
        d, t = self.cfg.data, self.cfg.train
        text_encoders = [m for m in self._encoders() if m is not self.base.vae]
        fields = {
            "model": self.base.source, "family": self.family.name,
            "vae": weights_probe(self.base.vae), "text_encoders": weights_probe(*text_encoders),
            "vae_dtype": str(self.base.vae.dtype), "text_dtype": str(self.weight_dtype),
            "data": table.description, "rows": len(examples), "columns": list(columns),
            "fingerprint": getattr(table.dataset, "_fingerprint", None),
            "files": files_signature(table.dataset, list(columns[:2]), table.base_dir),
            "selection": [d.max_train_samples, t.seed] if d.max_train_samples else None,
            "resolution": self.resolution, "interpolation": d.image_interpolation_mode,
        }
        root = Path(t.latent_cache_dir or Path(t.output_dir) / "encoded-cache")
        folder = root / cache_key(fields)
        acc = self._accelerator
        started = time.perf_counter()
        if not is_complete(folder, len(examples)):
            done = encoded_before(folder, len(examples))
            log.info("encoding %d images and their captions into %s%s", len(examples) - done, folder,
                     f" (resumed: {done} of {len(examples)} were encoded before)" if done else "")
            rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
            if rank == 0:
                write_meta(folder, fields)
            # the same precision as the uncached path's encoders (``loss``): cached and uncached train alike
            with self._encoders_on_device(), torch.no_grad(), self._frozen():
                # images per VAE pass: 8 at 512 px; 2 when the run asks to save memory, so that filling
                # the cache does not need more than training does
                per_image = 2 if t.gradient_checkpointing else 8
                per_batch = max(1, min(64, per_image * (512 // self.resolution) ** 2))
                build_latent_shards(folder, examples, self.encode_images, per_batch,
                                    self.cfg.data.dataloader_num_workers, rank, world,
                                    progress=acc is None or acc.is_local_main_process)
                if rank == 0:
                    captions = distinct_captions(examples.caption_values())
                    build_text_cache(folder, captions,
                                     lambda c: self.family.encode_prompts(self.base, c, self.device))
            if acc is not None:
                acc.wait_for_everyone()
        else:
            log.info("reusing the encoded cache %s (built from these VAE and text encoder weights, data files "
                     "and settings)", folder)
        self.cache_build_seconds = time.perf_counter() - started
        self.text_cache = load_text_cache(folder)
        return CachedExamples(examples, LatentCache(folder, len(examples)))

    def collate(self, items: list) -> dict:
        return collate_examples(items)

    # ---------------------------------------------------------------- the objective
    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        d = self.cfg.data
        if "latent_mean" in batch:  # from the encoded cache
            mean = to_device(batch["latent_mean"], self.device)
            std = to_device(batch["latent_std"], self.device)
        else:
            mean, std = self.encode_images(batch["pixel_values"])
        draws = self.objective.draw(generator, mean.shape[0], tuple(mean.shape[1:]))
        latents = sample_latents(mean, std, draws.latent_eps, self.base.scaling_factor).to(self.weight_dtype)
        captions = drop_captions(batch["captions"], d.proportion_empty_prompts, draws.uniform)
        if self.text_cache is not None:
            prompt = self.text_cache.lookup(captions, self.device)
        else:
            with self._frozen():
                prompt = self.family.encode_prompts(self.base, captions, self.device)
        micro = micro_conditions(batch, self.resolution, d.crops_coords_top_left_h, d.crops_coords_top_left_w)
        added = self.family.added_cond_kwargs(prompt, micro, self.weight_dtype)  # None for SD 1.x/2.x
        noise = to_device(draws.noise, self.device, latents.dtype)
        timesteps = to_device(draws.timesteps, self.device)
        with self._frozen():  # CUDA autocast runs add_noise's pow in fp32: noisy latents would come out fp32
            noisy = self.objective.add_noise(latents, noise, timesteps)
            target = self.objective.target(latents, noise, timesteps)
        self.denoiser.added_keys = tuple(added or ())
        per_sample = self._denoise(
            noisy, timesteps, prompt.encoder_hidden_states,
            to_device(batch["conditioning_pixel_values"], self.device), target, *(added or {}).values(),
        )
        return self.objective.reduce(per_sample, timesteps)

    # ---------------------------------------------------------------- state and outputs
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.controlnet.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.controlnet.load_state_dict(tensors, strict=True)

    def checkpoint_extras(self, folder: Path) -> None:
        """Make a checkpoint loadable as it is by ``ControlNetModel.from_pretrained`` and ``difftune generate
        --controlnet``: the ControlNet's config.json, and its weights under diffusers' file name as a hard
        link to trainable.safetensors (the same tensors under the same names; no second copy on disk)."""
        self.controlnet.save_config(folder)
        weights, alias = folder / "trainable.safetensors", folder / "diffusion_pytorch_model.safetensors"
        try:
            os.link(weights, alias)
        except OSError:  # a file system without hard links
            shutil.copyfile(weights, alias)

    def export(self, output_dir: Path) -> list[Path]:
        """``config.json`` + ``diffusion_pytorch_model.safetensors`` in ``output_dir``.

        Saved into a temporary folder first, then each file moved into place atomically.
        """
        output_dir = Path(output_dir)
        for stale in output_dir.glob(".export.tmp-*"):  # left by a run killed while exporting
            shutil.rmtree(stale, ignore_errors=True)
        tmp = output_dir / f".export.tmp-{os.getpid()}"
        self.controlnet.save_pretrained(tmp, safe_serialization=True)
        umask_mode(tmp)
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, output_dir / f.name)
            written.append(output_dir / f.name)
        tmp.rmdir()
        return written

    @torch.no_grad()
    def sample(self, prompts: list[str], images: list, num_images: int, seed: int, steps: int) -> list[list]:
        was_training = self.controlnet.training
        self.controlnet.eval()
        try:
            pipe = controlnet_pipeline(self.base, self.controlnet)
            ctx = self._accelerator.autocast() if self._accelerator else torch.autocast("cpu", enabled=False)
            with ctx, self._encoders_on_device(), self._frozen_in_fp32_on_cpu():
                return run_controlnet_pipeline(
                    pipe, prompts, images, num_images, seed, steps, self.resolution,
                    guidance_scale=self.family.validation_guidance_scale,
                    control_guidance=self.cfg.validation.validation_control_guidance,
                )
        finally:
            self.controlnet.train(was_training)

    @contextlib.contextmanager
    def _frozen_in_fp32_on_cpu(self):
        """The frozen parts in fp32 while sampling on the CPU under bf16: the pipeline makes its latents in the
        fp32 ControlNet's dtype, and the CPU's group norm refuses fp32 inputs with bf16 weights (CUDA's takes
        them). Put back after: bf16 -> fp32 -> bf16 is exact, so training goes on unchanged."""
        held = [(m, m.dtype) for m in self.base.frozen_modules() if m.dtype != torch.float32]
        if self.device.type != "cpu" or not held:
            yield
            return
        for m, _ in held:
            m.float()
        try:
            yield
        finally:
            for m, dtype in held:
                m.to(dtype)

    def model_card(self, output_dir: Path, summary: dict) -> str:
        c = self.cfg
        data = c.data.train_data_dir or c.data.dataset_name
        grid = summary.get("validation_grid")
        pipe_cls = self.family.controlnet_pipeline_name
        base_imports, base_expr = base_in_code(c.model.pretrained_model_name_or_path)
        extra = ", safety_checker=None" if self.family.name == "sd" else ""
        if self.base.variant:  # a folder saved in fp16 only: diffusers reads those files only when told
            extra = f', variant="{self.base.variant}"' + extra
        vae = c.model.pretrained_vae_model_name_or_path
        vae_code = []
        if vae:  # the run's VAE, not the base's: without it the snippet draws other images than validation did
            extra = ", vae=vae" + extra
            sub = ', subfolder="vae"' if (Path(vae).expanduser() / "vae" / "config.json").is_file() else ""
            vae_code = [f'vae = AutoencoderKL.from_pretrained("{vae}"{sub})']
        lines = [
            "---",
            f"base_model: {c.model.pretrained_model_name_or_path}",
            "library_name: diffusers",
            f"tags: [controlnet, {'stable-diffusion-xl' if self.family.name == 'sdxl' else 'stable-diffusion'}, difftune]",
            "---",
            "",
            "# ControlNet trained with difftune",
            "",
            f"- Base model: `{c.model.pretrained_model_name_or_path}`",
            *([f"- VAE: `{vae}`"] if vae else []),
            f"- Data: `{data}` at {self.resolution} px",
            f"- Optimizer steps: {summary.get('global_step')} of "
            f"{batch_text(c.train.train_batch_size, summary.get('processes', 1), c.train.gradient_accumulation_steps)}"
            f", {learning_rate_text(summary, c.optim)}",
            f"- Final loss: {summary.get('final_loss'):.4f}" if summary.get("final_loss") is not None else "",
            f"- Loss: {objective_text(c.loss.prediction_type, c.loss.snr_gamma, c.loss.timestep_sampling)}",
            f"- Trainable parameters: {count_parameters(self.controlnet):,}",
            "",
            "```python",
            f"from diffusers import {'AutoencoderKL, ' if vae else ''}ControlNetModel, {pipe_cls}, UniPCMultistepScheduler",
            *base_imports,
            f'controlnet = ControlNetModel.from_pretrained("{output_dir}")',
            *vae_code,
            f"pipe = {pipe_cls}.from_pretrained(",
            f'    {base_expr}, controlnet=controlnet{extra})',
            "pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config"
            + (f', prediction_type="{self.overridden_prediction}")' if self.overridden_prediction else ")"),
            "```",
        ]
        if grid:
            lines += ["", f"![validation samples]({Path(grid).relative_to(output_dir)})"]
        return "\n".join(lines) + "\n"
