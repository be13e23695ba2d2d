"""torch.compile on the CPU: compile time and steady-state latency of whole-model compilation against diffusers'
regional `compile_repeated_blocks`, for DiffiT-XL/2 (random weights: speed does not depend on their values).

    python -m benchmarks.compile_study --threads 2                        # XL/2 at 256 px, batch 2, fp32
    python -m benchmarks.compile_study --threads 2 --variants eager regional --rounds 9

Variants, all with fused QKV projections (what `DiffiTPipeline` runs):
- `eager`: no compilation, inside `inference_cache()` (the pipeline's CPU fp32 path: oneDNN-packed weights);
- `whole`: `torch.compile(model, fullgraph=True)`;
- `regional`: `model.compile_repeated_blocks(fullgraph=True)` (one graph for all 28 alike blocks);
- `whole-frozen`, `regional-frozen`: the same with inductor's `freezing` (weights folded in as constants, which
  lets inductor pack them for oneDNN: inference only, and weights edited later are not seen).

Two measurements, so that neither flatters a variant:
- cold start, each variant in a fresh process with an empty inductor cache: the time of the first call, and of it
  the compile time (first call minus the median of the next three; for eager, the first call's own warm-up);
- steady state, every variant in one process, sharing one copy of the weights, timed round-robin: × is the median
  over rounds of each round's ratio to `eager`, with the interquartile range of those ratios; "pays back after" is
  the number of calls whose saving (eager's median latency × (1 − ×)) covers the compile time. The compiled
  outputs are compared with eager's.

Two threads that share their cores with another busy process make every parallel region wait for the preempted
thread: run it on a quiet machine, or the ratios mean nothing.
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffusers_diffit.configs import model_config


VARIANTS = ("eager", "whole", "regional", "whole-frozen", "regional-frozen")
WARM_CALLS = 3
REPOSITORY = Path(__file__).resolve().parents[1]


def build(name: str, variant: str, seed: int = 0):
    """The model of `variant`: its call, and (for eager) the inference cache it runs in."""
    model_cls, config = model_config(name)
    torch.manual_seed(seed)
    model = model_cls(**config).eval()
    model.fuse_qkv_projections()
    return compiled(model, variant)


def compiled(model, variant: str):
    if variant == "eager":
        return model
    options = {"freezing": True} if variant.endswith("-frozen") else None
    if variant.startswith("whole"):
        return torch.compile(model, fullgraph=True, options=options)
    model.compile_repeated_blocks(fullgraph=True, options=options)
    return model


def inputs(model, batch: int, seed: int = 1):
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return x, t, y


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def cold_start(args) -> dict:
    """Run in a fresh process: build the variant, time its first call and the next ones."""
    start = time.perf_counter()
    model = build(args.model, args.child)
    built = time.perf_counter() - start
    x, t, y = inputs(model, args.batch_size)
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    with base.inference_cache() if args.child == "eager" else torch.no_grad():
        first = timed(lambda: model(x, t, y))
        steady = statistics.median(timed(lambda: model(x, t, y)) for _ in range(WARM_CALLS))
    return {"variant": args.child, "build_s": built, "first_call_s": first, "steady_s": steady}


def run_cold_starts(args, cache_root: str) -> dict:
    """Each variant in a fresh process with an empty inductor cache directory of its own."""
    results = {}
    for variant in args.variants:
        cache = os.path.join(cache_root, variant)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        command = [sys.executable, "-m", "benchmarks.compile_study", "--child", variant, "--model", args.model]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        print(f"cold start: {variant} …", file=sys.stderr, flush=True)
        done = subprocess.run(command, env=env, cwd=REPOSITORY, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"cold start of {variant} failed:\n{done.stderr[-4000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@torch.no_grad()
def steady_state(args) -> tuple[dict, dict, dict]:
    """Every variant in this process, timed round-robin; returns per-variant times, ratios to eager and max |Δ|."""
    eager = build(args.model, "eager")
    shared = {id(tensor): tensor for tensor in [*eager.parameters(), *eager.buffers()]}  # one copy of the weights
    models = {v: compiled(copy.deepcopy(eager, dict(shared)), v) for v in args.variants if v != "eager"}
    models = {"eager": eager, **models}
    x, t, y = inputs(eager, args.batch_size)
    with eager.inference_cache():
        expected = eager(x, t, y).sample
        error = {}
        for variant, model in models.items():  # warm-up: compiles (the cache directory is warm by now)
            print(f"steady state: warming {variant} …", file=sys.stderr, flush=True)
            error[variant] = (model(x, t, y).sample - expected).abs().max().item()
            model(x, t, y)
        times = {v: [] for v in models}
        for round_ in range(args.rounds):
            for variant, model in models.items():
                times[variant].append(timed(lambda: model(x, t, y)))
            print(f"steady state: round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
    ratios = {v: [a / b for a, b in zip(times[v], times["eager"])] for v in models}
    return times, ratios, error


def report(args, cold: dict, times: dict, ratios: dict, error: dict) -> list[dict]:
    print(
        f"\n## {args.model}, batch {args.batch_size}, CPU float32, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.rounds} steady rounds"
    )
    print(
        "| variant | first call, cold (s) | of it compile or warm-up (s) | steady latency (s, median) | × eager (IQR) | "
        "pays back after (calls) | max abs diff vs eager |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    eager_steady = statistics.median(times["eager"])
    for variant in times:
        compile_s = cold[variant]["first_call_s"] - cold[variant]["steady_s"]
        steady = statistics.median(times[variant])
        ratio = statistics.median(ratios[variant])
        q1, _, q3 = statistics.quantiles(ratios[variant], n=4)
        saving = eager_steady * (1 - ratio)  # per call, from the paired ratio
        payback = f"{compile_s / saving:.0f}" if variant != "eager" and saving > 0 else "–"
        print(
            f"| {variant} | {cold[variant]['first_call_s']:.1f} | {compile_s:.1f} | {steady:.3f} | "
            f"{ratio:.3f} ({q1:.3f}–{q3:.3f}) | {payback} | {error[variant]:.1e} |"
        )
        rows.append(
            dict(
                cold[variant],
                model=args.model,
                batch=args.batch_size,
                threads=torch.get_num_threads(),
                torch=torch.__version__,
                compile_s=compile_s,
                steady_median_s=steady,
                ratio_to_eager=ratio,
                ratio_iqr=[q1, q3],
                max_abs_diff=error[variant],
            )
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiffiT-XL/2-256", help="a name from diffusers_diffit.configs")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--rounds", type=int, default=7, help="steady-state rounds (≥ 2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output", default=None, help="append one JSON line per variant to this file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one cold start, in a fresh process
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2, got {args.rounds}")
    try:
        model_config(args.model)  # an unknown name fails here, before any work
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(cold_start(args)))
        return
    args.variants = ["eager"] + [v for v in args.variants if v != "eager"]
    cache_root = tempfile.mkdtemp(prefix="diffit-compile-")
    try:
        cold = run_cold_starts(args, cache_root)
        steady_cache = os.path.join(cache_root, "steady")  # the cold starts' caches, merged: compiles are warm here
        for variant in args.variants:
            shutil.copytree(os.path.join(cache_root, variant), steady_cache, dirs_exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = steady_cache
        times, ratios, error = steady_state(args)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    rows = report(args, cold, times, ratios, error)
    if args.output:
        with open(args.output, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
