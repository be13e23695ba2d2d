"""DiffiTPipeline: the official sampler reproduced against a reference loop written from
docs/diffit-equations.md#sampling, every scheduler, guidance, labels, outputs, callbacks, save/load and bad inputs.
Tiny models on CPU.

Determinism: a comparison is bitwise only between two runs of one pipeline object in one process with the same batch
shapes at every step (same weights in the same memory, same kernels). Anything that may pick other kernels —
reloaded weights, another batch size, another thread count or CPU — is compared with a stated tolerance.
`make test-other-kernels` reruns these tests on MKL's SSE4.2 path with one thread to keep that honest."""

import json
import math
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_ddpm

from diffusers_diffit.cli import build_parser
from diffusers_diffit.cli import main as cli_main
from diffusers_diffit.guidance import GUIDANCE_SCHEDULES, GuidanceSchedule, guidance_weight, register_guidance_schedule
from diffusers_diffit.models import DiffiTUNet2DModel
from diffusers_diffit.pipelines import OFFICIAL_RECIPES, RECIPE_KEYS, DiffiTPipeline, official_scheduler
from diffusers_diffit.schedulers import EDMHeunScheduler
from tests.utils import make_pipe, relative_error, tiny_transformer


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' Euler / LMS / KDPM2 schedulers meet numpy 2 with a deprecation warning per step (their side)
    pytest.mark.filterwarnings("ignore:__array:DeprecationWarning"),
]

NUM_CLASSES = 10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Exactness against the official sampling loop (docs/diffit-equations.md#sampling), written here from the formulas
# in float64


def official_loop(model, x_T, labels, noises, w, schedule, p=4.0, guided=3, steps=250):
    """ADM's respaced ancestral sampler with learned-range variance and DiffiT's guidance, one step at a time:
    batch [x; x] with labels [y; null], guide ε channels [:guided], keep the conditional half's v."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    use_timesteps = np.round(np.linspace(0, 999, steps)).astype(int)
    abar = alphas_cumprod[use_timesteps]  # respaced ᾱ
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev  # respaced β
    posterior_variance = beta * (1 - abar_prev) / (1 - abar)
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    x, channels, null = x_T.double(), x_T.shape[1], model.config.num_classes
    noises = iter(noises)
    for k in reversed(range(steps)):
        t = int(use_timesteps[k])  # the model sees the original timestep
        out = model(
            torch.cat([x, x]).float(),
            torch.full((2 * len(x),), t),
            class_labels=torch.cat([labels, torch.full_like(labels, null)]),
            return_dict=False,
        )[0].double()
        cond, uncond = out.chunk(2)
        if schedule == "power-cosine":
            w_t = 1 + (w - 1) * 0.5 * (1 - math.cos(math.pi * (1 - t / 1000) ** p))
        else:
            w_t = w
        eps = cond[:, :channels].clone()
        eps[:, :guided] = uncond[:, :guided] + w_t * (cond[:, :guided] - uncond[:, :guided])
        frac = (cond[:, channels:] + 1) / 2
        x0 = math.sqrt(1 / abar[k]) * x - math.sqrt(1 / abar[k] - 1) * eps
        mean = (beta[k] * math.sqrt(abar_prev[k]) / (1 - abar[k])) * x0 + (
            (1 - abar_prev[k]) * math.sqrt(1 - beta[k]) / (1 - abar[k])
        ) * x
        log_variance = frac * math.log(beta[k]) + (1 - frac) * posterior_log_variance_clipped[k]
        x = mean + torch.exp(0.5 * log_variance) * next(noises).double() if k > 0 else mean
    assert next(noises, None) is None, "every recorded noise draw is used exactly once"
    return x


@pytest.fixture
def record_ddpm_noise(monkeypatch):
    """Record the noise that the stock DDPMScheduler.step draws (with the pipeline's generator)."""
    draws = []
    original = scheduling_ddpm.randn_tensor

    def recording(*args, **kwargs):
        draws.append(original(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", recording)
    return draws


@pytest.mark.parametrize("image_size", [256, 512], ids=["power-cosine-w4.4", "constant-w1.49"])
@torch.no_grad()
def test_official_recipe_matches_reference_loop(image_size, record_ddpm_noise):
    recipe = OFFICIAL_RECIPES[image_size]
    model = tiny_transformer()
    pipe = make_pipe(model, vae=None, **recipe)  # defaults = the recipe; "latent" output skips decoding
    x_T = torch.randn(2, 4, 8, 8, generator=gen(1))
    labels = torch.tensor([1, 7])

    got = pipe(labels, latents=x_T, generator=gen(2), output_type="latent").images
    assert len(record_ddpm_noise) == 249  # no noise at the last step
    expected = official_loop(
        model, x_T, labels, record_ddpm_noise, recipe["guidance_scale"], recipe["guidance_schedule"]
    )
    error = relative_error(got, expected)
    print(f"{recipe['guidance_schedule']}: max |pipeline - reference| / max |reference| = {error:.2e}")
    assert error < 1e-4
    # the reference tells the release's recipe from near misses (all 4 channels guided, another w) by more than 1e-4
    for near_miss in (dict(guided=4), dict(w=recipe["guidance_scale"] + 0.2)):
        args = dict(w=recipe["guidance_scale"], schedule=recipe["guidance_schedule"]) | near_miss
        assert relative_error(got, official_loop(model, x_T, labels, record_ddpm_noise, **args)) > 1e-4


def test_official_scheduler_uses_the_release_timesteps():
    scheduler = official_scheduler()
    scheduler.set_timesteps(250)
    assert scheduler.timesteps.tolist() == np.round(np.linspace(0, 999, 250)).astype(int)[::-1].tolist()


def test_power_cosine_weight():
    # w(t) = 1 + (w − 1)·½·(1 − cos(π (1 − t/T)^p)): 1 at t = T, w at t = 0; at t = T/2, p = 4: ½(1 − cos(π/16))
    assert guidance_weight(1000, 4.4, "power-cosine", 4.0, horizon=1000) == pytest.approx(1.0)
    assert guidance_weight(0, 4.4, "power-cosine", 4.0, horizon=1000) == pytest.approx(4.4)
    assert guidance_weight(500, 4.4, "power-cosine", 4.0, horizon=1000) == pytest.approx(1 + 3.4 * 0.0096073598)
    assert guidance_weight(500, 4.4, "constant", 4.0) == 4.4


# ---------------------------------------------------------------------------------------------------------------
# Schedulers


def _discrete(cls):
    extra = {"variance_type": None} if cls in (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler) else {}
    return cls.from_config(official_scheduler().config, **extra)


DISCRETE = [
    DDPMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
    DEISMultistepScheduler,
    PNDMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    KDPM2DiscreteScheduler,
]


@pytest.mark.parametrize("scheduler_cls", DISCRETE, ids=lambda c: c.__name__)
@torch.no_grad()
def test_every_discrete_scheduler_runs_with_the_official_guidance(scheduler_cls):
    pipe = make_pipe(scheduler=_discrete(scheduler_cls), vae=None, **OFFICIAL_RECIPES[256])
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    latents = pipe([3, 4], num_inference_steps=4, generator=gen(0), output_type="latent").images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    assert calls == [4] * len(pipe.scheduler.timesteps)  # cond + uncond every step


@pytest.mark.parametrize(
    "scheduler_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler], ids=lambda c: c.__name__
)
@torch.no_grad()
def test_edm_schedulers_run_in_pixel_space(scheduler_cls):
    model = tiny_transformer(in_channels=3, learned_sigma=False, num_classes=0)
    pipe = make_pipe(model, scheduler_cls(), vae=None)
    images = pipe(num_images_per_label=2, num_inference_steps=4, generator=gen(0), output_type="pt").images
    raw = pipe(num_images_per_label=2, num_inference_steps=4, generator=gen(0), output_type="latent").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(raw).all()
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))  # pixel space: no decoder, [-1, 1] -> [0, 1]


@torch.no_grad()
def test_image_space_unet_with_edm_heun(tmp_path):
    """The package's own pixel-space pair: DiffiTUNet2DModel (1-channel, class-conditional) + EDMHeunScheduler."""
    torch.manual_seed(0)
    unet = DiffiTUNet2DModel(
        sample_size=16,
        in_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        window_size=4,
        attention_head_dim=8,
        time_embedding_dim=24,
        frequency_embedding_size=16,
        num_classes=NUM_CLASSES,
    ).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # its head starts at zero
    pipe = make_pipe(unet, EDMHeunScheduler(), vae=None, guidance_scale=2.0, num_inference_steps=3)
    calls = _count_forwards(pipe)
    images = pipe([1, 2], generator=gen(0), output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert calls == [4] * 5  # Heun: 2N − 1 calls, each with the unconditional half
    assert pipe(3, generator=gen(0)).images[0].mode == "L"
    with pytest.raises(ValueError, match="needs a discrete-time scheduler.*EDMHeunScheduler"):
        pipe(3, guidance_schedule="power-cosine")
    pipe.save_pretrained(tmp_path)
    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.transformer, DiffiTUNet2DModel) and isinstance(loaded.scheduler, EDMHeunScheduler)
    torch.testing.assert_close(loaded([1, 2], generator=gen(0), output_type="pt").images, images)


@torch.no_grad()
def test_a_seed_gives_the_same_image_in_bfloat16(monkeypatch):
    """The initial noise is drawn in float32 whatever the model's dtype, so a seed names the same image in every
    precision. torch's CPU generator need not draw the same sequence in reduced precision (with torch 2.11 one seed
    gave other digits in fp16 than in fp32; 2.13 draws alike), so the test makes such draws differ on any version."""
    randn = torch.randn

    def reduced_precision_draws_differ(*args, dtype=None, **kwargs):
        noise = randn(*args, **kwargs)
        return noise.flip(-1).to(dtype) if dtype in (torch.float16, torch.bfloat16) else noise.to(dtype)

    monkeypatch.setattr(torch, "randn", reduced_precision_draws_differ)
    model = tiny_transformer(in_channels=3, learned_sigma=False)
    pipe = make_pipe(model, EDMHeunScheduler(), vae=None, guidance_scale=2.0, num_inference_steps=4)
    expected = pipe([1, 2], generator=gen(0), output_type="latent").images
    pipe.to(torch.bfloat16)
    images = pipe([1, 2], generator=gen(0), output_type="latent").images
    assert images.dtype == torch.bfloat16 and relative_error(images, expected) < 5e-2


@torch.no_grad()
def test_edm_scheduler_with_constant_guidance_and_power_cosine_refused():
    pipe = make_pipe(scheduler=EDMEulerScheduler(), vae=None, guidance_scale=2.0)
    latents = pipe([1, 2], num_inference_steps=3, generator=gen(0), output_type="latent").images
    assert torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="'power-cosine'.*needs a discrete-time scheduler.*EDMEulerScheduler"):
        pipe([1, 2], num_inference_steps=3, guidance_schedule="power-cosine")


@torch.no_grad()
def test_initial_noise_is_scaled_by_init_noise_sigma(monkeypatch):
    pipe = make_pipe(scheduler=_discrete(EulerDiscreteScheduler), vae=None)
    seen = []
    step = pipe.scheduler.step
    monkeypatch.setattr(
        pipe.scheduler, "step", lambda out, t, sample, **kw: seen.append(sample) or step(out, t, sample, **kw)
    )
    x_T = torch.randn(1, 4, 8, 8, generator=gen(0))
    pipe(0, latents=x_T, num_inference_steps=3, output_type="latent")
    assert pipe.scheduler.init_noise_sigma > 10
    torch.testing.assert_close(seen[0], x_T * pipe.scheduler.init_noise_sigma)


@torch.no_grad()
def test_initial_noise_is_scaled_for_this_calls_timesteps(monkeypatch):
    """With "leading" spacing Euler's largest σ, hence `init_noise_sigma`, depends on the number of steps: the
    timesteps are set before the noise is scaled (as in diffusers' pipelines), not left from the previous call."""
    scheduler = EulerDiscreteScheduler.from_config(official_scheduler().config, timestep_spacing="leading")
    pipe = make_pipe(scheduler=scheduler, vae=None)
    seen = []
    step = pipe.scheduler.step
    monkeypatch.setattr(
        pipe.scheduler, "step", lambda out, t, sample, **kw: seen.append(sample) or step(out, t, sample, **kw)
    )
    x_T = torch.randn(1, 4, 8, 8, generator=gen(0))
    sigmas = []
    for steps in (10, 3):
        seen.clear()
        pipe(0, latents=x_T, num_inference_steps=steps, output_type="latent")
        sigmas.append(pipe.scheduler.init_noise_sigma)
        torch.testing.assert_close(seen[0], x_T * (pipe.scheduler.sigmas[0] ** 2 + 1) ** 0.5)
    assert sigmas[0] > 2 * sigmas[1]  # 10 steps start at t = 900, 3 steps at t = 666


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, EulerAncestralDiscreteScheduler], ids=lambda c: c.__name__)
@torch.no_grad()
def test_stochastic_steps_draw_from_the_generator(scheduler_cls):
    pipe = make_pipe(scheduler=_discrete(scheduler_cls), vae=None)
    torch.manual_seed(1)
    a = pipe([1, 2], num_inference_steps=5, generator=gen(0), output_type="latent").images
    torch.manual_seed(2)  # the global RNG must not matter
    b = pipe([1, 2], num_inference_steps=5, generator=gen(0), output_type="latent").images
    c = pipe([1, 2], num_inference_steps=5, generator=gen(1), output_type="latent").images
    assert torch.equal(a, b) and not torch.allclose(a, c)  # bitwise: same pipeline, batch and kernels


@torch.no_grad()
def test_learned_variance_type_is_adapted_or_refused():
    # diffusers' DPM-Solver keeps output channels [:3] when variance_type is learned (wrong for 4-channel latents);
    # `from_config` carries the DDPM config's "learned_range" over, so the pipeline builds it with variance_type=None
    pipe = make_pipe(vae=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(official_scheduler().config)
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler and pipe.scheduler.config.variance_type is None
    # bitwise: the same pipeline, inputs and kernels, only the scheduler object differs
    adapted = pipe(1, num_inference_steps=3, generator=gen(0), output_type="latent").images
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(official_scheduler().config, variance_type=None)
    assert torch.equal(adapted, pipe(1, num_inference_steps=3, generator=gen(0), output_type="latent").images)
    pipe = make_pipe(tiny_transformer(learned_sigma=False), vae=None)
    with pytest.raises(ValueError, match="the model predicts no variance"):
        pipe(1, num_inference_steps=2)


@torch.no_grad()
def test_fixed_variance_ddpm_drops_the_learned_variance():
    model = tiny_transformer()
    fixed = DDPMScheduler.from_config(official_scheduler().config, variance_type="fixed_small")
    pipe = make_pipe(model, fixed, vae=None)
    seen = []
    step = fixed.step
    fixed.step = lambda out, t, sample, **kw: seen.append(out.shape[1]) or step(out, t, sample, **kw)
    pipe(1, num_inference_steps=3, output_type="latent")
    assert seen == [4, 4, 4]


# ---------------------------------------------------------------------------------------------------------------
# Guidance options


def _count_forwards(pipe):
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls


@torch.no_grad()
def test_guidance_interval_skips_the_unconditional_pass():
    pipe = make_pipe(vae=None, guidance_scale=3.0)
    run = dict(class_labels=[1, 2], num_inference_steps=6, output_type="latent")
    calls = _count_forwards(pipe)
    everywhere = pipe(**run, generator=gen(0)).images
    assert calls == [4] * 6
    calls.clear()
    same = pipe(**run, generator=gen(0), guidance_interval=(0, 999)).images
    assert torch.equal(same, everywhere)  # bitwise: the same batches at every step
    calls.clear()
    timesteps = pipe.scheduler.timesteps.tolist()
    inside = pipe(**run, generator=gen(0), guidance_interval=(timesteps[4], timesteps[1])).images
    assert calls == [2, 4, 4, 4, 4, 2]  # guided where timesteps[4] <= t <= timesteps[1]
    calls.clear()
    nowhere = pipe(**run, generator=gen(0), guidance_interval=(-2, -1)).images
    unguided = pipe(**run, generator=gen(0), guidance_scale=1.0).images
    assert calls == [2] * 12 and torch.equal(nowhere, unguided)  # bitwise: the same unguided batches
    assert not torch.allclose(inside, everywhere) and not torch.allclose(inside, unguided)


@torch.no_grad()
def test_guidance_interval_all_overrides_a_saved_interval():
    pipe = make_pipe(vae=None, guidance_scale=3.0, guidance_interval=(200, 600))
    run = dict(class_labels=[1], num_inference_steps=5, output_type="latent")
    calls = _count_forwards(pipe)
    pipe(**run, generator=gen(0))
    assert calls == [1, 1, 2, 2, 1]  # timesteps 999, 749, 500, 250, 0: guided at 500 and 250 only
    calls.clear()
    every_step = pipe(**run, generator=gen(0), guidance_interval="all").images
    assert calls == [2] * 5 and pipe.guidance_interval is None
    # bitwise: the same pipeline and batches at every step
    assert torch.equal(every_step, make_pipe(vae=None, guidance_scale=3.0)(**run, generator=gen(0)).images)
    with pytest.raises(ValueError, match="must be None, 'all' or"):
        pipe(**run, guidance_interval="none")


@torch.no_grad()
def test_guided_channels_and_call_arguments_override_the_config():
    pipe = make_pipe(vae=None, guidance_scale=3.0, guided_channels=3)
    run = dict(class_labels=[5], num_inference_steps=4, output_type="latent")
    default = pipe(**run, generator=gen(0)).images
    # bitwise: the same pipeline and batches; only where the recipe values come from differs
    assert torch.equal(default, pipe(**run, generator=gen(0), guided_channels=3, guidance_scale=3.0).images)
    assert torch.equal(default, pipe(**run, generator=gen(0), guided_channels=None).images)  # None = the config's
    assert not torch.allclose(default, pipe(**run, generator=gen(0), guided_channels=4).images)  # all 4
    assert not torch.allclose(default, pipe(**run, generator=gen(0), guidance_scale=2.0).images)


@pytest.fixture
def halfway_schedule():
    """A schedule registered for one test: w(t) = (1 + w) / 2 for discrete-time schedulers, recording its calls."""
    calls = []

    def weight(timestep, guidance_scale, guidance_power, horizon):
        calls.append((timestep, horizon))
        return (1 + guidance_scale) / 2

    schedule = GuidanceSchedule("halfway", weight, needs_discrete_time=True, description="w(t) = (1 + w) / 2")
    yield register_guidance_schedule(schedule), calls
    del GUIDANCE_SCHEDULES["halfway"]


@torch.no_grad()
def test_a_registered_schedule_is_sampled_with_and_offered_by_the_cli(halfway_schedule, tmp_path, capsys, monkeypatch):
    schedule, calls = halfway_schedule
    with pytest.raises(ValueError, match="'halfway' is already registered"):
        register_guidance_schedule(schedule)
    pipe = make_pipe(vae=None, guidance_scale=3.0, guidance_schedule="halfway")  # a saved default like any other
    run = dict(class_labels=[1, 2], num_inference_steps=4, output_type="latent")
    halfway = pipe(**run, generator=gen(0)).images
    assert calls == [(float(t), 1000) for t in pipe.scheduler.timesteps]
    # bitwise: the same pipeline and batches, w(t) = 2 at every step either way
    constant = pipe(**run, generator=gen(0), guidance_schedule="constant", guidance_scale=2.0).images
    assert torch.equal(halfway, constant)
    assert not torch.allclose(halfway, pipe(**run, generator=gen(0), guidance_schedule="constant").images)  # w = 3
    edm = make_pipe(scheduler=EDMEulerScheduler(), vae=None, guidance_scale=2.0)
    with pytest.raises(ValueError, match="'halfway'.*needs a discrete-time scheduler.*EDMEulerScheduler"):
        edm([1], num_inference_steps=2, guidance_schedule="halfway")

    assert build_parser().parse_args(["sample", "--guidance-schedule", "halfway"]).guidance_schedule == "halfway"
    monkeypatch.setenv("COLUMNS", "1000")  # argparse's help on one line per option
    with pytest.raises(SystemExit):
        cli_main(["sample", "--help"])
    assert "halfway: w(t) = (1 + w) / 2 (discrete-time schedulers)" in capsys.readouterr().out
    # the digits model shipped in the package samples in EDM σ-space: refused before it is loaded
    assert (
        cli_main(["sample", "--labels", "1", "--guidance-schedule", "halfway", "--output", str(tmp_path / "g.png")])
        == 2
    )
    assert "argument --guidance-schedule: 'halfway' needs a discrete-time scheduler" in capsys.readouterr().err


@torch.no_grad()
def test_unconditional_sampling_of_a_conditional_model_uses_the_null_class():
    pipe = make_pipe(vae=None, guidance_scale=4.0)
    labels_seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: labels_seen.append(kw["class_labels"]), with_kwargs=True
    )
    pipe(num_images_per_label=3, num_inference_steps=2, output_type="latent")
    assert all(labels.tolist() == [NUM_CLASSES] * 3 for labels in labels_seen)  # one pass: nothing to guide


# ---------------------------------------------------------------------------------------------------------------
# Labels, batching, determinism


@torch.no_grad()
def test_labels_by_name_and_id_and_bare_strings():
    pipe = make_pipe(tiny_transformer(num_classes=1000), vae=None)  # 1000 classes -> ImageNet names by default
    assert pipe.get_label_ids(["golden retriever", "Tinca tinca"]) == [207, 0]
    labels_seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: labels_seen.append(kw["class_labels"]), with_kwargs=True
    )
    pipe("golden retriever", num_inference_steps=1, output_type="latent")  # a bare string is one label
    pipe(["tench", 207, torch.tensor(3).item()], num_images_per_label=2, num_inference_steps=1, output_type="latent")
    pipe(torch.tensor([9, 8]), num_inference_steps=1, output_type="latent")
    assert [labels.tolist() for labels in labels_seen] == [[207], [0, 0, 207, 207, 3, 3], [9, 8]]

    custom = make_pipe(vae=None, id2label={0: "zero, nought", 1: ["one"]})
    assert custom.get_label_ids("Nought") == [0]
    assert custom.id2label == {0: ["zero", "nought"], 1: ["one"]}
    with pytest.raises(ValueError, match="Unknown class label 'golden retriever'"):
        custom("golden retriever")
    assert make_pipe(vae=None).id2label == {}  # 10 classes and no names


@torch.no_grad()
def test_batch_equals_single_images_with_a_generator_list():
    pipe = make_pipe(vae=None, **OFFICIAL_RECIPES[256])
    run = dict(num_inference_steps=8, output_type="latent")
    batch = pipe([3, 5], generator=[gen(10), gen(11)], **run).images
    first = pipe([3], generator=[gen(10)], **run).images
    second = pipe(5, generator=gen(11), **run).images
    assert relative_error(batch[:1], first) < 1e-5 and relative_error(batch[1:], second) < 1e-5
    again = pipe([3, 5], generator=[gen(10), gen(11)], **run).images
    swapped = pipe([3, 5], generator=[gen(11), gen(10)], **run).images
    assert torch.equal(batch, again) and not torch.allclose(batch, swapped)  # bitwise: the same call twice


# ---------------------------------------------------------------------------------------------------------------
# Outputs, callbacks, offload


@torch.no_grad()
def test_output_types_decode_with_the_vae():
    pipe = make_pipe(guidance_scale=1.5)
    run = dict(class_labels=[1, 2], num_inference_steps=3)
    latents = pipe(**run, generator=gen(0), output_type="latent").images
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # [-1, 1] nominal
    pt = pipe(**run, generator=gen(0), output_type="pt").images
    np_images = pipe(**run, generator=gen(0), output_type="np").images
    pil = pipe(**run, generator=gen(0), output_type="pil").images
    tuple_out = pipe(**run, generator=gen(0), output_type="pt", return_dict=False)
    assert latents.shape == (2, 4, 8, 8) and pt.shape == (2, 3, 16, 16) and np_images.shape == (2, 16, 16, 3)
    torch.testing.assert_close(pt, (decoded / 2 + 0.5).clamp(0, 1))
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    official_uint8 = ((decoded + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # truncated
    assert all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in pil)
    # bitwise: the same VAE object decodes the same latents with the same batch shape
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), official_uint8)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], pt)  # bitwise: the same call twice


@torch.no_grad()
def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = make_pipe(vae=None)
    steps = []

    def callback(p, i, t, kwargs):
        steps.append((i, int(t), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 3 else {}

    out = pipe([1, 2], num_inference_steps=4, callback_on_step_end=callback, output_type="latent").images
    assert [(i, t) for i, t, _ in steps] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    assert all(shape == (2, 4, 8, 8) for *_, shape in steps)
    assert torch.equal(out, torch.zeros(2, 4, 8, 8))

    def stop(p, i, t, kwargs):
        p._interrupt = i == 1
        return {}

    calls = _count_forwards(pipe)
    pipe([1], num_inference_steps=4, callback_on_step_end=stop, output_type="latent")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe([1], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


@torch.no_grad()
def test_live_guidance_scale_and_num_timesteps_follow_diffusers_conventions():
    """diffusers' `test_callback_cfg`: a callback raising `_guidance_scale` by 1 per step ends at w + num_timesteps,
    and the raised weight is the one the next step uses."""
    pipe = make_pipe(vae=None, guidance_scale=2.0)
    weights = []
    pipe.transformer.register_forward_hook(lambda m, args, out: weights.append(pipe.guidance_scale))

    def raise_guidance(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    latents = pipe([1], num_inference_steps=4, callback_on_step_end=raise_guidance, output_type="latent").images
    assert pipe.num_timesteps == 4 and pipe.guidance_scale == 2.0 + pipe.num_timesteps
    assert weights == [2.0, 3.0, 4.0, 5.0]
    # the walk changes the result: w = 2 at every step gives other latents
    assert not torch.allclose(latents, pipe([1], num_inference_steps=4, output_type="latent").images)


@torch.no_grad()
def test_stock_cfg_cutoff_callback_turns_guidance_off(monkeypatch):
    """`SDCFGCutoffCallback` (diffusers' own) sets `_guidance_scale = 0` at the cutoff step: later steps run the
    conditional batch alone, and the result equals a run whose guidance interval ends at the same step."""
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = make_pipe(vae=None, guidance_scale=3.0)
    calls = _count_forwards(pipe)
    run = dict(class_labels=[1, 2], num_inference_steps=6, output_type="latent")
    cut = pipe(**run, generator=gen(0), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images
    assert calls == [4] * 4 + [2] * 2  # steps 0…3 guided (the callback runs after step 3 = int(6 · 0.5)), then not
    # bitwise: the same pipeline, batch shapes and kernels step by step
    t_last_guided = float(pipe.scheduler.timesteps[3])
    same = pipe(**run, generator=gen(0), guidance_interval=(t_last_guided, 1000)).images
    assert torch.equal(cut, same)
    seen = []
    pipe(
        [3],
        num_inference_steps=2,
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["prompt_embeds"]) or {},
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert [s.tolist() for s in seen] == [[3, NUM_CLASSES]] * 2  # [label; null] while guiding


@pytest.mark.parametrize(
    "labels",
    [
        np.array([3, 5]),
        np.array([3, 5], dtype=np.uint8),
        [torch.tensor(3), torch.tensor(5)],
        [np.int64(3), 5],
        torch.tensor([3, 5], dtype=torch.int32),
    ],
    ids=["numpy", "numpy-uint8", "0d-tensors", "numpy-scalar", "int32-tensor"],
)
@torch.no_grad()
def test_labels_in_every_form_diffusers_dit_accepts(labels):
    pipe = make_pipe(vae=None)
    run = dict(num_inference_steps=2, output_type="latent")
    # bitwise: the same pipeline, batch and kernels; only the form of the labels differs
    assert torch.equal(pipe(labels, generator=gen(0), **run).images, pipe([3, 5], generator=gen(0), **run).images)


def test_offload_sequence_covers_every_model_component():
    """`enable_model_cpu_offload` moves only the components named in `model_cpu_offload_seq`: a model component left
    out would stay wherever it was."""
    for pipe in (make_pipe(), make_pipe(vae=None)):
        models = {name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
        assert models and models <= set(pipe.model_cpu_offload_seq.split("->"))


# ---------------------------------------------------------------------------------------------------------------
# Save / load


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    pipe = make_pipe(
        id2label={0: ["zero"], 3: "three, drei"},
        num_inference_steps=7,
        guidance_scale=2.5,
        guidance_schedule="power-cosine",
        guidance_power=3.0,
        guided_channels=2,
        guidance_interval=(10, 900),
    )
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_diffit.models.transformer_diffit", "DiffiTTransformer2DModel"]
    assert index["id2label"] == {"0": ["zero"], "3": ["three", "drei"]}
    assert sorted(p.name for p in (tmp_path / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]

    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    keys = ["id2label", *RECIPE_KEYS]
    assert {k: loaded.config[k] for k in keys} == {k: pipe.config[k] for k in keys}
    assert loaded.config.guidance_interval == [10.0, 900.0] and loaded.id2label[3] == ["three", "drei"]
    assert type(loaded.scheduler) is DDPMScheduler and loaded.scheduler.config.variance_type == "learned_range"
    for name in ("transformer", "vae"):
        public = [
            {k: v for k, v in json.loads(p.components[name].to_json_string()).items() if not k.startswith("_")}
            for p in (pipe, loaded)
        ]
        assert public[0] == public[1]
        assert all(
            torch.equal(a, b)
            for a, b in zip(pipe.components[name].state_dict().values(), loaded.components[name].state_dict().values())
        )
    # a tolerance, not bitwise: the reloaded weights live in other memory (safetensors), and some BLAS builds pick
    # other kernels for them (seen on an AMD EPYC: 2.4e-7 apart; here with MKL_ENABLE_INSTRUCTIONS=SSE4_2)
    a = pipe(3, generator=gen(0), output_type="np").images
    b = loaded(3, generator=gen(0), output_type="np").images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    half = DiffiTPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16


@torch.no_grad()
def test_pixel_space_pipeline_round_trips_without_a_vae(tmp_path):
    model = tiny_transformer(in_channels=3, learned_sigma=False, num_classes=0)
    make_pipe(model, EDMEulerScheduler(), vae=None, num_inference_steps=5).save_pretrained(tmp_path)
    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and isinstance(loaded.scheduler, EDMEulerScheduler)
    assert loaded.config.num_inference_steps == 5


def test_hub_id_is_loaded_from_the_snapshot(tmp_path):
    """A Hub id goes through `snapshot_download` (here: an offline cache with one snapshot), then loads from disk."""
    make_pipe(guidance_scale=2.0).save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "cache" / "models--someone--diffit-tiny" / "snapshots" / "0123abc"
    shutil.copytree(tmp_path / "saved", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    loaded = DiffiTPipeline.from_pretrained("someone/diffit-tiny", cache_dir=tmp_path / "cache")
    assert loaded.config.guidance_scale == 2.0 and loaded.config._name_or_path == str(snapshot)
    with pytest.raises(Exception, match="someone/missing|snapshot"):
        DiffiTPipeline.from_pretrained("someone/missing", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=10), r"Class id 10 in `class_labels` is outside \[0, 10\)"),
        (dict(class_labels=[-1]), r"Class id -1 in `class_labels` is outside \[0, 10\)"),
        (dict(class_labels=[1.5]), "entries must be ints or strings"),
        (dict(class_labels=[True]), "entries must be ints or strings"),
        (dict(class_labels=[[1]]), "entries must be ints or strings"),
        (dict(class_labels=[]), "non-empty list"),
        (dict(class_labels=torch.tensor([1.0])), "must be 0-d or 1-d integers"),
        (dict(class_labels=np.array([1.0])), "entries must be ints or strings"),
        (dict(class_labels=[torch.tensor(1.5)]), "entries must be ints or strings"),
        (dict(class_labels=[torch.tensor([1, 2])]), "entries must be ints or strings"),
        (dict(class_labels="golden retriever"), "Unknown class label 'golden retriever'"),
        (dict(num_images_per_label=0), r"`num_images_per_label` must be an int >= 1"),
        (dict(num_inference_steps=0), r"`num_inference_steps` must be an int >= 1"),
        (dict(guidance_scale=-1.0), r"`guidance_scale` must be a finite number >= 1"),
        (dict(guidance_scale=0.5), r"`guidance_scale` must be a finite number >= 1"),
        (
            dict(guidance_scale=float("nan")),
            r"`guidance_scale` must be a finite number >= 1 \(1 = no guidance\), got nan",
        ),
        (dict(guidance_scale=float("inf")), r"`guidance_scale` must be a finite number >= 1"),
        (dict(guidance_power=float("nan")), "`guidance_power` must be a finite number > 0"),
        (dict(guidance_interval=(0, float("inf"))), "`guidance_interval` must be None, 'all' or \\(t_low, t_high\\)"),
        (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "`latents` contains NaN"),
        (dict(guidance_schedule="cosine"), "`guidance_schedule` must be one of"),
        (dict(guidance_power=0), "`guidance_power` must be a finite number > 0"),
        (dict(guided_channels=5), r"`guided_channels` must be None \(all\) or an int in \[1, 4\]"),
        (dict(guided_channels=0), r"`guided_channels` must be None \(all\) or an int in \[1, 4\]"),
        (dict(guidance_interval=(900, 10)), "`guidance_interval` must be None, 'all' or \\(t_low, t_high\\)"),
        (dict(guidance_interval=(1, 2, 3)), "`guidance_interval` must be None, 'all' or \\(t_low, t_high\\)"),
        (dict(output_type="jpg"), "`output_type` must be one of"),
        (dict(latents=torch.zeros(1, 4, 8, 8), class_labels=[1, 2]), r"`latents` must have shape \(2, 4, 8, 8\)"),
        (dict(generator=[torch.Generator()], class_labels=[1, 2]), "one per image"),
    ],
)
def test_bad_call_arguments(kwargs, match):
    pipe = make_pipe(vae=None)
    kwargs = dict(class_labels=1, num_inference_steps=2) | kwargs
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_bad_configurations():
    with pytest.raises(ValueError, match="`guidance_schedule` must be one of"):
        make_pipe(guidance_schedule="linear")
    with pytest.raises(ValueError, match=r"class id 10, outside \[0, 10\)"):
        make_pipe(id2label={10: ["ten"]})
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an int >= 1"):
        make_pipe(num_inference_steps=2.5)
    unconditional = make_pipe(tiny_transformer(num_classes=0), vae=None)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(class_labels=1)
    with pytest.raises(ValueError, match=r"`guidance_scale` is 2.0 but this model is unconditional"):
        unconditional(guidance_scale=2.0)
