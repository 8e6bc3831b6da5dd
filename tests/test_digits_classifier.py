"""The built-in digits data and the digits classifier yardstick (one ~10 s training at 8×8, shared)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditkit.data.digits import load_digits_split
from ditkit.metrics import digits_classifier as dc
from ditkit.runtime.errors import UserError


def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Independent float64 bilinear upsampling with half-pixel centres (align_corners=False semantics)."""
    n = img.shape[0]
    src = (np.arange(out) + 0.5) * n / out - 0.5
    src = np.clip(src, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    rows = img[lo] * (1 - w)[:, None] + img[hi] * w[:, None]
    return rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]


def test_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    data = load_digits()
    x_tr, y_tr = load_digits_split(8, "train")
    x_te, y_te = load_digits_split(8, "test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    # At the native size the images are the sklearn values mapped 0 -> -1 (background), 16 -> +1 (ink).
    native = np.concatenate([x_tr.numpy(), x_te.numpy()])[:, 0]
    expected = data.images / 8.0 - 1.0
    # Every sklearn image appears exactly once across the two splits (compare as sorted byte rows).
    key = lambda a: sorted(map(bytes, np.round(a.reshape(len(a), -1) * 8).astype(np.int8)))  # noqa: E731
    assert key(native) == key(expected)
    # Stratified: each class has 20% ± 1 image in the test split.
    for c in range(10):
        total = int((data.target == c).sum())
        assert abs(int((y_te == c).sum()) - 0.2 * total) <= 1
    # Fixed: the same call gives the same split; another seed gives another one.
    assert torch.equal(load_digits_split(8, "test")[1], y_te)
    assert not torch.equal(load_digits_split(8, "test", seed=1)[0], x_te)


def test_upscaling_matches_independent_bilinear_and_range():
    x8, y8 = load_digits_split(8, "test")
    x20, y20 = load_digits_split(20, "test")
    assert x20.shape == (360, 1, 20, 20) and torch.equal(y8, y20)
    assert float(x20.min()) >= -1.0 and float(x20.max()) <= 1.0
    for i in (0, 17, 359):
        ref = _bilinear_reference((x8[i, 0].double().numpy() + 1) / 2, 20) * 2 - 1
        np.testing.assert_allclose(x20[i, 0].numpy(), ref, atol=1e-5)
    # Background stays at -1 (the corners of every digit are blank in this data set).
    assert torch.all(x20[:, 0, 0, 0] == -1.0)
    small, _ = load_digits_split(4, "test")  # downscaling is antialiased: still within range
    assert small.shape == (360, 1, 4, 4) and float(small.min()) >= -1.0


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="split"):
        load_digits_split(8, "valid")
    with pytest.raises(UserError, match="image size"):
        load_digits_split(0, "train")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("DITKIT_CACHE", str(cache))
    dc._LOADED.clear()
    model = dc.get_digits_classifier(8, verbose=False)
    yield model, cache
    mp.undo()
    dc._LOADED.clear()


def test_classifier_accuracy_and_cache(classifier, monkeypatch):
    model, cache = classifier
    monkeypatch.setenv("DITKIT_CACHE", str(cache))
    path = dc.classifier_path(8)
    assert path.exists() and path.parent == cache
    assert not list(cache.glob(".*.tmp"))  # atomic write left no temp file
    x_te, y_te = load_digits_split(8, "test")
    assert dc.accuracy(model, x_te, y_te) >= 0.97
    # A fresh process state loads the cached file (no training: train would be slow and is forbidden here).
    dc._LOADED.clear()
    monkeypatch.setattr(dc, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained despite cache"))
    again = dc.get_digits_classifier(8, verbose=False)
    assert again is not model
    assert torch.equal(again(x_te[:16]), model(x_te[:16]))


def test_digits_metrics_separate_real_from_noise(classifier, monkeypatch):
    model, cache = classifier
    monkeypatch.setenv("DITKIT_CACHE", str(cache))
    x_tr, y_tr = load_digits_split(8, "train")
    x_te, y_te = load_digits_split(8, "test")
    real = dc.digits_metrics(x_tr, y_tr, verbose=False)
    assert real["accuracy"] >= 0.97 and real["num_samples"] == 1437
    # The Fréchet distance agrees with an independent float64 computation on the same features.
    fa = dc.digits_features(model, x_tr).numpy()
    fb = dc.digits_features(model, x_te).numpy()
    expected = _frechet_eig(fa, fb)
    # sqrtm of a near-singular product (ReLU features, many near-constant) is exact to ~1e-6 of the trace.
    scale = float(np.trace(np.cov(fa, rowvar=False)) + np.trace(np.cov(fb, rowvar=False)))
    assert real["frechet"] == pytest.approx(expected, abs=1e-6 * scale)
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = dc.digits_metrics(noise, y_te, verbose=False)
    assert bad["accuracy"] < 0.3
    assert bad["frechet"] > 20 * max(real["frechet"], 0.05)
    wrong = dc.digits_metrics(x_te, (y_te + 1) % 10, verbose=False)  # right images, wrong intended classes
    assert wrong["accuracy"] < 0.05
    assert dc.digits_metrics(x_te, None, verbose=False)["accuracy"] is None
    with pytest.raises(UserError, match="labels"):
        dc.digits_metrics(x_te, y_te[:5], verbose=False)
    with pytest.raises(UserError, match="N×1×S×S"):
        dc.digits_metrics(torch.zeros(4, 3, 8, 8), verbose=False)


def test_real_digits_floor(classifier, monkeypatch):
    model, cache = classifier
    monkeypatch.setenv("DITKIT_CACHE", str(cache))
    x_tr, y_tr = load_digits_split(8, "train")
    whole = dc.real_digits_frechet(8, len(x_tr))  # every training digit, in another order: same statistics
    assert whole == pytest.approx(dc.digits_metrics(x_tr, y_tr, verbose=False)["frechet"], rel=1e-6, abs=1e-9)
    assert dc.real_digits_frechet(8, 60) > whole  # fewer samples, a larger (biased) floor
    with pytest.raises(UserError, match="num_samples"):
        dc.real_digits_frechet(8, 1)


def _frechet_eig(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance via the symmetric form tr((√Σ1 Σ2 √Σ1)^½), computed with eigh only."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )
