"""The statistics behind `benchmarks/quality_digits.py`'s table, against textbook formulas."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import sqrtm


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality_digits import frechet_distance, paired_difference  # noqa: E402


def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula: ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½), with scipy's general matrix square root."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_fids_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))  # correlated features
    b = rng.normal(0.5, 2.0, size=(300, 6))
    assert frechet_distance(a, b) == pytest.approx(_frechet_reference(a, b), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_of_a_set_to_itself_is_zero_even_with_dead_features():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(size=(200, 5)), np.zeros((200, 2))], axis=1)  # rank-deficient covariance
    assert abs(frechet_distance(a, a)) < 1e-8
    shifted = a + np.array([1.0, 0, 0, 0, 0, 0, 0])
    assert frechet_distance(shifted, a) == pytest.approx(1.0, abs=1e-6)  # only the means differ


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    mean, se = paired_difference([0.30, 0.32, 0.31], [0.29, 0.30, 0.30])  # differences 0.01, 0.02, 0.01
    assert mean == pytest.approx(0.04 / 3)
    assert se == pytest.approx(np.sqrt(((0.01 - 0.04 / 3) ** 2 * 2 + (0.02 - 0.04 / 3) ** 2) / 2) / np.sqrt(3))
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference([0.3, 0.3], [0.3])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([0.3], [0.3])
