"""EDM preconditioning / loss and EDMHeunScheduler against the EDM paper (Karras et al. 2022), written out here."""

import json
import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from torch import nn

from diffusers_diffit import DiffiTUNet2DModel, EDMHeunScheduler
from diffusers_diffit.edm import edm_denoise, edm_preconditioning
from diffusers_diffit.losses import edm_loss, edm_loss_weight, sample_training_sigmas


SIGMA_DATA = 0.5


# ---------------------------------------------------------------------------------------------------------------------
# An analytic denoiser: data ~ N(mu, s²) per pixel has the ideal denoiser D(x; σ) = mu + s²/(σ² + s²)·(x − mu).
# `GaussianF` is the raw network F that gives this D under EDM preconditioning, with the diffusers model signature.
# ---------------------------------------------------------------------------------------------------------------------
MU, S = 0.3, 0.2


def ideal_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return MU + S**2 / (sigma**2 + S**2) * (x - MU)


class GaussianF(nn.Module):
    """F(c_in·x, c_noise) = (D(x; σ) − c_skip·x) / c_out, recovering σ = exp(4·c_noise) — Table 1 of the paper."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, scaled, timestep, class_labels=None, return_dict=False):
        sigma = math.exp(4 * float(torch.as_tensor(timestep).flatten()[0]))
        self.calls.append(sigma)
        x = scaled * math.sqrt(sigma**2 + SIGMA_DATA**2)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)
        return ((ideal_denoiser(x, sigma) - c_skip * x) / c_out,)


def edm_sampler(
    denoise,
    x,
    num_steps,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    generator=None,
):
    """EDM Algorithm 2 (Algorithm 1 when s_churn = 0), line by line, in float64. `x` is x_0 ~ N(0, t_0²)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = x.double()
    for n in range(num_steps):
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= t[n] <= s_tmax else 0.0
        t_hat = t[n] + gamma * t[n]
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator).double() * s_noise
            x = x + math.sqrt(t_hat**2 - t[n] ** 2) * eps
        d = (x - denoise(x, t_hat)) / t_hat
        x_next = x + (t[n + 1] - t_hat) * d
        if t[n + 1] != 0:
            d_prime = (x_next - denoise(x_next, t[n + 1])) / t[n + 1]
            x_next = x + (t[n + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def generic_loop(scheduler, model, num_steps, shape=(4, 1, 8, 8), seed=0):
    """What a diffusers pipeline does: init_noise_sigma, scale_model_input, model(…, t), step(…, generator)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(x, t), t, return_dict=False)[0]
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Preconditioning and loss
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 3.0, 80.0])
def test_preconditioning_matches_edm_table_1(sigma):
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor(sigma, dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.25 / (sigma**2 + 0.25))
    assert c_out.item() == pytest.approx(sigma * 0.5 / math.sqrt(sigma**2 + 0.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + 0.25))
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4)
    # λ(σ)·c_out(σ)² = 1: the loss weights F's error equally at every noise level (EDM eq. 8 and §5)
    assert (edm_loss_weight(torch.tensor(sigma, dtype=torch.float64)) * c_out**2).item() == pytest.approx(1.0)


def test_training_sigmas_are_log_normal():
    sigma = sample_training_sigmas(200_000, generator=torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.02)


def test_edm_denoise_with_the_ideal_f_is_the_ideal_denoiser():
    x, sigma = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0.01, 1.0, 40.0], dtype=torch.float64)
    expected = torch.stack([ideal_denoiser(x[i], s.item()) for i, s in enumerate(sigma)])

    class PerSampleF(nn.Module):
        def forward(self, scaled, timestep, class_labels=None, return_dict=False):
            return (torch.stack([GaussianF()(scaled[i], timestep[i])[0] for i in range(len(timestep))]),)

    torch.testing.assert_close(edm_denoise(PerSampleF(), x, sigma), expected)


def test_edm_loss_matches_the_formula():
    model = DiffiTUNet2DModel(
        sample_size=8,
        in_channels=1,
        block_out_channels=(8,),
        layers_per_block=1,
        window_size=4,
        attention_head_dim=8,
        time_embedding_dim=8,
        frequency_embedding_size=8,
        num_classes=3,
        class_dropout_prob=0.0,
    )
    nn.init.normal_(model.conv_out.weight, std=0.1)
    clean, labels = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 1])
    loss = edm_loss(model, clean, labels, generator=torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(5, generator=generator)).view(-1, 1, 1, 1)
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    total = sigma**2 + 0.25
    f = model(noisy / total.sqrt(), (sigma.log() / 4).flatten(), class_labels=labels).sample
    denoised = 0.25 / total * noisy + sigma * 0.5 / total.sqrt() * f
    expected = (total / (sigma * 0.5) ** 2 * (denoised - clean) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# EDMHeunScheduler
# ---------------------------------------------------------------------------------------------------------------------
def test_schedule_layout():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(18)
    i = torch.arange(18, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert len(scheduler.timesteps) == 35  # 18 steps = 35 evaluations (EDM, DiffiT CIFAR-10)
    expected = torch.cat([t[:1], t[1:].repeat_interleave(2)])
    torch.testing.assert_close(scheduler.timesteps, (expected.log() / 4).float())
    assert scheduler.init_noise_sigma == pytest.approx(80.0)
    assert scheduler.order == 2


@pytest.mark.parametrize("num_steps", [2, 5, 18])
def test_heun_matches_edm_algorithm_1(num_steps):
    model = GaussianF()
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80.0
    expected = edm_sampler(ideal_denoiser, x0, num_steps).float()
    got = generic_loop(EDMHeunScheduler(), model, num_steps)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(model.calls) == 2 * num_steps - 1


def test_heun_with_churn_matches_edm_algorithm_2():
    churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)  # EDM's ImageNet settings; no churn at t_0
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=generator) * 80.0
    expected = edm_sampler(ideal_denoiser, x0, 18, generator=generator, **churn).float()
    scheduler = EDMHeunScheduler(**churn)
    got = generic_loop(scheduler, GaussianF(), 18)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, generic_loop(EDMHeunScheduler(), GaussianF(), 18))


def test_churn_at_the_first_step_scales_the_initial_noise():
    scheduler = EDMHeunScheduler(s_churn=10.0, s_noise=1.1)
    scheduler.set_timesteps(10)
    t0 = 80.0
    t0_hat = 80.0 * (1 + min(10.0 / 10, math.sqrt(2) - 1))
    assert scheduler.init_noise_sigma == pytest.approx(math.sqrt(t0**2 + 1.1**2 * (t0_hat**2 - t0**2)), rel=1e-6)


def exact_ode_solution(shape=(4, 1, 8, 8), seed=0, sigma_max=80.0):
    """The probability-flow ODE of N(MU, S²) keeps (x − MU)/√(σ² + S²) constant: x(0) from the loop's x(σ_max)."""
    x_max = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigma_max
    return MU + (x_max - MU) * S / math.sqrt(sigma_max**2 + S**2)


def test_heun_converges_to_the_exact_ode_solution_at_second_order():
    exact = exact_ode_solution()
    errors = [(generic_loop(EDMHeunScheduler(), GaussianF(), n) - exact).abs().max().item() for n in (20, 40, 80)]
    assert errors[2] < 5e-3
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5  # halving the step size quarters the error


@pytest.mark.parametrize("other, num_steps", [(EDMEulerScheduler, 300), (EDMDPMSolverMultistepScheduler, 100)])
def test_diffusers_edm_schedulers_share_the_model_convention(other, num_steps):
    """The same F, called with c_in·x and c_noise, solves the same ODE with diffusers' EDM schedulers."""
    scheduler = other.from_config(EDMHeunScheduler().config)
    assert scheduler.config.sigma_min == 0.002 and scheduler.config.sigma_max == 80.0
    got = generic_loop(scheduler, GaussianF(), num_steps)
    # diffusers' EDM schedulers start from √(σ_max² + 1) instead of σ_max: a 1e-4 relative difference
    torch.testing.assert_close(got, exact_ode_solution(), rtol=0, atol=0.02)


def test_scheduler_config_round_trip(tmp_path):
    scheduler = EDMHeunScheduler(sigma_max=40.0, s_churn=5.0)
    scheduler.save_pretrained(tmp_path)
    text = (tmp_path / "scheduler_config.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert loaded.config.sigma_max == 40.0 and loaded.config.s_churn == 5.0


def test_scheduler_errors():
    for bad in (dict(s_churn=float("nan")), dict(s_tmax=float("inf")), dict(sigma_max=float("inf"))):
        with pytest.raises(ValueError, match="must be finite numbers"):
            EDMHeunScheduler(**bad)
    with pytest.raises(ValueError, match="sigma_min"):
        EDMHeunScheduler(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="s_churn"):
        EDMHeunScheduler(s_churn=-1.0)
    scheduler = EDMHeunScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of"):
        scheduler.scale_model_input(torch.zeros(1), 123.0)
    for t in scheduler.timesteps:
        scheduler.step(torch.zeros(1), t, torch.zeros(1))
    with pytest.raises(ValueError, match="3 model calls"):
        scheduler.step(torch.zeros(1), scheduler.timesteps[-1], torch.zeros(1))
