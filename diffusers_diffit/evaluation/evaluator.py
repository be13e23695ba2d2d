"""`diffit evaluate`: ADM's evaluator (FID, sFID, Inception Score, precision, recall) plus FD-DINOv2, in PyTorch.

    diffit evaluate --samples fid/diffit-256/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --output metrics.json

As ADM's `evaluator.py`: features of every reference image and every sample; FID and sFID from the reference npz's
`mu`/`sigma` and `mu_s`/`sigma_s` when it holds them (ADM's `VIRTUAL_imagenet256_labeled.npz` does), else from its
images; the Inception Score of the samples' softmax(pool @ W) in 10 parts; precision and recall of the samples'
against the reference's pool features with k = 3. Under `accelerate launch` the feature extraction is split across
the processes and the main process writes the result.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .features import (
    DEFAULT_DINOV2,
    DINOv2FeatureExtractor,
    InceptionFeatureExtractor,
    extract_features,
    load_images,
    process_state,
    resolve_inception_weights,
)
from .metrics import FeatureStatistics, frechet_distance, inception_score, precision_recall


logger = logging.getLogger(__name__)

METRICS = ("fid", "sfid", "is", "precision", "recall", "fd_dinov2")
DEFAULT_METRICS = ("fid", "sfid", "is", "precision", "recall")
# metric -> the feature it is computed on
FEATURE_OF = {
    "fid": "pool",
    "sfid": "spatial",
    "is": "logits",
    "precision": "pool",
    "recall": "pool",
    "fd_dinov2": "dinov2",
}
# ADM's npz keys of precomputed reference statistics, by feature (dinov2: this package's extension)
STATISTICS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("mu_dinov2", "sigma_dinov2")}


def check_metrics(metrics) -> tuple[str, ...]:
    """A comma-separated string or a list of metric names -> a tuple of unique known names, else `ValueError`."""
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"`--metrics` must be a comma-separated list from {','.join(METRICS)}, got {metrics!r}.")
    return tuple(dict.fromkeys(names))


def reference_statistics(path: str | os.PathLike) -> dict[str, FeatureStatistics]:
    """Precomputed statistics in a reference npz, by feature name ({} for a folder or an npz without them)."""
    path = Path(path)
    if path.is_dir():
        return {}
    stats = {}
    with np.load(path) as npz:
        for feature, (mu, sigma) in STATISTICS_KEYS.items():
            if mu in npz.files and sigma in npz.files:
                stats[feature] = FeatureStatistics(npz[mu].astype(np.float64), npz[sigma].astype(np.float64))
    return stats


def has_images(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.is_dir():
        return True
    with np.load(path) as npz:
        return "arr_0" in npz.files


def compute_metrics(
    samples: dict[str, np.ndarray],
    reference: dict[str, np.ndarray | FeatureStatistics],
    metrics=DEFAULT_METRICS,
    reference_statistics: dict[str, FeatureStatistics] | None = None,
    k: int = 3,
    num_splits: int = 10,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Metrics from features, as ADM's evaluator computes them.

    samples: {feature: [N, D]} with the feature names of `FEATURE_OF` ("pool", "spatial", "logits", "dinov2").
    reference: {feature: [N_ref, D] features, or FeatureStatistics}; precision and recall need features.
    reference_statistics: precomputed (μ, Σ) by feature (ADM's `mu`/`sigma`, `mu_s`/`sigma_s`); they replace the
        reference's own for the Fréchet distances, as ADM's `read_statistics` does.
    """
    metrics = check_metrics(metrics)
    reference_statistics = reference_statistics or {}
    result = {}
    for metric in metrics:
        feature = FEATURE_OF[metric]
        if feature not in samples:
            raise ValueError(f"`{metric}` needs the samples' {feature!r} features; got {sorted(samples)}.")
        if metric == "is":
            logits = torch.as_tensor(np.asarray(samples["logits"]), dtype=torch.float64)
            result["is"] = inception_score(torch.softmax(logits, dim=1).numpy(), num_splits=num_splits)
        elif metric in ("fid", "sfid", "fd_dinov2"):
            target = reference_statistics.get(feature, reference.get(feature))
            if target is None:
                raise ValueError(f"`{metric}` needs the reference's {feature!r} features or statistics.")
            result[metric] = frechet_distance(samples[feature], target)
        elif "precision" not in result:  # precision and recall come from one comparison
            if not isinstance(reference.get(feature), np.ndarray):
                raise ValueError(f"`{metric}` needs the reference images' {feature!r} features, not statistics.")
            result["precision"], result["recall"] = precision_recall(
                reference[feature], samples[feature], k=k, device=device
            )
    return {m: result[m] for m in metrics}


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    metrics=DEFAULT_METRICS,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    inception_weights: str | os.PathLike | None = None,
    dinov2_model: str = DEFAULT_DINOV2,
    distributed: bool = False,
) -> dict[str, float]:
    """Load images, extract the features the metrics need, compute them (see the module docstring)."""
    metrics = check_metrics(metrics)
    features = {FEATURE_OF[m] for m in metrics}
    stats = reference_statistics(reference)
    # reference features are needed for precision/recall, and for the FDs whose statistics the npz lacks
    need_reference = {f for f in features if f in ("pool", "spatial", "dinov2") and f not in stats}
    if {"precision", "recall"} & set(metrics):
        need_reference.add("pool")
    if need_reference and not has_images(reference):
        raise ValueError(
            f"`--reference` {str(reference)!r} has no images (`arr_0`) but {sorted(need_reference)} "
            f"features of them are needed for {','.join(metrics)}."
        )
    sample_images, reference_images = load_images(samples, "--samples"), None
    if need_reference:
        reference_images = load_images(reference, "--reference")

    extractors = []
    if features & {"pool", "spatial", "logits"}:
        extractors.append(InceptionFeatureExtractor.from_pretrained(inception_weights).to(device))
    if "dinov2" in features:
        extractors.append(DINOv2FeatureExtractor.from_pretrained(dinov2_model).to(device))

    sample_features, reference_features = {}, {}
    for extractor in extractors:
        sample_features.update(extract_features(sample_images, extractor, batch_size, device, distributed))
        if reference_images is not None:
            reference_features.update(extract_features(reference_images, extractor, batch_size, device, distributed))
    result = compute_metrics(sample_features, reference_features, metrics, reference_statistics=stats, device=device)
    result.update(num_samples=len(sample_images), reference_statistics_used=sorted(stats))
    return result


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `diffit evaluate` on the `diffit` command's subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="FID / sFID / IS / precision / recall (ADM's evaluator) and FD-DINOv2 of samples against a reference",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--samples", required=True, help="ADM npz (arr_0: uint8 [N, H, W, 3]) or a folder of images")
    parser.add_argument(
        "--reference",
        required=True,
        help="reference npz (e.g. VIRTUAL_imagenet256_labeled.npz; its mu/sigma/mu_s/sigma_s are "
        "used when present) or a folder of images",
    )
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated, from {','.join(METRICS)}"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="images per feature-extraction batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--inception-weights",
        default=None,
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
        "$DIFFIT_INCEPTION_WEIGHTS, then torch's hub cache)",
    )
    parser.add_argument("--dinov2-model", default=DEFAULT_DINOV2, help="Dinov2Model folder or Hub id, for fd_dinov2")
    parser.add_argument("--output", type=Path, default=None, help="write the metrics as JSON here")
    return parser


def check_evaluate_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Every user mistake, before any network is loaded: `ValueError` / `FileNotFoundError` naming the option."""
    metrics = check_metrics(args.metrics)
    for option, value in (("--samples", args.samples), ("--reference", args.reference)):
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"`{option}` {value!r} does not exist.")
        if not path.is_dir() and path.suffix != ".npz":
            raise ValueError(f"`{option}` must be an .npz file or a folder of images, got {value!r}.")
    if args.batch_size < 1:
        raise ValueError(f"`--batch-size` must be >= 1, got {args.batch_size}.")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"`--device` {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device {args.device}` but CUDA is not available here; use --device cpu.")
    if any(FEATURE_OF[m] != "dinov2" for m in metrics):
        resolve_inception_weights(args.inception_weights)  # FileNotFoundError with the download command
    if args.output is not None and not args.output.parent.is_dir():
        raise FileNotFoundError(
            f"`--output` {str(args.output)!r}: the folder {str(args.output.parent)!r} does not exist."
        )
    return metrics


def run_evaluate(args: argparse.Namespace) -> dict:
    """`diffit evaluate`: validate, evaluate (split across processes under `accelerate launch`), print and save."""
    metrics = check_evaluate_args(args)
    state = process_state()
    result = evaluate(
        args.samples,
        args.reference,
        metrics,
        args.batch_size,
        args.device if state.num_processes == 1 else state.device,
        args.inception_weights,
        args.dinov2_model,
        distributed=state.num_processes > 1,
    )
    if state.is_main_process:
        for name in metrics:
            logger.info("%s: %.6g", name, result[name])
        if args.output is not None:
            args.output.write_text(json.dumps(result, indent=2) + "\n")
            logger.info("wrote %s", args.output)
    return result
