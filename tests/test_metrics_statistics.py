"""Fréchet distance, precision/recall and Inception Score against independent float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import softmax
from scipy.stats import entropy

from ditkit.metrics import precision_recall as pr
from ditkit.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from ditkit.metrics.inception_score import inception_score
from ditkit.runtime.errors import UserError


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _frechet_eigh(mu1, s1, mu2, s2) -> float:
    """Independent route: tr((Σ1 Σ2)^½) = Σ sqrt(eig(√Σ1 Σ2 √Σ1)), a symmetric PSD matrix (eigh only)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


# ----------------------------------------------------------------------------------------------- Fréchet


def test_frechet_closed_form_diagonal_gaussians():
    # Commuting (diagonal) covariances: d² = |μ1−μ2|² + Σ_i (σ1_i − σ2_i)².
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum()
    got = frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_closed_form_2x2_noncommuting():
    # For a 2×2 matrix M with positive eigenvalues, tr √M = sqrt(tr M + 2 sqrt(det M)).
    rng = np.random.default_rng(1)
    for _ in range(5):
        s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        m = s1 @ s2
        tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_matches_independent_eigh_route_and_is_symmetric():
    rng = np.random.default_rng(2)
    d = 24
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = _frechet_eigh(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # Torch float32 inputs are promoted to float64 before any arithmetic.
    got = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_feature_statistics_and_sampled_gaussians():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)
    # 20k draws from N(0, I) and N(m, 4I) in 4-D: the estimate converges to |m|² + 4·(2−1)².
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) * 2.0 + np.array([1.0, 0.0, 0.0, 1.0])
    assert frechet_distance_from_features(a, b) == pytest.approx(2.0 + 4.0, rel=0.03)


def test_frechet_singular_covariances_stay_finite():
    # Fewer samples than dimensions: rank-deficient covariances, a singular product; the eps handling of the
    # reference implementations keeps the result finite, and it agrees with the eigh route.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(12, 40)) + 0.3
    got = frechet_distance_from_features(a, b)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    assert np.isfinite(got)
    assert got == pytest.approx(_frechet_eigh(mu1, s1, mu2, s2), rel=1e-4)


def test_frechet_bad_shapes():
    with pytest.raises(UserError, match="differ in size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------- precision/recall


def _pr_reference(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Brute force in float64 with scipy: radii = k-th neighbour distance (self excluded), inclusive balls."""
    ref, smp = ref.astype(np.float64), smp.astype(np.float64)
    r_ref = np.sort(cdist(ref, ref), axis=1)[:, k]
    r_smp = np.sort(cdist(smp, smp), axis=1)[:, k]
    precision = np.mean([(cdist(s[None], ref)[0] <= r_ref).any() for s in smp])
    recall = np.mean([(cdist(r[None], smp)[0] <= r_smp).any() for r in ref])
    return float(precision), float(recall)


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (1.0, 1.0), (0.0, 0.3), (0.0, 2.5)])
def test_precision_recall_match_brute_force(shift, scale):
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(300, 16)).astype(np.float32)
    smp = (rng.normal(size=(250, 16)) * scale + shift).astype(np.float32)
    got = pr.precision_recall(ref, smp)
    expected = _pr_reference(ref, smp)
    # float32 distances may flip a point lying on a ball's surface: allow one point of difference.
    assert got[0] == pytest.approx(expected[0], abs=1 / 250 + 1e-12)
    assert got[1] == pytest.approx(expected[1], abs=1 / 300 + 1e-12)


def test_precision_recall_behave_as_defined():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(200, 8))
    assert pr.precision_recall(ref, ref) == (1.0, 1.0)
    far = pr.precision_recall(ref, ref + 100.0)
    assert far == (0.0, 0.0)
    # Samples collapsed into a small region of the reference: precise, but little recall.
    collapsed = pr.precision_recall(ref, rng.normal(size=(200, 8)) * 0.05)
    assert collapsed[0] > 0.9 and collapsed[1] < 0.2


def test_manifold_radii_closed_form_and_batching(monkeypatch):
    # Points 0, 1, ..., 9 on a line: the 3rd nearest neighbour of 0 is 3 (radius² 9); of 5 it is 3 or 7 (4).
    line = np.arange(10, dtype=np.float64)[:, None]
    radii = pr.manifold_radii(line).numpy()
    np.testing.assert_allclose(radii[[0, 5, 9]], [9.0, 4.0, 9.0])
    rng = np.random.default_rng(7)
    ref, smp = rng.normal(size=(90, 5)), rng.normal(size=(70, 5)) * 1.3
    whole = pr.precision_recall(ref, smp)
    monkeypatch.setattr(pr, "ROW_BATCH", 16)  # row batches of 16 give the same answer
    assert pr.precision_recall(ref, smp) == whole
    with pytest.raises(UserError, match="more than k"):
        pr.manifold_radii(np.zeros((3, 2)))


# ----------------------------------------------------------------------------------------- Inception Score


def test_inception_score_closed_forms():
    c = 10
    confident = np.full((200, c), -40.0)
    confident[np.arange(200), np.arange(200) % c] = 40.0  # certain predictions, classes balanced
    assert inception_score(confident) == pytest.approx(c, rel=1e-6)
    same = np.tile(np.random.default_rng(8).normal(size=(1, c)), (50, 1))  # identical predictions
    assert inception_score(same) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_scipy_per_split():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(23, 7)) * 3
    split = 10  # splits of 10, 10 and 3
    scores = []
    for start in range(0, 23, split):
        p = softmax(logits[start : start + split], axis=1)
        marginal = p.mean(0)
        scores.append(np.exp(np.mean([entropy(row, marginal) for row in p])))
    assert inception_score(logits, split_size=split) == pytest.approx(np.mean(scores), rel=1e-10)
    assert inception_score(torch.tensor(logits, dtype=torch.float32), split_size=split) == pytest.approx(
        np.mean(scores), rel=1e-5
    )
