"""The judge of the digits benchmark (`benchmarks/quality_digits.py`, `benchmarks/nfe_study.py`): how well samples
of a 16×16 digits pipeline match the real digits, with models fitted on the real training digits only.

- accuracy: an RBF SVM (C=10) trained on the 1297 real training digits (8×8) classifies each sample; the label asked
  for is the truth.
- FD: Fréchet distance (`metrics.frechet_distance`) to the real training digits in two feature spaces fitted on
  them: the hidden ReLU units of an MLP classifier (FID-style; units dead on real digits dropped) and the top 16
  principal components.
- NN: median L2 distance (8×8 ink) from each sample to its nearest training digit; far below the held-out digits'
  figure would mean the model copies its training set.

Samples are mapped back to 8×8 ink by the least-squares inverse of the training upsampling
(`data.digits.model_to_ink`, exact on real digits). Needs scikit-learn.
"""

import numpy as np
import torch

from ..data.digits import NUM_CLASSES, model_to_ink
from .metrics import frechet_distance


class DigitsJudge:
    """Classifier, feature spaces and references, all fitted on real training ink [N, 8, 8] and labels [N]."""

    def __init__(self, train_ink: np.ndarray, train_labels: np.ndarray):
        from sklearn.decomposition import PCA
        from sklearn.neural_network import MLPClassifier
        from sklearn.svm import SVC

        self.train = train_ink.reshape(len(train_ink), -1)
        self.svm = SVC(C=10, gamma="scale").fit(self.train, train_labels)
        self.mlp = MLPClassifier((64,), max_iter=2000, random_state=0).fit(self.train, train_labels)
        self.alive = self._hidden(self.train).std(0) > 1e-6  # ReLU units that never fire on real digits
        self.pca = PCA(16, random_state=0).fit(self.train)
        self.reference = {"mlp": self.mlp_features(self.train), "pca": self.pca.transform(self.train)}

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)

    def mlp_features(self, x: np.ndarray) -> np.ndarray:
        return self._hidden(x)[:, self.alive]

    def __call__(self, ink: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Ink [N, 8, 8] in [0, 1] drawn for `labels` [N] -> accuracy, fd_mlp, fd_pca, nn."""
        x = ink.reshape(len(ink), -1)
        nearest = np.sqrt(((x[:, None] - self.train[None]) ** 2).sum(-1).min(1))
        return {
            "accuracy": float((self.svm.predict(x) == labels).mean()),
            "fd_mlp": frechet_distance(self.mlp_features(x), self.reference["mlp"]),
            "fd_pca": frechet_distance(self.pca.transform(x), self.reference["pca"]),
            "nn": float(np.median(nearest)),
        }


def sample_digit_ink(
    pipe, per_class: int, seed: int, classes=range(NUM_CLASSES), **call_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` samples of each of `classes` (default: every digit) from a digits pipeline (pixel space, or
    latent with a VAE), one CPU generator seeded with `seed` -> (ink [len(classes)·per_class, 8, 8], labels)."""
    labels = np.repeat(np.asarray(classes), per_class)
    images = pipe(
        list(classes),
        num_images_per_label=per_class,
        generator=torch.Generator().manual_seed(seed),
        # pixel space: the raw final sample in [-1, 1]; latent: the decoded images, [0, 1] back to [-1, 1]
        output_type="latent" if pipe.vae is None else "pt",
        **call_kwargs,
    ).images
    return model_to_ink(images if pipe.vae is None else images * 2 - 1), labels


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of a[i] − b[i] over paired trainings (at least two pairs)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_difference needs two equal-length lists of at least 2, got {len(a)} and {len(b)}.")
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
