"""Forward latency and peak memory of DiffiT-XL/2, side by side in one run.

Variants: this package's model with each processor / attention backend that runs on the device; two references
in the official checkpoint layout: "NVIDIA-like" follows the computation of NVIDIA's release (one fused qkv
projection plus the time projection, (q·scale) @ kᵀ + the gathered bias, softmax, @ v, as Swin does) and "naive" is
benchmarks/reference_diffit.py (scores divided by √d after the product, the bias added through a strided permute);
diffusers' DiTTransformer2DModel at DiT-XL/2 size; and "GEMM floors": the matmuls of the same linear layers alone
(shapes recorded from a real forward), once through `F.linear` (what both references use) and once through oneDNN
with packed weights (what this package uses for CPU float32 inference). Timings rotate through the variants round
by round, so machine noise spreads over all of them; "× NVIDIA-like" is the median over rounds of each round's
ratio to the NVIDIA-like reference of the same round, with the interquartile range of those ratios as the noise.

    python -m benchmarks.bench_transformer                       # CPU fp32 (GPU: bf16 and fp16 too), 256 and 512 px
    python -m benchmarks.bench_transformer --resolutions 256 --repeats 5
    python -m benchmarks.bench_transformer --device cpu --threads 2 --only ours --repeats 9   # the CPU comparison
    python -m benchmarks.bench_transformer --device cpu --threads 2 --only ours --resolutions 256 \
        --quantization bf16 torchao-int8-weight-only torchao-int8-dynamic quanto-int8 fp8-storage

`--quantization` (CPU) adds this package's model saved and loaded back through diffusers' own API as
benchmarks/quant_study.py loads it for its judged quality (`torch_dtype`, `TorchAoConfig`, `QuantoConfig`, fp8
layerwise casting, group offloading to disk), each inside `inference_cache()` as `DiffiTPipeline` runs it; the
weights column sums the bytes of their parameters and buffers (of the int8 data and scales inside a quantized one).
"""

import argparse
import contextlib
import ctypes
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from benchmarks.quant_study import VARIANTS as QUANTIZATIONS
from benchmarks.quant_study import prepare, transformer_kwargs
from benchmarks.reference_diffit import Attention, ReferenceDiffiT
from diffusers_diffit import DIFFIT_CONFIGS, DiffiTTransformer2DModel
from diffusers_diffit.loading import convert_state_dict, infer_config


REFERENCE = "reference, NVIDIA-like"


class NvidiaLikeAttention(Attention):
    """TMSA computed the way NVIDIA's release does (facts from reading it, no code copied): the fused qkv projection
    plus the time projection, q scaled before the product, the bias gathered to [N, N, H], permuted to a contiguous
    [H, N, N] and added to the scores, softmax, @ v."""

    def forward(self, x, c):
        b, n, d = x.shape
        head_dim = d // self.heads
        qkv = (self.qkv(x) + self.qkv_temb(c)[:, None]).reshape(b, n, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, D]
        scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        scores = scores + bias.permute(2, 0, 1).contiguous()[None]
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def attention_as(reference: ReferenceDiffiT, cls: type):
    """A setup step: the references share one module and its weights and differ only in the attention class."""

    def setup():
        for block in reference.blocks:
            block.attn.__class__ = cls

    return setup


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device) -> float:
    """Extra bytes at the peak while `fn` runs: CUDA allocator stats, or on CPU (Linux, glibc) the process's
    resident-set high-water mark (reset through /proc/self/clear_refs) above the resident set before the call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, or the peak hides in allocator caches
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = status("VmRSS:")
    fn()
    return status("VmHWM:") - base


def record_linears(model: nn.Module, run_model) -> list[tuple[int, nn.Linear]]:
    """Every nn.Linear call of `run_model()` in order, as (input rows, layer)."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: calls.append((args[0].numel() // m.in_features, m)))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        run_model()
    finally:
        for h in hooks:
            h.remove()
    return calls


def gemm_floor(model: nn.Module, run_model, device, dtype, onednn: bool = False):
    """A function replaying every nn.Linear call of `run_model()` (`record_linears`) through `F.linear`, or with
    `onednn` through oneDNN with weights packed beforehand (CPU float32)."""
    calls = record_linears(model, run_model)
    inputs = [(torch.randn(rows, m.in_features, device=device, dtype=dtype), m.weight, m.bias) for rows, m in calls]
    if onednn:
        inputs = [(x, torch.ops.mkldnn._reorder_linear_weight(w.detach()), b) for x, w, b in inputs]

        def replay():
            for x, w, b in inputs:
                torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

        return replay

    def replay():
        for x, w, b in inputs:
            nn.functional.linear(x, w, b)

    return replay


INFERENCE_CACHES = contextlib.ExitStack()  # what stays open for the whole run


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized tensor subclass (torchao, quanto) is the sum of the tensors inside it."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def quantized(official: dict, variants: list[str], x, t, y, footprints: dict) -> dict:
    """This package's model saved once and loaded back as each of `variants` (benchmarks/quant_study.py)."""
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        model = DiffiTTransformer2DModel(**infer_config(official))
        model.load_state_dict(convert_state_dict(official, dict(model.config)))
        model.save_pretrained(folder)
        del model
        for variant in variants:
            kwargs = transformer_kwargs(variant)
            model = DiffiTTransformer2DModel.from_pretrained(folder, **kwargs).eval()
            prepare(model, variant, INFERENCE_CACHES.enter_context(tempfile.TemporaryDirectory()))
            INFERENCE_CACHES.enter_context(model.inference_cache())
            name = f"DiffiT, {variant}"
            footprints[name] = weight_bytes(model)
            inputs = (x.to(kwargs.get("torch_dtype", x.dtype)), t, y)
            runs[name] = (lambda: None, lambda model=model, inputs=inputs: model(*inputs))
    return runs


def build(resolution: int, device, dtype, batch: int, footprints: dict, only_ours: bool = False, quantization=()):
    """The variants to time, each (setup, run); `footprints` receives the weight bytes of this package's models."""
    config = DIFFIT_CONFIGS[f"DiffiT-XL/2-{resolution}"]
    side = config["sample_size"]
    reference = ReferenceDiffiT(input_size=side).to(device, dtype).eval()
    official = reference.state_dict()
    models = [DiffiTTransformer2DModel(**infer_config(official)).eval() for _ in range(1 if only_ours else 2)]
    fused, diffit = models[0], models[-1]
    for model in models:
        model.load_state_dict(convert_state_dict(official, dict(model.config)))
        model.to(device, dtype)
    fused.fuse_qkv_projections()
    for model in models:  # for the whole benchmark, as DiffiTPipeline does for each call (the weights never change)
        INFERENCE_CACHES.enter_context(model.inference_cache())

    x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def ours(model, backend):
        def setup():
            for processor in model.attn_processors.values():
                processor._attention_backend = backend

        return setup, lambda: model(x, t, y)

    backends = ["_native_math"] + (["_native_efficient", "_native_cudnn", "flex"] if device.type == "cuda" else [])
    try:
        import xformers  # noqa: F401

        if device.type == "cuda":
            backends.append("xformers")
    except ImportError:
        pass
    variants = {REFERENCE: (attention_as(reference, NvidiaLikeAttention), lambda: reference(x, t, y))}
    naive = attention_as(reference, Attention)
    variants["reference, naive (benchmarks/reference_diffit.py)"] = (naive, lambda: reference(x, t, y))
    variants["DiffiT fused QKV, native"] = ours(fused, "native")
    footprints["DiffiT fused QKV, native"] = weight_bytes(fused)
    variants.update(quantized(official, quantization, x, t, y, footprints))
    if only_ours:  # (one model of ours: the machine may be short of memory)
        return variants
    variants["DiffiT unfused, native"] = ours(diffit, "native")
    for backend in backends:
        variants[f"DiffiT fused QKV, {backend}"] = ours(fused, backend)
    dit = DiTTransformer2DModel(sample_size=side, out_channels=8, num_embeds_ada_norm=1000).to(device, dtype).eval()
    variants["diffusers DiT-XL/2"] = (lambda: None, lambda: dit(x, t, y))
    variants["GEMM floor, F.linear"] = (lambda: None, gemm_floor(fused, lambda: fused(x, t, y), device, dtype))
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        floor = gemm_floor(fused, lambda: fused(x, t, y), device, dtype, onednn=True)
        variants["GEMM floor, oneDNN packed"] = (lambda: None, floor)
    return variants


@torch.no_grad()
def bench(resolution, device, dtype, batch, repeats, only_ours=False, quantization=()):
    footprints = {}
    variants = build(resolution, device, dtype, batch, footprints, only_ours, quantization)
    times = {name: [] for name in variants}
    memory = {}
    for name, (setup, run) in variants.items():  # warm-up (twice: first touch of fresh weights) + memory
        setup()
        run()
        run()
        synchronize(device)
        memory[name] = peak_memory(run, device)
    for _ in range(repeats):  # round-robin timing
        for name, (setup, run) in variants.items():
            setup()
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: [a / b for a, b in zip(v, times[REFERENCE])] for name, v in times.items()}
    floor = median.get("GEMM floor, F.linear")
    print(
        f"\n## DiffiT-XL/2 {resolution} px, batch {batch}, {device.type} {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, {repeats} rounds"
    )
    print(
        "| variant | latency (ms, median) | × NVIDIA-like (median of paired ratios) | ratio IQR | "
        "F.linear GEMM floor / latency | peak memory (MiB) | weights (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        q1, _, q3 = statistics.quantiles(ratios[name], n=4) if repeats > 1 else (ratios[name][0],) * 3
        share = f"{floor / median[name]:.1%}" if floor else "–"
        weights = f"{footprints[name] / 2**20:.0f}" if name in footprints else "–"
        print(
            f"| {name} | {median[name] * 1e3:.1f} | {statistics.median(ratios[name]):.3f} | {q1:.3f}–{q3:.3f} | "
            f"{share} | {memory[name] / 2**20:.0f} | {weights} |"
        )
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], choices=[256, 512])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--only",
        choices=["all", "ours"],
        default="all",
        help="'ours': only the two references and this package's default variants (quicker)",
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=[],
        choices=[v for v in QUANTIZATIONS if v != "fp32"],
        help="CPU: add this package's model loaded with these quantizations / dtypes (benchmarks/quant_study.py)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quantization and device.type != "cpu":
        parser.error(f"--quantization runs on the CPU; got --device {args.device}")
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float16]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, default attention backend "
        f"{_AttentionBackendRegistry.get_active_backend()[0].value}"
    )
    with INFERENCE_CACHES:  # closed at the end: the inference caches, the group-offload folders
        for resolution, dtype in itertools.product(args.resolutions, dtypes):
            bench(resolution, device, dtype, args.batch_size, args.repeats, args.only == "ours", args.quantization)


if __name__ == "__main__":
    main()
