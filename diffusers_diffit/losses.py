"""Training objectives: what one training step minimises, for each kind of denoiser (`OBJECTIVES`).

- "edm" (EDM, Karras et al. 2022): ln σ ~ N(P_mean, P_std²), loss = λ(σ)·‖D_θ(x + σ·n; σ) − x‖², λ(σ) =
  (σ² + σ_d²) / (σ·σ_d)², with the preconditioned denoiser D_θ of `edm.py`. Samples with EDM schedulers.
- "ddpm-hybrid" (improved DDPM / ADM / DiT, and DiffiT's latent models): t uniform over the training steps, DDPM
  noising, L_simple + λ·L_vlb (`HybridDiffusionLoss`), the L_vlb term only for models that predict the variance.
  Samples with discrete-time schedulers.

An objective is built from the scheduler the trained pipeline samples with (`from_scheduler`: σ_data, or the noise
schedule), so training and sampling share one definition of the noise. Calling it on (model, clean batch, labels,
generator) returns the batch's loss and a dict of extra numbers to log; every random draw comes from `generator`.
"""

import math

import torch
from diffusers import DDPMScheduler
from torch import nn

from .edm import SIGMA_DATA, edm_denoise


P_MEAN, P_STD = -1.2, 1.2


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)², which makes the loss of F_θ unit-weighted at every σ (EDM eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_training_sigmas(
    batch: int,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ln σ ~ N(p_mean, p_std²) -> [batch] float32 noise levels for training."""
    noise = torch.randn(batch, generator=generator, device=generator.device if generator else device)
    return (p_mean + p_std * noise).exp().to(device)


def edm_loss(
    model: nn.Module,
    clean: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_data: float = SIGMA_DATA,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EDM training loss of a batch of clean images [B, C, H, W] (scaled so that their std is about σ_data),
    averaged over the batch and the pixels."""
    sigma = sample_training_sigmas(clean.shape[0], p_mean, p_std, clean.device, generator)
    noise = torch.randn(clean.shape, generator=generator, device=generator.device if generator else clean.device)
    noisy = clean + sigma.view(-1, 1, 1, 1) * noise.to(clean.device)
    denoised = edm_denoise(model, noisy, sigma, class_labels, sigma_data)
    return (edm_loss_weight(sigma, sigma_data).view(-1, 1, 1, 1) * (denoised - clean) ** 2).mean()


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for data on [-1, 1] quantised to 256 levels (bins of width 2/255), under
    N(mean, e^(2·log_scale)); the outermost bins take the tails (DDPM's decoder, Ho et al. §3.3); probabilities
    are floored at 1e-12 (ADM).

    Computed from log-CDFs on the lower tail (a bin's mass equals its mirror image's), so float32 stays accurate
    many standard deviations from the mean, where differences of CDFs cancel to 0. ADM uses a tanh approximation
    of the CDF; this is the exact one."""
    inv_std = torch.exp(-log_scale)
    half_bin = 1.0 / 255
    near = -(x - mean).abs()
    log_upper = torch.special.log_ndtr(inv_std * (near + half_bin))
    log_lower = torch.special.log_ndtr(inv_std * (near - half_bin))
    log_delta = log_upper + torch.log1p(-torch.exp(log_lower - log_upper))
    log_lowest = torch.special.log_ndtr(inv_std * (x - mean + half_bin))  # P(X < x + h), the bin of x = -1
    log_highest = torch.special.log_ndtr(-inv_std * (x - mean - half_bin))  # P(X > x − h), the bin of x = +1
    log_probs = torch.where(x < -0.999, log_lowest, torch.where(x > 0.999, log_highest, log_delta))
    return log_probs.clamp(min=math.log(1e-12))


class HybridDiffusionLoss:
    """L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021, "improved DDPM"; ADM and DiT train with it, and so did
    DiffiT), for a model whose output is [ε̂ ‖ v] with the learned-range variance
    (docs/diffit-equations.md#ddpm-hybrid).

    - L_simple = mean over dims of (ε − ε̂)².
    - L_vlb, in bits per dimension: KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 0, and the discretized
      Gaussian decoder NLL −log p_θ(x_0 | x_1) for t = 0.
    - p_θ's mean is the posterior mean at x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t with ε̂ **detached**, so L_vlb only
      trains v.
    - p_θ's variance: log σ² = f·log β_t + (1 − f)·log β̃_t, f = (v + 1)/2, where log β̃ is ADM's clipped
      table (β̃_0 = 0 replaced by β̃_1).
    - λ = num_train_timesteps / 1000 (ADM's weighting; 1 for the usual 1000 steps).

    A model without variance channels (out_channels == in_channels) gets L_simple only.
    Timestep conventions are diffusers' `DDPMScheduler`'s (t = 0 is the first noising step, ᾱ_{−1} = 1).
    """

    def __init__(self, scheduler: DDPMScheduler):
        betas = scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.num_train_timesteps = len(betas)
        self.vlb_weight = self.num_train_timesteps / 1000.0
        # computed in float64, stored in float32 (ADM gathers from float64 and casts: the same numbers)
        self.sqrt_recip_alphas_cumprod = torch.rsqrt(alphas_cumprod).float()
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1.0).float()
        self.posterior_mean_coef1 = (betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)).float()
        self.posterior_mean_coef2 = (
            (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        ).float()
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])).float()
        self.log_betas = torch.log(betas).float()

    def _gather(self, table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # -> [B, 1, 1, 1]
        return table.to(timesteps.device)[timesteps].view(-1, 1, 1, 1)

    def posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t−1} | x_t, x_0)."""
        return (
            self._gather(self.posterior_mean_coef1, timesteps) * x_start
            + self._gather(self.posterior_mean_coef2, timesteps) * x_t
        )

    def model_log_variance(self, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        frac = (v + 1) / 2
        return frac * self._gather(self.log_betas, timesteps) + (1 - frac) * self._gather(
            self.posterior_log_variance, timesteps
        )

    def vlb(
        self, eps: torch.Tensor, v: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """L_vlb per sample [B] in bits/dim (unweighted) for predicted ε (used as given) and variance channels v."""
        pred_x_start = (
            self._gather(self.sqrt_recip_alphas_cumprod, timesteps) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, timesteps) * eps
        )
        model_mean = self.posterior_mean(pred_x_start, x_t, timesteps)
        model_log_variance = self.model_log_variance(v, timesteps)
        true_mean = self.posterior_mean(x_start, x_t, timesteps)
        true_log_variance = self._gather(self.posterior_log_variance, timesteps)
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3))
        return torch.where(timesteps == 0, nll, kl) / math.log(2.0)

    def __call__(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            model_output: [B, C or 2C, H, W]: ε̂, then v when the model learns the variance.
            x_start, x_t, noise: [B, C, H, W] with x_t = √ᾱ_t·x_start + √(1−ᾱ_t)·noise.
            timesteps: int64 [B] in [0, num_train_timesteps).
        Returns:
            per-sample [B] float32 tensors: "loss" = "mse" + λ·"vlb" ("vlb" is 0 without variance channels).
        """
        channels = x_start.shape[1]
        if model_output.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"`model_output` must have {channels} (ε) or {2 * channels} (ε and v) channels, "
                f"got {model_output.shape[1]}."
            )
        model_output, x_start, x_t, noise = (t.float() for t in (model_output, x_start, x_t, noise))
        eps, v = model_output[:, :channels], model_output[:, channels:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        vlb = self.vlb(eps.detach(), v, x_start, x_t, timesteps) if v.shape[1] else torch.zeros_like(mse)
        return {"loss": mse + self.vlb_weight * vlb, "mse": mse, "vlb": vlb}


class EDMObjective:
    name, denoiser_type = "edm", "edm"

    def __init__(self, sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN, p_std: float = P_STD):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    @classmethod
    def from_scheduler(cls, scheduler) -> "EDMObjective":
        return cls(sigma_data=scheduler.config.sigma_data)

    def __call__(self, model: nn.Module, clean: torch.Tensor, class_labels, generator) -> tuple[torch.Tensor, dict]:
        return edm_loss(model, clean, class_labels, self.p_mean, self.p_std, self.sigma_data, generator), {}


class DDPMHybridObjective:
    name, denoiser_type = "ddpm-hybrid", "ddpm"

    def __init__(self, noise_scheduler: DDPMScheduler):
        self.noise_scheduler = noise_scheduler
        self.hybrid_loss = HybridDiffusionLoss(noise_scheduler)

    @classmethod
    def from_scheduler(cls, scheduler) -> "DDPMHybridObjective":
        return cls(DDPMScheduler.from_config(scheduler.config))

    def __call__(self, model: nn.Module, clean: torch.Tensor, class_labels, generator) -> tuple[torch.Tensor, dict]:
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (clean.shape[0],),
            generator=generator,
            device=clean.device,
        )
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        output = model(noisy, timesteps, class_labels=class_labels).sample
        terms = self.hybrid_loss(output, clean, noisy, noise, timesteps)
        return terms["loss"].mean(), {"mse": terms["mse"].mean().item(), "vlb": terms["vlb"].mean().item()}


OBJECTIVES = {objective.name: objective for objective in (EDMObjective, DDPMHybridObjective)}
