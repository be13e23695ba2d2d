"""diffusers' guiders (`diffusers.guiders`) in DiffiTPipeline, and DiffiT's own recipe as the default."""

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    LTX2Guidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
)
from diffusers.hooks import LayerSkipConfig

from diffusers_diffit.guidance import apply_guidance, guidance_weight
from diffusers_diffit.pipelines import DiffiTPipeline, official_scheduler
from tests.utils import make_pipe, relative_error, tiny_transformer, tiny_unet


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # diffusers' DPM-Solver meets numpy 2 with a deprecation warning per call (their side)
    pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning"),
]


def dpm_solver() -> DPMSolverMultistepScheduler:
    """digits-latent's saved sampler: DPM-Solver++ 2M (deterministic)."""
    return DPMSolverMultistepScheduler.from_config(official_scheduler().config, variance_type=None)


def latent_pipe(transformer=None, scheduler=None, **config) -> DiffiTPipeline:
    """`make_pipe` with digits-latent's sampler unless given, without a VAE ("latent" output)."""
    return make_pipe(transformer, scheduler or dpm_solver(), vae=None, **config)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# The default: DiffiT's recipe, unchanged


def recipe_loop(pipe, labels, steps, w, schedule, power, guided, interval, seed):
    """DiffiTPipeline's denoising loop as it was before guiders existed, step for step: one batched [x; x] forward
    with labels [y; null] inside `inference_cache`, w(t) on the first `guided` ε channels, the conditional half's
    variance for DDPM's learned variance, `scheduler.step` with the generator."""
    model, scheduler, generator = pipe.transformer, pipe.scheduler, gen(seed)
    channels = model.config.in_channels
    keep_variance = isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(steps)
    shape = (len(labels), channels, model.config.sample_size, model.config.sample_size)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    null = torch.full_like(labels, model.config.num_classes)
    with model.inference_cache():
        for t in scheduler.timesteps:
            guided_step = interval is None or interval[0] <= float(t) <= interval[1]
            x_in = scheduler.scale_model_input(x, t)
            if guided_step:
                out = model(
                    torch.cat([x_in, x_in]), t.expand(2 * len(x)), torch.cat([labels, null]), return_dict=False
                )
                w_t = guidance_weight(float(t), w, schedule, power, scheduler.config.num_train_timesteps)
                out = apply_guidance(*out[0].chunk(2), w_t, guided)
            else:
                out = model(x_in, t.expand(len(x)), labels, return_dict=False)[0]
            out = out if keep_variance else out[:, :channels]
            x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return x


@pytest.mark.parametrize(
    "scheduler, recipe",
    [
        (dpm_solver, dict(steps=6, w=3.0, schedule="power-cosine", power=4.0, guided=3, interval=None)),
        (official_scheduler, dict(steps=8, w=2.5, schedule="constant", power=4.0, guided=3, interval=[300.0, 900.0])),
    ],
    ids=["dpm-solver-power-cosine", "ddpm-learned-variance-interval"],
)
@torch.no_grad()
def test_default_path_is_diffit_recipe_bitwise(scheduler, recipe):
    """Without a guider the pipeline samples exactly as before guiders existed: bitwise, since the reference makes the
    same calls with the same batches in the same process (same kernels)."""
    pipe = latent_pipe(scheduler=scheduler())
    labels = torch.tensor([1, 7, 3])
    got = pipe(
        labels,
        num_inference_steps=recipe["steps"],
        guidance_scale=recipe["w"],
        guidance_schedule=recipe["schedule"],
        guidance_power=recipe["power"],
        guided_channels=recipe["guided"],
        guidance_interval=recipe["interval"],
        generator=gen(0),
        output_type="latent",
    ).images
    expected = recipe_loop(pipe, labels, seed=0, **recipe)
    assert torch.equal(got, expected)
    # the reference tells the recipe from a near miss
    assert not torch.equal(got, recipe_loop(pipe, labels, seed=0, **{**recipe, "guided": 4}))


# ---------------------------------------------------------------------------------------------------------------
# diffusers' guiders against their equations


def guided_loop(pipe, labels, steps, combine, seed, skip_block=None):
    """DPM-Solver sampling with ε̃ = combine(step, ε_c, ε_u, ε_skip) written out here: ε_c from the labels, ε_u from the
    null class, ε_skip from the labels with `transformer_blocks[skip_block]` taken out of the model (None: not made)."""
    model, scheduler = pipe.transformer, pipe.scheduler
    channels = model.config.in_channels
    scheduler.set_timesteps(steps)
    shape = (len(labels), channels, model.config.sample_size, model.config.sample_size)
    x = torch.randn(shape, generator=gen(seed)) * scheduler.init_noise_sigma
    null = torch.full_like(labels, model.config.num_classes)
    blocks = model.transformer_blocks
    for step, t in enumerate(scheduler.timesteps):
        eps = {}
        for name, y in (("cond", labels), ("uncond", null), ("skip", labels)):
            if name == "skip":
                if skip_block is None:
                    break
                model.transformer_blocks = torch.nn.ModuleList(b for i, b in enumerate(blocks) if i != skip_block)
            eps[name] = model(x, t.expand(len(x)), y, return_dict=False)[0][:, :channels].double()
            model.transformer_blocks = blocks
        x = scheduler.step(combine(step, *eps.values()).float(), t, x, return_dict=False)[0]
    return x


def sample(pipe, labels, steps, seed=0):
    return pipe(labels, num_inference_steps=steps, generator=gen(seed), output_type="latent").images


LABELS = torch.tensor([2, 5, 9])


@torch.no_grad()
def test_cfg_guider_is_diffit_constant_guidance_on_all_channels():
    """ClassifierFreeGuidance(w) and DiffiT's recipe with a constant w on every channel are the same equation,
    ε̃ = ε_u + w·(ε_c − ε_u), the learned variance the conditional one's (DDPM reads it). A tolerance, not bitwise:
    the guider makes two forwards of B where the recipe makes one of 2B."""
    pipe = latent_pipe(scheduler=official_scheduler())
    recipe = sample(pipe, LABELS, 8)  # the pipeline's default recipe: w = 1, i.e. no guidance
    pipe.guider = ClassifierFreeGuidance(guidance_scale=3.0)
    got = sample(pipe, LABELS, 8)
    pipe.guider = None
    expected = pipe(
        LABELS, num_inference_steps=8, guidance_scale=3.0, guided_channels=4, generator=gen(0), output_type="latent"
    ).images
    assert relative_error(got, expected) < 1e-5
    assert relative_error(got, recipe) > 1e-2  # guidance matters here


@torch.no_grad()
def test_cfg_zero_star_guider_follows_its_equation():
    """CFG-Zero*: ε̃ = 0 for the first `zero_init_steps` steps, then with α = ⟨ε_c, ε_u⟩ / ‖ε_u‖² per sample,
    ε̃ = α·ε_u + w·(ε_c − α·ε_u)."""

    def cfg_zero_star(step, cond, uncond):
        if step < 1:
            return torch.zeros_like(cond)
        alpha = (cond * uncond).sum((1, 2, 3), keepdim=True) / (uncond**2).sum((1, 2, 3), keepdim=True)
        return alpha * uncond + 4.0 * (cond - alpha * uncond)

    pipe = latent_pipe(guider=ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1))
    got = sample(pipe, LABELS, 5)
    assert relative_error(got, guided_loop(pipe, LABELS, 5, cfg_zero_star, seed=0)) < 1e-5


@torch.no_grad()
def test_adaptive_projected_guider_follows_its_equation():
    """APG: Δ = ε_c − ε_u accumulated with momentum m (Δ_k = Δ + m·Δ_{k−1}), its norm capped at r, split along
    ε_c / ‖ε_c‖ into parallel and orthogonal parts; ε̃ = ε_u + w·(Δ_⊥ + η·Δ_∥), norms per sample."""
    w, m, r, eta = 5.0, -0.5, 2.0, 0.3
    running = [0]

    def norm(x):
        return torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)

    def apg(step, cond, uncond):
        running[0] = (cond - uncond) + m * running[0]
        diff = running[0]
        diff = diff * (r / norm(diff)).clamp(max=1)
        unit = cond / norm(cond)
        parallel = (diff * unit).sum((1, 2, 3), keepdim=True) * unit
        return uncond + w * (diff - parallel + eta * parallel)

    guider = AdaptiveProjectedGuidance(
        guidance_scale=w, adaptive_projected_guidance_momentum=m, adaptive_projected_guidance_rescale=r, eta=eta
    )
    pipe = latent_pipe(guider=guider)
    got = sample(pipe, LABELS, 5)
    assert relative_error(got, guided_loop(pipe, LABELS, 5, apg, seed=0)) < 1e-5
    # the momentum starts afresh with every call
    assert torch.equal(sample(pipe, LABELS, 5), got)


@torch.no_grad()
def test_skip_layer_guider_skips_diffit_blocks():
    """SkipLayerGuidance on `transformer_blocks.1`: ε̃ = ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_skip), ε_skip the model
    without that block, at the steps k with start·n < k < stop·n (diffusers' range for the skip term)."""
    w, s, steps = 2.0, 1.5, 5

    def slg(step, cond, uncond, skip):
        return uncond + w * (cond - uncond) + (s * (cond - skip) if 0 < step < steps else 0)

    guider = SkipLayerGuidance(
        guidance_scale=w,
        skip_layer_guidance_scale=s,
        skip_layer_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
    )
    pipe = latent_pipe(tiny_transformer(num_layers=3), guider=guider)
    got = sample(pipe, LABELS, steps)
    assert relative_error(got, guided_loop(pipe, LABELS, steps, slg, seed=0, skip_block=1)) < 1e-5
    assert relative_error(got, guided_loop(pipe, LABELS, steps, slg, seed=0, skip_block=0)) > 1e-3
    # the hooks are gone after the call: the model is whole again
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    whole = pipe.transformer(x, t, torch.tensor([1]), return_dict=False)[0]
    assert torch.equal(whole, tiny_transformer(num_layers=3)(x, t, torch.tensor([1]), return_dict=False)[0])


@torch.no_grad()
def test_guider_saves_and_loads_with_the_pipeline(tmp_path):
    pipe = latent_pipe(guider=ClassifierFreeZeroStarGuidance(guidance_scale=2.5, zero_init_steps=0))
    pipe.save_pretrained(tmp_path)
    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    public = [{k: v for k, v in p.guider.config.items() if not k.startswith("_")} for p in (pipe, loaded)]
    assert type(loaded.guider) is ClassifierFreeZeroStarGuidance and public[0] == public[1]
    without = latent_pipe()
    without.save_pretrained(tmp_path / "none")
    assert DiffiTPipeline.from_pretrained(tmp_path / "none").guider is None


# ---------------------------------------------------------------------------------------------------------------
# Guiders this pipeline cannot drive


def test_guiders_the_pipeline_cannot_drive_are_refused_on_assignment():
    pipe = latent_pipe()
    with pytest.raises(
        ValueError, match=r"LTX2Guidance needs the predictions \['pred_cond_stg', 'pred_cond_modality'\]"
    ):
        pipe.guider = LTX2Guidance(guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"SkipLayerGuidance hooks transformer blocks \[5\].*blocks 0…1"):
        pipe.guider = SkipLayerGuidance(skip_layer_guidance_layers=[5])
    with pytest.raises(ValueError, match="SkipLayerGuidance hooks blocks under 'down_blocks'"):
        pipe.guider = SkipLayerGuidance(skip_layer_config=LayerSkipConfig(indices=[0], fqn="down_blocks"))
    with pytest.raises(ValueError, match=r"PerturbedAttentionGuidance perturbs parts of blocks \(LayerSkipConfig"):
        pipe.guider = PerturbedAttentionGuidance(perturbed_guidance_layers=[1])
    partial = LayerSkipConfig(indices=[1], fqn="transformer_blocks", skip_attention=False, skip_ff=True)
    with pytest.raises(ValueError, match="SkipLayerGuidance perturbs parts of blocks"):
        pipe.guider = SkipLayerGuidance(skip_layer_config=partial)
    with pytest.raises(ValueError, match="`guider` must be None .* got str"):
        pipe.guider = "cfg"
    assert pipe.guider is None  # nothing was assigned
    with pytest.raises(ValueError, match=r"ClassifierFreeGuidance guides with unconditional .* \(num_classes=0\)"):
        latent_pipe(tiny_transformer(num_classes=0), guider=ClassifierFreeGuidance())


def test_layer_guiders_are_refused_on_the_unet():
    unet = tiny_unet()
    pipe = latent_pipe(unet, guider=ClassifierFreeGuidance(guidance_scale=2.0))  # no hooks: fine on any model
    with pytest.raises(ValueError, match=r"SkipLayerGuidance hooks transformer blocks .* DiffiTUNet2DModel does not"):
        pipe.guider = SkipLayerGuidance(skip_layer_guidance_layers=[0])


def test_recipe_arguments_with_a_guider_are_refused():
    pipe = latent_pipe(guider=ClassifierFreeGuidance(guidance_scale=2.0))
    with pytest.raises(ValueError, match=r"`guidance_scale`, `guidance_schedule`: DiffiT's guidance recipe, which .*"):
        pipe(1, guidance_scale=3.0, guidance_schedule="constant", num_inference_steps=2)
    pipe.transformer = tiny_transformer(num_classes=0)  # changed after the guider was assigned
    with pytest.raises(ValueError, match="unconditional"):
        pipe(num_inference_steps=2)
