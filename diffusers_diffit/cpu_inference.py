"""Fast inference on x86 CPUs: the transformer compiled by inductor with freezing, in bfloat16 or in int8.

Freezing folds the weights into the graph as constants, so inductor packs them once for oneDNN's GEMMs, which use
AMX on recent Xeons. `compile_frozen` compiles the model as it is (load it with `torch_dtype=torch.bfloat16` for the
bfloat16 path); `compile_int8_dynamic` first exports it and quantizes its linear layers with torchao's
`X86InductorQuantizer` (int8 weights per channel, activations per tensor at run time), the int8 path that is faster
than float32 also where torchao's eager int8 kernels are not. Measured on DiffiT-XL/2 (256 px, batch 2, 2 threads,
against the float32 forward): on a Xeon with AMX, bfloat16 eager 3.5×, `compile_frozen` in bfloat16 4.4×,
`compile_int8_dynamic` 4.7×; on an AVX2 EPYC, `compile_int8_dynamic` 1.8× and bfloat16 slower than float32. Judged
quality on `digits-latent` stays within seed noise (docs/performance.md; `benchmarks/precision_study.py`).
"""

import logging
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .models import DiffiTTransformer2DModel


logger = logging.getLogger(__name__)


def has_vnni() -> bool:
    """Whether this CPU multiplies int8 with 32-bit accumulation (AVX-512 VNNI, AVX-VNNI or AMX). Without it,
    oneDNN's u8·s8 kernels add pairs of products in saturating int16, and full-range 8-bit activations overflow."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _check_can_compile(transformer, dtypes: tuple) -> None:
    """Raise before any export or compilation for a model the compiled graph cannot stand for."""
    if not isinstance(transformer, DiffiTTransformer2DModel):
        raise ValueError(f"`transformer` must be a DiffiTTransformer2DModel, got {type(transformer).__name__}.")
    if transformer.device.type != "cpu" or transformer.dtype not in dtypes:
        raise ValueError(
            f"`transformer` must be on the CPU in one of {[str(d) for d in dtypes]} (these are x86 CPU paths), got "
            f"{transformer.device} / {transformer.dtype}: move it with `.to('cpu', dtype)` first."
        )
    problems = {
        "it was compiled for the CPU already": transformer.__dict__.get("_compiled_for_cpu", False),
        "it is quantized already (quantization_config)": getattr(transformer, "hf_quantizer", None) is not None,
        "it has LoRA adapters: fuse_lora() and unload_lora_weights() first": getattr(
            transformer, "_hf_peft_config_loaded", False
        ),
        "a cache hook is enabled: disable_cache() first": getattr(transformer, "is_cache_enabled", False),
    }
    for problem, applies in problems.items():
        if applies:
            raise ValueError(f"`transformer` cannot be compiled: {problem}.")


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
    if reduce_range not in (None, True, False):
        raise ValueError(f"`reduce_range` must be None (decide from the CPU), True or False, got {reduce_range!r}.")
    _check_can_compile(transformer, dtypes=(torch.float32,))
    try:
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
        sample = frozen(compiled)(hidden_states=hidden_states, timestep=timestep.float(), **labels, return_dict=False)
        return Transformer2DModelOutput(sample=sample[0]) if return_dict else (sample[0],)

    _replace_forward(transformer, forward)


def compile_frozen(transformer: DiffiTTransformer2DModel, **compile_kwargs) -> None:
    """Compile `transformer` in place with `torch.compile` and inductor's freezing, for inference on the CPU: the
    weights become constants of the graph, packed once for oneDNN (AMX on recent Xeons). The fastest bfloat16 path:
    load with `torch_dtype=torch.bfloat16`, then call this (measured 4.4× the float32 forward on an AMX Xeon, against
    3.5× for bfloat16 without it). It compiles at the first call and again for a new input shape.

    The forward takes the same arguments as before, under `torch.no_grad()`. Weights changed after the first call
    are not seen (they are constants of the graph), nor are adapters loaded afterwards: load and fuse LoRA first.

    Args:
        transformer: a `DiffiTTransformer2DModel` on the CPU, e.g. `pipe.transformer`.
        compile_kwargs: passed to `torch.compile` (e.g. `fullgraph=True`, `dynamic=False`).
    """
    _check_can_compile(transformer, dtypes=(torch.float32, torch.bfloat16))
    compiled = torch.compile(transformer.forward, **compile_kwargs)  # the class's forward, bound before replacing

    def forward(*args, **kwargs):
        return frozen(compiled)(*args, **kwargs)

    _replace_forward(transformer, forward)


def frozen(compiled):
    """`compiled` called with inductor's freezing on and without gradients. `torch.compile(options={"freezing":
    True})` does not reach the int8 lowering, and freezing set globally would also apply to
    `compile_repeated_blocks` elsewhere in the process, which fails with it."""

    def call(*args, **kwargs):
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def _replace_forward(transformer, forward) -> None:
    transformer.eval()
    transformer.forward = forward  # a function: a module assigned as `forward` would become a submodule
    transformer.__dict__["_compiled_for_cpu"] = True
