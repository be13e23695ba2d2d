"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): preconditioning,
training noise distribution and loss. The one source of truth reused by `EDMHeunScheduler` and the training code.

    D_θ(x; σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ·σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ln(σ) / 4
    loss = E_{σ, y, n} [ λ(σ) · ‖D_θ(y + n; σ) − y‖² ],  λ(σ) = (σ² + σ_d²) / (σ·σ_d)²,  ln σ ~ N(P_mean, P_std²)

F_θ is any denoiser called as `model(x, c_noise, class_labels=..., return_dict=False)[0]`, the signature of
`DiffiTUNet2DModel` and of diffusers' `UNet2DModel`; it is what diffusers' EDM schedulers call `"epsilon"` output.
"""

from typing import NamedTuple

import torch
from torch import nn


SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2


class EDMPreconditioning(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_preconditioning(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> EDMPreconditioning:
    """The four EDM scalings of σ (a number or a tensor of any shape, σ > 0), each shaped like `sigma`."""
    sigma = torch.as_tensor(sigma)
    total = sigma**2 + sigma_data**2
    return EDMPreconditioning(
        c_skip=sigma_data**2 / total,
        c_out=sigma * sigma_data / total.sqrt(),
        c_in=total.rsqrt(),
        c_noise=sigma.log() / 4,
    )


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


def edm_denoise(
    model: nn.Module,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """D_θ(x; σ): noisy [B, C, H, W] at noise levels `sigma` [B] -> the denoised estimate [B, C, H, W]."""
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_preconditioning(sigma, sigma_data))
    output = model(c_in * noisy, c_noise.flatten(), class_labels=class_labels, return_dict=False)[0]
    return c_skip * noisy + c_out * output.to(noisy.dtype)


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
