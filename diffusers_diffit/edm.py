"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the
preconditioning, the one source of truth reused by `EDMHeunScheduler` and by the EDM loss (`losses.py`).

    D_θ(x; σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ·σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ln(σ) / 4

F_θ is any denoiser called as `model(x, c_noise, class_labels=..., return_dict=False)[0]`, the signature of
`DiffiTUNet2DModel` and of diffusers' `UNet2DModel`; it is what diffusers' EDM schedulers call `"epsilon"` output.
"""

from typing import NamedTuple

import torch
from torch import nn


SIGMA_DATA = 0.5


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
