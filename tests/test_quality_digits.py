"""The digits benchmark's judge (diffusers_diffit/evaluation/digits.py): it separates real digits from damaged ones,
and its paired statistic is the textbook one."""

import numpy as np
import pytest

from diffusers_diffit.data.digits import digits_split
from diffusers_diffit.evaluation.digits import DigitsJudge, paired_difference


@pytest.fixture(scope="module")
def split():
    return digits_split()


@pytest.fixture(scope="module")
def judge(split):
    train_ink, train_labels, _, _ = split
    return DigitsJudge(train_ink, train_labels)


def test_held_out_real_digits_score_like_real_digits(judge, split):
    _, _, held_ink, held_labels = split
    real = judge(held_ink, held_labels)
    assert real["accuracy"] >= 0.97  # real digits the judge never saw
    assert real["fd_mlp"] < 0.5 and real["fd_pca"] < 0.1
    assert real["nn"] > 0.5  # held-out digits are not copies of training digits

    rng = np.random.default_rng(0)
    noisy = np.clip(held_ink + rng.normal(0, 0.25, held_ink.shape), 0, 1)
    damaged = judge(noisy, held_labels)
    assert damaged["fd_mlp"] > 2 * real["fd_mlp"] and damaged["fd_pca"] > 2 * real["fd_pca"]
    wrong = judge(held_ink, (held_labels + 1) % 10)  # the right images for the wrong labels
    assert wrong["accuracy"] < 0.05 and wrong["fd_mlp"] == pytest.approx(real["fd_mlp"])
    copies = judge(*split[:2])  # the training digits themselves: nearest neighbour at distance 0
    assert copies["nn"] == 0


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    mean, se = paired_difference([0.30, 0.32, 0.31], [0.29, 0.30, 0.30])  # differences 0.01, 0.02, 0.01
    assert mean == pytest.approx(0.04 / 3)
    assert se == pytest.approx(np.std([0.01, 0.02, 0.01], ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference([0.3, 0.3], [0.3])
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference([0.3], [0.3])
