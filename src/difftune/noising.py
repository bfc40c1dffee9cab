"""The denoising objective shared by every method, written once.

Encode images to latents and prompts to embeddings, draw noise and timesteps, noise the
latents, compute the regression target (epsilon or v) and the optionally Min-SNR-weighted
MSE. Every random draw comes from an explicit ``torch.Generator``, sample by sample
(``draw_per_sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SampleDraws:
    """Everything random about a micro-batch, one row per sample."""

    latent_eps: torch.Tensor  # [B, C, h, w] reparameterisation noise of the VAE posterior
    noise: torch.Tensor  # [B, C, h, w] diffusion noise
    timesteps: torch.Tensor  # [B] integer timesteps in [0, T)
    uniform: torch.Tensor  # [B] in [0, 1): caption dropout and other per-sample coin flips


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on ``device`` without holding the host: on CUDA through pinned memory, asynchronously.

    A copy from ordinary (pageable) host memory first waits for everything queued on the GPU,
    so the host cannot prepare the next step while the GPU works; from pinned memory it is
    queued like a kernel. (Pinned blocks come from PyTorch's caching host allocator, which
    keeps each one until its copy has finished.) Elsewhere, a plain ``.to``.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    return t.to(device, dtype)


def draw_per_sample(generator: torch.Generator, n: int, latent_shape: tuple[int, ...], num_timesteps: int) -> SampleDraws:
    """Draw a micro-batch's randomness sample after sample.

    Sample i's numbers depend only on how many samples were drawn before it, so a batch of 4
    draws exactly what two batches of 2 draw (gradient accumulation is exact), and a resumed
    run draws exactly what the uninterrupted one would have. (One vectorised draw of
    ``(n, *shape)`` would not: its values depend on the batch size.)
    """
    eps, noise, t, u = [], [], [], []
    for _ in range(n):
        eps.append(torch.randn(latent_shape, generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        t.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        u.append(torch.rand((1,), generator=generator))
    return SampleDraws(torch.stack(eps), torch.stack(noise), torch.cat(t), torch.cat(u))


@torch.no_grad()
def encode_prompt(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state of the CLIP text encoder: ``[B, 77, D]``."""
    return text_encoder(input_ids, return_dict=False)[0]


@torch.no_grad()
def latent_moments(vae: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for images in [-1, 1]: ``[B, 4, H/8, W/8]`` each.

    Keeping the distribution (not one sample) is what lets a cache of latents train exactly
    like encoding every step.
    """
    dist = vae.encode(pixel_values).latent_dist
    return dist.mean, dist.std


def sample_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A scaled sample of the latent distribution (the VAE's reparameterisation)."""
    return (mean + std * to_device(eps, mean.device, mean.dtype)) * scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


def drop_captions(captions: list[str], proportion: float, uniform: torch.Tensor) -> list[str]:
    """Replace a ``proportion`` of captions by '' (trains the unconditional branch of guidance)."""
    if proportion <= 0:  # without reading ``uniform``: the memory estimate's fake tensors hold no values
        return list(captions)
    return ["" if float(x) < proportion else c for x, c in zip(uniform, captions)]


TIMESTEP_SAMPLING = ("uniform", "cubic")


def cubic_timesteps(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Uniform integer timesteps mapped to ``(1 - (t/T)^3) T``: biased toward the noisy end.

    Mou et al. 2023 (T2I-Adapter, sec. 3.4): the layout of an image is decided in the first,
    noisiest sampling steps, so an adapter that controls layout learns faster where it is
    trained there more often. Under this map ``P(t >= T/2) = 0.79`` (uniform: 0.5). It maps the
    uniform draw, so the random stream, and with it resume and accumulation, stay exact.
    """
    u = t.to(torch.float64) / num_timesteps
    return ((1.0 - u**3) * num_timesteps).to(torch.long).clamp_(0, num_timesteps - 1)


@dataclass
class DiffusionObjective:
    """Noise, target and loss for a DDPM-family noise scheduler.

    ``prediction_type`` None uses the scheduler's own. Min-SNR-gamma weighting follows
    Hang et al. 2023 ("Efficient Diffusion Training via Min-SNR Weighting Strategy"), eq. 4:
    the per-timestep weight is min(SNR, gamma) / SNR for epsilon prediction and
    min(SNR, gamma) / (SNR + 1) for v-prediction. ``timestep_sampling`` "cubic" draws noisy
    timesteps more often (``cubic_timesteps``).
    """

    noise_scheduler: object
    prediction_type: str | None = None
    snr_gamma: float | None = None
    timestep_sampling: str = "uniform"

    def __post_init__(self) -> None:
        self.prediction_type = self.prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            from .errors import ConfigError

            raise ConfigError(f"The base model's scheduler predicts {self.prediction_type!r} (prediction_type in its "
                              "scheduler/scheduler_config.json), which difftune does not train: it trains epsilon and "
                              "v_prediction models. If that setting is wrong, --prediction_type epsilon|v_prediction "
                              "overrides it.")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep sampling {self.timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}")
        self.num_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float32)

    def draw(self, generator: torch.Generator, n: int, latent_shape: tuple[int, ...]) -> SampleDraws:
        draws = draw_per_sample(generator, n, latent_shape, self.num_timesteps)
        if self.timestep_sampling == "cubic":
            draws.timesteps = cubic_timesteps(draws.timesteps, self.num_timesteps)
        return draws

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return a / (1.0 - a)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1.0) if self.prediction_type == "v_prediction" else clipped / snr

    def loss(
        self,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean (optionally Min-SNR-weighted, optionally masked) squared error, computed in fp32."""
        return self.reduce(per_sample_error(model_pred, target, mask), timesteps)

    def reduce(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch's loss from its per-sample errors: Min-SNR-weighted when asked, then the mean."""
        w = self.weights(timesteps)
        if w is not None:
            per_sample = per_sample * w.to(per_sample.device)
        return per_sample.mean()


def per_sample_error(model_pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error (over the mask's pixels, when given), in fp32: ``[B]``."""
    err = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is not None:
        return (err * mask).flatten(1).sum(1) / mask.expand_as(err).flatten(1).sum(1).clamp(min=1)
    return err.flatten(1).mean(1)


def objective_text(prediction_type: str, snr_gamma: float | None, timestep_sampling: str = "uniform") -> str:
    """A model card's line on what the loss was: 'v_prediction target, Min-SNR-gamma 5.0 weighting, ...'."""
    parts = [f"{prediction_type} target"]
    if snr_gamma is not None:
        parts.append(f"Min-SNR-gamma {snr_gamma:g} weighting")
    parts.append(f"{timestep_sampling} timesteps")
    return ", ".join(parts)
