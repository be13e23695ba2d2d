"""Eval-mode inference inside `inference_cache()` reuses what depends on the weights alone (the gathered position
bias; on the CPU in float32 the oneDNN-packed linear weights) and rebuilds it whenever the weights, their dtype or
device change; outside the block, in training and in grad-enabled calls nothing is reused, and the block's end drops
everything (so a weight edit autograd cannot see, through `.data`, is seen by the next block).

Guarantees relied on: "cached" and "rebuilt from scratch" run the same kernels on the same inputs in one process,
so they are compared bitwise; a cached model against a freshly built one with the same weights likewise.
"""

import pytest
import torch

from diffusers_diffit.models.attention import DiffiTAttention
from diffusers_diffit.models.attention_processor import clear_derived_tensors
from tests.utils import TINY_MODELS


def run(model, args):
    with torch.no_grad():
        return model(*args).sample


def fresh(model, args):
    """The same model with nothing reused: every derived tensor rebuilt from the current weights."""
    clear_derived_tensors(model)
    return run(model, args)


def caches(model):
    return [m.__dict__.get("_derived_tensors", {}) for m in model.modules() if m.__dict__.get("_derived_tensors")]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_derived_tensors_are_built_once(name):
    model, args = TINY_MODELS[name]()
    with model.inference_cache():
        first = run(model, args)
        attn = next(m for m in model.modules() if isinstance(m, DiffiTAttention))
        bias = attn._derived_tensors["bias_torch.float32"][1]
        kept = [dict(c) for c in caches(model)]
        assert len(kept) > 0
        second = run(model, args)
        assert torch.equal(first, second)
        assert attn._derived_tensors["bias_torch.float32"][1] is bias  # reused, not rebuilt
        assert all(c[k][1] is old[k][1] for c, old in zip(caches(model), kept) for k in old)
        torch.testing.assert_close(bias, attn.relative_position_bias(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_load_state_dict_invalidates(name):
    model, args = TINY_MODELS[name]()
    with model.inference_cache():
        other, _ = TINY_MODELS[name]()  # other random weights
        before = run(model, args)
        model.load_state_dict(other.state_dict())
        after = run(model, args)
        assert not torch.allclose(after, before)
        assert torch.equal(after, fresh(model, args))
        with other.inference_cache():  # the same kernels: packed weights on both sides
            assert torch.equal(after, run(other, args))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_optimizer_step_and_in_place_edits_invalidate(name):
    model, args = TINY_MODELS[name]()
    with model.inference_cache():
        run(model, args)  # fill the caches
        model.train()
        model.condition_embed.class_dropout_prob = 0.0
        model(*args).sample.square().mean().backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        model.eval()
        stepped = run(model, args)
        assert torch.equal(stepped, fresh(model, args))

        attn = next(m for m in model.modules() if isinstance(m, DiffiTAttention))
        run(model, args)
        with torch.no_grad():  # in-place edits of one block's bias table and output projection
            attn.relative_position_bias_table.mul_(3.0)
            attn.to_out.weight.add_(0.1)
        edited = run(model, args)
        assert not torch.allclose(edited, stepped)
        assert torch.equal(edited, fresh(model, args))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_dtype_round_trip_invalidates(name):
    """fp32 → bf16 → fp32 rounds every weight: the rebuilt tensors must follow (a cache keyed on storage addresses
    alone could find the old fp32 address again)."""
    model, args = TINY_MODELS[name]()
    with model.inference_cache():
        run(model, args)
        model.to(torch.bfloat16)
        half = run(model, (args[0].bfloat16(), *args[1:]))
        assert half.dtype == torch.bfloat16 and torch.equal(half, fresh(model, (args[0].bfloat16(), *args[1:])))
        model.to(torch.float32)
        rounded = run(model, args)
        assert torch.equal(rounded, fresh(model, args))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_training_and_grad_mode_never_reuse(name):
    model, args = TINY_MODELS[name]()
    with model.inference_cache():
        run(model, args)  # eval-mode caches exist
        attn = next(m for m in model.modules() if isinstance(m, DiffiTAttention))
        table = attn.relative_position_bias_table
        model(*args).sample.square().mean().backward()  # eval mode, but grad enabled: computed afresh, so it has grads
        assert table.grad is not None and table.grad.abs().sum() > 0
        assert attn.to_out.weight.grad.abs().sum() > 0

        model.train()
        assert caches(model) == []  # switching mode drops everything
        model.condition_embed.class_dropout_prob = 0.0
        with torch.no_grad():
            model(*args)
        assert caches(model) == []  # training mode never stores, even without grad


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_nothing_is_reused_outside_the_block_and_its_end_drops_everything(name):
    model, args = TINY_MODELS[name]()
    run(model, args)
    assert caches(model) == []  # eval mode and no grad, but outside the block
    with model.inference_cache():
        run(model, args)
        assert caches(model) != []
        with model.inference_cache():  # nested: the outer block owns the cache
            run(model, args)
        assert caches(model) != []
    assert caches(model) == []


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_data_edits_between_blocks_are_seen(name):
    """diffusers' `EMAModel.copy_to` writes through `.data`, which autograd's version counter does not see: a cache
    that outlived the call would keep the old weights. Pipeline calls are blocks, so the next call sees the edit."""
    model, args = TINY_MODELS[name]()
    other, _ = TINY_MODELS[name]()
    with model.inference_cache():
        before = run(model, args)
    for param, new in zip(model.parameters(), other.parameters()):
        param.data.copy_(new.data)
    with model.inference_cache():
        after = run(model, args)
    assert not torch.allclose(after, before)
    with other.inference_cache():
        torch.testing.assert_close(after, run(other, args), rtol=1e-5, atol=1e-5)  # another object: a tolerance
