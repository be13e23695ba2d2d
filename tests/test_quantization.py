"""Quantization and memory features through diffusers' own API, on a tiny transformer (CPU).

torchao (`TorchAoConfig`) and quanto (`QuantoConfig`) quantize the linear layers at `from_pretrained`, save with
`save_pretrained` and reload without the config; `enable_layerwise_casting` stores weights in fp8; group offloading
to disk restores the weights. Tolerances: quantized outputs are compared with float32 by `relative_error` (max |Δ| /
max |ref|): int8 weights with float32 activations (quanto) ≤ 2 %, int8 weights or activations with the rest of the
model in bfloat16 (diffusers' torchao path) ≤ 5 %, fp8 e4m3 weight storage ≤ 10 % (3 mantissa bits). A reloaded
model and a disk-offloaded one run the same kernels on the same weights in one process: bitwise equal.
"""

import pytest
import torch
from diffusers import FirstBlockCacheConfig, PipelineQuantizationConfig, QuantoConfig
from peft import LoraConfig

from diffusers_diffit import DiffiTPipeline, DiffiTTransformer2DModel, compile_frozen, compile_int8_dynamic
from tests.utils import make_pipe, relative_error, tiny_transformer_16, tiny_unet, transformer_inputs


pytest.importorskip("optimum.quanto", reason="the `test` extra (optimum-quanto) is not installed")
try:  # torchao is in the `quant` extra only: with torch 2.13 its import prints warnings to stderr on every
    import torchao.quantization as torchao_quantization  # diffusers import, which the CLI tests would see
    from diffusers import TorchAoConfig
except ImportError:
    torchao_quantization = None
requires_torchao = pytest.mark.skipif(torchao_quantization is None, reason="torchao (the `quant` extra) is absent")


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # QuantoConfig is deprecated in diffusers 0.42


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny float32 transformer saved to disk, its inputs and its float32 output."""
    model = tiny_transformer_16().eval()
    path = tmp_path_factory.mktemp("fp32")
    model.save_pretrained(path)
    x, t, y = transformer_inputs()
    with torch.no_grad():
        expected = model(x, t, y).sample
    return path, (x, t, y), expected


def run(model, x, t, y):
    with torch.no_grad(), model.inference_cache():  # as DiffiTPipeline runs it
        return model(x.to(model.dtype), t, y).sample.float()


CONFIGS = {  # name -> (quantization config factory, torch_dtype, tolerance against float32); torchao's need it
    "torchao-int8-weight-only": (lambda: TorchAoConfig(torchao_quantization.Int8WeightOnlyConfig()), "bf16", 0.05),
    "torchao-int8-dynamic": (
        lambda: TorchAoConfig(torchao_quantization.Int8DynamicActivationInt8WeightConfig()),
        "bf16",
        0.05,
    ),
    "quanto-int8": (lambda: QuantoConfig("int8"), "fp32", 0.02),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=requires_torchao) if n.startswith("torchao") else n for n in sorted(CONFIGS)]
)
def test_quantized_model_is_close_to_fp32_and_round_trips(name, saved, tmp_path):
    path, inputs, expected = saved
    config, dtype, tolerance = CONFIGS[name]
    model = DiffiTTransformer2DModel.from_pretrained(path, quantization_config=config(), torch_dtype=DTYPES[dtype])
    block = model.transformer_blocks[0]
    assert type(block.attn.to_q.weight) is not torch.nn.Parameter  # quantized: a tensor subclass
    assert type(model.condition_embed.class_embedder.weight) is torch.nn.Parameter  # embeddings are not quantized
    actual = run(model, *inputs)
    assert relative_error(actual, expected) <= tolerance

    model.save_pretrained(tmp_path)  # safetensors; the quantization config goes into config.json
    reloaded = DiffiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=DTYPES[dtype])
    assert type(reloaded.transformer_blocks[0].attn.to_q.weight) is type(block.attn.to_q.weight)
    assert torch.equal(run(reloaded, *inputs), actual)


@requires_torchao
def test_torchao_in_float32_runs_in_the_inference_cache(saved):
    path, inputs, expected = saved
    config = TorchAoConfig(torchao_quantization.Int8WeightOnlyConfig())
    model = DiffiTTransformer2DModel.from_pretrained(path, quantization_config=config, torch_dtype=torch.float32)
    assert relative_error(run(model, *inputs), expected) <= 0.02


def test_pipeline_quantization_config_quantizes_only_the_transformer(saved, tmp_path):
    path, _, _ = saved
    pipe = DiffiTPipeline(transformer=DiffiTTransformer2DModel.from_pretrained(path), scheduler=_scheduler())
    pipe.save_pretrained(tmp_path)
    config = PipelineQuantizationConfig(quant_mapping={"transformer": QuantoConfig("int8")})
    quantized = DiffiTPipeline.from_pretrained(tmp_path, quantization_config=config)
    assert type(quantized.transformer.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    kwargs = dict(num_inference_steps=2, output_type="latent", guidance_scale=2.0)
    expected = pipe([1, 7], generator=torch.Generator().manual_seed(0), **kwargs).images
    actual = quantized([1, 7], generator=torch.Generator().manual_seed(0), **kwargs).images
    # the sampler's clipping amplifies a few elements: the mean error, relative to the mean magnitude, within 2 %
    assert (actual - expected).abs().mean() <= 0.02 * expected.abs().mean()


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(variance_type="learned_range")


def test_invalid_quantization_configs_name_what_is_allowed(saved, tmp_path):
    path, _, _ = saved
    with pytest.raises(ValueError, match=r"\['float8', 'int8', 'int4', 'int2'\].*int3"):
        QuantoConfig("int3")
    with pytest.raises(ValueError, match="Unknown quantization type, got nonsense - supported types are: .*torchao"):
        DiffiTTransformer2DModel.from_pretrained(path, quantization_config={"quant_method": "nonsense"})
    DiffiTPipeline(transformer=DiffiTTransformer2DModel.from_pretrained(path), scheduler=_scheduler()).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="PipelineQuantizationConfig"):
        DiffiTPipeline.from_pretrained(tmp_path, quantization_config=QuantoConfig("int8"))


@requires_torchao
def test_torchao_takes_config_objects_not_strings():
    with pytest.raises(TypeError, match="AOBaseConfig"):
        TorchAoConfig("int8wo")  # diffusers 0.42 takes torchao config objects, not the old strings


def test_layerwise_casting_keeps_the_skip_patterns_in_float32(saved):
    path, inputs, expected = saved
    model = DiffiTTransformer2DModel.from_pretrained(path).eval()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    kept = [n for n in dtypes if n.startswith(("patch_embed", "condition_embed", "proj_out")) or "bias_table" in n]
    assert kept and all(dtypes[n] == torch.float32 for n in kept)
    stored = [n for n in dtypes if n.startswith("transformer_blocks") and n.endswith(".weight")]
    assert stored and all(dtypes[n] == torch.float8_e4m3fn for n in stored)
    assert relative_error(run(model, *inputs), expected) <= 0.10


def test_block_level_group_offload_to_disk_restores_the_weights(saved, tmp_path):
    path, inputs, expected = saved
    model = DiffiTTransformer2DModel.from_pretrained(path).eval()
    model.enable_group_offload(
        torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=str(tmp_path)
    )
    for _ in range(2):  # the second call reads every group back from disk
        with torch.no_grad():  # as `expected` was computed (no inference cache: the same kernels)
            assert torch.equal(model(*inputs).sample, expected)
    assert any(tmp_path.glob("*.safetensors"))


@requires_torchao
def test_int8_graph_is_close_to_fp32_at_any_batch_size_and_timestep_type(saved):
    """`compile_int8_dynamic` (the int8 path faster than float32 on x86 CPUs): exported with a dynamic batch,
    quantized and compiled once, it serves other batch sizes, integer and float timesteps and a scalar one, and stays
    within int8's 5 % of float32 (7-bit activations where the CPU lacks VNNI, the default). Tolerances: another
    kernel path than float32's."""
    path, (x, t, y), expected = saved
    model = DiffiTTransformer2DModel.from_pretrained(path).eval()
    compile_int8_dynamic(model)
    for batch in (len(x), 1):
        out = model(x[:batch], t[:batch], class_labels=y[:batch]).sample
        assert 0 < relative_error(out, expected[:batch]) <= 0.05, batch
    assert relative_error(model(x, t.float(), y, return_dict=False)[0], expected) <= 0.05
    reference = DiffiTTransformer2DModel.from_pretrained(path).eval()
    null = torch.full_like(y, reference.config.num_classes)
    with torch.no_grad():
        expected_null = reference(x, 500, class_labels=null).sample
    assert relative_error(model(x, 500).sample, expected_null) <= 0.05  # no labels: the null class
    with pytest.raises(ValueError, match="attention_kwargs"):
        model(x, t, y, attention_kwargs={"scale": 0.5})


@requires_torchao
def test_pipeline_samples_with_the_int8_graph():
    """The pipeline's loop (guided batch of twice the size, scheduler timesteps) runs the int8 graph as it is and
    lands near the float32 sample from the same noise."""
    pipe = make_pipe(transformer=tiny_transformer_16().eval(), vae=None)
    kwargs = dict(class_labels=[1, 2], num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    expected = pipe(**kwargs, generator=torch.manual_seed(0)).images
    compile_int8_dynamic(pipe.transformer)
    images = pipe(**kwargs, generator=torch.manual_seed(0)).images
    assert images.shape == expected.shape and relative_error(images, expected) <= 0.1


def test_cpu_graphs_refuse_what_they_cannot_stand_for():
    """Refused before any export or compilation, torchao or not, each naming the fix."""
    with pytest.raises(ValueError, match="DiffiTTransformer2DModel"):
        compile_int8_dynamic(tiny_unet())
    with pytest.raises(ValueError, match="reduce_range"):
        compile_int8_dynamic(tiny_transformer_16(), reduce_range="yes")
    with pytest.raises(ValueError, match="on the CPU in one of"):
        compile_int8_dynamic(tiny_transformer_16().to(torch.bfloat16))  # int8 starts from float32 weights
    lora = tiny_transformer_16()
    lora.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="fuse_lora"):
        compile_int8_dynamic(lora)
    cached = tiny_transformer_16()
    cached.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="disable_cache"):
        compile_int8_dynamic(cached)


def test_frozen_bfloat16_graph_is_close_to_fp32_and_samples(saved):
    """`compile_frozen` on a bfloat16 model (the fastest bfloat16 CPU path): the same arguments as the eager model,
    within bfloat16's tolerance of float32 at two batch sizes, through the pipeline's loop too; a second compile is
    refused. Tolerances: another dtype and kernel path than float32's."""
    path, (x, t, y), expected = saved
    model = DiffiTTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    compile_frozen(model)
    for batch in (len(x), 1):
        out = model(x[:batch].bfloat16(), t[:batch], class_labels=y[:batch]).sample
        assert out.dtype == torch.bfloat16 and relative_error(out, expected[:batch]) <= 0.05, batch
    with pytest.raises(ValueError, match="compiled for the CPU already"):
        compile_frozen(model)

    pipe = make_pipe(transformer=DiffiTTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16), vae=None)
    kwargs = dict(class_labels=[1, 2], num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    eager = pipe(**kwargs, generator=torch.manual_seed(0)).images
    compile_frozen(pipe.transformer)
    assert relative_error(pipe(**kwargs, generator=torch.manual_seed(0)).images, eager) <= 0.1
