"""Attention backends checked at the door (both models): bias-capable, runs on the model's device and dtype, and
checked again when the model moves; clear errors instead of failures deep inside a forward."""

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from diffusers_diffit.models.attention_backends import backends_for, check_attention_backend
from tests.utils import TINY_MODELS


def run(model, args):
    with torch.no_grad():
        return model(*args).sample


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("backend", ["_native_efficient", "_native_cudnn", "xformers"])
def test_cuda_only_backends_are_refused_on_a_cpu_model(name, backend):
    model, args = TINY_MODELS[name]()
    before = {p._attention_backend for p in model.attn_processors.values()}
    with pytest.raises(ValueError, match=rf"'{backend}' runs only on cuda.*device 'cpu'.*'native', '_native_math'"):
        model.set_attention_backend(backend)
    assert {p._attention_backend for p in model.attn_processors.values()} == before  # nothing was changed
    run(model, args)  # and the model still runs


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("backend", ["_native_flash", "flash", "flash_varlen", "sage", "_native_npu", "_native_xla"])
def test_backends_without_additive_bias_are_refused_at_the_door(name, backend):
    model, _ = TINY_MODELS[name]()
    with pytest.raises(ValueError, match="cannot add DiffiT's relative-position bias.*'native'"):
        model.set_attention_backend(backend)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_unknown_backend_names_the_value_and_the_allowed_ones(name):
    model, _ = TINY_MODELS[name]()
    with pytest.raises(ValueError, match=r"`backend` 'fastest' is not an attention backend.*'native'.*'flex'"):
        model.set_attention_backend("fastest")


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("backend", ["native", "_native_math", "flex", "NATIVE"])
def test_cpu_backends_are_accepted_and_match_native(name, backend):
    """Different kernels (SDPA's CPU flash kernel, the math path, FlexAttention) agree to a tolerance."""
    model, args = TINY_MODELS[name]()
    expected = run(model, args)
    model.set_attention_backend(backend)
    assert {p._attention_backend.value for p in model.attn_processors.values()} == {backend.lower()}
    torch.testing.assert_close(run(model, args), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_flex_on_cpu_is_for_inference_only(name):
    model, args = TINY_MODELS[name]()
    model.set_attention_backend("flex")
    run(model, args)
    with pytest.raises(ValueError, match="'flex' has no backward pass on the CPU.*no_grad.*'native'"):
        model(*args)  # grad mode: torch itself would raise NotImplementedError deep inside


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_moving_the_model_checks_the_backend_again(name):
    """A backend that ran where the model was but cannot where it goes: the move raises. On a CPU-only machine the
    dtype rule of cuDNN attention (half precision only) is the move we can make; test_gpu.py moves devices."""
    model, _ = TINY_MODELS[name]()
    for processor in model.attn_processors.values():  # as if set on a CUDA fp16 model
        processor._attention_backend = "_native_cudnn"
    with pytest.raises(ValueError, match="'_native_cudnn' runs only on cuda in float16 or bfloat16.*'cpu' in float64"):
        model.to(torch.float64)
    model.reset_attention_backend()
    model.to(torch.float32)  # the default backend is not checked on moves: it is resolved at every call


def test_a_cuda_only_process_default_fails_clearly_at_call_time():
    """diffusers' `set_attention_backend` also sets a process-wide default; a CPU model that follows the default
    gets a ValueError naming the device instead of torch's 'No viable backend for scaled_dot_product_attention'."""
    model, args = TINY_MODELS["transformer"]()
    _AttentionBackendRegistry.set_active_backend("_native_efficient")  # restored by conftest
    with pytest.raises(ValueError, match="'_native_efficient' runs only on cuda.*device 'cpu'"):
        run(model, args)


def test_backend_table():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends_for(cpu, torch.float32) == ["native", "_native_math", "flex"]
    assert backends_for(cuda, torch.float32) == ["native", "_native_math", "_native_efficient", "flex", "xformers"]
    assert "_native_cudnn" in backends_for(cuda, torch.bfloat16)
    assert check_attention_backend("_native_cudnn", torch.device("meta"), torch.float32).value == "_native_cudnn"
