"""`diffusers_diffit.evaluation` against references written here from the papers' definitions (scipy's `sqrtm` FID,
brute-force k-NN precision/recall, the Inception Score by hand), ADM's npz layout, and bad inputs."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist
from torch import nn

from diffusers_diffit.cli import build_parser
from diffusers_diffit.evaluation import (
    FeatureStatistics,
    InceptionFeatureExtractor,
    check_images,
    compute_metrics,
    evaluate,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    load_images,
    manifold_radii,
    precision_recall,
    reference_statistics,
    save_npz,
)
from diffusers_diffit.evaluation import evaluator as evaluate_module
from diffusers_diffit.evaluation.evaluator import check_evaluate_args, run_evaluate


# ------------------------------------------------------------------------------------------ independent references


def fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula with scipy's general matrix square root of Σ_a Σ_b (TTUR / ADM style)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def inception_score_reference(p: np.ndarray, splits: int) -> float:
    """Salimans et al.: exp(E_x KL(p(y|x) || p(y))) per split, averaged; plain loops."""
    n, scores = len(p), []
    for s in range(splits):
        part = p[n * s // splits : n * (s + 1) // splits]
        marginal = [sum(row[c] for row in part) / len(part) for c in range(p.shape[1])]
        kl = [sum(row[c] * math.log(row[c] / marginal[c]) for c in range(p.shape[1]) if row[c] > 0) for row in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    return sum(scores) / splits


def precision_recall_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 by brute force: full distance matrices, k-th neighbour with the point itself first."""
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)  # [M, N]
    precision = np.mean([(d[i] <= real_radii).any() for i in range(len(fake))])
    recall = np.mean([(d[:, j] <= fake_radii).any() for j in range(len(real))])
    return float(precision), float(recall)


# ------------------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("dim", [4, 32])
def test_frechet_distance_matches_scipy_sqrtm_fid(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))  # correlated
    b = rng.normal(0.3, 1.5, size=(400, dim)) + rng.normal(size=(400, 1))
    expected = fid_reference(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    # statistics, (μ, Σ) tuples and the 4-argument form give the same number
    sa, sb = feature_statistics(a), feature_statistics(b)
    assert frechet_distance(sa, (sb.mu, sb.sigma)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_statistics(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_singular_covariances_is_the_closed_form():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 60))], axis=1)  # N < D, rank 3
    assert abs(frechet_distance(a, a)) < 1e-9
    shift = np.zeros(63)
    shift[10] = 2.0
    assert frechet_distance(a + shift, a) == pytest.approx(4.0, abs=1e-9)  # only the means differ
    # two Gaussians with diagonal covariances: Σ (√s_a − √s_b)² + ‖Δμ‖²
    sa = FeatureStatistics(np.zeros(3), np.diag([1.0, 4.0, 0.0]))
    sb = FeatureStatistics(np.ones(3), np.diag([4.0, 1.0, 9.0]))
    assert frechet_distance(sa, sb) == pytest.approx(3 + 1 + 1 + 9, abs=1e-12)


def test_frechet_distance_rejects_bad_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 4))
    with pytest.raises(ValueError, match="covariance needs at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(a, rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="2-d"):
        frechet_distance(a[0], a)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 4), np.nan), a)
    with pytest.raises(ValueError, match="dtype"):
        frechet_distance(a.astype(str), a)


# ------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_matches_the_definition_by_hand():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(103, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p[0] = np.eye(7)[2]  # exact zeros: 0·log 0 = 0
    for splits in (1, 3, 10):
        assert inception_score(p, num_splits=splits) == pytest.approx(inception_score_reference(p, splits), rel=1e-12)


def test_inception_score_extremes():
    assert inception_score(np.full((20, 5), 0.2), num_splits=2) == pytest.approx(1.0)  # no information
    assert inception_score(np.tile(np.eye(5), (4, 1)), num_splits=2) == pytest.approx(5.0)  # sure and diverse


def test_inception_score_rejects_bad_inputs():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.random.default_rng(0).normal(size=(20, 5)))
    with pytest.raises(ValueError, match="num_splits"):
        inception_score(np.full((5, 2), 0.5), num_splits=10)
    with pytest.raises(ValueError, match="2-d"):
        inception_score(np.full(5, 0.2))


# ------------------------------------------------------------------------------------------ precision / recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force_knn(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(157, 8))
    fake = rng.normal(0.4, 1.3, size=(131, 8))
    expected = precision_recall_reference(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    # small blocks: many row and column blocks, uneven last ones
    assert precision_recall(real, fake, k=k, block_size=17, dtype=torch.float64) == expected
    assert precision_recall(real, fake, k=k, block_size=1000, dtype=torch.float64) == expected
    p32, r32 = precision_recall(real, fake, k=k, block_size=17)  # float32: at most a boundary point flips
    assert abs(p32 - expected[0]) <= 1 / len(fake) and abs(r32 - expected[1]) <= 1 / len(real)


def test_manifold_radii_are_kth_neighbour_distances():
    x = np.random.default_rng(2).normal(size=(60, 5))
    np.testing.assert_allclose(
        manifold_radii(x, k=3, block_size=7, dtype=torch.float64), np.sort(cdist(x, x), axis=1)[:, 3], rtol=1e-10
    )


def test_precision_recall_of_a_set_with_itself_is_one():
    x = np.random.default_rng(3).normal(size=(50, 4))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    with pytest.raises(ValueError, match="feature dimension"):
        precision_recall(real, rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(real[:3], fake, k=3)
    with pytest.raises(ValueError, match="`k`"):
        precision_recall(real, fake, k=0)
    with pytest.raises(ValueError, match="block_size"):
        precision_recall(real, fake, block_size=0)


# ------------------------------------------------------------------------------------------ images and extraction


class TinyExtractor(nn.Module):
    """A fixed random conv net on uint8 [B, 3, H, W]: 'pool' [B, 6] and 'spatial' [B, 6·2·2]."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # every instance is the same network
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(torch.randn(6, generator=generator) * 0.1)

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        x = torch.tanh(self.conv(images.float() / 127.5 - 1))
        return {
            "pool": x.mean((2, 3)),
            "spatial": nn.functional.adaptive_avg_pool2d(x, 2).flatten(1),
            "logits": x.mean((2, 3)) * 3,
        }


def _images(n: int, seed: int, side: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def test_extract_features_does_not_depend_on_the_batch_size():
    images, extractor = _images(23, 0), TinyExtractor()
    whole = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))
    for batch_size in (1, 5, 100):
        out = extract_features(images, extractor, batch_size=batch_size, progress=False)
        for key in whole:
            np.testing.assert_allclose(out[key], whole[key].detach().numpy(), rtol=1e-5, atol=1e-6)
    plain = extract_features(images, nn.Sequential(nn.Flatten()), batch_size=4, progress=False, device="cpu")
    np.testing.assert_array_equal(plain, images.transpose(0, 3, 1, 2).reshape(23, -1).astype(np.float32))


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        check_images(np.zeros((2, 3, 8, 8), dtype=np.uint8))  # NCHW
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        check_images(np.full((2, 8, 8, 3), 300, dtype=np.int32))
    assert check_images(np.full((1, 2, 2, 3), 7, dtype=np.int64)).dtype == np.uint8
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(_images(2, 0), TinyExtractor(), batch_size=0)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip_in_adms_layout(tmp_path, compressed):
    images = _images(12, 1)
    stats = {"mu": np.arange(3.0), "sigma": np.eye(3), "mu_s": np.zeros(2), "sigma_s": 2 * np.eye(2)}
    path = tmp_path / "ref.npz"
    if compressed:
        np.savez_compressed(path, arr_0=images, **stats)
    else:
        save_npz(path, images, statistics=stats, labels=np.arange(12))
    loaded = load_images(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (12, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(loaded), images)
    with np.load(path) as npz:  # exactly ADM's keys
        assert set(npz.files) == {"arr_0", *stats} | (set() if compressed else {"labels"})
    read = reference_statistics(path)
    np.testing.assert_array_equal(read["pool"].mu, stats["mu"])
    np.testing.assert_array_equal(read["spatial"].sigma, stats["sigma_s"])


def test_images_from_a_folder(tmp_path):
    from PIL import Image

    images = _images(3, 2)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp_path / f"{i:03d}.png")
    Image.fromarray(images[0, ..., 0]).save(tmp_path / "003.png")  # grayscale -> RGB
    loaded = load_images(tmp_path)  # read lazily, a slice at a time
    assert len(loaded) == 4 and loaded.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(loaded[:3], images)
    np.testing.assert_array_equal(loaded[3:][0], np.repeat(images[0, ..., :1], 3, axis=-1))
    features = extract_features(loaded, TinyExtractor(), batch_size=3, progress=False)
    whole = extract_features(loaded[:], TinyExtractor(), progress=False)["pool"]
    # a tolerance: batches of 3 and of 4 may run other kernels (seen on MKL's SSE4.2 path: 1.5e-8 apart)
    np.testing.assert_allclose(features["pool"], whole, rtol=1e-5, atol=1e-7)
    Image.fromarray(_images(1, 3, side=9)[0]).save(tmp_path / "004.png")
    with pytest.raises(ValueError, match="004.png"):
        extract_features(load_images(tmp_path), TinyExtractor(), batch_size=2, progress=False)


def test_inception_wrapper_keeps_adms_spatial_layout():
    """The hook reads `Mixed_6d.branch1x1`, keeps 7 channels and flattens them NHWC as ADM's `spatial[..., :7]`."""

    class FakeInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.Mixed_6d = nn.Module()
            self.Mixed_6d.branch1x1 = nn.Conv2d(3, 9, 1)
            self.fc = nn.Linear(9, 4)

        def forward(self, images):
            spatial = self.Mixed_6d.branch1x1(images.float())
            pool = spatial.mean((2, 3))
            return pool, pool @ self.fc.weight.T

    net = FakeInception()
    images = torch.from_numpy(_images(2, 3, side=5)).permute(0, 3, 1, 2)
    out = InceptionFeatureExtractor(net)(images)
    nhwc = net.Mixed_6d.branch1x1(images.float()).permute(0, 2, 3, 1)[..., :7]  # TF's layout, then [..., :7]
    torch.testing.assert_close(out["spatial"], nhwc.reshape(2, -1))
    assert out["pool"].shape == (2, 9) and out["logits"].shape == (2, 4)


def test_dinov2_wrapper_returns_the_normed_cls_token():
    import transformers

    from diffusers_diffit.evaluation import DINOv2FeatureExtractor

    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=28
    )
    model = transformers.Dinov2Model(config).eval()
    extractor = DINOv2FeatureExtractor(model, resolution=28)
    features = extract_features(_images(3, 4, side=20), extractor, batch_size=2, progress=False)["dinov2"]
    assert features.shape == (3, 32)
    np.testing.assert_allclose(features.mean(1), 0, atol=1e-4)  # layer-normed (affine weight 1, bias 0 at init)


def test_missing_dinov2_weights_say_how_to_get_them(tmp_path):
    from diffusers_diffit.evaluation import DINOv2FeatureExtractor

    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/dinov2-large"):
        DINOv2FeatureExtractor.from_pretrained(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------ metrics and the command


def test_compute_metrics_uses_reference_statistics_like_adm():
    extractor = TinyExtractor()
    samples = extract_features(_images(40, 5), extractor, progress=False)
    reference = extract_features(_images(50, 6), extractor, progress=False)
    given = FeatureStatistics(np.zeros(6), np.eye(6))  # deliberately not the reference images' statistics
    out = compute_metrics(
        samples, reference, ("fid", "sfid", "precision", "recall", "is"), reference_statistics={"pool": given}
    )
    assert out["fid"] == pytest.approx(fid_reference_stats(samples["pool"], given))  # the npz's μ, Σ
    assert out["sfid"] == pytest.approx(fid_reference(samples["spatial"], reference["spatial"]), rel=1e-6)
    assert (out["precision"], out["recall"]) == pytest.approx(
        precision_recall_reference(reference["pool"], samples["pool"], 3), abs=1 / 40
    )
    logits = samples["logits"].astype(np.float64)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert out["is"] == pytest.approx(inception_score_reference(p, 10), rel=1e-9)
    with pytest.raises(ValueError, match="not statistics"):
        compute_metrics(samples, {"pool": given}, ("precision",))
    with pytest.raises(ValueError, match="--metrics"):
        compute_metrics(samples, reference, ("fid", "kid"))


def fid_reference_stats(features: np.ndarray, stats: FeatureStatistics) -> float:
    cov = np.cov(features, rowvar=False)
    root = sqrtm(cov @ stats.sigma).real
    mean_term = ((features.mean(0) - stats.mu) ** 2).sum()
    return float(mean_term + np.trace(cov) + np.trace(stats.sigma) - 2 * np.trace(root))


@pytest.fixture
def tiny_inception(monkeypatch, tmp_path):
    """`diffit evaluate` with TinyExtractor in place of the Inception network (and a dummy weights file)."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(
        evaluate_module.InceptionFeatureExtractor,
        "from_pretrained",
        classmethod(lambda cls, path=None: TinyExtractor()),
    )
    return weights


def test_diffit_evaluate_end_to_end_with_reference_statistics(tmp_path, tiny_inception):
    samples, reference = _images(30, 7), _images(40, 8)
    ref_features = extract_features(reference, TinyExtractor(), progress=False)
    stats = {
        "mu": ref_features["pool"].mean(0) + 1,
        "sigma": np.cov(ref_features["pool"], rowvar=False),
        "mu_s": ref_features["spatial"].mean(0),
        "sigma_s": np.cov(ref_features["spatial"], rowvar=False),
    }
    save_npz(tmp_path / "samples.npz", samples)
    save_npz(tmp_path / "ref.npz", reference, statistics=stats)
    out_json = tmp_path / "metrics.json"
    args = build_parser().parse_args(
        [
            "evaluate",
            "--samples",
            str(tmp_path / "samples.npz"),
            "--reference",
            str(tmp_path / "ref.npz"),
            "--metrics",
            "fid,sfid,is,precision,recall",
            "--batch-size",
            "7",
            "--device",
            "cpu",
            "--inception-weights",
            str(tiny_inception),
            "--output",
            str(out_json),
        ]
    )
    result = run_evaluate(args)
    sample_features = extract_features(samples, TinyExtractor(), progress=False)
    assert result["fid"] == pytest.approx(
        fid_reference_stats(sample_features["pool"], FeatureStatistics(stats["mu"], stats["sigma"])), rel=1e-6
    )
    assert result["reference_statistics_used"] == ["pool", "spatial"]
    assert (result["precision"], result["recall"]) == pytest.approx(
        precision_recall_reference(ref_features["pool"], sample_features["pool"], 3), abs=1 / 30
    )
    assert json.loads(out_json.read_text())["fid"] == pytest.approx(result["fid"])
    # the same through the functional API, without statistics in the reference: they come from its images
    save_npz(tmp_path / "ref_plain.npz", reference)
    plain = evaluate(tmp_path / "samples.npz", tmp_path / "ref_plain.npz", ("fid",))
    assert plain["fid"] == pytest.approx(fid_reference(sample_features["pool"], ref_features["pool"]), rel=1e-6)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"samples": "missing.npz"}, FileNotFoundError, "--samples"),
        ({"reference": "ref.txt"}, ValueError, "--reference"),
        ({"metrics": "fid,kid"}, ValueError, "--metrics"),
        ({"batch_size": 0}, ValueError, "--batch-size"),
        ({"device": "gpu0"}, ValueError, "--device"),
        ({"inception_weights": "nowhere.pth"}, FileNotFoundError, "curl -L"),
        ({"output": "no/such/dir/m.json"}, FileNotFoundError, "--output"),
    ],
)
def test_evaluate_refuses_user_mistakes_before_loading_networks(tmp_path, monkeypatch, change, error, message):
    monkeypatch.chdir(tmp_path)
    save_npz("s.npz", _images(4, 0))
    (tmp_path / "ref.txt").write_text("")
    (tmp_path / "w.pth").write_bytes(b"")
    values = dict(
        samples="s.npz",
        reference="s.npz",
        metrics="fid",
        batch_size=8,
        device="cpu",
        inception_weights="w.pth",
        dinov2_model="facebook/dinov2-large",
        output=None,
    )
    values.update(change)
    if values["output"] is not None:
        values["output"] = tmp_path / values["output"]

    def no_network(*args, **kwargs):
        raise AssertionError("a network was loaded before the arguments were checked")

    monkeypatch.setattr(evaluate_module.InceptionFeatureExtractor, "from_pretrained", no_network)
    with pytest.raises(error, match=message):
        check_evaluate_args(argparse.Namespace(**values))
