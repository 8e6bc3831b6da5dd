"""The latent store: extract → shards → LatentStore round trip, resume, CLI, and open_training_data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data import extract as extract_mod
from ditkit.data import open_training_data
from ditkit.data.extract import extract
from ditkit.data.images import center_crop_arr, load_rgb
from ditkit.data.store import LatentStore, open_shard, read_manifest, shard_name
from ditkit.encoders.autoencoder import SD_SCALE, load_vae
from ditkit.runtime.errors import UserError
from helpers.images import CORRUPT, IMAGES, make_image_folder, smooth_image
from helpers.vae import make_tiny_vae

SIZE = 32  # pixels; the tiny VAE downsamples 8× → 4×4 latents


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)  # the test machine's cores are shared
    base = tmp_path_factory.mktemp("latents")
    folder = make_image_folder(base / "images")
    vae_dir = make_tiny_vae(base / "vae")
    vae = load_vae(str(vae_dir))
    store = base / "store"
    manifest = extract(folder, store, vae, image_size=SIZE, batch_size=2, shard_size=3, dtype="float32",
                       workers=0, progress=False)
    return dict(base=base, folder=folder, vae_dir=vae_dir, vae=vae, store=store, manifest=manifest)


def _posterior_by_hand(vae, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 posterior of uint8 N×H×W×3 crops through the encoder modules, without the wrapper."""
    model = vae.model
    x = torch.from_numpy(crops).double().permute(0, 3, 1, 2) / 127.5 - 1.0
    model.double()
    try:
        mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, dim=1)
    finally:
        model.float()
    return mean, torch.exp(0.5 * logvar.clamp(-30, 20))


def _stored(store) -> dict[str, np.ndarray]:
    """All shards concatenated (read with safetensors' own reader, independent of the memory-map reader)."""
    from safetensors.numpy import load_file

    parts = [load_file(str(store / s["file"])) for s in read_manifest(store)["shards"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_store_round_trip(setup):
    folder, vae, store, manifest = setup["folder"], setup["vae"], setup["store"], setup["manifest"]
    n_files = len(IMAGES) + 1
    assert manifest["count"] == len(IMAGES) and manifest["skipped"] == 1
    assert manifest["skipped_paths"] == [f"{CORRUPT[0]}/{CORRUPT[1]}"]
    assert manifest["num_classes"] == 3 and manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["scale"] == SD_SCALE
    assert len(manifest["shards"]) == math.ceil(n_files / 3)

    data = _stored(store)
    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    assert data["index"].tolist() == [i for i, p in enumerate(paths) if p.name != CORRUPT[1]]
    crops = np.stack([center_crop_arr(load_rgb(paths[i]), SIZE) for i in data["index"]])
    want_mean, want_std = _posterior_by_hand(vae, crops)
    flip_mean, flip_std = _posterior_by_hand(vae, np.ascontiguousarray(crops[:, :, ::-1]))
    np.testing.assert_allclose(data["mean"][:, 0], want_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data["std"][:, 0], want_std.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(data["mean"][:, 1], flip_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data["std"][:, 1], flip_std.numpy(), rtol=1e-4, atol=1e-6)
    classes = manifest["classes"]
    assert [classes[y] for y in data["label"]] == [paths[i].parent.name for i in data["index"]]

    # Per-channel statistics: scaled posterior means over both flips and all positions, in float64.
    scaled = data["mean"].astype(np.float64) * SD_SCALE
    np.testing.assert_allclose(manifest["channel_mean"], scaled.mean(axis=(0, 1, 3, 4)), atol=2e-6)
    np.testing.assert_allclose(manifest["channel_std"], scaled.std(axis=(0, 1, 3, 4)), atol=2e-6)


def test_latent_store_items(setup):
    store, data = setup["store"], _stored(setup["store"])
    plain = LatentStore(store, seed=5, random_flip=False, resample=False)
    assert len(plain) == len(IMAGES) and plain.num_classes == 3
    for i in range(len(plain)):
        x, y = plain[i]
        assert x.dtype == torch.float32 and x.shape == (4, 4, 4) and y == data["label"][i]
        np.testing.assert_allclose(x.numpy(), data["mean"][i, 0] * SD_SCALE, rtol=1e-6)
    with pytest.raises(IndexError):
        plain[len(plain)]

    ds = LatentStore(store, seed=5)
    # Over epochs, item 3 picks both flips, and (x/scale − mean_f)/std_f is standard normal noise.
    flips, z = set(), []
    for epoch in range(60):
        ds.set_epoch(epoch)
        x = ds[3][0].numpy().astype(np.float64) / SD_SCALE
        errs = [np.abs((x - data["mean"][3, f]) / data["std"][3, f]).max() for f in (0, 1)]
        f = int(np.argmin(errs))
        flips.add(f)
        z.append((x - data["mean"][3, f]) / data["std"][3, f])
    z = np.concatenate([v.ravel() for v in z])
    assert flips == {0, 1}
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.std() - 1) < 0.1

    # Reproducible from (seed, epoch, index): a fresh object and a multi-worker loader give the same items.
    ds.set_epoch(7)
    again = LatentStore(store, seed=5)
    again.set_epoch(7)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))
    loader = torch.utils.data.DataLoader(again, batch_size=3, num_workers=2)
    batched = torch.cat([x for x, _ in loader])
    assert torch.equal(batched, torch.stack([ds[i][0] for i in range(len(ds))]))
    ds.set_epoch(8)
    assert not torch.equal(ds[0][0], again[0][0])


def test_memmap_reader_matches_safetensors(setup):
    from safetensors.numpy import load_file

    path = setup["store"] / shard_name(0)
    mapped, loaded = open_shard(path), load_file(str(path))
    assert set(mapped) == set(loaded)
    for k in loaded:
        assert isinstance(mapped[k], np.memmap) and np.array_equal(mapped[k], loaded[k])


def test_float16_store_and_flat_folder(tmp_path, setup):
    flat = make_image_folder(tmp_path / "flat", flat=True, corrupt=False)
    m = extract(flat, tmp_path / "s16", setup["vae"], image_size=SIZE, shard_size=4, workers=0, progress=False)
    assert m["num_classes"] == 1 and m["classes"] == [] and m["dtype"] == "float16" and m["skipped"] == 0
    data = _stored(tmp_path / "s16")
    assert data["mean"].dtype == np.float16 and set(data["label"].tolist()) == {0}
    crops = np.stack([center_crop_arr(load_rgb(p), SIZE) for p in sorted(flat.glob("*.*g"))])
    want, _ = _posterior_by_hand(setup["vae"], crops)
    np.testing.assert_allclose(data["mean"][:, 0].astype(np.float64), want.numpy(), rtol=2e-3, atol=2e-3)


def test_interrupted_extract_resumes_to_identical_shards(tmp_path, setup, monkeypatch):
    folder, vae, full = setup["folder"], setup["vae"], setup["store"]
    out = tmp_path / "resumed"
    real_write = extract_mod._write_shard
    calls = []

    def write_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the job were stopped while writing its second shard
        real_write(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, out, vae, image_size=SIZE, batch_size=2, shard_size=3, dtype="float32", workers=0,
                progress=False)
    assert (out / shard_name(0)).exists() and not (out / shard_name(1)).exists()
    assert not (out / "manifest.json").exists()
    (out / f".{shard_name(1)}.abc.tmp").write_bytes(b"half a shard")  # what a hard kill leaves behind
    monkeypatch.setattr(extract_mod, "_write_shard", real_write)

    done_before = (out / shard_name(0)).stat().st_mtime_ns
    manifest = extract(folder, out, vae, image_size=SIZE, batch_size=3, shard_size=3, dtype="float32",
                       workers=1, progress=False)
    assert (out / shard_name(0)).stat().st_mtime_ns == done_before  # not re-encoded
    assert not list(out.glob(".*.tmp"))
    for s in manifest["shards"]:
        assert (out / s["file"]).read_bytes() == (full / s["file"]).read_bytes()
    assert {k: v for k, v in manifest.items() if k != "source"} == {
        k: v for k, v in setup["manifest"].items() if k != "source"
    }
    # A completed store is left alone; one made with other settings is refused.
    assert extract(folder, out, vae, image_size=SIZE, batch_size=2, shard_size=3, dtype="float32", workers=0,
                   progress=False) == manifest
    with pytest.raises(UserError, match="other images or settings"):
        extract(folder, out, vae, image_size=SIZE, shard_size=2, dtype="float32", workers=0, progress=False)


def test_extract_cli(tmp_path, setup, capsys):
    from ditkit.cli import main

    out = tmp_path / "cli-store"
    argv = ["extract", str(setup["folder"]), "--out", str(out), "--vae", str(setup["vae_dir"]),
            "--image-size", str(SIZE), "--workers", "0", "--device", "cpu", "--shard-size", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"{len(IMAGES)} images, 3 classes" in captured.out
    assert "images/s" in captured.err and str(CORRUPT[1]) in captured.err
    assert json.loads((out / "manifest.json").read_text())["count"] == len(IMAGES)
    assert main(["extract", str(tmp_path / "nope"), "--out", str(out), "--vae", str(setup["vae_dir"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ditkit extract: error:") and "not found" in err and "\n" not in err
    assert main(argv[:-2] + ["--image-size", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_open_training_data(tmp_path, setup):
    store, folder = setup["store"], setup["folder"]
    data = open_training_data(str(store), SIZE, None, seed=0)
    assert (data.num_classes, data.in_channels, data.input_size, data.encoder) == (3, 4, 4, None)
    assert len(data.dataset) == len(IMAGES) and data.labels.tolist() == _stored(store)["label"].tolist()
    assert "latent store" in data.describe() and "\n" not in data.describe()
    assert open_training_data(str(store), None, None, seed=0).input_size == 4
    with pytest.raises(UserError, match="extracted at 32px"):
        open_training_data(str(store), 64, None, seed=0)

    pixels = open_training_data(str(folder), 16, None, seed=0)
    assert (pixels.num_classes, pixels.in_channels, pixels.input_size, pixels.encoder) == (3, 3, 16, None)
    assert pixels.dataset[0][0].shape == (3, 16, 16)

    on_the_fly = open_training_data(str(folder), SIZE, str(setup["vae_dir"]), seed=0)
    assert (on_the_fly.in_channels, on_the_fly.input_size) == (4, 4)
    images = torch.stack([on_the_fly.dataset[i][0] for i in range(3)])
    torch.manual_seed(0)
    z = on_the_fly.encoder(images)
    mean, std = setup["vae"].encode(images)
    assert z.shape == (3, 4, 4, 4)
    assert ((z / SD_SCALE - mean).abs() <= 6 * std).all()  # a posterior sample, scaled

    with pytest.raises(UserError, match="does not exist"):
        open_training_data(str(tmp_path / "missing"), SIZE, None, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        open_training_data(str(tmp_path / "empty"), SIZE, None, seed=0)


@pytest.mark.parametrize("source", ["store", "folder+vae"])
def test_training_runs(tmp_path, setup, source):
    from ditkit.train import TrainOptions, train

    opts = TrainOptions(
        data_path=str(setup["store"] if source == "store" else setup["folder"]),
        vae=None if source == "store" else str(setup["vae_dir"]),
        image_size=SIZE,
        model="DiT-S/2",
        model_overrides=dict(depth=2, hidden_size=64, num_heads=2),
        global_batch_size=4,
        max_steps=3,
        log_every=1,
        ckpt_every=1000,
        num_workers=0,
        results_dir=str(tmp_path / "run"),
        progress=False,
    )
    result = train(opts)
    assert result.step == 3
    assert result.losses and all(math.isfinite(loss) for _, loss in result.losses)


def test_ranks_split_shards_and_match_single_process(tmp_path, setup):
    """Two ranks (run one after the other here) encode disjoint shards; rank 0's manifest equals one process's."""
    out = tmp_path / "two-ranks"
    kwargs = dict(image_size=SIZE, batch_size=2, shard_size=3, dtype="float32", workers=0, progress=False)
    assert extract(setup["folder"], out, setup["vae"], rank=1, world_size=2, **kwargs) is None
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(1)]  # rank 1 owns shards 1, 3, ...
    manifest = extract(setup["folder"], out, setup["vae"], rank=0, world_size=2, **kwargs)
    for s in manifest["shards"]:
        assert (out / s["file"]).read_bytes() == (setup["store"] / s["file"]).read_bytes()
    assert {k: v for k, v in manifest.items() if k != "source"} == {
        k: v for k, v in setup["manifest"].items() if k != "source"
    }


def test_shard_of_only_unreadable_images(tmp_path, setup):
    folder = tmp_path / "flat"
    folder.mkdir()
    for name in ("0bad.jpg", "0bad.png"):  # sorted first: shard 0 (size 2) ends up empty
        (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not really an image")
    for i in range(3):
        Image.fromarray(smooth_image(40 + i, 36, i)).save(folder / f"good{i}.png")
    m = extract(folder, tmp_path / "s", setup["vae"], image_size=SIZE, shard_size=2, workers=0, progress=False)
    assert [s["count"] for s in m["shards"]] == [0, 2, 1] and m["skipped"] == 2 and m["count"] == 3
    store = LatentStore(tmp_path / "s", seed=0)
    assert len(store) == 3 and store[0][0].shape == (4, 4, 4)
    assert open_shard(tmp_path / "s" / shard_name(0))["mean"].shape == (0, 2, 4, 4, 4)
