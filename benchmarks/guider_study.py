"""diffusers' guiders against DiffiT's own guidance recipe on the latent digits model, each at its best scale.

    # one JSON line per (guider, scale, seed) appended to --results; the model's saved sampler (digits-latent:
    # DPM-Solver++ 2M, 6 steps) for every guider, 200 samples per draw, the same labels and noise per seed
    nice -n 10 python -m benchmarks.guider_study run --seeds 0 1 2 --results benchmarks/results/guiders_digits_latent.jsonl
    # markdown table (mean ± std over draws), each guider's best scale (lowest mean FD-MLP) and its paired FD
    # difference to the saved recipe (the same labels and noise per seed)
    python -m benchmarks.guider_study report --results benchmarks/results/guiders_digits_latent.jsonl

Guiders (`--guiders`, default all) and the scales swept (`SWEEP`):
- `diffit`: DiffiT's recipe (`pipe.guider = None`): the model's saved schedule (digits-latent: power-cosine, p = 4,
  3 of 4 channels guided) at w = scale (the saved w is 3).
- `cfg`: `ClassifierFreeGuidance(guidance_scale=w)`, ε̃ = ε_u + w·(ε_c − ε_u) on every channel at every step.
- `cfg-zero-star`: `ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=0)`; its default of one zeroed
  first step is swept as `cfg-zero-star-init1` (for flow models a zero velocity keeps x; for this ε-model a zero ε
  makes the first DPM-Solver step scale x by √(ᾱ_next/ᾱ_T)).
- `apg`: `AdaptiveProjectedGuidance(guidance_scale=w, eta=0, adaptive_projected_guidance_momentum=-0.5)`, the APG
  paper's choices (the parallel part of the update dropped, negative momentum), diffusers' norm cap (15).
- `slg`: `SkipLayerGuidance(guidance_scale=1.5, skip_layer_guidance_scale=s, skip_layer_guidance_layers=[2])` over
  the whole run (start 0, stop 1; diffusers skips the skip term at the first step): CFG at w = 1.5 plus s times the
  difference to the model without its middle block (of 5).

Scoring: the digits judge (`diffusers_diffit.evaluation.digits.DigitsJudge`: SVM accuracy, Fréchet distance on
MLP and PCA-16 features), `--per-class` 20 = 200 samples per draw, decoded by the model's VAE. Each record also
holds `network_evals`: the images the model processed per sampled image (counted by a forward hook), the cost.
"""

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    SkipLayerGuidance,
)

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.data.digits import digits_split
from diffusers_diffit.embedded import EMBEDDED_MODELS
from diffusers_diffit.evaluation.digits import DigitsJudge, paired_difference, sample_digit_ink


logger = logging.getLogger("guider_study")

# guider name -> (scales swept, scale -> guider; None = DiffiT's recipe at w = scale)
SWEEP = {
    "diffit": ((1.5, 2.0, 3.0), lambda w: None),
    "cfg": ((1.25, 1.5, 2.0), lambda w: ClassifierFreeGuidance(guidance_scale=w)),
    "cfg-zero-star": (
        (1.25, 1.5, 2.0),
        lambda w: ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=0),
    ),
    "cfg-zero-star-init1": ((1.5,), lambda w: ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1)),
    "apg": (
        (1.5, 2.0, 3.0),
        lambda w: AdaptiveProjectedGuidance(guidance_scale=w, eta=0.0, adaptive_projected_guidance_momentum=-0.5),
    ),
    "slg": (
        (0.5, 1.0, 2.0),
        lambda s: SkipLayerGuidance(
            guidance_scale=1.5,
            skip_layer_guidance_scale=s,
            skip_layer_guidance_layers=[2],
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
        ),
    ),
}
METRICS = ("accuracy", "fd_mlp", "fd_pca")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.num_threads)
    pipe = DiffiTPipeline.from_pretrained(
        embedded_model_path(args.model) if args.model in EMBEDDED_MODELS else args.model
    )
    pipe.set_progress_bar_config(disable=True)
    saved_scale = pipe.config.guidance_scale
    processed = []
    pipe.transformer.register_forward_pre_hook(lambda module, inputs: processed.append(len(inputs[0])))
    train_ink, train_labels, _, _ = digits_split()
    judge = DigitsJudge(train_ink, train_labels)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in args.guiders:
        scales, make_guider = SWEEP[name]
        for scale in scales:
            pipe.guider = make_guider(scale)
            # DiffiT's recipe: the saved one at w = scale; a guider: its own config (recipe arguments are refused)
            kwargs = {"guidance_scale": scale} if pipe.guider is None else {}
            for seed in args.seeds:
                processed.clear()
                start = time.time()
                scores = judge(*sample_digit_ink(pipe, args.per_class, seed, **kwargs))
                record = {
                    "model": args.model,
                    "guider": name,
                    "scale": scale,
                    "saved_recipe": name == "diffit" and scale == saved_scale,
                    "config": None if pipe.guider is None else dict(pipe.guider.config),
                    "steps": pipe.config.num_inference_steps,
                    "seed": seed,
                    "samples": 10 * args.per_class,
                    "network_evals": sum(processed) / (10 * args.per_class),
                    "seconds": round(time.time() - start, 1),
                    **{k: scores[k] for k in METRICS},
                }
                with open(args.results, "a") as f:
                    f.write(json.dumps(record) + "\n")
                logger.info("%s", {k: record[k] for k in ("guider", "scale", "seed", *METRICS)})


def report(args: argparse.Namespace) -> None:
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    groups = defaultdict(list)
    for r in records:
        groups[(r["guider"], r["scale"])].append(r)

    def mean_std(rows, key):
        values = np.array([r[key] for r in rows])
        return values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0

    print("| guider | scale | draws | accuracy | FD (MLP) | FD (PCA-16) | network evals / image |")
    print("|---|---|---|---|---|---|---|")
    best = {}
    for (guider, scale), rows in groups.items():
        stats = {k: mean_std(rows, k) for k in METRICS}
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in stats.values())
        print(f"| {guider} | {scale:g} | {len(rows)} | {cells} | {rows[0]['network_evals']:g} |")
        if guider not in best or stats["fd_mlp"][0] < best[guider][1]["fd_mlp"][0]:
            best[guider] = (scale, stats, rows[0]["network_evals"])
    # the same labels and initial noise per seed for every guider: differences to the saved recipe are paired
    saved = {r["seed"]: r["fd_mlp"] for r in records if r["saved_recipe"]}
    print("\nBest scale per guider (lowest mean FD-MLP); ΔFD: paired FD-MLP difference to the saved recipe, ± SE:\n")
    print("| guider | best scale | accuracy | FD (MLP) | FD (PCA-16) | ΔFD (MLP) | network evals / image |")
    print("|---|---|---|---|---|---|---|")
    for guider, (scale, stats, evals) in sorted(best.items(), key=lambda item: item[1][1]["fd_mlp"][0]):
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in stats.values())
        rows = [r for r in groups[(guider, scale)] if r["seed"] in saved]
        delta = "n/a"
        if len(rows) >= 2:
            mean, se = paired_difference([r["fd_mlp"] for r in rows], [saved[r["seed"]] for r in rows])
            delta = f"{mean:+.3f} ± {se:.3f}"
        print(f"| {guider} | {scale:g} | {cells} | {delta} | {evals:g} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="sample and judge every guider at every scale of SWEEP")
    run_parser.add_argument("--model", default="digits-latent", help="a shipped 10-class model or a pipeline folder")
    run_parser.add_argument("--guiders", nargs="+", choices=list(SWEEP), default=list(SWEEP))
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one draw per seed")
    run_parser.add_argument("--per-class", type=int, default=20, help="samples per digit and draw")
    run_parser.add_argument("--num-threads", type=int, default=1)
    run_parser.add_argument("--results", type=Path, default=Path("benchmarks/results/guiders_digits_latent.jsonl"))
    report_parser = commands.add_parser("report", help="table of the results and each guider's best scale")
    report_parser.add_argument("--results", type=Path, default=Path("benchmarks/results/guiders_digits_latent.jsonl"))
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.per_class < 1:
            parser.error(f"--per-class must be >= 1, got {args.per_class}")
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
