"""Train the bundled tiny base model ("tiny-shapes") from scratch on the shapes world.

Reproducible: ``difftune pretrain-base --out DIR [--seed 0]`` (the defaults are what was
shipped). Two stages, each saved before the next starts, and each checkpointed every
``--checkpointing_steps`` steps, so a killed run continues where it was; each finished stage
records the flags it was trained with, so a rerun with other flags is refused rather than mixed
in, and a finished run is not retrained (``pretrain_run.py``):

1. VAE (``AutoencoderKL``, 64 px -> 16x16x4 latents, or 8x8 with ``latent_downsample=8``, or
   more channels with ``latent_channels``):
   reconstruction MSE + L1 + a small KL term.
   The latent scaling factor is then set to 1/std of the data's latents, as SD did.
2. Text encoder (``CLIPTextModel``) and UNet (``UNet2DConditionModel``) jointly, on cached
   latent distributions, with the SD noise schedule, epsilon prediction, Min-SNR-5
   weighting, 10% empty captions (for classifier-free guidance) and an EMA of the weights,
   which is what is exported.

This is a one-off tool that builds an asset, not an adapter trainer, so it keeps its own
short loops instead of the method loop in ``trainer.py``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import restore_rng
from .data.shapes import BASE_SHAPES, render_batch, sample_shapes
from .errors import ConfigError
from .noising import DiffusionObjective
from .pretrain_run import (
    PretrainSettings,
    StageCheckpoints,
    check_memory,
    recorded_settings,
    recorded_step,
    refuse_other_settings,
    save_whole,
    write_record,
)
from .tiny import SD_SCHEDULER, default_words, write_tokenizer

logger = logging.getLogger(__name__)

RESOLUTION = 64
MAX_TOKENS = 24
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=1, sample_size=RESOLUTION,
)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=8,
    cross_attention_dim=64, attention_head_dim=8,
)


def architecture(latent_downsample: int = 4, latent_channels: int = 4) -> tuple[dict, dict]:
    """VAE and UNet configs for latents ``RESOLUTION / latent_downsample`` pixels wide with
    ``latent_channels`` channels.

    2: 32x32 latents, to measure whether a finer latent keeps fill50k's smallest circles (not shipped).
    8: 8x8x4 latents, the SD layout in miniature (shipped until 2026-11-30; its VAE lost small
    shapes and their colours). 4 (what ships): 16x16x4 latents from a three-level VAE, and
    a three-level UNet whose extra 16x16 level is narrow (32 channels, no attention) so that a
    pretraining step costs about 1.5x the 8x8 one rather than 4x. More latent channels (SD3 and
    FLUX use 16) let the VAE keep more of each 4x4 patch at almost no cost to the UNet (only its
    first and last convolutions widen); 4 ships.
    """
    if latent_channels < 1:
        raise ConfigError(f"latent_channels must be at least 1, not {latent_channels}")
    if latent_downsample == 8:
        vae, unet = dict(VAE_CONFIG), dict(UNET_CONFIG)
    elif latent_downsample == 4:
        vae = dict(VAE_CONFIG, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   block_out_channels=(32, 64, 64))
        unet = dict(UNET_CONFIG, sample_size=RESOLUTION // 4, block_out_channels=(32, 64, 128),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    elif latent_downsample == 2:  # 32x32 latents (an experiment: the UNet costs about 4x the 16x16 one)
        vae = dict(VAE_CONFIG, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   block_out_channels=(32, 64))
        unet = dict(UNET_CONFIG, sample_size=RESOLUTION // 2, block_out_channels=(32, 32, 64, 128),
                    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    else:
        raise ConfigError(f"latent_downsample must be 2, 4 or 8, not {latent_downsample}")
    return (dict(vae, latent_channels=latent_channels),
            dict(unet, in_channels=latent_channels, out_channels=latent_channels))


def _log(path: Path, **row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _images_to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def one_cycle_pct_start(steps: int, warmup: float = 0.05) -> float:
    """OneCycleLR's ``pct_start`` for a warm-up over the first ``warmup`` of ``steps``.

    OneCycleLR ends its warm-up at step ``pct_start * steps - 1`` and divides by the warm-up's
    length, so a warm-up of exactly one step (20 steps at 5%) ends at step 0, where it starts, and
    divides by zero. A warm-up of one step or less is none: 0 (the schedule starts at its peak and
    anneals), which is what fewer than 20 steps already did in effect. Longer runs keep 5%."""
    return warmup if warmup * steps > 1 else 0.0


def vae_schedule(opt: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The VAE's learning rate: a 5% warm-up to ``lr``, then a cosine down to ``lr / 100`` at ``steps``."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=one_cycle_pct_start(steps),
                                               anneal_strategy="cos", div_factor=10, final_div_factor=10)


def train_vae(out: Path, images: np.ndarray, steps: int, seed: int, batch: int = 32, lr: float = 3e-4,
              config: dict = VAE_CONFIG, device: str = "cpu", checkpoints: StageCheckpoints | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = vae_schedule(opt, lr, steps)
    g = np.random.default_rng(seed)
    log, t0 = out / "pretrain_log.jsonl", time.time()
    start = 1
    if checkpoints is not None and (ck := checkpoints.load()) is not None:
        vae.load_state_dict(ck["weights"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        g.bit_generator.state = ck["extra"]["numpy_rng"]
        restore_rng(ck["rng"], torch.Generator())  # the latent samples come from torch's global generator
        start = ck["state"].global_step + 1
        _log(log, stage="vae", resumed_after=start - 1)
        logger.info("vae: resumed from its checkpoint at step %d", start - 1)
    for step in range(start, steps + 1):
        x = _images_to_tensor(images[g.integers(len(images), size=batch)]).to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            _log(log, stage="vae", step=step, mse=round(mse.item(), 5), seconds=round(time.time() - t0, 1))
            logger.info("vae step %d/%d: mse %.5f (%.0f s)", step, steps, mse.item(), time.time() - t0)
        if checkpoints is not None and checkpoints.due(step, steps):
            checkpoints.save(step, vae.state_dict(), opt, sched, torch.Generator(),
                             extra={"numpy_rng": g.bit_generator.state})
    return vae.eval()


@torch.no_grad()
def latent_moments_of(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each image's latent distribution, on the VAE's device."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for i in range(0, len(images), batch):
        dist = vae.encode(_images_to_tensor(images[i : i + batch]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(out: Path, tokenizer, mean, std, captions, steps: int, seed: int, scaling_factor: float,
                   batch: int = 64, lr: float = 1e-3, ema_decay: float = 0.999, empty_prob: float = 0.1,
                   unet_config: dict = UNET_CONFIG, checkpoints: StageCheckpoints | None = None,
                   stop: int | None = None,
                   export: Callable[[int, torch.nn.ModuleList], None] | None = None) -> torch.nn.ModuleList:
    """Train the UNet and text encoder on the latents ``mean + std * noise``; returns their EMA
    ``[unet, text_encoder]``. The schedule spans ``steps``; the run ends at ``stop`` (default
    ``steps``), and ``export(step, ema)`` is called every 1000 steps and at ``stop``, before the
    checkpoint of that step, so a checkpoint never runs ahead of the exported model."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    device = mean.device
    unet = UNet2DConditionModel(**unet_config)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))
    modules = torch.nn.ModuleList([unet, text_encoder]).to(device)
    ema = torch.nn.ModuleList([UNet2DConditionModel(**unet_config),
                               CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))]).to(device)
    ema.load_state_dict(modules.state_dict())
    ema.requires_grad_(False)
    objective = DiffusionObjective(DDPMScheduler(**SD_SCHEDULER), "epsilon", snr_gamma=5.0)
    ids_all = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    )
    g = torch.Generator().manual_seed(seed)
    log, t0, running = out / "pretrain_log.jsonl", time.time(), []
    start = 1
    if checkpoints is not None and (ck := checkpoints.load()) is not None:
        w = ck["weights"]
        modules.load_state_dict({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")})
        ema.load_state_dict({k[len("ema."):]: v for k, v in w.items() if k.startswith("ema.")})
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        restore_rng(ck["rng"], g)
        start = ck["state"].global_step + 1
        _log(log, stage="unet", resumed_after=start - 1)
        logger.info("unet: resumed from its checkpoint at step %d", start - 1)
    stop = steps if stop is None else stop
    if start - 1 > stop:
        refuse_going_back(checkpoints.folder, start - 1, stop)
    if start - 1 == stop and export is not None:  # stopped there before, and its export is gone
        export(stop, ema)
    for step in range(start, stop + 1):
        # every random draw comes from one CPU generator, so a run is the same on any device
        idx = torch.randint(len(mean), (batch,), generator=g)
        eps = torch.randn((batch, *mean.shape[1:]), generator=g).to(device)
        on_device = idx.to(device)
        latents = (mean[on_device] + std[on_device] * eps) * scaling_factor
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=g) < empty_prob
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, objective.num_timesteps, (batch,), generator=g).to(device)
        ids = ids.to(device)
        hidden = text_encoder(ids)[0]
        pred = unet(objective.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = objective.loss(pred, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        running.append(loss.item())
        if step % 100 == 0 or step == stop:
            _log(log, stage="unet", step=step, loss=round(sum(running) / len(running), 5),
                 lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 1))
            logger.info("unet step %d/%d: loss %.5f (%.0f s)", step, steps, sum(running) / len(running),
                        time.time() - t0)
            running = []
        if export is not None and (step % 1000 == 0 or step == stop):
            export(step, ema)
        if checkpoints is not None and checkpoints.due(step, steps, stop):
            weights = {f"model.{k}": v for k, v in modules.state_dict().items()}
            weights.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
            checkpoints.save(step, weights, opt, sched, g)
    return ema


def save_pipeline(folder: Path, vae, text_encoder, unet, tokenizer, settings: dict | None = None,
                  step: int | None = None) -> None:
    """The model in diffusers' layout, with the run's ``settings`` and UNet ``step`` recorded in it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

    def save(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if settings is not None:
            write_record(tmp, settings, step)

    save_whole(folder, save)


def world_samples(n_images: int, seed: int, world: str = "standard") -> list:
    """The pretraining images' specs. ``standard`` (what ships): every shape fully in frame and at
    least 9% of the image wide. ``wide``: half of them so, half with fill50k's geometry (sizes down
    to its smallest circle, centres anywhere, so shapes may be cut by the border), so that fill50k
    is the circle subset of what the base model (and above all its VAE) was trained on."""
    if world == "standard":
        return sample_shapes(n_images, RESOLUTION, seed, BASE_SHAPES)
    if world == "wide":
        half = n_images // 2
        return (sample_shapes(n_images - half, RESOLUTION, seed, BASE_SHAPES)
                + sample_shapes(half, RESOLUTION, seed + 1_000_003, BASE_SHAPES, wide=True))
    raise ConfigError(f"world must be 'standard' or 'wide', not {world!r}")


def resolve_device(device: str) -> str:
    """``--device`` (``auto``: a CUDA GPU when torch sees one), refused when torch cannot use it here: said
    before any model loads (also by ``generate``), not as torch's error once the models are loaded."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here, "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return str(device)


def pretrain_base(out: str | Path, n_images: int = 20000, vae_steps: int = 1500, unet_steps: int = 2000,
                  seed: int = 0, stop_at_step: int | None = None, latent_downsample: int = 4,
                  world: str = "standard", vae_batch: int = 32, unet_batch: int = 64, device: str = "auto",
                  latent_channels: int = 4, checkpointing_steps: int = 250) -> Path:
    """Build the tiny-shapes base model in ``out/model`` (diffusers layout); returns that path.

    The UNet's learning-rate schedule spans ``unet_steps``; the EMA weights are exported every
    1000 steps, and ``stop_at_step`` ends the run at that step after exporting it there (a later
    run with the same flags continues from it). The defaults are what ships: 16x16x4 latents,
    1,500 VAE steps, 2,000 UNet + text encoder steps (about 3 hours on 2 cores), the ``standard``
    world. ``unet_steps=0`` stops after the VAE and returns its folder (``out/vae``), e.g. to
    measure it. ``device`` "auto" takes a CUDA GPU when torch sees one (fp32 with TF32 matmuls
    there); the random draws come from CPU generators either way.
    Every ``checkpointing_steps`` steps each stage saves a resumable checkpoint
    (``out/checkpoints-vae``, ``out/checkpoints-unet``): the same command run again continues a
    killed run from there, and trains exactly what the uninterrupted run would have. Each
    finished stage records its flags (``difftune_pretrain.json`` in ``out/vae`` and
    ``out/model``): a rerun with other flags is refused, and a finished run is not retrained.
    Every flag is checked, and the images' memory estimated, before anything is written.
    """
    settings = PretrainSettings(n_images=n_images, world=world, seed=seed, latent_downsample=latent_downsample,
                                latent_channels=latent_channels, vae_steps=vae_steps, vae_batch=vae_batch,
                                unet_steps=unet_steps, unet_batch=unet_batch, stop_at_step=stop_at_step)
    if checkpointing_steps < 1:
        raise ConfigError(f"--checkpointing_steps must be at least 1, not {checkpointing_steps}")
    vae_config, unet_config = architecture(latent_downsample, latent_channels)
    device = resolve_device(device)
    check_memory(settings, RESOLUTION)
    out = Path(out)
    if (done := finished_stage(out, settings)) is not None:
        return done
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(max(1, torch.get_num_threads()))
    logger.info("rendering %d shapes-world images", n_images)
    samples = world_samples(n_images, seed, world)
    images = render_batch(samples, RESOLUTION)  # before OUT exists: a start that fails here leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    write_tokenizer(tok_dir, default_words())
    vae = vae_stage(out, settings, images, vae_config, device, checkpointing_steps)
    if unet_steps == 0:
        logger.info("--unet_steps 0: only the VAE was trained, into %s; %s holds no model (the same flags with "
                    "--unet_steps N train one over this VAE)", out / "vae", out / "model")
        return out / "vae"
    return unet_stage(out, settings, vae, images, [s.prompt for s in samples], tok_dir, unet_config,
                      checkpointing_steps)


def refuse_going_back(folder: Path, step: int, stop: int | None) -> None:
    """A model or checkpoint already past --stop_at_step: a run only goes forward."""
    raise ConfigError(f"{folder} is at UNet step {step}, past --stop_at_step {stop}: a run cannot go back; use a new "
                      f"--out for a model at step {stop}")


def finished_stage(out: Path, settings: PretrainSettings) -> Path | None:
    """What a rerun into ``out`` already finished with these flags (its folder), None while
    something is left to train; a finished stage trained with other flags is refused."""
    vae_dir, model_dir = out / "vae", out / "model"
    if (recorded := recorded_settings(vae_dir)) is not None:
        refuse_other_settings(vae_dir, recorded, settings.vae_stage())
        shutil.rmtree(out / "checkpoints-vae", ignore_errors=True)  # (a run killed right after the export left it)
        if settings.unet_steps == 0:
            logger.info("%s is already trained with these flags: nothing to do", vae_dir)
            return vae_dir
    if settings.unet_steps == 0 or (recorded := recorded_settings(model_dir)) is None:
        return None
    refuse_other_settings(model_dir, recorded, settings.model_stage())
    step = recorded_step(model_dir)
    if step is not None and step > settings.last_unet_step:
        refuse_going_back(model_dir, step, settings.stop_at_step)
    if step == settings.last_unet_step:
        if step == settings.unet_steps:  # the end: what a run killed right after the export left goes (its
            shutil.rmtree(out / "checkpoints-unet", ignore_errors=True)  # optimizer state); --stop_at_step's stays
        logger.info("%s is already complete with these flags (UNet step %d of %d): nothing to train",
                    model_dir, step, settings.unet_steps)
        return model_dir
    return None


def _data(settings: PretrainSettings) -> dict:
    """What both stages' checkpoints depend on besides their own steps, batch and architecture."""
    return {"n_images": settings.n_images, "world": settings.world, "seed": settings.seed}


def vae_stage(out: Path, settings: PretrainSettings, images: np.ndarray, vae_config: dict, device: str,
              checkpointing_steps: int):
    """``out/vae``: the finished one (checked by ``finished_stage``), else trained and saved with its record."""
    from diffusers import AutoencoderKL

    vae_dir = out / "vae"
    if (vae_dir / "config.json").is_file():
        return AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    ckpts = StageCheckpoints(out / "checkpoints-vae", {"stage": "vae", "steps": settings.vae_steps,
                                                       "batch": settings.vae_batch, "config": vae_config,
                                                       **_data(settings)}, checkpointing_steps)
    vae = train_vae(out, images, settings.vae_steps, settings.seed, batch=settings.vae_batch, config=vae_config,
                    device=device, checkpoints=ckpts)
    mean, _ = latent_moments_of(vae, images[:2000])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))

    def save(tmp: Path) -> None:
        vae.save_pretrained(tmp)
        write_record(tmp, settings.vae_stage())

    save_whole(vae_dir, save)
    ckpts.finished()
    logger.info("vae: saved to %s", vae_dir)
    return vae


def unet_stage(out: Path, settings: PretrainSettings, vae, images: np.ndarray, captions: list[str], tok_dir: Path,
               unet_config: dict, checkpointing_steps: int) -> Path:
    """Train the UNet and text encoder on ``vae``'s latents, exporting the model to ``out/model``."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=MAX_TOKENS)
    tokenizer.model_max_length = MAX_TOKENS
    mean, std = latent_moments_of(vae, images)
    scale = float(vae.config.scaling_factor)
    _log(out / "pretrain_log.jsonl", stage="latents", scaling_factor=scale, latent_std=float((mean * scale).std()))
    ckpts = StageCheckpoints(out / "checkpoints-unet",
                             {"stage": "unet", "steps": settings.unet_steps, "batch": settings.unet_batch,
                              "config": unet_config, "scaling_factor": scale, **_data(settings)},
                             checkpointing_steps)
    model_dir, stop = out / "model", settings.last_unet_step

    def export(step: int, ema: torch.nn.ModuleList) -> None:
        save_pipeline(model_dir, vae, ema[1], ema[0], tokenizer, settings.model_stage(), step)
        _log(out / "pretrain_log.jsonl", stage="saved", step=step)
        logger.info("unet step %d: model exported to %s", step, model_dir)

    train_denoiser(out, tokenizer, mean, std, captions, settings.unet_steps, settings.seed + 1, scale,
                   batch=settings.unet_batch, unet_config=unet_config, checkpoints=ckpts, stop=stop, export=export)
    if stop == settings.unet_steps:
        ckpts.finished()
    else:
        logger.info("stopped at UNet step %d of %d (--stop_at_step): the same flags with a later --stop_at_step, "
                    "or none, continue from there", stop, settings.unet_steps)
    return model_dir
