"""Where DiffiT-XL/2's CPU time goes, per precision, and whether bfloat16 or int8 can beat float32 on this CPU.

Two parts, one run (DiffiT-XL/2, 256 px, batch 2, the reference's random weights, as benchmarks/bench_transformer.py):

1. **GEMM kernels.** Every linear layer's call of one forward is recorded (input rows, weight) and replayed through
   each precision's CPU kernel, with inputs of the recorded shapes: float32 through oneDNN with packed weights (what
   `inference_cache()` runs); bfloat16 through `F.linear`; int8 weights with bfloat16 activations through
   `_weight_int8pack_mm` (torchao's int8 weight-only kernel on the CPU); int8 dynamic quantization through oneDNN's
   `qlinear_pointwise` (what `compile_int8_dynamic` compiles to), activations quantized per tensor at run time, with
   8-bit and with 7-bit activations. (torchao's int8 dynamic path on the CPU, `torch._int_mm`, is left out: on CPUs
   without VNNI it runs a reference loop, about 60× slower than float32 here; bench_transformer times it whole.)
   Each row: time, GFLOP/s, speed against float32 and the relative RMS error of the outputs against float32's.
   The last column bounds the whole forward (Amdahl): with the linear layers taking share s of the float32
   forward, a kernel g times faster makes the forward at most 1 / ((1 − s) + s / g) times faster.
2. **Whole forwards**, timed round-robin and paired against float32 eager (`inference_cache()`, this package's CPU
   path): float32 with `compile_repeated_blocks` (the compiler's gains alone); bfloat16 eager (what
   `from_pretrained(..., torch_dtype=torch.bfloat16)` gives) and through `compile_frozen` (inductor with freezing:
   weights packed for oneDNN's bfloat16 GEMMs, AMX where the CPU has it); and `compile_int8_dynamic` (int8 dynamic quantization
   through PyTorch 2 export and inductor, 7-bit activations where the CPU lacks VNNI); compile times in this
   process, relative RMS error of the output against float32.

    python -m benchmarks.precision_study --threads 2 --repeats 5

Judged quality of the int8 path on `digits-latent`: `python -m benchmarks.quant_study --variants fp32
pt2e-int8-dynamic`.
"""

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from benchmarks.bench_transformer import record_linears
from benchmarks.reference_diffit import ReferenceDiffiT
from diffusers_diffit import DIFFIT_CONFIGS, DiffiTTransformer2DModel, compile_frozen, compile_int8_dynamic
from diffusers_diffit.cpu_inference import has_vnni
from diffusers_diffit.loading import convert_state_dict, infer_config


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first touch of fresh buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_of(model: DiffiTTransformer2DModel) -> DiffiTTransformer2DModel:
    copy = DiffiTTransformer2DModel.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def quantize_activation(x: torch.Tensor, levels: int):
    """Per-tensor asymmetric uint8 quantization on [0, levels] (255: 8 bits, 127: 7 bits), as PT2E's dynamic
    quantization computes it at run time."""
    low, high = torch.aminmax(x)
    scale = (high.clamp(min=0) - low.clamp(max=0)) / levels
    zero_point = (-low.clamp(max=0) / scale).round()
    return (x / scale + zero_point).round().clamp(0, levels).to(torch.uint8), scale, zero_point.long()


def kernels(x: torch.Tensor, linear: nn.Linear) -> dict:
    """For one recorded call (input `x`, layer `linear`): each precision's kernel with its weights prepared, as a
    function of no arguments returning the float output."""
    w, b = linear.weight.detach(), linear.bias.detach() if linear.bias is not None else None
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16() if b is not None else None
    scale = w.abs().amax(dim=1) / 127  # [out]: per-channel symmetric int8 weights
    qw = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    q_packed = torch.ops.onednn.qlinear_prepack(qw, list(x.shape))
    w_zero = torch.zeros(len(qw), dtype=torch.long)

    def onednn_int8(levels):
        def run():
            qx, x_scale, x_zero = quantize_activation(x, levels)
            return torch.ops.onednn.qlinear_pointwise.tensor(
                qx, x_scale, x_zero, q_packed, scale, w_zero, b, 1.0, 0, torch.float32, "none", [], ""
            )

        return run

    return {
        "float32, oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
        "bfloat16, F.linear": lambda: nn.functional.linear(xb, wb, bb),
        "int8 weights, bf16 activations (_weight_int8pack_mm)": lambda: (
            torch.ops.aten._weight_int8pack_mm(xb, qw, scale.bfloat16()) + (bb if bb is not None else 0)
        ),
        "int8 dynamic, oneDNN, 8-bit activations": onednn_int8(255),
        "int8 dynamic, oneDNN, 7-bit activations": onednn_int8(127),
    }


def gemm_table(model, inputs, repeats: int, forward_time: float) -> None:
    calls = record_linears(model, lambda: model(*inputs))
    torch.manual_seed(0)
    prepared = [kernels(torch.randn(rows, m.in_features), m) for rows, m in calls]
    flops = sum(2 * rows * m.in_features * m.out_features for rows, m in calls)
    names = list(prepared[0])
    outputs = {name: [k[name]() for k in prepared] for name in names}
    times = {name: median_time(lambda name=name: [k[name]() for k in prepared], repeats) for name in names}
    base = times[names[0]]
    share = base / forward_time
    print(f"\n### GEMM kernels: the {len(calls)} linear calls of one forward, {flops / 1e9:.0f} GFLOP")
    print(f"float32 forward {forward_time * 1e3:.0f} ms, of which the float32 linear layers {share:.0%}\n")
    print("| kernel | ms | GFLOP/s | × float32 speed | rel. RMS error vs float32 | forward speed-up bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        error = statistics.fmean(relative_error(o, r) for o, r in zip(outputs[name], outputs[names[0]]))
        speed = base / times[name]
        # Amdahl's bound holds only where the replayed GEMMs take less time than the forward they came from
        bound = f"{1 / ((1 - share) + share / speed):.2f}×" if share <= 1 else "–"
        print(
            f"| {name} | {times[name] * 1e3:.0f} | {flops / times[name] / 1e9:.1f} | {speed:.2f} | {error:.2e} | "
            f"{bound} |"
        )


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {capability}, "
        f"VNNI: {'yes' if has_vnni() else 'no'}"
    )
    config = DIFFIT_CONFIGS["DiffiT-XL/2-256"]
    official = ReferenceDiffiT(input_size=config["sample_size"]).state_dict()
    model = DiffiTTransformer2DModel(**infer_config(official)).eval()
    model.load_state_dict(convert_state_dict(official, dict(model.config)))
    side, batch = config["sample_size"], args.batch_size
    x = torch.randn(batch, 4, side, side)
    inputs = (x, torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,)))

    variants, compile_seconds = {}, {}
    with model.inference_cache(), contextlib.ExitStack() as caches:
        variants["float32, eager (inference_cache)"] = lambda: model(*inputs).sample
        reference = variants["float32, eager (inference_cache)"]()
        forward_time = median_time(variants["float32, eager (inference_cache)"], args.repeats)
        gemm_table(model, inputs, args.repeats, forward_time)

        regional = copy_of(model)
        regional.compile_repeated_blocks(fullgraph=True)
        variants["float32, compile_repeated_blocks"] = lambda: regional(*inputs).sample
        bf16 = caches.enter_context(copy_of(model).to(torch.bfloat16).inference_cache())  # as the pipeline runs it
        bf16_inputs = (x.bfloat16(), *inputs[1:])
        variants["bfloat16, eager"] = lambda: bf16(*bf16_inputs).sample.float()
        bf16_frozen = copy_of(model).to(torch.bfloat16)
        compile_frozen(bf16_frozen, fullgraph=True)
        variants["bfloat16, compile_frozen"] = lambda: bf16_frozen(*bf16_inputs).sample.float()
        int8 = copy_of(model)
        start = time.perf_counter()
        compile_int8_dynamic(int8)
        compile_seconds["int8 dynamic, compile_int8_dynamic"] = time.perf_counter() - start  # export + convert
        variants["int8 dynamic, compile_int8_dynamic"] = lambda: int8(*inputs).sample

        outputs = {}
        for name, run in variants.items():  # first calls: compile (timed) and warm-up
            start = time.perf_counter()
            outputs[name] = run()
            compile_seconds[name] = compile_seconds.get(name, 0.0) + time.perf_counter() - start
            run()
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    baseline = times["float32, eager (inference_cache)"]
    print(f"\n### Whole forwards, {args.repeats} rounds, paired against float32 eager")
    print("| variant | ms (median) | speed-up (median of paired ratios) | IQR | first call (s) | rel. RMS error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in times.items():
        ratios = [b / v for b, v in zip(baseline, values)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        print(
            f"| {name} | {statistics.median(values) * 1e3:.0f} | {statistics.median(ratios):.2f}× | "
            f"{q1:.2f}–{q3:.2f} | {compile_seconds[name]:.1f} | {relative_error(outputs[name], reference):.2e} |"
        )


if __name__ == "__main__":
    main()
