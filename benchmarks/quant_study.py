"""Judged quality of quantized and lower-precision `digits-latent` against float32, in one run.

Each variant is the shipped latent digits pipeline loaded through diffusers' own API: `torch_dtype=torch.bfloat16`;
torchao int8 weight-only and int8 dynamic-activation through `PipelineQuantizationConfig(quant_mapping=
{"transformer": TorchAoConfig(...)})` (in bfloat16: diffusers' torchao path computes the rest of the model in
bfloat16); quanto int8 weights (`QuantoConfig`, float32 activations); fp8 (e4m3) weight storage with float32 compute
(`enable_layerwise_casting`); block-level group offloading to disk (`enable_group_offload(offload_to_disk_path=...)`,
onload device CPU); and int8 dynamic quantization through PyTorch 2 export and inductor (`pt2e-int8-dynamic`,
`diffusers_diffit.compile_int8_dynamic`: oneDNN's int8 kernels, the int8 path that is faster than float32 on x86
CPUs) and bfloat16 compiled with inductor's freezing (`bf16-compile-frozen`, `diffusers_diffit.compile_frozen`); see
benchmarks/precision_study.py. Every variant samples the pipeline's saved recipe with the same labels and initial
noise per seed and is scored by the digits judge (`diffusers_diffit.evaluation.digits`): accuracy, FD on MLP and PCA features.

    python -m benchmarks.quant_study --seeds 0 1 2 --results benchmarks/results/quant_digits_latent.jsonl
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import PipelineQuantizationConfig, QuantoConfig, TorchAoConfig

from diffusers_diffit import DiffiTPipeline, compile_frozen, compile_int8_dynamic, embedded_model_path
from diffusers_diffit.data.digits import digits_split
from diffusers_diffit.evaluation.digits import DigitsJudge, sample_digit_ink


HERE = Path(__file__).resolve().parent


def transformer_kwargs(variant: str) -> dict:
    """The `from_pretrained` keyword arguments (quantization config, dtype) of the transformer of `variant`."""
    if variant in ("bf16", "bf16-compile-frozen"):
        return dict(torch_dtype=torch.bfloat16)
    if variant.startswith("torchao-"):
        from torchao import quantization

        name = {
            "torchao-int8-weight-only": "Int8WeightOnlyConfig",
            "torchao-int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
        }[variant]
        return dict(quantization_config=TorchAoConfig(getattr(quantization, name)()), torch_dtype=torch.bfloat16)
    if variant == "quanto-int8":
        return dict(quantization_config=QuantoConfig("int8"))
    if variant not in VARIANTS + COMPILED_VARIANTS:
        raise ValueError(f"`variant` {variant!r} is not one of {VARIANTS + COMPILED_VARIANTS}.")
    return {}


def prepare(transformer, variant: str, workdir: str) -> None:
    """What `variant` does to a loaded transformer: fp8 weight storage, group offloading to disk, the compiled int8
    graph or the compiled bfloat16 one."""
    if variant == "pt2e-int8-dynamic":
        compile_int8_dynamic(transformer)
    elif variant == "bf16-compile-frozen":
        compile_frozen(transformer)
    elif variant == "fp8-storage":
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    elif variant == "group-offload-disk":
        transformer.enable_group_offload(
            torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=workdir
        )


def load(variant: str, path: str, workdir: str) -> DiffiTPipeline:
    """The pipeline at `path` with its transformer as `variant` makes it; a quantization config goes through
    `PipelineQuantizationConfig(quant_mapping={"transformer": ...})`, a dtype applies to the whole pipeline."""
    kwargs = transformer_kwargs(variant)
    if "quantization_config" in kwargs:
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_mapping={"transformer": kwargs["quantization_config"]}
        )
    pipe = DiffiTPipeline.from_pretrained(path, **kwargs)
    prepare(pipe.transformer, variant, workdir)
    return pipe


VARIANTS = (
    "fp32",
    "bf16",
    "torchao-int8-weight-only",
    "torchao-int8-dynamic",
    "quanto-int8",
    "fp8-storage",
    "group-offload-disk",
)
COMPILED_VARIANTS = (
    "pt2e-int8-dynamic",
    "bf16-compile-frozen",
)  # not loaded by diffusers' API alone: its weight bytes are not counted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variants = VARIANTS + COMPILED_VARIANTS
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit and seed")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "quant_digits_latent.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    path = str(embedded_model_path("digits-latent"))
    judge = DigitsJudge(*digits_split()[:2])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as workdir:
            pipe = load(variant, path, workdir)
            for seed in args.seeds:
                start = time.perf_counter()
                scores = judge(*sample_digit_ink(pipe, args.per_class, seed))
                record = {"model": "digits-latent", "variant": variant, "seed": seed, "per_class": args.per_class}
                record.update(seconds=round(time.perf_counter() - start, 2), **scores)
                with open(args.results, "a") as f:
                    f.write(json.dumps(record) + "\n")
                rows.setdefault(variant, []).append(record)
    print(f"\n| variant | accuracy | FD (MLP) | FD (PCA) | seconds / draw |  ({len(args.seeds)} seeds, mean ± std)")
    print("|---|---:|---:|---:|---:|")
    for variant, records in rows.items():
        cells = []
        for key in ("accuracy", "fd_mlp", "fd_pca", "seconds"):
            values = [r[key] for r in records]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
