"""Which schedulers drive which denoiser: every "works" verdict samples the right distribution, every rejection
raises at assignment, and the table in docs/schedulers.md is the one the code builds.

The reference is analytic: for data x₀ ~ N(μ_y, s²) per pixel the optimal denoisers are known in closed form,

    ddpm:  ε̂(x_t, t) = √(1−ᾱ_t)·(x_t − √ᾱ_t·μ_y) / (ᾱ_t·s² + 1 − ᾱ_t)
    edm:   D(x; σ) = μ_y + s²/(s² + σ²)·(x − μ_y),   F = (D − c_skip·x) / c_out

so a scheduler that calls and reads the model the right way turns noise into samples with mean μ_y and std s, and
one that does not gives something else. Sample statistics are compared with tolerances (they depend on the draw).
"""

import re
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffusers_diffit import DiffiTPipeline, EDMHeunScheduler, official_scheduler
from diffusers_diffit.edm import edm_preconditioning
from diffusers_diffit.schedulers import (
    PRESETS,
    check_scheduler,
    compatibility_table,
    scheduler_from_preset,
    scheduler_presets,
    scheduler_support,
)
from diffusers_diffit.schedulers.compatibility import COMPATIBLE, all_scheduler_classes, scheduler_class


pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")  # diffusers' Euler/LMS with numpy 2

ROOT = Path(__file__).resolve().parents[1]
SIDE, STD = 16, 0.5
# Steps that bring each sampler's own discretisation error under the tolerance: ancestral DDPM with v = 0 (a variance
# between β̃ and β; the exact one lies between them) needs the official 250; Euler ancestral, first order and
# stochastic, is still 7 % narrow at 100 steps (1.5 % at 300); every other scheduler is within 3 % at 100.
STEPS = {"DDPMScheduler": 250, "DDPMParallelScheduler": 250, "EulerAncestralDiscreteScheduler": 300}


def class_mean(labels: torch.Tensor) -> torch.Tensor:
    return (-0.6 + 0.3 * labels.double()).view(-1, 1, 1, 1)  # μ_y: classes 0…4 -> −0.6 … 0.6


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The optimal denoiser of per-pixel Gaussian data N(μ_y, s²), in either parametrisation."""

    @register_to_config
    def __init__(self, denoiser_type="ddpm", in_channels=1, out_channels=1, sample_size=SIDE, num_classes=5):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # a parameter gives the model its dtype and device
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt(), persistent=False)

    def forward(self, x, timestep, class_labels=None, return_dict=False):
        assert class_labels is not None
        mu = class_mean(class_labels)
        x, t = x.double(), torch.as_tensor(timestep, dtype=torch.float64).view(-1, 1, 1, 1)
        if self.config.denoiser_type == "edm":
            sigma = (4 * t).exp()
            c_skip, c_out, c_in, _ = edm_preconditioning(sigma)
            x = x / c_in
            denoised = mu + STD**2 / (STD**2 + sigma**2) * (x - mu)
            out = (denoised - c_skip * x) / c_out
        else:  # σ(t) interpolated between training steps, as diffusers' Euler-type schedulers do
            sigma = torch.from_numpy(np.interp(t.flatten().numpy(), np.arange(1000), self.sigmas.numpy())).view(
                -1, 1, 1, 1
            )
            abar = 1 / (1 + sigma**2)
            # Euler-type schedulers feed x_t·(1/√(σ²+1)) = √ᾱ·(x₀ + σ ε), which is x_t of the DDPM scale
            out = (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * STD**2 + 1 - abar)
            if self.config.out_channels == 2 * self.config.in_channels:  # learned variance
                out = torch.cat([out, torch.zeros_like(out)], dim=1)  # v = 0: between β̃ and β
        return (out.float(),)


def gaussian_pipe(denoiser_type: str) -> DiffiTPipeline:
    model = GaussianDenoiser(denoiser_type, out_channels=2 if denoiser_type == "ddpm" else 1)
    scheduler = official_scheduler() if denoiser_type == "ddpm" else EDMHeunScheduler()
    pipe = DiffiTPipeline(model, scheduler, vae=None, denoiser_type=denoiser_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "denoiser_type, name",
    [(kind, name) for kind in ("ddpm", "edm") for name in COMPATIBLE[kind]],
    ids=lambda v: str(v),
)
@torch.no_grad()
def test_every_compatible_scheduler_samples_the_data_distribution(denoiser_type, name):
    pipe = gaussian_pipe(denoiser_type)
    pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)
    labels = torch.tensor([0, 2, 4]).repeat_interleave(32)
    steps = STEPS.get(name, 100)
    x = pipe(
        labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images
    x = x.double().view(3, -1)  # [class, pixels]
    mean, std = x.mean(1), x.std(1)
    print(f"{name}: mean {mean.tolist()}, std {std.tolist()}")
    torch.testing.assert_close(mean, class_mean(torch.tensor([0, 2, 4])).flatten(), rtol=0, atol=0.03)
    torch.testing.assert_close(std, torch.full((3,), STD, dtype=torch.float64), rtol=0.06, atol=0)


@pytest.mark.parametrize("denoiser_type, wrong", [("edm", EulerDiscreteScheduler), ("ddpm", EDMEulerScheduler)])
@torch.no_grad()
def test_the_analytic_reference_tells_a_wrong_pairing_apart(monkeypatch, denoiser_type, wrong):
    """With the gate switched off, a scheduler of the other type samples far from the data (or overflows): the check
    above can fail."""
    monkeypatch.setattr("diffusers_diffit.pipelines.pipeline_diffit.check_scheduler", lambda scheduler, *_: scheduler)
    pipe = gaussian_pipe(denoiser_type)
    pipe.scheduler = wrong.from_config(official_scheduler().config, variance_type=None)
    x = pipe([4] * 8, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="latent").images
    mean, std = x.double().mean().item(), x.double().std().item()
    assert not (abs(mean - 0.6) < 0.1 and abs(std - STD) < 0.1), (mean, std)


def rejected(denoiser_type: str) -> list[type]:
    return [cls for cls in all_scheduler_classes() if scheduler_support(cls, denoiser_type) is not None]


@pytest.mark.parametrize("denoiser_type", ["ddpm", "edm"])
def test_every_other_scheduler_is_refused_at_assignment(denoiser_type):
    pipe = gaussian_pipe(denoiser_type)
    before = pipe.scheduler
    assert len(rejected(denoiser_type)) >= 30
    for cls in rejected(denoiser_type):
        scheduler = object.__new__(cls)  # the verdict depends on the class; some need arguments to construct
        with pytest.raises(ValueError, match=rf"^{cls.__name__} cannot drive this model .*Schedulers that work: "):
            pipe.scheduler = scheduler
        assert pipe.scheduler is before  # the pipeline keeps its scheduler


def test_the_shipped_digits_model_refuses_discrete_schedulers_and_names_the_edm_ones():
    pipe = DiffiTPipeline.from_pretrained(str(ROOT / "diffusers_diffit" / "embedded" / "digits"))
    assert pipe.denoiser_type == "edm"
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler):
        with pytest.raises(ValueError, match=r"EDMHeunScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler"):
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    assert pipe.compatible_schedulers == [
        EDMHeunScheduler,
        EDMEulerScheduler,
        diffusers.EDMDPMSolverMultistepScheduler,
    ]


def test_noise_schedule_and_prediction_type_must_match_the_training():
    pipe = gaussian_pipe("ddpm")
    with pytest.raises(ValueError, match=r"changes the noise schedule.*beta_schedule: 'linear' -> 'scaled_linear'"):
        pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.scheduler = DDIMScheduler()  # diffusers' defaults are the DDPM training schedule: accepted
    edm = gaussian_pipe("edm")
    with pytest.raises(ValueError, match=r"sigma_data: 0.5 -> 1.0"):
        edm.scheduler = EDMEulerScheduler(sigma_data=1.0)


def test_denoiser_type_is_saved_and_inferred_for_older_folders(tmp_path):
    pipe = gaussian_pipe("edm")
    assert pipe.config.denoiser_type == "edm"
    for denoiser_type, scheduler in (("edm", EDMEulerScheduler()), ("ddpm", official_scheduler())):
        assert DiffiTPipeline(pipe.transformer, scheduler, vae=None).denoiser_type == denoiser_type
    with pytest.raises(ValueError, match="`denoiser_type` must be one of"):
        check_scheduler(official_scheduler(), "eps")


@pytest.mark.parametrize("denoiser_type", ["ddpm", "edm"])
def test_presets_build_schedulers_that_pass_the_gate(denoiser_type):
    pipe = gaussian_pipe(denoiser_type)
    names = scheduler_presets(denoiser_type)
    assert names[0] == ("ddpm" if denoiser_type == "ddpm" else "edm-heun")
    for name in names:
        scheduler = scheduler_from_preset(name, pipe.scheduler)
        assert type(scheduler).__name__ == PRESETS[name][1]
        assert all(scheduler.config[k] == v for k, v in PRESETS[name][2].items())
        pipe.scheduler = scheduler
    other = scheduler_presets("edm" if denoiser_type == "ddpm" else "ddpm")[0]
    with pytest.raises(ValueError, match=rf"Scheduler {other!r} is not one of"):
        scheduler_from_preset(other, pipe.scheduler)
    with pytest.raises(ValueError, match="Did you mean"):
        scheduler_from_preset(names[0] + "x", pipe.scheduler)


def test_dpmsolver_preset_on_a_learned_variance_model_gets_variance_type_none():
    pipe = gaussian_pipe("ddpm")
    scheduler = scheduler_from_preset("dpmsolver", pipe.scheduler)
    assert scheduler.config.variance_type is None and scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler_from_preset("ddpm", pipe.scheduler).config.variance_type == "learned_range"


def test_docs_table_is_the_one_the_code_builds():
    page = (ROOT / "docs" / "schedulers.md").read_text()
    table = compatibility_table()
    assert table in page, "docs/schedulers.md's scheduler table is stale: paste `compatibility_table()`"
    works = {kind: len(re.findall(r"\*\*works\*\*", table)) for kind in ("all",)}
    assert works["all"] == len(COMPATIBLE["ddpm"]) + len(COMPATIBLE["edm"])
