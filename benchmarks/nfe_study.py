"""Sample quality against the number of model calls, for several samplers, with guidance at every step or only in a
limited interval of noise levels (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample
and distribution quality in diffusion models"). Made for learned-variance (DDPM-family) models: how few calls keep
the quality of NVIDIA's 250-step sampler, and what the learned variance buys.

    # the latent digits model (`--model digits-latent`, CPU), NVIDIA's guidance recipe at w = 2: one JSON line per
    # (sampler, calls, guidance, draw) appended to --results
    python -m benchmarks.nfe_study run --model digits-latent --recipe official --guidance-scale 2 \\
        --samplers ddpm ddpm-fixed ddim dpmpp-2m dpmpp-2m-karras unipc-2 euler --calls 250 100 50 25 12 \\
        --guidance full --seeds 0 1 2 3 4 --results benchmarks/results/nfe_digits_latent.jsonl
    # markdown table, the fewest calls within the baseline's seed noise, and a PNG
    python -m benchmarks.nfe_study report --results benchmarks/results/nfe_digits_latent.jsonl \\
        --baseline ddpm full 250 --plot docs/nfe_digits_latent.png

    # the shipped EDM digits model (the default `--model digits`)
    python -m benchmarks.nfe_study run --samplers edm-heun edm-euler dpmpp-2m --calls 6 8 10 12 --seeds 0
    python -m benchmarks.nfe_study report --plot docs/nfe_digits.png

    # a converted ImageNet pipeline (GPU): FID of `diffusers_diffit.evaluation` against ADM's reference batch
    python -m benchmarks.nfe_study run --model DiffiT-XL-2-256 --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --num-samples 10000 --batch-size 125 \\
        --device cuda --samplers ddpm dpmpp-2m dpmpp-3m unipc-2 --calls 250 12 18 25 --guidance full \\
        --results nfe_imagenet256.jsonl

`--model` is a pipeline folder or the name of a shipped model (`diffusers_diffit.embedded.EMBEDDED_MODELS`). Model
calls are the sequential network evaluations of one sampling run (`len(scheduler.timesteps)`): N steps of EDM's Heun
sampler are 2N − 1 calls, every other sampler here makes one call per step. Classifier-free guidance doubles the batch
of a call, not the number of calls; each record also holds `network_evals` = calls + guided calls (the cost in
forward passes of one image), which a limited guidance interval lowers.

Samplers (`--samplers`, default: all of the model's family), by the model's `denoiser_type`:
- EDM (the digits model): `edm-heun` (this package's `EDMHeunScheduler`), `edm-euler` (`EDMEulerScheduler`),
  `dpmpp-2m` / `dpmpp-3m` / `sde-dpmpp-2m` (`EDMDPMSolverMultistepScheduler`, algorithm dpmsolver++ of order 2 / 3,
  sde-dpmsolver++ of order 2; diffusers has no 3rd-order SDE variant), `unipc-2` / `unipc-3`
  (`UniPCMultistepScheduler`, bh2, order 2 / 3). UniPC has no EDM variant in diffusers and always works in VP form,
  x_vp = x / √(1 + σ²); with `use_karras_sigmas=True`, `sigma_min`/`sigma_max` from the EDM config it steps through
  exactly EDM's ρ = 7 noise levels, and `EDMAsVP` below hands it ε = (x − D(x; σ))/σ of the EDM denoiser at the
  scheduler's own σ, from which it recovers x0 = D(x; σ). Its integer `timesteps` are not used by the model (they
  are rounded positions in a 1000-step DDPM table). The VP start x_vp = n (UniPC's `init_noise_sigma` is 1) differs
  from the exact x/√(1 + σ_max²) by 0.0125·x0. This is faithful UniPC, but not a scheduler the pipeline can load.
- discrete-time (`denoiser_type` "ddpm": digits-latent, converted ImageNet pipelines), each built `from_config` of
  the model's own scheduler (its betas and timestep spacing) and accepted by the pipeline's scheduler gate
  (`diffusers_diffit.schedulers.compatibility`): `ddpm` (ancestral DDPM with `variance_type="learned_range"`,
  NVIDIA's sampler), `ddpm-fixed` (the same step with `variance_type="fixed_small"`: the learned variance ignored),
  `ddim`, `dpmpp-2m`, `dpmpp-3m`, `sde-dpmpp-2m` (`DPMSolverMultistepScheduler`), `dpmpp-2m-karras`,
  `dpmpp-3m-karras` (the same on Karras σs, `use_karras_sigmas=True`), `unipc-2`, `unipc-3`, `euler`
  (`EulerDiscreteScheduler`), `euler-ancestral` (`EulerAncestralDiscreteScheduler`). Only `ddpm` reads the learned
  variance v: every other scheduler gets ε alone (the pipeline drops v, `DiffiTPipeline._keeps_learned_variance`),
  so comparing `ddpm` with `ddpm-fixed` is what the learned variance buys.

Recipe (`--recipe`): `saved` (the pipeline's own guidance: digits w = 1.25 constant, the stand-in digits-latent none,
ImageNet-256 the power-cosine ramp to 4.4) or `official` (NVIDIA's 256-px guidance at w = `--guidance-scale`:
`guidance_schedule="power-cosine"`, `guidance_power=4` on the first `guided_channels=3` latent channels; discrete-time
models only). Guidance (`--guidance`): `none` (w = 1), `full` (the recipe at every step), `interval` (constant w =
`--interval-scale`, default the recipe's w, on the recipe's guided channels, only at calls whose noise level σ lies in
(σ_lo, σ_hi] = `--interval-sigmas`, default (0.28, 5.42] as EDM2 in Kynkäänniemi et al.; σ of a discrete timestep t
is √((1 − ᾱ_t)/ᾱ_t)). Each record holds the recipe's name and the guidance its calls ran with under "recipe".

Scoring: models with 10 classes and no `--reference` get the digits judge
(`diffusers_diffit.evaluation.digits.DigitsJudge`: SVM accuracy, Fréchet distance on MLP and PCA-16 features;
`--per-class` 50 = 500 samples per draw, seed s = one draw; every sampler gets the same labels and initial noise per
seed; latent models are decoded first). Any other model needs `--reference` (FID, sFID, IS).

`report` prints one table row per (sampler, guidance, calls) with mean ± std over draws, then the study's answer: for
each (sampler, guidance) the fewest calls within the baseline's seed noise (mean fd_mlp over draws at most the
baseline's mean + 1 std over draws, and mean accuracy at most 1 point below the baseline's).
"""

import argparse
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers_diffit import OFFICIAL_RECIPES, DiffiTPipeline, embedded_model_path
from diffusers_diffit.data.digits import NUM_CLASSES, digits_split
from diffusers_diffit.edm import edm_preconditioning
from diffusers_diffit.embedded import EMBEDDED_MODELS
from diffusers_diffit.evaluation.digits import DigitsJudge, sample_digit_ink
from diffusers_diffit.pipelines import RECIPE_KEYS
from diffusers_diffit.schedulers import EDMHeunScheduler


logger = logging.getLogger("nfe_study")
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "nfe_digits.jsonl"

EDM_SAMPLERS = ("edm-heun", "edm-euler", "dpmpp-2m", "dpmpp-3m", "sde-dpmpp-2m", "unipc-2", "unipc-3")
# discrete-time sampler name -> (scheduler class, overrides of the model's own scheduler config)
DISCRETE_SAMPLERS = {
    "ddpm": (DDPMScheduler, {"variance_type": "learned_range"}),
    "ddpm-fixed": (DDPMScheduler, {"variance_type": "fixed_small"}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "sde-dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp-3m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "unipc-2": (UniPCMultistepScheduler, {"solver_order": 2}),
    "unipc-3": (UniPCMultistepScheduler, {"solver_order": 3}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
}
SAMPLERS = {"edm": EDM_SAMPLERS, "ddpm": tuple(DISCRETE_SAMPLERS)}
GUIDANCE_MODES = ("none", "full", "interval")
GUIDANCE_KEYS = tuple(k for k in RECIPE_KEYS if k != "num_inference_steps")
# NVIDIA's 256-px guidance (`OFFICIAL_RECIPES`), for `--recipe official` at w = `--guidance-scale`
OFFICIAL_GUIDANCE = {k: OFFICIAL_RECIPES[256][k] for k in ("guidance_schedule", "guidance_power", "guided_channels")}
CALL_TICKS = (4, 5, 6, 8, 10, 12, 18, 25, 35, 50, 100, 250, 500, 1000)  # the plot's x ticks, where calls were run


class EDMAsVP(torch.nn.Module):
    """An EDM denoiser as the ε-prediction of a VP-form scheduler.

    The scheduler holds x_vp = x / √(1 + σ²) at its current noise level σ = `scheduler.sigmas[step_index]`; this
    returns ε = (x − D_θ(x; σ)) / σ with x = x_vp·√(1 + σ²) and D_θ(x; σ) = c_skip·x + c_out·F_θ(c_in·x, c_noise),
    ignoring the scheduler's (rounded, discrete) timestep. The scheduler's x0 from it, (x_vp − σ_vp·ε)/α_vp with
    α_vp = 1/√(1 + σ²) and σ_vp = σ·α_vp, is D_θ(x; σ).
    """

    def __init__(self, model: torch.nn.Module, scheduler, sigma_data: float):
        super().__init__()
        self.model, self.scheduler, self.sigma_data = model, scheduler, sigma_data

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, x_vp: torch.Tensor, timestep, class_labels=None, return_dict: bool = False):
        sigma = self.scheduler.sigmas[self.scheduler.step_index or 0].to(torch.float64)
        x = x_vp * float((1 + sigma**2).sqrt())  # [B, C, H, W] in EDM's VE space
        c = edm_preconditioning(sigma, self.sigma_data)
        c_noise = c.c_noise.to(x.dtype).to(x.device).expand(len(x))
        out = self.model(x * float(c.c_in), c_noise, class_labels=class_labels, return_dict=False)[0]
        denoised = float(c.c_skip) * x + float(c.c_out) * out
        return ((x - denoised) / float(sigma),)


def model_path(model: str) -> str:
    """The folder of `--model`: a shipped model's name or a pipeline folder."""
    return embedded_model_path(model) if model in EMBEDDED_MODELS else model


def sampler_pipeline(base: DiffiTPipeline, name: str) -> DiffiTPipeline:
    """`base`'s model behind the scheduler `name` (see the module docstring)."""
    family, cfg = base.denoiser_type, dict(base.scheduler.config)
    if name not in SAMPLERS[family]:
        raise ValueError(
            f"`--samplers` {name!r} is not available for this {family} model; choose from {SAMPLERS[family]}."
        )
    model = base.transformer
    if family == "edm":
        order = next((int(ch) for ch in name if ch.isdigit()), None)  # "dpmpp-3m" -> 3, "unipc-2" -> 2
        edm = {k: cfg[k] for k in ("sigma_min", "sigma_max", "sigma_data", "rho")}
        if name == "edm-heun":
            scheduler = EDMHeunScheduler(**edm)
        elif name == "edm-euler":
            scheduler = EDMEulerScheduler(**edm)
        elif name.startswith(("dpmpp", "sde-dpmpp")):
            algorithm = "sde-dpmsolver++" if name.startswith("sde") else "dpmsolver++"
            scheduler = EDMDPMSolverMultistepScheduler(**edm, solver_order=order, algorithm_type=algorithm)
        else:  # unipc-k through the VP adapter
            scheduler = UniPCMultistepScheduler(
                use_karras_sigmas=True,
                sigma_min=edm["sigma_min"],
                sigma_max=edm["sigma_max"],
                solver_order=order,
                final_sigmas_type="zero",
            )
            model = EDMAsVP(model, scheduler, edm["sigma_data"])
    else:
        scheduler_cls, overrides = DISCRETE_SAMPLERS[name]
        scheduler = scheduler_cls.from_config(cfg, **overrides)
    recipe = {k: base.config[k] for k in RECIPE_KEYS}
    # the pipeline's scheduler gate refuses a scheduler that cannot drive the model (a ValueError)
    pipe = DiffiTPipeline(model, scheduler, vae=base.vae, id2label=base.config.id2label, **recipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def study_recipe(base: DiffiTPipeline, recipe: str, guidance_scale: float | None) -> dict:
    """The guidance recipe of `--recipe`: the pipeline's saved one, or NVIDIA's official one at w = `guidance_scale`."""
    if (recipe == "official") != (guidance_scale is not None):
        raise ValueError("`--guidance-scale` is the w of `--recipe official`, which needs it: give both or neither.")
    if recipe == "saved":
        return {k: base.config[k] for k in GUIDANCE_KEYS}
    if base.denoiser_type != "ddpm":
        raise ValueError(
            "`--recipe official` (the power-cosine ramp over training timesteps) needs a discrete-time (ddpm) model."
        )
    return {**OFFICIAL_GUIDANCE, "guidance_scale": guidance_scale, "guidance_interval": None}


def steps_for_calls(name: str, calls: int) -> int:
    """Scheduler steps whose run makes `calls` model calls (Heun: 2N − 1 <= calls, the largest such N)."""
    return (calls + 1) // 2 if name == "edm-heun" else calls


def call_sigmas(pipe: DiffiTPipeline, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timestep, σ) of every model call of a `steps`-step run; σ in EDM's VE units: the EDM (or VP-adapted)
    scheduler's own σ, or for a discrete timestep t √((1 − ᾱ_t)/ᾱ_t), interpolated at fractional t (Euler's)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.double().numpy()  # [calls]
    if "sigma_data" in scheduler.config or isinstance(pipe.transformer, EDMAsVP):
        return timesteps, scheduler.sigmas[: len(timesteps)].double().numpy()
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    sigma_of_t = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return timesteps, np.interp(timesteps, np.arange(len(sigma_of_t)), sigma_of_t)


def guidance_recipe(
    pipe: DiffiTPipeline, recipe: dict, mode: str, steps: int, interval_sigmas, interval_scale
) -> tuple[dict, int]:
    """(the complete guidance recipe of the pipeline call, number of guided calls) for guidance `mode` with `recipe`
    on a `steps`-step run."""
    timesteps, sigmas = call_sigmas(pipe, steps)
    if mode == "none":
        return {**recipe, "guidance_scale": 1.0}, 0
    if mode == "full":
        return {**recipe, "guidance_interval": "all"}, len(timesteps) if recipe["guidance_scale"] > 1 else 0
    low, high = interval_sigmas
    scale = recipe["guidance_scale"] if interval_scale is None else interval_scale
    inside = (sigmas > low) & (sigmas <= high)
    if scale == 1 or not inside.any():
        return {**recipe, "guidance_scale": 1.0}, 0
    t_inside = timesteps[inside]
    # the pipeline guides calls whose timestep lies in [t_low, t_high]; σ is monotone in t, so these are `inside`
    kwargs = {
        **recipe,
        "guidance_scale": scale,
        "guidance_schedule": "constant",
        "guidance_interval": [float(t_inside.min()), float(t_inside.max())],
    }
    return kwargs, int(inside.sum())


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.num_threads)
    base = DiffiTPipeline.from_pretrained(model_path(args.model))
    recipe = study_recipe(base, args.recipe, args.guidance_scale)
    num_classes = base.transformer.config.num_classes
    if args.reference is None and num_classes != NUM_CLASSES:
        raise ValueError(
            f"{args.model} has {num_classes} classes, so the digits judge (10-class digits models) cannot score it; "
            "give `--reference` (an ADM reference batch .npz) to score FID."
        )
    pipes = {name: sampler_pipeline(base, name) for name in args.samplers or SAMPLERS[base.denoiser_type]}
    scorer = DigitsScorer(args) if args.reference is None else FIDScorer(args, base)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name, pipe in pipes.items():
        pipe.to(args.device)
        for calls in args.calls:
            steps = steps_for_calls(name, calls)
            real_calls = len(call_sigmas(pipe, steps)[0])
            for mode in args.guidance:
                kwargs, guided = guidance_recipe(pipe, recipe, mode, steps, args.interval_sigmas, args.interval_scale)
                label = mode
                if mode == "interval" and args.interval_scale is not None:
                    label = f"interval w={args.interval_scale:g}"
                for seed in args.seeds:
                    start = time.time()
                    metrics = scorer(pipe, steps, seed, kwargs)
                    record = {
                        "model": args.model,
                        "sampler": name,
                        "steps": steps,
                        "calls": real_calls,
                        "guidance": label,
                        "guided_calls": guided,
                        "network_evals": real_calls + guided,
                        "recipe": {"name": args.recipe, **kwargs},
                        "seed": seed,
                        "seconds": round(time.time() - start, 1),
                        **metrics,
                    }
                    with open(args.results, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    logger.info("%s", record)


class DigitsScorer:
    """quality_digits.py's judge on `per_class` × 10 samples per draw."""

    def __init__(self, args):
        self.per_class = args.per_class
        train_ink, train_labels, _, _ = digits_split()
        self.judge = DigitsJudge(train_ink, train_labels)

    def __call__(self, pipe, steps, seed, kwargs) -> dict:
        scores = self.judge(*sample_digit_ink(pipe, self.per_class, seed, num_inference_steps=steps, **kwargs))
        return {k: scores[k] for k in ("accuracy", "fd_mlp", "fd_pca")}


class FIDScorer:
    """FID, sFID and IS (`diffusers_diffit.evaluation`, ADM's definitions) of `--num-samples` images with uniform
    random labels, against the reference's precomputed statistics (or its images' features)."""

    def __init__(self, args, base):
        from diffusers_diffit.evaluation import (
            FeatureStatistics,
            InceptionFeatureExtractor,
            extract_features,
            feature_statistics,
            load_images,
            reference_statistics,
        )

        self.args = args
        self.extractor = InceptionFeatureExtractor.from_pretrained(args.inception_weights).to(args.device)
        self.statistics = reference_statistics(args.reference)
        missing = [f for f in ("pool", "spatial") if f not in self.statistics]
        if missing:
            features = extract_features(
                load_images(args.reference, "--reference"), self.extractor, args.batch_size, args.device
            )
            self.statistics.update({f: feature_statistics(features[f]) for f in missing})
        assert all(isinstance(s, FeatureStatistics) for s in self.statistics.values())
        self.num_classes = base.transformer.config.num_classes

    def __call__(self, pipe, steps, seed, kwargs) -> dict:
        from diffusers_diffit.evaluation import compute_metrics, extract_features

        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, self.num_classes, (self.args.num_samples,), generator=generator)
        images = []
        for start in range(0, self.args.num_samples, self.args.batch_size):
            batch = labels[start : start + self.args.batch_size].tolist()
            generators = [
                torch.Generator(self.args.device).manual_seed(seed * 1_000_003 + start + i) for i in range(len(batch))
            ]
            out = pipe(batch, generator=generators, num_inference_steps=steps, output_type="pt", **kwargs).images
            # the pipeline's uint8 conversion: clamp((x + 1)·127.5, 0, 255) truncated = (x/2 + 0.5)·255 truncated
            images.append((out * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        features = extract_features(np.concatenate(images), self.extractor, self.args.batch_size, self.args.device)
        return compute_metrics(features, {}, ("fid", "sfid", "is"), reference_statistics=self.statistics)


def load_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(args: argparse.Namespace) -> None:
    """Markdown table (mean ± std over draws), the fewest calls within the baseline's seed noise and, with --plot, FD
    (MLP) against model calls."""
    records = load_records(args.results)
    runs = sorted({f"{r['model']} ({r['recipe'].get('name', 'saved')} recipe)" for r in records})
    if len(runs) > 1:
        raise ValueError(f"{args.results} mixes {runs}: keep one model and recipe per results file.")
    groups = defaultdict(list)
    for r in records:
        groups[(r["sampler"], r["guidance"], r["calls"])].append(r)
    metric = "fd_mlp" if "fd_mlp" in records[0] else "fid"
    baseline = groups.get((args.baseline[0], args.baseline[1], int(args.baseline[2])))
    base_mean = np.mean([r[metric] for r in baseline]) if baseline else None
    base_std = np.std([r[metric] for r in baseline]) if baseline and len(baseline) > 1 else None
    by_seed = {r["seed"]: r[metric] for r in baseline} if baseline else {}
    print(f"{runs[0]}\n")
    print(
        f"| sampler | guidance | calls | network evals / image | draws | {metric} | accuracy | FD, PCA-16 "
        f"| Δ{metric} vs baseline, paired |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, mode, calls), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        values = np.array([r[metric] for r in rs])
        cell = f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")
        acc = np.array([r.get("accuracy", np.nan) for r in rs]) * 100
        pca = np.array([r.get("fd_pca", np.nan) for r in rs])
        paired = [r[metric] - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed]
        delta = (
            f"{np.mean(paired):+.3f}"
            + (f" ± {np.std(paired, ddof=1) / math.sqrt(len(paired)):.3f}" if len(paired) > 1 else "")
            if paired
            else "–"
        )
        print(
            f"| {name} | {mode} | {calls} | {rs[0]['network_evals']} | {len(rs)} | {cell} | {acc.mean():.1f} % "
            f"| {pca.mean():.3f} | {delta} |"
        )
    baseline_name = " / ".join(args.baseline)
    if base_std is None:
        draws = len(baseline or [])
        print(f"\nbaseline {baseline_name}: {draws} draws in {args.results}; the seed-noise summary needs at least 2")
    else:
        print(
            f"\nbaseline {baseline_name}: {metric} {base_mean:.3f} ± {base_std:.3f} (std over {len(baseline)} draws)"
        )
        print("\n" + seed_noise_summary(groups, baseline, metric))
    if args.plot:
        seed = min(r["seed"] for r in records)  # one draw that every point has: same noise and labels everywhere
        first = {key: [r for r in rs if r["seed"] == seed] for key, rs in groups.items()}
        base_first = by_seed.get(seed)
        plot({k: v for k, v in first.items() if v}, metric, args.plot, base_first, base_std, seed)


def seed_noise_summary(groups: dict, baseline: list[dict], metric: str) -> str:
    """For each (sampler, guidance) of `groups` ((sampler, guidance, calls) -> records), the fewest calls whose mean
    `metric` over draws is at most the baseline's mean + 1 std over draws and, for digits records, whose mean
    accuracy is at most 1 point below the baseline's."""
    values = np.array([r[metric] for r in baseline])
    limit = values.mean() + values.std()
    header = f"within seed noise of the baseline: {metric} <= {limit:.3f} (mean + 1 std over {len(values)} draws)"
    has_accuracy = "accuracy" in baseline[0]
    if has_accuracy:
        min_accuracy = 100 * np.mean([r["accuracy"] for r in baseline]) - 1
        header += f", accuracy >= {min_accuracy:.1f} % (mean − 1 point)"
    lines = [header]
    for name, mode in sorted({(name, mode) for name, mode, _ in groups}):
        rows = sorted(
            ((calls, rs) for (n, m, calls), rs in groups.items() if (n, m) == (name, mode)), key=lambda x: x[0]
        )
        for calls, rs in rows:
            value = np.mean([r[metric] for r in rs])
            accuracy = 100 * np.mean([r["accuracy"] for r in rs]) if has_accuracy else None
            if value <= limit and (accuracy is None or accuracy >= min_accuracy):
                scores = f"{metric} {value:.3f}" + (f", accuracy {accuracy:.1f} %" if has_accuracy else "")
                cost = f"{rs[0]['network_evals']} network evals / image"
                lines.append(f"- {name} / {mode}: {calls} calls ({cost}; {scores}; {len(rs)} draws)")
                break
        else:
            lines.append(f"- {name} / {mode}: none of {', '.join(str(calls) for calls, _ in rows)} calls")
    return "\n".join(lines)


def plot(groups: dict, metric: str, path: Path, base_mean, base_std, seed: int) -> None:
    """One panel per guidance mode: the metric of draw `seed` (log scale) against model calls, one line per sampler
    (same colour in every panel); the baseline's value in that draw ± its draw-to-draw std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, ScalarFormatter

    modes = sorted({mode for _, mode, _ in groups}, key=lambda m: (m != "full", m))
    names = sorted({name for name, _, _ in groups})
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in names:
            points = sorted(
                (c, np.mean([r[metric] for r in rs])) for (n, m, c), rs in groups.items() if n == name and m == mode
            )
            if points:
                ax.plot(*zip(*points), marker="o", color=colours[name], label=name)
        if base_mean is not None:
            ax.axhline(base_mean, color="k", lw=1, ls="--", label="baseline")
            if base_std is not None:
                ax.axhspan(base_mean - base_std, base_mean + base_std, color="k", alpha=0.12)
        ax.set_xscale("log")
        ax.set_yscale("log")
        calls = [c for _, m, c in groups if m == mode]
        ax.set_xticks([c for c in CALL_TICKS if min(calls) <= c <= max(calls)])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.set_xlabel("model calls (sequential network evaluations)")
        ax.set_title(f"guidance: {mode}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{metric}, draw {seed} (lower is better)")
    if base_mean is not None:
        axes[0][0].set_ylim(0.8 * base_mean, 8 * base_mean)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    logger.info("wrote %s", path)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run", help="sample and score; appends to --results")
    r.add_argument(
        "--model", default="digits", help=f"pipeline folder, or a shipped model: {', '.join(EMBEDDED_MODELS)}"
    )
    r.add_argument("--samplers", nargs="+", default=None, help="default: every sampler of the model's family")
    r.add_argument("--calls", type=int, nargs="+", default=[6, 8, 10, 12])
    r.add_argument("--guidance", nargs="+", choices=GUIDANCE_MODES, default=["full", "interval"])
    r.add_argument(
        "--recipe",
        choices=("saved", "official"),
        default="saved",
        help="saved: the pipeline's guidance; official: NVIDIA's power-cosine ramp on 3 channels at --guidance-scale",
    )
    r.add_argument("--guidance-scale", type=float, default=None, help="w of `--recipe official` (required with it)")
    r.add_argument("--interval-sigmas", type=float, nargs=2, default=[0.28, 5.42], metavar=("SIGMA_LO", "SIGMA_HI"))
    r.add_argument("--interval-scale", type=float, default=None, help="w inside the interval (default: the recipe's)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--per-class", type=int, default=50)
    r.add_argument("--reference", default=None, help="ADM reference .npz: score FID instead of the digits judge")
    r.add_argument("--inception-weights", default=None, help="see `diffit evaluate --help`")
    r.add_argument("--num-samples", type=int, default=10_000)
    r.add_argument("--batch-size", type=int, default=100)
    r.add_argument("--device", default="cpu")
    r.add_argument("--num-threads", type=int, default=1)
    r.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p = commands.add_parser("report", help="table, seed-noise summary (and plot) from --results")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--baseline", nargs=3, default=["edm-heun", "full", "35"], metavar=("SAMPLER", "GUIDANCE", "CALLS"))
    p.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
