"""Evaluation as every ImageNet number in the field is measured: ADM's evaluator (FID, sFID, Inception Score,
precision and recall on Inception-v3 features) plus FD-DINOv2, in PyTorch; `diffit evaluate` on the command line.

The maths (`metrics`) works on any features; `extract_features` runs any `nn.Module` over uint8 images.
"""

from .evaluator import METRICS, compute_metrics, evaluate, reference_statistics
from .features import (
    DINOv2FeatureExtractor,
    InceptionFeatureExtractor,
    check_images,
    extract_features,
    load_images,
    save_npz,
)
from .metrics import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    manifold_radii,
    precision_recall,
)


__all__ = [
    "METRICS",
    "DINOv2FeatureExtractor",
    "FeatureStatistics",
    "InceptionFeatureExtractor",
    "check_images",
    "compute_metrics",
    "evaluate",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "inception_score",
    "load_images",
    "manifold_radii",
    "precision_recall",
    "reference_statistics",
    "save_npz",
]
