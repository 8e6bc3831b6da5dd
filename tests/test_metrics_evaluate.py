"""`ditkit evaluate` end to end with a small random-weight Inception stand-in, and torch-fidelity's net."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.special import softmax
from scipy.stats import entropy

from ditkit.cli import main
from ditkit.metrics import evaluate as ev
from ditkit.metrics import inception as inc
from ditkit.runtime.errors import UserError
from helpers.inception import TinyInception


def _images(seed: int, n: int, size: int = 12, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(128 + shift, 50, size=(n, size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _write_folder(path, images: np.ndarray) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:04d}.png")


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 Fréchet distance through eigh of √Σ1 Σ2 √Σ1."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(
        ((a.mean(0) - b.mean(0)) ** 2).sum()
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions on a shared 2-core machine run ~20× faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def sets(tmp_path):
    smp, ref = _images(1, 40, shift=30.0), _images(2, 50)
    np.savez(tmp_path / "samples.npz", arr_0=smp)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    _write_folder(tmp_path / "ref_folder", ref)
    return smp, ref, tmp_path


def test_metrics_match_independent_computation(sets, cache):
    smp, ref, tmp = sets
    net = TinyInception()
    result = ev.inception_metrics(
        ev.open_images(tmp / "samples.npz"),
        ev.open_images(tmp / "ref.npz"),
        net,
        batch_size=7,
        progress=False,
    )
    # Independent: the network on all images at once, then float64 formulas written here.
    fs = net(torch.from_numpy(smp).permute(0, 3, 1, 2))
    fr = net(torch.from_numpy(ref).permute(0, 3, 1, 2))
    assert fs["spatial"].shape == (40, 4 * 4 * 7)
    assert result["fid"] == pytest.approx(
        _frechet(fs["pool"].numpy(), fr["pool"].numpy()), rel=1e-4, abs=1e-6
    )
    assert result["sfid"] == pytest.approx(_frechet(fs["spatial"].numpy(), fr["spatial"].numpy()), rel=1e-4)
    p = softmax(fs["logits"].double().numpy(), axis=1)
    expected_is = np.exp(np.mean([entropy(row, p.mean(0)) for row in p]))
    assert result["inception_score"] == pytest.approx(expected_is, rel=1e-5)
    a, b = fr["pool"].double().numpy(), fs["pool"].double().numpy()
    r_a, r_b = np.sort(cdist(a, a), 1)[:, 3], np.sort(cdist(b, b), 1)[:, 3]
    precision = np.mean((cdist(b, a) <= r_a[None]).any(1))
    recall = np.mean((cdist(a, b) <= r_b[None]).any(1))
    assert result["precision"] == pytest.approx(precision, abs=1 / 40)
    assert result["recall"] == pytest.approx(recall, abs=1 / 50)
    assert result["num_samples"] == 40 and result["num_reference"] == 50
    assert result["fid"] > 1e-3  # the shifted samples are measurably different


def test_folder_npz_grey_and_batching_agree(sets, cache):
    smp, ref, tmp = sets
    net = TinyInception()
    from_npz = ev.compute_activations(net, ev.open_images(tmp / "ref.npz"), batch_size=64, progress=False)
    from_folder = ev.compute_activations(
        net, ev.open_images(tmp / "ref_folder"), batch_size=3, progress=False
    )
    for key in ("pool", "spatial", "logits"):
        np.testing.assert_allclose(from_npz[key], from_folder[key], rtol=1e-5, atol=1e-6)
    # Grey images (N×H×W, as digits are stored) are replicated to three channels.
    grey = smp[..., 0]
    np.savez(tmp / "grey.npz", arr_0=grey)
    got = ev.compute_activations(net, ev.open_images(tmp / "grey.npz"), batch_size=16, progress=False)
    want = net(torch.from_numpy(np.repeat(grey[..., None], 3, -1)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got["pool"], want["pool"].numpy(), rtol=1e-5, atol=1e-6)


def test_reference_statistics_are_cached(sets, cache):
    smp, ref, tmp = sets
    net = TinyInception()
    samples, reference = ev.open_images(tmp / "samples.npz"), ev.open_images(tmp / "ref_folder")
    first = ev.inception_metrics(samples, reference, net, progress=False)
    assert net.images_seen == 90
    assert len(list((cache / "reference-stats").glob("*.npz"))) == 1
    second = ev.inception_metrics(samples, ev.open_images(tmp / "ref_folder"), net, progress=False)
    assert net.images_seen == 130  # only the 40 samples again
    assert second == first
    # Another network (other weights) must not reuse the entry.
    other = TinyInception(seed=1)
    ev.inception_metrics(samples, reference, other, progress=False)
    assert other.images_seen == 90
    # A changed reference file invalidates its entry.
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp / "ref_folder" / "0000.png")
    os.utime(tmp / "ref_folder" / "0000.png", ns=(1, 1))
    ev.inception_metrics(samples, ev.open_images(tmp / "ref_folder"), net, progress=False)
    assert net.images_seen == 130 + 90
    # --no-cache neither reads nor writes.
    ev.inception_metrics(samples, ev.open_images(tmp / "ref_folder"), net, progress=False, use_cache=False)
    assert net.images_seen == 130 + 180


def test_precomputed_statistics(sets, cache):
    smp, ref, tmp = sets
    net = TinyInception()
    fr = net(torch.from_numpy(ref).permute(0, 3, 1, 2))
    pool, spatial = fr["pool"].double().numpy(), fr["spatial"].double().numpy()
    np.savez(
        tmp / "stats.npz",
        mu=pool.mean(0),
        sigma=np.cov(pool, rowvar=False),
        mu_s=spatial.mean(0),
        sigma_s=np.cov(spatial, rowvar=False),
    )
    samples = ev.open_images(tmp / "samples.npz")
    from_images = ev.inception_metrics(samples, ev.open_images(tmp / "ref.npz"), net, progress=False)
    from_stats = ev.inception_metrics(samples, ev.open_images(tmp / "stats.npz"), net, progress=False)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-5)
    assert from_stats["sfid"] == pytest.approx(from_images["sfid"], rel=1e-5)
    assert from_stats["precision"] is None and from_stats["recall"] is None  # no features in a stats file
    assert from_stats["inception_score"] == pytest.approx(from_images["inception_score"])


def test_cli_json_and_errors(sets, cache, monkeypatch, capsys):
    smp, ref, tmp = sets
    monkeypatch.setattr(inc, "load_inception", lambda path, device="cpu": TinyInception())
    argv = [
        "evaluate",
        str(tmp / "samples.npz"),
        str(tmp / "ref_folder"),
        "--inception-weights",
        "w.pth",
        "--json",
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(out)
    assert out["num_samples"] == 40 and out["fid"] > 0
    assert main([a for a in argv if a != "--json"]) == 0  # human-readable lines
    assert "FID:" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setenv("DITKIT_CACHE", str(cache))
    assert main(["evaluate", str(tmp / "samples.npz"), str(tmp / "ref.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--inception-weights" in err and len(err.splitlines()) == 1
    assert main(["evaluate", str(tmp / "samples.npz")]) == 2
    assert "REFERENCE" in capsys.readouterr().err
    assert main(["evaluate", str(tmp / "missing.npz"), str(tmp / "ref.npz")]) == 2
    np.savez(tmp / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        ev.open_images(tmp / "float.npz")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp / "ref_folder" / "9999.png")
    with pytest.raises(UserError, match="one size"):
        ev.compute_activations(TinyInception(), ev.open_images(tmp / "ref_folder"), progress=False)


def test_cli_digits_metric(tmp_path, cache, capsys):
    from safetensors.torch import save_file

    from ditkit.data.digits import load_digits_split
    from ditkit.metrics import digits_classifier as dc

    # A random-weight classifier placed in the cache: the pipeline is tested here, accuracy elsewhere.
    torch.manual_seed(0)
    net = dc.DigitsCNN().eval()
    path = dc.classifier_path(8)
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    dc._LOADED.clear()
    x, y = load_digits_split(8, "test")
    grey = ((x[:100, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "digits.npz", arr_0=np.repeat(grey[..., None], 3, -1), arr_1=y[:100].numpy())
    try:
        assert main(["evaluate", "--metric", "digits", str(tmp_path / "digits.npz"), "--json"]) == 0
    finally:
        dc._LOADED.clear()
    out = json.loads(capsys.readouterr().out)
    samples = torch.from_numpy(grey).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        expected_acc = float((net(samples).argmax(1) == y[:100]).double().mean())
        expected_fd = _frechet(net.features(samples).double().numpy(), net.features(x).double().numpy())
    assert out["metric"] == "digits" and out["num_samples"] == 100
    assert out["accuracy"] == pytest.approx(expected_acc)
    assert out["frechet"] == pytest.approx(expected_fd, rel=1e-4, abs=1e-6)
    # evaluate_samples takes tensors in [-1, 1] directly (the training loop's call).
    direct = ev.evaluate_samples(samples, y[:100])
    dc._LOADED.clear()
    assert direct["accuracy"] == pytest.approx(expected_acc)


# ------------------------------------------------------------------------------------------ torch-fidelity


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("torch_fidelity") is None,
    reason="torch-fidelity not installed (pip install --no-deps torch-fidelity)",
)
def test_fidelity_inception_random_weights(tmp_path):
    weights = tmp_path / inc.WEIGHTS_FILE_NAME
    inc.save_random_weights(weights)
    net = inc.load_inception(weights)
    assert "torch_fidelity" not in sys.modules and "torchvision" not in sys.modules
    seen = {}
    net.extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    images = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)  # one image: 299² on a CPU is slow
    out = net(images)
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    assert out["spatial"].shape == (1, 17 * 17 * 7)
    # NHWC order of the first 7 channels: element (h, w, c) sits at (h·17 + w)·7 + c.
    h, w, c = 5, 11, 6
    assert out["spatial"][0, (h * 17 + w) * 7 + c] == seen["x"][0, c, h, w]
    # Bias-free logits, as ADM's graph computes them.
    fc = net.extractor.fc
    torch.testing.assert_close(out["logits"], out["pool"] @ fc.weight.T, rtol=1e-4, atol=1e-6)
    assert (out["logits"] - out["pool"] @ fc.weight.T - fc.bias).abs().max() > 1e-3  # the bias is not in
    assert net.fingerprint.startswith("fid-inception-v3:")
    # A file that does not fit is one line naming a tensor.
    state = torch.load(weights, weights_only=True)
    state.pop("fc.bias")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="fc.bias"):
        inc.load_inception(tmp_path / "bad.pth")
    with pytest.raises(UserError, match="--inception-weights"):
        inc.load_inception(None)
