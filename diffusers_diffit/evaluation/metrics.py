"""The maths of ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`), on any features.

- Fréchet distance of two Gaussians fitted to features [N, D] (FID on Inception pool features, sFID on the spatial
  `mixed_6/conv` features, FD-DINOv2 on DINOv2 features):

      FD = ‖μ_a − μ_b‖² + Tr(Σ_a) + Tr(Σ_b) − 2·Tr((Σ_a Σ_b)^½),   Σ = np.cov(features) (unbiased, N − 1)

  Tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a Σ_b; they equal those of the symmetric
  positive semi-definite Σ_a^½ Σ_b Σ_a^½, which `numpy.linalg.eigvalsh` computes stably even for singular
  covariances (ADM calls `scipy.linalg.sqrtm(Σ_a Σ_b)`, the same number up to rounding when it converges).
- Inception Score (Salimans et al. 2016) of class probabilities p(y|x) [N, C], in `num_splits` equal parts:

      IS = mean over parts of exp( mean_i KL(p(y|x_i) ‖ p(y)) ),  p(y) = the part's mean of p(y|x_i)

  ADM cuts parts of 5000 samples, i.e. 10 parts for its 50,000 samples, and reports the mean (no std).
- Improved precision and recall (Kynkäänniemi et al. 2019, as ADM's `ManifoldEstimator`): the radius r_j of a point
  is the distance to its k-th nearest neighbour within its own set (the point itself counts as the 0-th);

      precision = fraction of fake f with ‖f − r‖ ≤ r_r for some real r
      recall    = fraction of real r with ‖r − f‖ ≤ r_f for some fake f

  Distances come from ‖u‖² − 2u·v + ‖v‖² (clamped at 0) in blocks of at most `block_size` rows × columns, so a
  50k × 50k comparison never holds more than one block; ADM computes them in float16 (float32 on overflow), this in
  float32 or, with `dtype=torch.float64`, float64.
"""

import logging
from typing import NamedTuple

import numpy as np
import torch


logger = logging.getLogger(__name__)


class FeatureStatistics(NamedTuple):
    """Mean μ [D] and covariance Σ [D, D] (float64) of a feature set: what an ADM reference npz stores as
    `mu` / `sigma` (pool features) and `mu_s` / `sigma_s` (spatial features)."""

    mu: np.ndarray
    sigma: np.ndarray


def check_features(features, name: str, min_samples: int = 1) -> np.ndarray:
    """`features` as a finite float64 array [N, D] with N >= `min_samples`, else `ValueError` naming `name`."""
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    if features.dtype.kind not in "fiu":
        raise ValueError(f"`{name}` must hold real numbers, got dtype {features.dtype}.")
    if features.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-d array [num_samples, feature_dim], got shape {features.shape}.")
    if len(features) < min_samples:
        raise ValueError(f"`{name}` needs at least {min_samples} samples here, got {len(features)}.")
    if not np.isfinite(features).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return features.astype(np.float64, copy=False)


def feature_statistics(features) -> FeatureStatistics:
    """μ and the unbiased covariance Σ (divisor N − 1, as `np.cov`) of features [N, D]; N >= 2."""
    features = check_features(features, "features", min_samples=2)
    return FeatureStatistics(features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1))


def _as_statistics(value, name: str) -> FeatureStatistics:
    if isinstance(value, FeatureStatistics):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return FeatureStatistics(*value)
    features = check_features(value, name)
    if len(features) < 2:
        raise ValueError(f"`{name}` has {len(features)} sample(s); a covariance needs at least 2.")
    return feature_statistics(features)


def frechet_distance(a, b) -> float:
    """Fréchet distance between two feature sets, each given as features [N, D] (N >= 2) or as `FeatureStatistics`
    / a (μ, Σ) tuple. See the module docstring for the formula."""
    a, b = _as_statistics(a, "a"), _as_statistics(b, "b")
    return frechet_distance_from_statistics(a.mu, a.sigma, b.mu, b.sigma)


def frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a) + Tr(Σ_b) − 2·Tr((Σ_a Σ_b)^½) for μ [D] and symmetric PSD Σ [D, D]."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.ndim != 1 or mu_a.shape != mu_b.shape:
        raise ValueError(f"The means must be vectors of one length, got shapes {mu_a.shape} and {mu_b.shape}.")
    dim = mu_a.shape[0]
    for name, sigma in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"`{name}` must have shape ({dim}, {dim}) to match the means, got {sigma.shape}.")
        if not np.isfinite(sigma).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
    # Tr((Σ_a Σ_b)^½) = Σ √λ_i(Σ_a^½ Σ_b Σ_a^½): symmetric, so eigvalsh; tiny negative eigenvalues are rounding.
    w, v = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


def inception_score(probabilities, num_splits: int = 10) -> float:
    """Inception Score of class probabilities p(y|x) [N, C] (rows >= 0 summing to 1, e.g. a softmax), the mean over
    `num_splits` consecutive parts (sizes differ by at most one) of exp(mean_i KL(p(y|x_i) ‖ p(y)))."""
    p = check_features(probabilities, "probabilities")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= len(p):
        raise ValueError(f"`num_splits` must be an int in [1, {len(p)}] (the number of samples), got {num_splits!r}.")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1, atol=1e-3):
        raise ValueError(
            "`probabilities` must be non-negative with rows summing to 1 (class probabilities); apply a softmax to "
            "logits first."
        )
    bounds = [len(p) * i // num_splits for i in range(num_splits + 1)]
    scores = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = p[start:stop]  # [n, C]
        marginal = part.mean(axis=0, keepdims=True)  # p(y) [1, C]
        # KL(p ‖ q) = Σ_y p·(log p − log q); the floor only makes 0·log 0 = 0 (q_y = 0 implies p_y = 0)
        tiny = np.finfo(np.float64).tiny
        kl = part * (np.log(np.maximum(part, tiny)) - np.log(np.maximum(marginal, tiny)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖u_i − v_j‖² [n, m] of u [n, D] and v [m, D], clamped at 0 (ADM's formula)."""
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]).clamp_min(0)


def _blocks(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _squared_radii(x: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Squared distance [N] from each row of x [N, D] to its k-th nearest row (itself being the 0-th)."""
    n = len(x)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0, r1 in _blocks(n, block_size):
        best = None  # [rows, k + 1] smallest squared distances so far
        for c0, c1 in _blocks(n, block_size):
            d = _pairwise_sq_distances(x[r0:r1], x[c0:c1])
            candidates = d if best is None else torch.cat([best, d], dim=1)
            best = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r0:r1] = best[:, k]
    return radii


def manifold_radii(
    features, k: int = 3, block_size: int = 10_000, device: str | torch.device = "cpu", dtype=torch.float32
) -> np.ndarray:
    """Distance [N] from each point to its k-th nearest neighbour in `features` [N, D] (the point itself is the 0-th
    neighbour, so N must exceed k). Memory: one block of `block_size`² distances plus N·(k + 1) values."""
    x = torch.as_tensor(check_features(features, "features", min_samples=k + 1), dtype=dtype, device=device)
    return _squared_radii(x, k, block_size).sqrt().cpu().numpy().astype(np.float64)


def _coverage(points: torch.Tensor, centres: torch.Tensor, squared_radii: torch.Tensor, block_size: int):
    """For each point [n, D]: is it within the ball of some centre c_j (‖p − c_j‖² <= r_j²)? bool [n]."""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for r0, r1 in _blocks(len(points), block_size):
        for c0, c1 in _blocks(len(centres), block_size):
            d = _pairwise_sq_distances(points[r0:r1], centres[c0:c1])
            inside[r0:r1] |= (d <= squared_radii[None, c0:c1]).any(dim=1)
    return inside


def precision_recall(
    real_features,
    fake_features,
    k: int = 3,
    block_size: int = 10_000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake_features` [M, D] against `real_features`
    [N, D], with k-th-nearest-neighbour balls (see the module docstring). Both sets need more than k points.

    `block_size` bounds memory (block_size² distances at a time); `device="cuda"` runs the blocks on a GPU.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be an int >= 1, got {block_size!r}.")
    real = check_features(real_features, "real_features", min_samples=k + 1)
    fake = check_features(fake_features, "fake_features", min_samples=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"`real_features` and `fake_features` must have the same feature dimension, got {real.shape[1]} and "
            f"{fake.shape[1]}."
        )
    real_t = torch.as_tensor(real, dtype=dtype, device=device)  # [N, D]
    fake_t = torch.as_tensor(fake, dtype=dtype, device=device)  # [M, D]
    real_radii, fake_radii = _squared_radii(real_t, k, block_size), _squared_radii(fake_t, k, block_size)
    precision = _coverage(fake_t, real_t, real_radii, block_size).double().mean().item()
    recall = _coverage(real_t, fake_t, fake_radii, block_size).double().mean().item()
    return precision, recall
