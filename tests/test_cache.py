"""diffusers' cache hooks on DiffiT through `DiffiTPipeline`: a cache that never skips changes nothing, no cache state
survives a call, and a cache that does not apply is refused at `enable_cache`.

Comparisons with and without a cache, or between two calls, run the same kernels on the same inputs in one process,
so they are bitwise.
"""

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.models.cache import shipped_mag_ratios
from tests.utils import make_pipe, tiny_transformer, tiny_unet


STEPS = 4


def sample(pipe, labels=(1, 2), seed=0, **kwargs):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=2.0, output_type="latent") | kwargs
    return pipe(list(labels), generator=torch.manual_seed(seed), **kwargs).images


def never_skips(pipe):
    """Configs whose thresholds never let a step reuse anything (the inputs change from step to step)."""
    return {
        "first_block": FirstBlockCacheConfig(threshold=0.0),
        "mag": MagCacheConfig(threshold=0.0, num_inference_steps=STEPS, mag_ratios=[1.0] + [0.9] * (STEPS - 1)),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=1),
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1, current_timestep_callback=lambda: pipe.current_timestep
        ),
    }


@pytest.mark.parametrize("name", ["first_block", "mag", "taylorseer", "pab"])
def test_a_cache_that_never_skips_changes_nothing(name):
    pipe = make_pipe(transformer=tiny_transformer(), vae=None)
    expected = sample(pipe)
    pipe.transformer.enable_cache(never_skips(pipe)[name])
    assert torch.equal(sample(pipe), expected)


def test_a_skipping_cache_skips_and_is_reset_between_calls():
    """FirstBlockCache with a threshold that always skips after the first step: fewer block evaluations, and the
    second identical call (and one at another batch size) equals a fresh pipeline's: nothing leaks across calls."""
    pipe = make_pipe(transformer=tiny_transformer(), vae=None)
    baseline_calls = []
    hook = pipe.transformer.transformer_blocks[-1].attn.register_forward_hook(lambda *_: baseline_calls.append(1))
    expected = sample(pipe)
    hook.remove()

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    calls = []
    pipe.transformer.transformer_blocks[-1].attn.register_forward_hook(lambda *_: calls.append(1))
    first = sample(pipe)
    assert len(calls) < len(baseline_calls)  # the last block computed only when the cache did not skip
    assert not torch.equal(first, expected)
    assert torch.equal(sample(pipe), first)  # the second call starts from an empty cache too

    three = sample(pipe, labels=(3, 4, 5), seed=1)  # another batch size after a call
    fresh = make_pipe(transformer=tiny_transformer(), vae=None)
    fresh.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    assert torch.equal(three, sample(fresh, labels=(3, 4, 5), seed=1))
    assert pipe.current_timestep is None


def test_a_guidance_interval_gives_each_batch_composition_its_own_cache_state():
    """With `guidance_interval`, early steps run the conditional half alone (batch B) and later ones the guided batch
    (2B). A cache that always skips after its first step must start afresh when the composition changes, never
    reuse a batch-B residual for a 2B batch: the last block runs once per composition."""
    pipe = make_pipe(transformer=tiny_transformer(), vae=None)
    pipe.scheduler.set_timesteps(STEPS)
    middle = float(pipe.scheduler.timesteps[STEPS // 2])  # the later half of the steps is guided
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    batches = []
    pipe.transformer.transformer_blocks[-1].attn.register_forward_hook(lambda m, args, out: batches.append(len(out)))
    out = sample(pipe, guidance_interval=(0, middle))
    assert batches == [2, 4] and torch.isfinite(out).all()


def test_caches_that_do_not_fit_are_refused():
    transformer = tiny_transformer()
    with pytest.raises(
        ValueError, match="FasterCacheConfig does not apply to DiffiTTransformer2DModel.*MagCacheConfig"
    ):
        transformer.enable_cache(FasterCacheConfig())
    assert not transformer.is_cache_enabled
    unet = tiny_unet()
    with pytest.raises(ValueError, match="FirstBlockCacheConfig does not apply to DiffiTUNet2DModel.*: none"):
        unet.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    assert not unet.is_cache_enabled


def test_shipped_mag_ratios_load_and_skip_on_the_embedded_model():
    """The shipped MagCache ratios of digits-latent (one per step of each recipe) drive MagCache on the model: some
    block evaluations are skipped, the samples stay finite, and an unknown recipe is refused by name."""
    assert len(shipped_mag_ratios("digits-latent", "official")) == 250
    ratios = shipped_mag_ratios("digits-latent")  # the saved recipe: DPM-Solver++ 2M, 6 steps
    pipe = DiffiTPipeline.from_pretrained(embedded_model_path("digits-latent"), vae=None)
    pipe.set_progress_bar_config(disable=True)
    assert len(ratios) == pipe.config.num_inference_steps and ratios[0] == 1.0
    calls = []
    for block in pipe.transformer.transformer_blocks:  # the time projection runs once per attention computation
        block.attn.to_q_time.register_forward_hook(lambda *_: calls.append(1))
    pipe.transformer.enable_cache(MagCacheConfig(threshold=0.06, num_inference_steps=len(ratios), mag_ratios=ratios))
    images = pipe([3, 7], generator=torch.manual_seed(0), output_type="latent").images
    blocks = len(pipe.transformer.transformer_blocks)
    assert 0 < len(calls) < blocks * len(ratios) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="`recipe` must be one of \\['official', 'saved'\\].*'fast'"):
        shipped_mag_ratios("digits-latent", "fast")
