"""Sample quality of the shipped digits model, next to real held-out digits and a diffusers UNet2DModel baseline.

    python examples/train_digits.py --output_dir outputs/digits-unet --architecture unet   # the baseline, once
    python benchmarks/quality_digits.py --unet outputs/digits-unet/ema
    python benchmarks/quality_digits.py --diffit runs/diffit_s*/pipeline --unet runs/unet_s*/ema  # over seeds

Protocol (the split, the 16×16 ↔ 8×8 maps and the baseline come from `examples/train_digits.py`):
- 500 samples per model and draw, 50 per class, through `DiffiTPipeline` with the scheduler, steps and guidance of
  the first DiffiT pipeline (the shipped one by default) for every model, same seeds. Samples are mapped back to 8×8
  ink by the least-squares inverse of the training upsampling (exact on real digits).
- several folders per architecture (one per training seed): a row each (spread over the draws), then a "mean over
  N trainings" row whose ± is the spread over the trainings, which is what comparing architectures needs.
- accuracy: an RBF SVM (C=10) trained on the 1297 real training digits (8×8) classifies each sample; the label
  asked for is the truth.
- FD: Fréchet distance to the 1297 real training digits, in two feature spaces fitted on them: the hidden ReLU
  units of an MLP classifier (FID-style; units dead on real digits dropped) and the top 16 principal components.
  Real-vs-real: the 500 held-out digits, which the models never saw, against the same reference.
- NN: median L2 distance (8×8 ink) from each image to its nearest training digit; far below the held-out figure
  would mean the model copies its training set.
- as many DiffiT as U-Net folders (two or more): they are paired in the order given (pass the same training seeds
  in the same order, as `digits_seeds.sh` does), and the last line is the paired difference DiffiT − U-Net of each
  metric, mean ± standard error over the pairs, with its t statistic.
Targets (issue 4): accuracy >= 98 %, FD <= 2x real-vs-real, DiffiT at least as good as the U-Net.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from sklearn.decomposition import PCA
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_digits import NUM_CLASSES, digits_split, model_to_ink  # noqa: E402

from diffusers_diffit import DiffiTPipeline, embedded_model_path  # noqa: E402


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) of two feature sets [N, D]; Tr((Σ_a Σ_b)^½) is the sum of the
    square roots of the eigenvalues of the symmetric Σ_a^½ Σ_b Σ_a^½ (stable for singular covariances)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


class Judge:
    """Classifier, feature spaces and references, all fitted on the real training digits only."""

    def __init__(self, train_ink: np.ndarray, train_labels: np.ndarray):
        self.train = train_ink.reshape(len(train_ink), -1)
        self.svm = SVC(C=10, gamma="scale").fit(self.train, train_labels)
        self.mlp = MLPClassifier((64,), max_iter=2000, random_state=0).fit(self.train, train_labels)
        hidden = self._hidden(self.train)
        self.alive = hidden.std(0) > 1e-6  # ReLU units that never fire on real digits carry no information
        self.pca = PCA(16, random_state=0).fit(self.train)
        self.reference = {"mlp": self.mlp_features(self.train), "pca": self.pca.transform(self.train)}

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)

    def mlp_features(self, x: np.ndarray) -> np.ndarray:
        return self._hidden(x)[:, self.alive]

    def __call__(self, ink: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        x = ink.reshape(len(ink), -1)
        nearest = np.sqrt(((x[:, None] - self.train[None]) ** 2).sum(-1).min(1))
        return {
            "accuracy": float((self.svm.predict(x) == labels).mean()),
            "fd_mlp": frechet_distance(self.mlp_features(x), self.reference["mlp"]),
            "fd_pca": frechet_distance(self.pca.transform(x), self.reference["pca"]),
            "nn": float(np.median(nearest)),
        }


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of a[i] − b[i] over paired trainings (at least two pairs)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_difference needs two equal-length lists of at least 2, got {len(a)} and {len(b)}.")
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def sample_ink(pipe: DiffiTPipeline, per_class: int, seed: int, **recipe) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    images = pipe(
        list(range(NUM_CLASSES)),
        num_images_per_label=per_class,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",  # pixel space: the raw final sample in [-1, 1]
        **recipe,
    ).images
    return model_to_ink(images), labels


def unet_pipeline(path: str, like: DiffiTPipeline) -> DiffiTPipeline:
    """The baseline behind the same pipeline, scheduler and recipe as the DiffiT model."""
    unet = UNet2DModel.from_pretrained(path).eval()
    unet.register_to_config(num_classes=unet.config.num_class_embeds - 1)  # the last row is the null class
    recipe = {k: like.config[k] for k in ("num_inference_steps", "guidance_scale", "guidance_schedule")}
    return DiffiTPipeline(unet, like.scheduler.__class__.from_config(like.scheduler.config), vae=None, **recipe)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffit", nargs="+", default=None,
                        help="DiffiT pipeline folder(s), e.g. one per training seed (default: the shipped model)")
    parser.add_argument("--unet", nargs="+", default=[],
                        help="UNet2DModel folder(s) from train_digits.py --architecture unet")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="override the pipeline's steps for both models")
    parser.add_argument("--guidance-scale", type=float, default=None, help="override for both models")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one 500-image draw per seed")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the models sample, e.g. cuda (same noise: CPU generator)")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)

    train_ink, train_labels, held_out_ink, held_out_labels = digits_split()
    judge = Judge(train_ink, train_labels)
    recipe = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}

    diffit_paths = args.diffit or [embedded_model_path("digits")]
    diffit = [DiffiTPipeline.from_pretrained(path) for path in diffit_paths]
    families = [
        ("DiffiTUNet2DModel", diffit_paths, diffit),
        ("diffusers UNet2DModel", args.unet, [unet_pipeline(path, diffit[0]) for path in args.unet]),
    ]
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
                runs.append(judge(*sample_ink(pipe, args.per_class, seed, **recipe)))
            seconds = (time.time() - start) / len(args.seeds)
            draws = {k: [r[k] for r in runs] for k in runs[0]}
            label = name if len(paths) == 1 else f"{name} `{path}`"
            rows.append((f"{label} ({seconds:.0f} s / draw)", f"{pipe.transformer.num_parameters():,}", draws))
            trainings.append({k: float(np.mean(v)) for k, v in draws.items()})
        if len(trainings) > 1:  # the spread over training runs, not over sampling draws
            over = {k: [t[k] for t in trainings] for k in trainings[0]}
            rows.append((f"**{name}, mean over {len(trainings)} trainings**", rows[-1][1], over))

    cfg = diffit[0].config
    print(
        f"{NUM_CLASSES * args.per_class} images per draw, seeds {args.seeds}; mean ± std over the draws, or over the "
        f"trainings in a 'mean over' row; {type(diffit[0].scheduler).__name__}, "
        f"{args.steps or cfg.num_inference_steps} steps, guidance {args.guidance_scale or cfg.guidance_scale} "
        f"({cfg.guidance_schedule}, interval {cfg.guidance_interval})"
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
        for key, scale, digits, unit in (("accuracy", 100, 2, " pt"), ("fd_mlp", 1, 3, ""), ("fd_pca", 1, 3, ""),
                                         ("nn", 1, 3, "")):
            mean, se = paired_difference([scale * t[key] for t in diffit_runs], [scale * t[key] for t in unet_runs])
            t_stat = mean / se if se else float("nan")
            cells.append(f"{key} {mean:+.{digits}f} ± {se:.{digits}f}{unit} (t = {t_stat:+.1f})")
        print(f"DiffiT − U-Net over {len(diffit_runs)} paired trainings (mean ± standard error): " + ", ".join(cells))


def _cell(values: np.ndarray, fmt: str, real: float | None = None) -> str:
    text = fmt.format(values.mean()) + (f" ± {fmt.format(values.std())}" if len(values) > 1 else "")
    return text if real is None else f"{text} ({values.mean() / real:.2f}×)"


if __name__ == "__main__":
    main()
