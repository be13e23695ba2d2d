"""int8 inference on x86 CPUs through PyTorch 2 export and inductor: the int8 path that is faster than float32 there.

diffusers' `TorchAoConfig` int8 runs torchao's eager int8 kernels, which on CPUs without AVX-512 VNNI / AMX are
slower than float32. `compile_int8_dynamic` instead exports the transformer, quantizes its linear layers with
torchao's `X86InductorQuantizer` (int8 weights per channel, activations per tensor at run time) and compiles the
graph with inductor and freezing, which lowers them to oneDNN's u8·s8 GEMMs with packed weights. Measured on a
2-core AVX2 EPYC (DiffiT-XL/2, 256 px, batch 2): 1.80× faster than the float32 forward, judged quality on
`digits-latent` within seed noise (docs/performance.md; `benchmarks/precision_study.py`).
"""

import logging
from pathlib import Path

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .models import DiffiTTransformer2DModel


logger = logging.getLogger(__name__)


def has_vnni() -> bool:
    """Whether this CPU multiplies int8 with 32-bit accumulation (AVX-512 VNNI, AVX-VNNI or AMX). Without it,
    oneDNN's u8·s8 kernels add pairs of products in saturating int16, and full-range 8-bit activations overflow."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _check_can_compile_int8(transformer) -> None:
    """Raise before any export for a model the int8 graph cannot stand for."""
    if not isinstance(transformer, DiffiTTransformer2DModel):
        raise ValueError(f"`transformer` must be a DiffiTTransformer2DModel, got {type(transformer).__name__}.")
    if transformer.device.type != "cpu" or transformer.dtype != torch.float32:
        raise ValueError(
            f"`transformer` must be on the CPU in float32 (oneDNN's int8 kernels are x86 CPU kernels), got "
            f"{transformer.device} / {transformer.dtype}: call `.to('cpu', torch.float32)` first."
        )
    problems = {
        "it is int8 already (compile_int8_dynamic was applied)": transformer.__dict__.get("_int8_graph") is not None,
        "it is quantized already (quantization_config)": getattr(transformer, "hf_quantizer", None) is not None,
        "it has LoRA adapters: fuse_lora() and unload_lora_weights() first": getattr(
            transformer, "_hf_peft_config_loaded", False
        ),
        "a cache hook is enabled: disable_cache() first": getattr(transformer, "is_cache_enabled", False),
    }
    for problem, applies in problems.items():
        if applies:
            raise ValueError(f"`transformer` cannot be compiled to int8: {problem}.")


def compile_int8_dynamic(transformer: DiffiTTransformer2DModel, reduce_range: bool | None = None) -> None:
    """Run `transformer`'s forward as an int8 graph on an x86 CPU, in place: its linear layers quantized to int8
    (weights per output channel, activations per tensor at run time) and compiled by inductor with freezing into
    oneDNN's int8 GEMMs. Needs torchao (`pip install "diffusers-diffit[quant]"`).

    The model keeps its config and its float32 parameters (`save_pretrained` saves them, not int8); its `forward`
    takes the same arguments for any batch size, for inference only (no gradients through it, no
    `attention_kwargs`). Exporting takes seconds; inductor compiles at the first call (about a minute for XL/2,
    much less for small models). Apply it after loading adapters (fused and unloaded) and not with cache hooks.

    Args:
        transformer: a float32 `DiffiTTransformer2DModel` on the CPU, e.g. `pipe.transformer`.
        reduce_range: quantize activations to 7 bits instead of 8. Default: on where the CPU lacks VNNI
            (`has_vnni`), where 8-bit activations overflow oneDNN's 16-bit accumulation (10 % error instead of 2 %).
    """
    _check_can_compile_int8(transformer)
    try:
        import torch._inductor.config as inductor_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:
        raise ImportError(
            f'compile_int8_dynamic needs torchao: pip install "diffusers-diffit[quant]" ({error}).'
        ) from error

    config, batch = transformer.config, 4
    conditional = bool(config.num_classes)
    # the graph's inputs: timesteps in float32 (the time embedding casts them to float first), labels when conditional
    inputs = {
        "hidden_states": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size),
        "timestep": torch.rand(batch) * 999,
    }
    if conditional:
        inputs["class_labels"] = torch.randint(0, config.num_classes, (batch,))
    dim = torch.export.Dim("batch", min=1, max=65536)
    shapes = {name: {0: dim} for name in inputs} | {"return_dict": None}
    reduce_range = not has_vnni() if reduce_range is None else reduce_range
    logger.info("Exporting DiffiT and quantizing it to int8 (%d-bit activations)", 7 if reduce_range else 8)
    with torch.no_grad():
        graph = torch.export.export(transformer.eval(), (), inputs | {"return_dict": False}, dynamic_shapes=shapes)
        graph = graph.module()
        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config(is_dynamic=True, reduce_range=reduce_range)
        )
        graph = prepare_pt2e(graph, quantizer)
        graph(**inputs, return_dict=False)  # dynamic: nothing observed is kept, but prepare_pt2e wants one call
        graph = convert_pt2e(graph)
    compiled = torch.compile(graph)

    def forward(hidden_states, timestep, class_labels=None, attention_kwargs=None, return_dict=True):
        if attention_kwargs:
            raise ValueError(
                f"`attention_kwargs` {attention_kwargs} cannot apply to the int8 graph (it has no LoRA layers)."
            )
        timestep, class_labels = transformer.check_inputs(hidden_states, timestep, class_labels, None)
        if conditional and class_labels is None:  # unconditional sampling: the null class
            class_labels = torch.full_like(timestep, config.num_classes, dtype=torch.long)
        labels = {"class_labels": class_labels} if conditional else {}
        # weights as constants, packed once for oneDNN (`torch.compile(options={"freezing": True})` does not reach
        # the int8 lowering; freezing set globally would break `compile_repeated_blocks` elsewhere)
        with torch.no_grad(), inductor_config.patch(freezing=True):
            sample = compiled(hidden_states=hidden_states, timestep=timestep.float(), **labels, return_dict=False)[0]
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    transformer.forward = forward  # a function: a module assigned as `forward` would become a submodule
    transformer.__dict__["_int8_graph"] = compiled
