"""DiffiTTransformer2DModel: parity with an independent official-layout reference, loading, processors, errors."""

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from benchmarks.reference_diffit import ReferenceDiffiT, randomize_, sincos_pos_embed, timestep_embedding
from diffusers_diffit import DIFFIT_CONFIGS, DiffiTAttnProcessor, DiffiTTransformer2DModel
from diffusers_diffit.models.attention_backends import BIAS_CAPABLE_BACKENDS
from tests.utils import relative_error, tiny_transformer_16, transformer_inputs


TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def reference():
    return randomize_(ReferenceDiffiT(**TINY)).eval()


@pytest.fixture(scope="module")
def official_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "diffit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    return path


# ----------------------------------------------------------------------------------------------------------- parity
def test_from_single_file_matches_reference(reference, official_file):
    model = DiffiTTransformer2DModel.from_single_file(official_file)
    assert (model.config.num_layers, model.config.num_attention_heads, model.config.mlp_ratio) == (3, 4, 4.0)
    assert (model.config.sample_size, model.config.attention_head_dim, model.config.num_classes) == (16, 16, 10)
    assert not model.training
    x, t, y = transformer_inputs()
    with torch.no_grad():
        expected = reference(x, t, y)
        actual = model(x, t, y).sample
    assert actual.shape == (3, 8, 16, 16)
    print(f"from_single_file vs the official-layout reference, fp32: max |Δ| = {(actual - expected).abs().max():.3g}")
    assert (actual - expected).abs().max().item() <= 1e-5


def test_pt_wrappers_and_missing_index(reference, tmp_path):
    no_index = randomize_(ReferenceDiffiT(**TINY, with_index=False)).eval()
    assert not any("relative_position_index" in k for k in no_index.state_dict())
    x, t, y = transformer_inputs()
    for i, wrap in enumerate(
        [
            lambda sd: {"ema": sd, "opt": {"lr": torch.tensor(1.0)}},
            lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
            lambda sd: {f"ema.{k}": v for k, v in sd.items()},
        ]
    ):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(wrap(no_index.state_dict()), path)
        model = DiffiTTransformer2DModel.from_single_file(path)
        with torch.no_grad():
            assert torch.allclose(model(x, t, y).sample, no_index(x, t, y), atol=1e-5)


def test_from_single_file_dtype_and_overrides(official_file):
    model = DiffiTTransformer2DModel.from_single_file(
        official_file, torch_dtype=torch.bfloat16, class_dropout_prob=0.0
    )
    assert model.dtype == torch.bfloat16 and model.config.class_dropout_prob == 0.0
    model = DiffiTTransformer2DModel.from_single_file(official_file, dtype=torch.float16)
    assert model.dtype == torch.float16 and "dtype" not in model.config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads(reference, tmp_path, dtype):
    """A checkpoint saved in half precision carries a rounded sin-cos `pos_embed`; it is still recognised."""
    save_file(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in reference.state_dict().items()},
        tmp_path / "half.safetensors",
    )
    model = DiffiTTransformer2DModel.from_single_file(tmp_path / "half.safetensors", torch_dtype=torch.float32)
    x, t, y = transformer_inputs()
    with torch.no_grad():
        assert relative_error(model(x, t, y).sample, reference(x, t, y)) < 2e-2


def test_loading_errors_list_everything_and_name_dit(reference, tmp_path):
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    sd["final_layer.linear.bias"] = torch.zeros(31)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as err:
        DiffiTTransformer2DModel.from_single_file(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "transformer_blocks.1.ff.net.2.bias" in message and "blocks.0.attn.extra" in message
    assert "proj_out.bias" in message and "mis-shaped" in message

    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sd["blocks.2.attn.relative_position_index"] = sd["blocks.2.attn.relative_position_index"].flip(0)
    save_file(sd, tmp_path / "bad_index.safetensors")
    with pytest.raises(ValueError, match="relative_position_index"):
        DiffiTTransformer2DModel.from_single_file(tmp_path / "bad_index.safetensors")

    dit = {"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2), "blocks.0.adaLN_modulation.1.weight": torch.zeros(48, 8)}
    save_file(dit, tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="DiT checkpoint"):
        DiffiTTransformer2DModel.from_single_file(tmp_path / "dit.safetensors")
    with pytest.raises(FileNotFoundError):
        DiffiTTransformer2DModel.from_single_file(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("name, expected", [("DiffiT-XL/2-256", 561_035_232), ("DiffiT-XL/2-512", 562_382_816)])
def test_released_parameter_counts_on_meta(name, expected):
    with init_empty_weights():
        model = DiffiTTransformer2DModel(**DIFFIT_CONFIGS[name])
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    frozen = model.pos_embed.numel()
    assert frozen == (model.config.sample_size // 2) ** 2 * 1152


def test_positions_are_maes_table_and_derived_tensors_are_not_saved():
    model = tiny_transformer_16()  # an 8x8 token grid: diffusers' default base_size (16) would halve the positions
    assert torch.equal(model.pos_embed, torch.from_numpy(sincos_pos_embed(64, 8)).float()[None])
    assert not [k for k in model.state_dict() if k.endswith(("pos_embed", "relative_position_index"))]


def test_timestep_embedding_avoids_the_downscale_freq_shift_trap():
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    ours = tiny_transformer_16().condition_embed.time_proj(t)
    assert torch.allclose(ours, timestep_embedding(t), atol=1e-5)  # the release's sinusoid, not diffusers' DiT one


# ------------------------------------------------------------------------------------------------- processors etc.
def _run(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y).sample


def test_fused_and_unfused_projections_agree():
    model = tiny_transformer_16()
    x, t, y = transformer_inputs()
    expected = _run(model, x, t, y)
    model.fuse_qkv_projections()
    attn = model.transformer_blocks[0].attn
    assert attn.fused_projections and attn.to_qkv.out_features == 3 * 64 and attn.to_qkv_time.out_features == 3 * 64
    assert torch.allclose(_run(model, x, t, y), expected, atol=1e-5)
    model.unfuse_qkv_projections()
    assert not hasattr(attn, "to_qkv") and not hasattr(attn, "to_qkv_time")
    assert torch.equal(_run(model, x, t, y), expected)  # bitwise: unfusing leaves the original weights in place


CUDA_ONLY_BACKENDS = {"_native_cudnn", "_native_efficient", "xformers"}
CPU_BACKENDS = [b.value for b in BIAS_CAPABLE_BACKENDS if b.value not in CUDA_ONLY_BACKENDS]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_match_default(backend):
    model = tiny_transformer_16()
    x, t, y = transformer_inputs()
    expected = _run(model, x, t, y)
    model.set_attention_backend(backend)
    assert all(p._attention_backend.value == backend for p in model.attn_processors.values())
    assert torch.allclose(_run(model, x, t, y), expected, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", sorted(CUDA_ONLY_BACKENDS))
def test_cuda_backends_match_native(backend):
    if backend == "xformers":
        pytest.importorskip("xformers")
    model = tiny_transformer_16().cuda().half()
    x, t, y = (v.cuda() for v in transformer_inputs())
    expected = _run(model, x.half(), t, y)
    model.set_attention_backend(backend)
    assert torch.allclose(_run(model, x.half(), t, y), expected, atol=2e-2)


def test_set_attn_processor_swaps_every_block():
    model = tiny_transformer_16()
    processors = model.attn_processors
    assert len(processors) == 2 and all(isinstance(p, DiffiTAttnProcessor) for p in processors.values())
    calls = []

    class Recording(DiffiTAttnProcessor):
        def __call__(self, attn, hidden_states, temb, num_windows=1):
            calls.append((hidden_states.shape, num_windows))
            return super().__call__(attn, hidden_states, temb, num_windows)

    x, t, y = transformer_inputs()
    expected = _run(model, x, t, y)
    model.set_attn_processor(Recording())
    assert torch.equal(_run(model, x, t, y), expected)  # bitwise: same model, kernels
    assert calls == [((3, 64, 64), 1)] * 2  # the whole 8x8 token grid is one window


def test_batch_equals_single_samples_and_bias_is_shared():
    model = tiny_transformer_16()
    x, t, y = transformer_inputs(batch=3)
    batched = _run(model, x, t, y)
    singles = torch.cat([_run(model, x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, singles, atol=1e-5)
    bias = model.transformer_blocks[0].attn.relative_position_bias()
    assert bias.shape == (1, 4, 64, 64) and bias.is_contiguous()  # one [1, H, N, N] mask broadcast over the batch


# ---------------------------------------------------------------------------------------------- conditioning rules
def test_null_class_unconditional_and_label_dropout():
    model = tiny_transformer_16(class_dropout_prob=1.0)
    x, t, _ = transformer_inputs()
    null = torch.full((3,), 10)
    with torch.no_grad():
        assert torch.equal(model(x, t, None).sample, model(x, t, null).sample)
        labelled = model(x, t, torch.tensor([1, 2, 3])).sample
        assert not torch.allclose(labelled, model(x, t, null).sample)  # eval mode: labels are never dropped
        model.train()
        assert torch.allclose(model(x, t, torch.tensor([1, 2, 3])).sample, model(x, t, null).sample)


def test_unconditional_model():
    model = tiny_transformer_16(num_classes=0)
    assert model.condition_embed.class_embedder is None
    x, t, _ = transformer_inputs()
    assert _run(model, x, t, None).shape == (3, 8, 16, 16)
    with pytest.raises(ValueError, match="class_labels.*unconditional"):
        _run(model, x, t, torch.zeros(3, dtype=torch.long))


def test_scalar_timestep_broadcasts():
    model = tiny_transformer_16()
    x, _, y = transformer_inputs()
    assert torch.equal(_run(model, x, 500, y), _run(model, x, torch.full((3,), 500), y))


# ------------------------------------------------------------------------------------------------- save, grad, dtype
def test_save_load_round_trip(tmp_path):
    model = tiny_transformer_16(num_layers=1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiffiTTransformer2DModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, y = transformer_inputs()
    # a tolerance: the reloaded weights live in other (memory-mapped) memory, where some BLAS builds pick other kernels
    torch.testing.assert_close(_run(loaded, x, t, y), _run(model, x, t, y), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_is_equivalent():
    model = tiny_transformer_16(class_dropout_prob=0.0).train()
    x, t, y = transformer_inputs()

    def grads():
        model.zero_grad()
        model(x, t, y).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_runs_close_to_fp32(dtype, tol):
    model = tiny_transformer_16()
    x, t, y = transformer_inputs()
    expected = _run(model, x, t, y)
    model.to(dtype)
    out = _run(model, x.to(dtype), t, y)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < tol * expected.abs().max()


# ------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "x_shape, t, y, match",
    [
        ((2, 3, 16, 16), [1, 2], [0, 1], "hidden_states"),
        ((2, 4, 15, 16), [1, 2], [0, 1], "divisible by patch_size"),
        ((2, 4, 8, 8), [1, 2], [0, 1], "built for 16x16"),
        ((2, 4, 16, 16), [1, 2], [0, 11], r"class_labels.*\[0, 10\]"),
        ((2, 4, 16, 16), [1, 2], [-1, 3], r"class_labels.*\[0, 10\]"),
        ((2, 4, 16, 16), [1, 2], [0.5, 1.0], "class_labels.*integers"),
        ((2, 4, 16, 16), [1, 2, 3], [0, 1], "timestep"),
        ((2, 4, 16, 16), [1, 2], [0, 1, 2], "class_labels.*shape"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(x_shape, t, y, match):
    model = tiny_transformer_16()
    with pytest.raises(ValueError, match=match):
        _run(model, torch.randn(x_shape), torch.tensor(t), torch.tensor(y))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="sample_size"):
        tiny_transformer_16(sample_size=15)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_transformer_16(num_classes=-1)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_transformer_16(num_attention_heads=3, attention_head_dim=2)
    with pytest.raises(ValueError, match="attention_kwargs"):
        tiny_transformer_16()(*transformer_inputs(), attention_kwargs={"scale": 1.0, "temperature": 2.0})
