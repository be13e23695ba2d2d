"""Sample quality of the shipped digits model, next to real held-out digits and a diffusers UNet2DModel baseline.

    bash benchmarks/digits_seeds.sh outputs/seeds 0 1 2 3   # train DiffiT and the U-Net per seed, then this table
    python -m benchmarks.quality_digits --diffit outputs/seeds/diffit_s* --unet outputs/seeds/unet_s*
    python -m benchmarks.quality_digits   # the shipped model alone

Protocol (the judge is `diffusers_diffit.evaluation.digits`; the split and the 16×16 ↔ 8×8 maps are
`diffusers_diffit.data.digits`):
- 500 samples per model and draw, 50 per class, through `DiffiTPipeline` with the scheduler, steps and guidance of
  the first DiffiT pipeline (the shipped one by default) for every model, same seeds.
- several folders per architecture (one per training seed, all pipeline folders written by train_diffit.py): a row
  each (spread over the draws), then a "mean over N trainings" row whose ± is the spread over the trainings, which
  is what comparing architectures needs.
- metrics: SVM accuracy, Fréchet distance on MLP and PCA-16 features of 8×8 ink, nearest-neighbour distance (see
  the judge). Real-vs-real: the 500 held-out digits, which the models never saw, against the same reference.
- as many DiffiT as U-Net folders (two or more): they are paired in the order given (pass the same training seeds
  in the same order, as `digits_seeds.sh` does), and the last line is the paired difference DiffiT − U-Net of each
  metric, mean ± standard error over the pairs, with its t statistic.
Targets (issue 4): accuracy >= 98 %, FD <= 2x real-vs-real, DiffiT at least as good as the U-Net.
"""

import argparse
import time

import numpy as np
import torch

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.data.digits import NUM_CLASSES, digits_split
from diffusers_diffit.evaluation.digits import DigitsJudge, paired_difference, sample_digit_ink
from diffusers_diffit.pipelines import RECIPE_KEYS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--diffit",
        nargs="+",
        default=None,
        help="DiffiT pipeline folder(s), e.g. one per training seed (default: the shipped model)",
    )
    parser.add_argument(
        "--unet", nargs="+", default=[], help="UNet2DModel pipeline folder(s) from train_diffit.py --architecture unet"
    )
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="override the pipeline's steps for both models")
    parser.add_argument("--guidance-scale", type=float, default=None, help="override for both models")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one 500-image draw per seed")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument(
        "--device", default="cpu", help="where the models sample, e.g. cuda (same noise: CPU generator)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)

    train_ink, train_labels, held_out_ink, held_out_labels = digits_split()
    judge = DigitsJudge(train_ink, train_labels)
    diffit_paths = args.diffit or [embedded_model_path("digits")]
    diffit = [DiffiTPipeline.from_pretrained(path) for path in diffit_paths]
    unet = [DiffiTPipeline.from_pretrained(path) for path in args.unet]
    # every model samples with the first DiffiT pipeline's scheduler and recipe (overrides from the flags)
    recipe = {k: diffit[0].config[k] for k in RECIPE_KEYS}
    recipe.update(
        {
            k: v
            for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance_scale))
            if v is not None
        }
    )
    for pipe in diffit + unet:
        pipe.scheduler = type(diffit[0].scheduler).from_config(diffit[0].scheduler.config)
    families = [("DiffiTUNet2DModel", diffit_paths, diffit), ("diffusers UNet2DModel", args.unet, unet)]
    real = judge(held_out_ink, held_out_labels)
    rows = [("real held-out digits", "-", {k: [v] for k, v in real.items()})]
    per_family = []  # each family's trainings: {metric: mean over the draws}
    for name, paths, pipes in families:
        trainings = []
        per_family.append(trainings)
        for path, pipe in zip(paths, pipes):
            pipe.to(args.device).set_progress_bar_config(disable=True)
            start, runs = time.time(), []
            for seed in args.seeds:
                runs.append(judge(*sample_digit_ink(pipe, args.per_class, seed, **recipe)))
            seconds = (time.time() - start) / len(args.seeds)
            draws = {k: [r[k] for r in runs] for k in runs[0]}
            label = name if len(paths) == 1 else f"{name} `{path}`"
            rows.append((f"{label} ({seconds:.0f} s / draw)", f"{pipe.transformer.num_parameters():,}", draws))
            trainings.append({k: float(np.mean(v)) for k, v in draws.items()})
        if len(trainings) > 1:  # the spread over training runs, not over sampling draws
            over = {k: [t[k] for t in trainings] for k in trainings[0]}
            rows.append((f"**{name}, mean over {len(trainings)} trainings**", rows[-1][1], over))

    print(
        f"{NUM_CLASSES * args.per_class} images per draw, seeds {args.seeds}; mean ± std over the draws, or over the "
        f"trainings in a 'mean over' row; {type(diffit[0].scheduler).__name__}, "
        f"{recipe['num_inference_steps']} steps, guidance {recipe['guidance_scale']} "
        f"({recipe['guidance_schedule']}, interval {recipe['guidance_interval']})"
    )
    print("| images | params | SVM accuracy | FD, MLP features (× real) | FD, PCA-16 (× real) | NN distance |")
    print("|---|---|---|---|---|---|")
    for name, params, m in rows:
        cells = [_cell(100 * np.array(m["accuracy"]), "{:.1f} %")]
        cells += [_cell(np.array(m[k]), "{:.3f}", real[k]) for k in ("fd_mlp", "fd_pca")]
        print(f"| {name} | {params} | " + " | ".join(cells) + f" | {np.mean(m['nn']):.3f} |")
    diffit_runs, unet_runs = per_family
    if len(diffit_runs) == len(unet_runs) > 1:
        cells = []
        for key, scale, digits, unit in (
            ("accuracy", 100, 2, " pt"),
            ("fd_mlp", 1, 3, ""),
            ("fd_pca", 1, 3, ""),
            ("nn", 1, 3, ""),
        ):
            mean, se = paired_difference([scale * t[key] for t in diffit_runs], [scale * t[key] for t in unet_runs])
            t_stat = mean / se if se else float("nan")
            cells.append(f"{key} {mean:+.{digits}f} ± {se:.{digits}f}{unit} (t = {t_stat:+.1f})")
        print(f"DiffiT − U-Net over {len(diffit_runs)} paired trainings (mean ± standard error): " + ", ".join(cells))


def _cell(values: np.ndarray, fmt: str, real: float | None = None) -> str:
    text = fmt.format(values.mean()) + (f" ± {fmt.format(values.std())}" if len(values) > 1 else "")
    return text if real is None else f"{text} ({values.mean() / real:.2f}×)"


if __name__ == "__main__":
    main()
