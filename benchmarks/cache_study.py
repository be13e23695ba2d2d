"""diffusers' cache hooks on the latent digits model: transformer-block evaluations and wall time saved against the
digits judge's accuracy and FD, under the model's saved recipe and NVIDIA's official 250-step one.

    # MagCache ratios of a model (the shipped ones: `diffusers_diffit.models.cache.shipped_mag_ratios`): one
    # calibration run without skipping (`MagCacheConfig(calibrate=True)`) per recipe; --output writes them as JSON
    python -m benchmarks.cache_study calibrate --model PATH --recipe saved
    python -m benchmarks.cache_study calibrate --model digits-latent --recipe saved official \\
        --output diffusers_diffit/embedded/digits-latent/magcache.json
    # one JSON line per (recipe, cache setting, seed) appended to --results; every setting gets the same labels and
    # noise per seed as the no-cache baseline of the same run
    nice -n 10 python -m benchmarks.cache_study run --recipe saved --seeds 0 1 2 \\
        --results benchmarks/results/cache_digits_latent.jsonl
    nice -n 10 python -m benchmarks.cache_study run --recipe official --settings none fbc-0.05 mag-0.06 mag-0.12 \\
        taylorseer-2 pab-2 --seeds 0 1 2 --results benchmarks/results/cache_digits_latent.jsonl
    # the guidance interval, alone and with a cache (its own baseline, so its own results file)
    nice -n 10 python -m benchmarks.cache_study run --recipe saved --settings none interval-700 interval-550 \
        interval-400 interval-400+fbc-0.1 interval-250 interval-250+fbc-0.1 --seeds 0 1 2 \
        --results benchmarks/results/cache_interval_digits_latent.jsonl
    # the same at 5 steps, the fewest that keep NVIDIA's 250-step quality (benchmarks/nfe_study.py)
    nice -n 10 python -m benchmarks.cache_study run --recipe saved --steps 5 --settings none interval-400 \
        interval-400+fbc-0.1 interval-250 interval-250+fbc-0.1 --seeds 0 1 2 \
        --results benchmarks/results/cache_interval_5steps_digits_latent.jsonl
    # table (mean ± std over draws, ratios against the baseline) and the recommended setting per recipe
    python -m benchmarks.cache_study report --results benchmarks/results/cache_digits_latent.jsonl

Calibrating a user's own model (e.g. a converted ImageNet pipeline) is the same command with its folder and the
recipe it samples with (`--recipe official`: DDPM with learned-range variance, 250 steps, `official_scheduler()`),
on the device it samples on (`--device cuda`): the ratios printed (or written by --output) go to
`MagCacheConfig(mag_ratios=..., num_inference_steps=...)`. The ratios are per step of one scheduler and step count;
diffusers interpolates them to another count, which is only an approximation.

Recipes (`--recipe`): `saved` (the folder's scheduler and saved recipe; digits-latent: DPM-Solver++ 2M, 6 steps,
power-cosine guidance at w = 3 on 3 of 4 channels) and `official` (NVIDIA's sampler: `official_scheduler()`,
learned-range DDPM, 250 steps, with the folder's saved guidance; `OFFICIAL_RECIPES` holds NVIDIA's ImageNet w).

Settings (`SETTINGS`): `none` (the baseline), `fbc-T` (`FirstBlockCacheConfig(threshold=T)`), `mag-T`
(`MagCacheConfig(threshold=T)` with the shipped ratios of the recipe, diffusers' defaults otherwise: retention 0.2,
at most 3 skipped steps in a row), `taylorseer-N` (`TaylorSeerCacheConfig(cache_interval=N)`, first-order,
diffusers' defaults otherwise) and `pab-N` (`PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=N)`
in diffusers' timestep range (100, 800)). Not a cache, and combinable with one by "+": `interval-T`
(`guidance_interval=(0, T)`: the unconditional half runs only at timesteps up to T, which saves block evaluations where
the power-cosine weight w(t) is close to 1 anyway), e.g. `interval-400+fbc-0.1`.

Cost: block evaluations per sampled image: the attention computations of all blocks, counted by a forward hook on
each attention's time projection (which runs once per computation; a block that FirstBlockCache or MagCache skips
does not run its attention, PAB and TaylorSeer skip the attention alone and its block's MLP still runs), so the
count is exact and deterministic; the guided half of the batch counts like the conditional one. Wall time is the sampling call's
(measured on a shared machine: indicative only). Quality: the digits judge (`DigitsJudge`, accuracy and FD on MLP
and PCA-16 features), `--per-class` 20 = 200 samples per draw, decoded by the model's VAE.

Recommendation (`report`): per recipe, the setting with the fewest block evaluations whose mean FD-MLP over draws is
at most the baseline's mean + 1 std over draws and whose mean accuracy is at most 1 point below the baseline's
(`benchmarks/nfe_study.py`'s seed-noise rule).
"""

import argparse
import contextlib
import io
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from diffusers_diffit import DiffiTPipeline, official_scheduler
from diffusers_diffit.data.digits import digits_split
from diffusers_diffit.evaluation.digits import DigitsJudge, paired_difference, sample_digit_ink
from diffusers_diffit.models.cache import shipped_mag_ratios

from .nfe_study import load_records, model_path


logger = logging.getLogger("cache_study")
RECIPES = ("saved", "official")
OFFICIAL_STEPS = 250
METRICS = ("accuracy", "fd_mlp", "fd_pca")
# the settings `run` sweeps by default, per recipe: MagCache's accumulated error grows per step, so 6 steps need
# lower thresholds than 250
SETTINGS = {
    "saved": ("none", "fbc-0.05", "fbc-0.1", "fbc-0.2", "mag-0.01", "mag-0.03", "mag-0.06")
    + ("taylorseer-2", "taylorseer-3", "pab-2", "pab-3"),
    "official": ("none", "mag-0.06", "fbc-0.05", "taylorseer-2", "pab-2", "mag-0.12", "fbc-0.1")
    + ("taylorseer-3", "pab-3"),
}


def recipe_pipeline(folder: str, recipe: str) -> DiffiTPipeline:
    """The pipeline of `folder` under `recipe`: its own (saved), or NVIDIA's sampler at 250 steps (official)."""
    pipe = DiffiTPipeline.from_pretrained(folder)
    if recipe == "official":
        pipe.scheduler = official_scheduler()
        pipe.register_to_config(num_inference_steps=OFFICIAL_STEPS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cache_config(setting: str, pipe: DiffiTPipeline, mag_ratios: list[float] | None):
    """The diffusers cache config of `setting` (see the module docstring); None for the baseline."""
    if setting == "none":
        return None
    kind, value = setting.rsplit("-", 1)
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(value))
    if kind == "mag":
        steps = pipe.config.num_inference_steps
        return MagCacheConfig(threshold=float(value), num_inference_steps=steps, mag_ratios=mag_ratios)
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value))
    if kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(value), current_timestep_callback=lambda: pipe.current_timestep
        )
    raise ValueError(f"`--settings` {setting!r} is not one of fbc-T, mag-T, taylorseer-N, pab-N or none.")


def setting_parts(setting: str, pipe: DiffiTPipeline, mag_ratios: list[float] | None) -> tuple[object, dict]:
    """`setting` as (cache config or None, sampling kwargs): parts joined by "+", at most one cache, and
    `interval-T` for `guidance_interval=(0, T)` (no unconditional half above timestep T)."""
    config, call_kwargs = None, {}
    for part in setting.split("+"):
        if part.startswith("interval-"):
            call_kwargs["guidance_interval"] = (0.0, float(part.removeprefix("interval-")))
        elif config is None:
            config = cache_config(part, pipe, mag_ratios)
        else:
            raise ValueError(f"`--settings` {setting!r} names more than one cache.")
    return config, call_kwargs


def config_record(config) -> dict | None:
    """`config`'s fields as JSON values (tensors as lists, dtypes as text; the timestep callback left out)."""
    if config is None:
        return None
    fields = {k: v.tolist() if torch.is_tensor(v) else v for k, v in vars(config).items() if not callable(v)}
    return json.loads(json.dumps(fields, default=str))


def calibrate_ratios(pipe: DiffiTPipeline, per_class: int, seed: int) -> list[float]:
    """MagCache's magnitude ratios of one sampling run of `pipe` (`per_class` images of each of the first 10
    classes), one per step: the mean over tokens of |residual_t| / |residual_{t-1}| of the block stack (diffusers'
    calibration, which prints them at the end of the run; with guidance at every step the one context is the guided
    batch's)."""
    steps = pipe.config.num_inference_steps
    labels = list(range(min(10, pipe.transformer.config.num_classes)))
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipe(labels, num_images_per_label=per_class, generator=torch.manual_seed(seed), output_type="latent")
    pipe.transformer.disable_cache()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    return [round(r, 5) for r in json.loads(lines[-1])]


def calibrate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.num_threads)
    folder = model_path(args.model)
    shipped = {}
    for recipe in args.recipe:
        pipe = recipe_pipeline(folder, recipe).to(args.device)
        ratios = calibrate_ratios(pipe, args.per_class, args.seed)
        shipped[recipe] = {
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": pipe.config.num_inference_steps,
            "mag_ratios": ratios,
        }
        print(f"{recipe}: MagCacheConfig(num_inference_steps={len(ratios)}, mag_ratios={ratios})")
    if args.output:
        args.output.write_text(json.dumps(shipped, indent=1) + "\n")
        logger.info("wrote %s", args.output)


def run(args: argparse.Namespace) -> None:
    args.settings = args.settings or SETTINGS[args.recipe]
    if "none" not in args.settings:
        raise ValueError(f"`--settings` {args.settings} must include `none`: the baseline of the same run.")
    torch.set_num_threads(args.num_threads)
    pipe = recipe_pipeline(model_path(args.model), args.recipe)
    if args.steps is not None:
        pipe.register_to_config(num_inference_steps=args.steps)
    mag_ratios = shipped_mag_ratios(args.model, args.recipe) if any("mag-" in s for s in args.settings) else None
    evaluated = []  # images whose attention one block computed, per computation
    for block in pipe.transformer.transformer_blocks:
        attn = block.attn
        # the time projection runs once per attention computation, on temb [B, C_t]; a hook on `attn` itself would
        # also fire when a cache hook on it (PAB, TaylorSeer) returns a cached output
        time_projection = attn.to_qkv_time if attn.fused_projections else attn.to_q_time
        time_projection.register_forward_hook(lambda module, inputs, output: evaluated.append(len(inputs[0])))
    sample_digit_ink(pipe, 1, 0)  # warm-up, so that the first setting's time is not the only cold one
    judge = DigitsJudge(*digits_split()[:2])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        config, call_kwargs = setting_parts(setting, pipe, mag_ratios)
        if config is not None:
            pipe.transformer.enable_cache(config)
        for seed in args.seeds:
            evaluated.clear()
            start = time.perf_counter()
            ink, labels = sample_digit_ink(pipe, args.per_class, seed, **call_kwargs)
            seconds = time.perf_counter() - start
            scores = judge(ink, labels)
            record = {
                "model": args.model,
                "recipe": args.recipe,
                "scheduler": type(pipe.scheduler).__name__,
                "steps": pipe.config.num_inference_steps,
                "setting": setting,
                "config": config_record(config),
                "call_kwargs": call_kwargs,
                "seed": seed,
                "samples": len(labels),
                "block_evals": sum(evaluated) / len(labels),
                "seconds": round(seconds, 2),
                **{k: scores[k] for k in METRICS},
            }
            with open(args.results, "a") as f:
                f.write(json.dumps(record) + "\n")
            logger.info("%s", {k: record[k] for k in ("recipe", "setting", "seed", "block_evals", *METRICS)})
        if config is not None:
            pipe.transformer.disable_cache()


def report(args: argparse.Namespace) -> None:
    """Per recipe: a markdown table against the recipe's baseline and the recommended setting."""
    groups = defaultdict(list)
    for r in load_records(args.results):
        groups[(r["recipe"], r["setting"])].append(r)
    for recipe in RECIPES:
        baseline = groups.get((recipe, "none"))
        if not baseline:
            continue
        base = {k: np.mean([r[k] for r in baseline]) for k in ("block_evals", "seconds", *METRICS)}
        fd_limit = base["fd_mlp"] + np.std([r["fd_mlp"] for r in baseline])
        accuracy_limit = base["accuracy"] - 0.01
        print(f"\n{recipe} recipe ({baseline[0]['scheduler']}, {baseline[0]['steps']} steps)\n")
        print(
            "| setting | draws | block evals / image | fewer evals | time vs baseline | accuracy | FD-MLP | FD-PCA "
            "| ΔFD-MLP, paired |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        base_fd = {r["seed"]: r["fd_mlp"] for r in baseline}  # the same labels and noise per seed
        passing = []
        for (r_recipe, setting), rs in groups.items():
            if r_recipe != recipe:
                continue
            mean = {k: np.mean([r[k] for r in rs]) for k in ("block_evals", "seconds", *METRICS)}
            fd = [r["fd_mlp"] for r in rs]
            paired = [(r["fd_mlp"], base_fd[r["seed"]]) for r in rs if r["seed"] in base_fd]
            delta = "–"
            if len(paired) > 1:
                delta = "{:+.3f} ± {:.3f}".format(*paired_difference(*zip(*paired)))
            print(
                f"| {setting} | {len(rs)} | {mean['block_evals']:.0f} | {base['block_evals'] / mean['block_evals']:.2f}× "
                f"| {mean['seconds'] / base['seconds']:.2f} | {100 * mean['accuracy']:.1f} % "
                f"| {mean['fd_mlp']:.3f} ± {np.std(fd):.3f} | {mean['fd_pca']:.3f} | {delta} |"
            )
            complete = len(rs) == len(baseline)  # a setting with fewer draws than the baseline is not judged
            if complete and mean["fd_mlp"] <= fd_limit and mean["accuracy"] >= accuracy_limit:
                passing.append((mean["block_evals"], setting))
        best_evals, best = min(passing)
        print(
            f"\nwithin seed noise of the baseline (FD-MLP <= {fd_limit:.3f}, the baseline's mean + 1 std over "
            f"{len(baseline)} draws; accuracy >= {100 * accuracy_limit:.1f} %): recommended {best}, "
            f"{base['block_evals'] / best_evals:.2f}× fewer block evaluations"
        )


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("calibrate", help="MagCache ratios of a model under one or more recipes")
    c.add_argument("--model", default="digits-latent", help="pipeline folder, or a shipped model's name")
    c.add_argument("--recipe", nargs="+", choices=RECIPES, default=["saved"])
    c.add_argument("--per-class", type=int, default=2, help="images of each class in the calibration run")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--output", type=Path, default=None, help="write the ratios per recipe as JSON")
    c.add_argument("--device", default="cpu")
    c.add_argument("--num-threads", type=int, default=1)
    r = commands.add_parser("run", help="sample and score; appends to --results")
    r.add_argument("--model", default="digits-latent", help="pipeline folder, or a shipped model's name")
    r.add_argument("--recipe", choices=RECIPES, default="saved")
    r.add_argument("--settings", nargs="+", default=None, help="default: the recipe's `SETTINGS`")
    r.add_argument("--steps", type=int, default=None, help="sampling steps instead of the recipe's")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--per-class", type=int, default=20)
    r.add_argument("--num-threads", type=int, default=1)
    r.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "cache_digits_latent.jsonl")
    p = commands.add_parser("report", help="tables and recommendations from --results")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "cache_digits_latent.jsonl")
    args = parser.parse_args(argv)
    {"calibrate": calibrate, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
