"""The training objectives (diffusers_diffit/losses.py): ADM's hybrid loss against the DDPM equations written out here
and diffusers' own `DDPMScheduler`, and each objective against the loss it is defined by, draw for draw."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler

from diffusers_diffit import EDMHeunScheduler, official_scheduler
from diffusers_diffit.losses import (
    OBJECTIVES,
    DDPMHybridObjective,
    EDMObjective,
    HybridDiffusionLoss,
    edm_loss,
)
from diffusers_diffit.schedulers.compatibility import scheduler_support
from tests.utils import tiny_transformer, tiny_unet


def reference_hybrid_terms(out, x0, x_t, noise, t, scheduler):
    """L_simple and L_vlb from Ho et al. (eq. 7 posterior, eq. 15 x̂_0, §3.3 decoder) in float64, the model's log
    variance from diffusers' own `DDPMScheduler._get_variance("learned_range")` (t > 0), KL from
    torch.distributions."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    c = x0.shape[1]
    out, x0, x_t, noise = (a.double() for a in (out, x0, x_t, noise))
    mse, vlb = [], []
    for i, ti in enumerate(t.tolist()):
        eps, v = out[i, :c], out[i, c:]
        ab, beta = alpha_bar[ti], betas[ti]
        ab_prev = alpha_bar[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64)

        def posterior_mean(start):
            return ab_prev.sqrt() * beta / (1 - ab) * start + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t[i]

        x0_hat = (x_t[i] - (1 - ab).sqrt() * eps) / ab.sqrt()
        model_mean = posterior_mean(x0_hat)
        beta_tilde_1 = (1 - alpha_bar[0]) / (1 - alpha_bar[1]) * betas[1]
        if ti > 0:
            log_var = scheduler._get_variance(ti, predicted_variance=v.float()).double()
            true = torch.distributions.Normal(posterior_mean(x0[i]), ((1 - ab_prev) / (1 - ab) * beta).sqrt())
            model = torch.distributions.Normal(model_mean, (0.5 * log_var).exp())
            vlb.append(torch.distributions.kl_divergence(true, model).mean() / math.log(2))
        else:
            frac = (v + 1) / 2
            log_var = frac * beta.log() + (1 - frac) * beta_tilde_1.log()
            model = torch.distributions.Normal(model_mean, (0.5 * log_var).exp())
            upper = torch.where(x0[i] > 0.999, torch.ones_like(x0[i]), model.cdf(x0[i] + 1 / 255))
            lower = torch.where(x0[i] < -0.999, torch.zeros_like(x0[i]), model.cdf(x0[i] - 1 / 255))
            vlb.append(-(upper - lower).clamp(min=1e-12).log().mean() / math.log(2))  # ADM's probability floor
        mse.append(((noise[i] - eps) ** 2).mean())
    return torch.stack(mse), torch.stack(vlb)


def test_hybrid_loss_matches_the_ddpm_equations():
    scheduler = DDPMScheduler(beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (5, 3, 4, 4), generator=gen) / 127.5 - 1).float()  # 8-bit data, incl. ±1 edges
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 0, 1, 500, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    out = torch.cat([torch.randn(x0.shape, generator=gen), torch.rand(x0.shape, generator=gen) * 2 - 1], dim=1)
    out[0, :3] = noise[0] + 0.01 * torch.randn(x0[0].shape, generator=gen)  # a good ε̂ at t = 0: a sharp decoder

    terms = HybridDiffusionLoss(scheduler)(out, x0, x_t, noise, t)
    mse, vlb = reference_hybrid_terms(out, x0, x_t, noise, t, scheduler)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["vlb"].double(), vlb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vlb"])  # λ = 1000 / 1000


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    scheduler = DDPMScheduler(beta_schedule="linear")
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 10, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    out = torch.randn(3, 8, 4, 4, requires_grad=True)
    terms = HybridDiffusionLoss(scheduler)(out, x0, x_t, noise, t)
    (grad_vlb,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_vlb[:, :4].abs().max() == 0 and grad_vlb[:, 4:].abs().max() > 0  # ε̂ detached in L_vlb
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0


def test_hybrid_loss_weighting_and_shapes():
    scheduler = DDPMScheduler(num_train_timesteps=4000, beta_schedule="linear")
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([3, 3000])
    x_t = scheduler.add_noise(x0, noise, t)
    loss = HybridDiffusionLoss(scheduler)
    terms = loss(torch.randn(2, 8, 2, 2), x0, x_t, noise, t)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 4.0 * terms["vlb"])  # ADM: λ = T / 1000
    eps_only = loss(torch.randn(2, 4, 2, 2), x0, x_t, noise, t)  # no variance channels: L_simple only
    assert eps_only["vlb"].abs().max() == 0 and torch.equal(eps_only["loss"], eps_only["mse"])
    with pytest.raises(ValueError, match="model_output"):
        loss(torch.randn(2, 6, 2, 2), x0, x_t, noise, t)


def test_objectives_are_named_by_the_denoiser_they_train_and_driven_by_its_schedulers():
    assert sorted(OBJECTIVES) == ["ddpm-hybrid", "edm"]
    assert scheduler_support(EDMHeunScheduler, OBJECTIVES["edm"].denoiser_type) is None
    assert scheduler_support(DDPMScheduler, OBJECTIVES["ddpm-hybrid"].denoiser_type) is None
    assert scheduler_support(DDPMScheduler, OBJECTIVES["edm"].denoiser_type) is not None


def test_edm_objective_is_the_edm_loss_with_the_schedulers_sigma_data():
    model = tiny_unet()  # eval mode: no dropout, so both calls see the same function
    clean, labels = torch.randn(4, 1, 16, 16) * 0.5, torch.tensor([0, 3, 10, 9])
    scheduler = EDMDPMSolverMultistepScheduler(sigma_data=0.7)
    objective = EDMObjective.from_scheduler(scheduler)
    loss, logs = objective(model, clean, labels, torch.Generator().manual_seed(3))
    expected = edm_loss(model, clean, labels, sigma_data=0.7, generator=torch.Generator().manual_seed(3))
    assert logs == {} and objective.sigma_data == 0.7
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)  # same draws, same kernels: bitwise


def test_ddpm_hybrid_objective_draws_noise_then_timesteps_and_applies_the_hybrid_loss():
    model = tiny_transformer()  # eval mode: no dropout, so both calls see the same function
    clean, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 5])
    objective = DDPMHybridObjective.from_scheduler(official_scheduler())
    loss, logs = objective(model, clean, labels, torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)  # the documented order of draws
    noise = torch.randn(clean.shape, generator=gen)
    t = torch.randint(0, 1000, (3,), generator=gen)
    scheduler = DDPMScheduler.from_config(official_scheduler().config)
    noisy = scheduler.add_noise(clean, noise, t)
    terms = HybridDiffusionLoss(scheduler)(model(noisy, t, class_labels=labels).sample, clean, noisy, noise, t)
    torch.testing.assert_close(loss, terms["loss"].mean(), rtol=0, atol=0)  # same draws, same kernels: bitwise
    assert logs == pytest.approx({"mse": terms["mse"].mean().item(), "vlb": terms["vlb"].mean().item()})
