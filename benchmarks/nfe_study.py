"""Sample quality against the number of model calls, for several samplers, with guidance at every step or only in a
limited interval of noise levels (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample
and distribution quality in diffusion models").

    # the shipped digits model (CPU): append one JSON line per (sampler, calls, guidance, draw) to --results
    python -m benchmarks.nfe_study run --samplers edm-heun edm-euler dpmpp-2m --calls 6 8 10 12 --seeds 0
    python -m benchmarks.nfe_study report --plot benchmarks/nfe_digits.png   # markdown table + PNG from --results

    # a converted ImageNet pipeline (GPU): FID of `diffusers_diffit.evaluation` against ADM's reference batch
    python -m benchmarks.nfe_study run --model DiffiT-XL-2-256 --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --num-samples 10000 --batch-size 125 \\
        --device cuda --samplers ddpm dpmpp-2m dpmpp-3m unipc-2 --calls 250 12 18 25 --guidance full \\
        --results nfe_imagenet256.jsonl

Model calls are the sequential network evaluations of one sampling run (`len(scheduler.timesteps)`): N steps of
EDM's Heun sampler are 2N − 1 calls, every other sampler here makes one call per step. Classifier-free guidance doubles
the batch of a call, not the number of calls; each record also holds `network_evals` = calls + guided calls (the
cost in forward passes of one image), which a limited guidance interval lowers.

Samplers (`--samplers`), by the model's family (its scheduler's config: EDM σ-space or discrete DDPM timesteps):
- EDM (the digits model): `edm-heun` (this package's `EDMHeunScheduler`), `edm-euler` (`EDMEulerScheduler`),
  `dpmpp-2m` / `dpmpp-3m` / `sde-dpmpp-2m` (`EDMDPMSolverMultistepScheduler`, algorithm dpmsolver++ of order 2 / 3,
  sde-dpmsolver++ of order 2; diffusers has no 3rd-order SDE variant), `unipc-2` / `unipc-3`
  (`UniPCMultistepScheduler`, bh2, order 2 / 3). UniPC has no EDM variant in diffusers and always works in VP form,
  x_vp = x / √(1 + σ²); with `use_karras_sigmas=True`, `sigma_min`/`sigma_max` from the EDM config and
  `prediction_type="sample"` it steps through exactly EDM's ρ = 7 noise levels, and `EDMAsVP` below hands it the
  EDM denoiser D(x; σ) at the scheduler's own σ. Its integer `timesteps` are not used by the model (they are rounded
  positions in a 1000-step DDPM table). The VP start x_vp = n (UniPC's `init_noise_sigma` is 1) differs from the
  exact x/√(1 + σ_max²) by 0.0125·x0. This is faithful UniPC, but not a scheduler the pipeline can take as is.
- discrete (converted ImageNet pipelines): `ddpm` (the official learned-range DDPM), `ddim`, `dpmpp-2m`, `dpmpp-3m`,
  `sde-dpmpp-2m` (`DPMSolverMultistepScheduler`), `unipc-2`, `unipc-3`.

Guidance (`--guidance`): `none` (w = 1), `full` (the pipeline's own recipe at every step: digits w = 1.25 constant,
ImageNet-256 the power-cosine ramp to 4.4), `interval` (constant w = `--interval-scale` only at calls whose noise
level σ lies in (σ_lo, σ_hi] = `--interval-sigmas`, default (0.28, 5.42] as EDM2 in Kynkäänniemi et al.; σ of a
discrete timestep t is √((1 − ᾱ_t)/ᾱ_t)).

Digits quality: `diffusers_diffit.evaluation.digits.DigitsJudge` (SVM accuracy, Fréchet distance on MLP and PCA-16
features,
500 samples per draw, 50 per class, seed s = one draw; every sampler gets the same labels and initial noise per seed).
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
    UniPCMultistepScheduler,
)

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.data.digits import digits_split
from diffusers_diffit.edm import edm_preconditioning
from diffusers_diffit.evaluation.digits import DigitsJudge, sample_digit_ink
from diffusers_diffit.schedulers import EDMHeunScheduler


logger = logging.getLogger("nfe_study")
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "nfe_digits.jsonl"

EDM_SAMPLERS = ("edm-heun", "edm-euler", "dpmpp-2m", "dpmpp-3m", "sde-dpmpp-2m", "unipc-2", "unipc-3")
DISCRETE_SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-3m", "sde-dpmpp-2m", "unipc-2", "unipc-3")
GUIDANCE_MODES = ("none", "full", "interval")


class EDMAsVP(torch.nn.Module):
    """An EDM denoiser for a VP-form scheduler that predicts x0 (`prediction_type="sample"`).

    The scheduler holds x_vp = x / √(1 + σ²) at its current noise level σ = `scheduler.sigmas[step_index]`; this
    returns D_θ(x; σ) = c_skip·x + c_out·F_θ(c_in·x, c_noise) with x = x_vp·√(1 + σ²), ignoring the scheduler's
    (rounded, discrete) timestep.
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
        return (float(c.c_skip) * x + float(c.c_out) * out,)


def model_family(pipe: DiffiTPipeline) -> str:
    return "edm" if "sigma_data" in pipe.scheduler.config else "discrete"


def sampler_pipeline(base: DiffiTPipeline, name: str) -> DiffiTPipeline:
    """`base`'s model and recipe behind the scheduler `name` (see the module docstring)."""
    family, cfg = model_family(base), dict(base.scheduler.config)
    allowed = EDM_SAMPLERS if family == "edm" else DISCRETE_SAMPLERS
    if name not in allowed:
        raise ValueError(f"`--samplers` {name!r} is not available for this {family} model; choose from {allowed}.")
    model = base.transformer
    order = next((int(ch) for ch in name if ch.isdigit()), None)  # "dpmpp-3m" -> 3, "unipc-2" -> 2
    if family == "edm":
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
                prediction_type="sample",
                solver_order=order,
                final_sigmas_type="zero",
            )
            model = EDMAsVP(model, scheduler, edm["sigma_data"])
    else:
        if name == "ddpm":
            scheduler = DDPMScheduler.from_config(cfg)
        elif name == "ddim":
            scheduler = DDIMScheduler.from_config(cfg)
        elif name.startswith(("dpmpp", "sde-dpmpp")):
            algorithm = "sde-dpmsolver++" if name.startswith("sde") else "dpmsolver++"
            scheduler = DPMSolverMultistepScheduler.from_config(
                cfg, variance_type=None, solver_order=order, algorithm_type=algorithm
            )
        else:
            scheduler = UniPCMultistepScheduler.from_config(cfg, solver_order=order)
    recipe = {
        k: base.config[k]
        for k in ("guidance_scale", "guidance_schedule", "guidance_power", "guided_channels", "guidance_interval")
    }
    pipe = DiffiTPipeline(model, scheduler, vae=base.vae, id2label=base.config.id2label, **recipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def steps_for_calls(name: str, calls: int) -> int:
    """Scheduler steps whose run makes `calls` model calls (Heun: 2N − 1 <= calls, the largest such N)."""
    return (calls + 1) // 2 if name == "edm-heun" else calls


def call_sigmas(pipe: DiffiTPipeline, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timestep, σ) of every model call of a `steps`-step run; σ in EDM's VE units (discrete: √((1 − ᾱ_t)/ᾱ_t))."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.double().numpy()  # [calls]
    if hasattr(scheduler, "sigmas") and scheduler.sigmas is not None and "sigma_data" in scheduler.config:
        sigmas = scheduler.sigmas[: len(timesteps)].double().numpy()
    elif isinstance(pipe.transformer, EDMAsVP):
        sigmas = scheduler.sigmas[: len(timesteps)].double().numpy()
    else:
        alphas_cumprod = scheduler.alphas_cumprod.double().numpy()[timesteps.astype(int)]
        sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return timesteps, sigmas


def guidance_recipe(pipe: DiffiTPipeline, mode: str, steps: int, interval_sigmas, interval_scale) -> tuple[dict, int]:
    """(pipeline kwargs, number of guided calls) for guidance `mode` on a `steps`-step run."""
    timesteps, sigmas = call_sigmas(pipe, steps)
    if mode == "none":
        return {"guidance_scale": 1.0}, 0
    if mode == "full":
        return {}, len(timesteps) if pipe.config.guidance_scale != 1 else 0
    low, high = interval_sigmas
    inside = (sigmas > low) & (sigmas <= high)
    if not inside.any():
        return {"guidance_scale": 1.0}, 0
    t_inside = timesteps[inside]
    scale = pipe.config.guidance_scale if interval_scale is None else interval_scale
    # the pipeline guides calls whose timestep lies in [t_low, t_high]; σ is monotone in t, so these are `inside`
    kwargs = {
        "guidance_scale": scale,
        "guidance_schedule": "constant",
        "guidance_interval": [float(t_inside.min()), float(t_inside.max())],
    }
    return kwargs, int(inside.sum())


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.num_threads)
    base = DiffiTPipeline.from_pretrained(args.model or embedded_model_path("digits"))
    family = model_family(base)
    if family == "discrete" and args.reference is None:
        raise ValueError(
            "`--reference` (an ADM reference batch .npz) is required for a discrete-time (ImageNet) model."
        )
    scorer = DigitsScorer(args) if args.reference is None else FIDScorer(args, base)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in args.samplers:
        pipe = sampler_pipeline(base, name).to(args.device)
        for calls in args.calls:
            steps = steps_for_calls(name, calls)
            for mode in args.guidance:
                kwargs, guided = guidance_recipe(pipe, mode, steps, args.interval_sigmas, args.interval_scale)
                real_calls = len(call_sigmas(pipe, steps)[0])
                label = mode
                if mode == "interval" and args.interval_scale is not None:
                    label = f"interval w={args.interval_scale:g}"
                for seed in args.seeds:
                    start = time.time()
                    metrics = scorer(pipe, steps, seed, kwargs)
                    record = {
                        "model": args.model or "digits",
                        "sampler": name,
                        "steps": steps,
                        "calls": real_calls,
                        "guidance": label,
                        "guided_calls": guided,
                        "network_evals": real_calls + guided,
                        "recipe": kwargs,
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
    """Markdown table (mean ± std over draws) and, with --plot, FD (MLP) against model calls."""
    records = load_records(args.results)
    groups = defaultdict(list)
    for r in records:
        groups[(r["sampler"], r["guidance"], r["calls"])].append(r)
    metric = "fd_mlp" if "fd_mlp" in records[0] else "fid"
    baseline = groups.get((args.baseline[0], args.baseline[1], int(args.baseline[2])))
    base_mean = np.mean([r[metric] for r in baseline]) if baseline else None
    base_std = np.std([r[metric] for r in baseline]) if baseline and len(baseline) > 1 else None
    by_seed = {r["seed"]: r[metric] for r in baseline} if baseline else {}
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
    if base_mean is not None:
        noise = f" ± {base_std:.3f} (std over {len(baseline)} draws)" if base_std is not None else ""
        print(f"\nbaseline {' / '.join(args.baseline)}: {metric} {base_mean:.3f}{noise}")
    if args.plot:
        seed = min(r["seed"] for r in records)  # one draw that every point has: same noise and labels everywhere
        first = {key: [r for r in rs if r["seed"] == seed] for key, rs in groups.items()}
        base_first = by_seed.get(seed)
        plot({k: v for k, v in first.items() if v}, metric, args.plot, base_first, base_std, seed)


def plot(groups: dict, metric: str, path: Path, base_mean, base_std, seed: int) -> None:
    """One panel per guidance mode: the metric of draw `seed` (log scale) against model calls, one line per sampler
    (same colour in every panel); the baseline's value in that draw ± its draw-to-draw std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, ScalarFormatter

    modes = sorted({mode for _, mode, _ in groups}, key=lambda m: (m != "full", m))
    names = sorted({name for name, _, _ in groups})
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
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
        ax.set_xticks([5, 6, 8, 10, 12, 18, 35])
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
    r.add_argument("--model", default=None, help="pipeline folder (default: the shipped digits model)")
    r.add_argument("--samplers", nargs="+", default=list(EDM_SAMPLERS))
    r.add_argument("--calls", type=int, nargs="+", default=[6, 8, 10, 12])
    r.add_argument("--guidance", nargs="+", choices=GUIDANCE_MODES, default=["full", "interval"])
    r.add_argument("--interval-sigmas", type=float, nargs=2, default=[0.28, 5.42], metavar=("SIGMA_LO", "SIGMA_HI"))
    r.add_argument(
        "--interval-scale", type=float, default=None, help="w inside the interval (default: the pipeline's)"
    )
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--per-class", type=int, default=50)
    r.add_argument("--reference", default=None, help="ADM reference .npz: score FID instead of the digits judge")
    r.add_argument("--inception-weights", default=None, help="see `diffit evaluate --help`")
    r.add_argument("--num-samples", type=int, default=10_000)
    r.add_argument("--batch-size", type=int, default=100)
    r.add_argument("--device", default="cpu")
    r.add_argument("--num-threads", type=int, default=1)
    r.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p = commands.add_parser("report", help="table (and plot) from --results")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--baseline", nargs=3, default=["edm-heun", "full", "35"], metavar=("SAMPLER", "GUIDANCE", "CALLS"))
    p.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
