"""Forward latency and peak memory of DiffiT-XL/2, side by side in one run.

Variants: this package's model with each processor / attention backend that runs on the device, the naive
official-layout reference from tests/reference_diffit.py, diffusers' DiTTransformer2DModel at DiT-XL/2 size, and a
"GEMM floor": the matmuls of the same linear layers alone (shapes recorded from a real forward), which no
implementation of this architecture can beat. Timings rotate through the variants round by round, so machine noise
spreads over all of them; ratios are against the naive reference of the same run.

    python benchmarks/bench_transformer.py                       # CPU fp32 (GPU: bf16 and fp16 too), 256 and 512 px
    python benchmarks/bench_transformer.py --resolutions 256 --repeats 5
"""

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.attention_dispatch import _AttentionBackendRegistry  # noqa: E402

from diffusers_diffit import DIFFIT_CONFIGS, DiffiTTransformer2DModel  # noqa: E402
from diffusers_diffit.loading import convert_state_dict, infer_config  # noqa: E402
from tests.reference_diffit import ReferenceDiffiT  # noqa: E402


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


def gemm_floor(model: nn.Module, run_model, device, dtype):
    """Record every nn.Linear call's (input rows, weight) during one forward; return a function replaying them."""
    shapes = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: shapes.append((args[0].numel() // m.in_features, m)))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    run_model()
    for h in hooks:
        h.remove()
    inputs = [(torch.randn(rows, m.in_features, device=device, dtype=dtype), m.weight, m.bias) for rows, m in shapes]

    def replay():
        for x, w, b in inputs:
            nn.functional.linear(x, w, b)

    return replay


def build(resolution: int, device, dtype, batch: int):
    config = DIFFIT_CONFIGS[f"DiffiT-XL/2-{resolution}"]
    side = config["sample_size"]
    reference = ReferenceDiffiT(input_size=side).to(device, dtype).eval()
    official = reference.state_dict()
    diffit, fused = (DiffiTTransformer2DModel(**infer_config(official)).eval() for _ in range(2))
    for model in (diffit, fused):
        model.load_state_dict(convert_state_dict(official, dict(model.config)))
        model.to(device, dtype)
    fused.fuse_qkv_projections()
    dit = DiTTransformer2DModel(sample_size=side, out_channels=8, num_embeds_ada_norm=1000).to(device, dtype).eval()

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
    variants = {"reference (naive, official layout)": (lambda: None, lambda: reference(x, t, y))}
    variants["DiffiT unfused, native"] = ours(diffit, "native")
    variants["DiffiT fused QKV, native"] = ours(fused, "native")
    for backend in backends:
        variants[f"DiffiT fused QKV, {backend}"] = ours(fused, backend)
    variants["diffusers DiT-XL/2"] = (lambda: None, lambda: dit(x, t, y))
    variants["GEMM floor"] = (lambda: None, gemm_floor(fused, lambda: fused(x, t, y), device, dtype))
    return variants


@torch.no_grad()
def bench(resolution, device, dtype, batch, repeats):
    variants = build(resolution, device, dtype, batch)
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
    base, floor = median["reference (naive, official layout)"], median["GEMM floor"]
    print(f"\n## DiffiT-XL/2 {resolution} px, batch {batch}, {device.type} {str(dtype).removeprefix('torch.')}, "
          f"median of {repeats}")
    print("| variant | latency (ms) | × reference | GEMM floor / latency | peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {median[name] * 1e3:.1f} | {median[name] / base:.3f} | {floor / median[name]:.1%} | "
              f"{memory[name] / 2**20:.0f} |")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], choices=[256, 512])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float16]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, default attention backend "
          f"{_AttentionBackendRegistry.get_active_backend()[0].value}")
    for resolution in args.resolutions:
        for dtype in dtypes:
            bench(resolution, device, dtype, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
