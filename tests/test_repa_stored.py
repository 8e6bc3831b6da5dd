"""REPA's encoder features stored beside a latent store (data/feature_store.py): equal to the encoder run on each
image and its flip (to float16 round-off), read for the flip the latents drew, the same training loss as targets
computed on the fly, resumable extraction and training, and one line for another encoder or a damaged file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ditkit.data.feature_store import (
    AlignedLatents,
    StoredFeatures,
    extract_features,
    feature_file,
)
from ditkit.data.images import center_crop_arr, find_images, load_rgb
from ditkit.data.store import LatentStore, read_manifest
from ditkit.runtime.errors import UserError

SIZE = 32  # pixels; the tiny VAE downsamples 8× → 4×4 latents, a 2×2 patch grid for patch 2
FP16_ROUNDOFF = 2.0**-11  # float16's relative rounding error (half an ulp of its 10-bit mantissa)
transformers = pytest.importorskip("transformers")


def _tiny_dino(folder):
    """A random 1-layer DINOv2 (16 channels) saved as a transformers folder; at 28 px it gives a 2×2 patch grid."""
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=14)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder)
    return folder


def _encoder(folder):
    from ditkit.encoders.features import load_encoder

    encoder = load_encoder(str(folder))
    encoder.image_size = 28
    return encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("diffusers")
    from ditkit.data.extract import extract
    from ditkit.encoders.autoencoder import load_vae
    from helpers.images import make_image_folder
    from helpers.vae import make_tiny_vae

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("repa-stored")
    folder = make_image_folder(base / "images")
    vae_dir = make_tiny_vae(base / "vae")
    dino = _tiny_dino(base / "dino")
    store = base / "store"
    extract(folder, store, load_vae(str(vae_dir)), image_size=SIZE, batch_size=2, shard_size=3, dtype="float32",
            workers=0, progress=False)
    manifest = extract_features(folder, store, _encoder(dino), "tiny-dino", batch_size=2, workers=0, progress=False)
    return dict(base=base, folder=folder, vae_dir=vae_dir, dino=dino, store=store, manifest=manifest)


def _crops(folder, positions) -> torch.Tensor:
    """The store's centre crops of images `positions` of the sorted file list, N×3×S×S in [-1, 1]."""
    paths = find_images(folder)[0]
    arr = np.stack([center_crop_arr(load_rgb(paths[i]), SIZE) for i in positions])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _read_all(store, key):
    """One tensor of all shards, read with safetensors' own reader (not the memory-map reader under test)."""
    from safetensors.numpy import load_file

    m = read_manifest(store)
    names = m["features"]["files"] if key == "features" else [s["file"] for s in m["shards"]]
    return np.concatenate([load_file(str(store / n))[key] for n in names])


def test_stored_features_are_the_encoder_on_each_image_and_its_flip_to_float16_roundoff(setup):
    store, info = setup["store"], setup["manifest"]["features"]
    assert {k: info[k] for k in ("encoder", "tokens", "channels", "dtype")} == dict(
        encoder="tiny-dino", tokens=4, channels=16, dtype="float16")
    stored = torch.from_numpy(_read_all(store, "features")).double()
    index = _read_all(store, "index")
    assert stored.shape == (len(index), 2, 4, 16) and index.tolist() == _read_all(store, "index").tolist()
    images = _crops(setup["folder"], index.tolist())
    encoder = _encoder(setup["dino"])
    for flip, x in ((0, images), (1, images.flip(-1))):
        want = torch.cat([encoder(x[i:i + 1]) for i in range(len(x))]).double()  # one image a call: other sums
        torch.testing.assert_close(stored[:, flip], want, rtol=FP16_ROUNDOFF + 1e-5, atol=1e-6)
    assert (stored[:, 0] - stored[:, 1]).abs().max() > 0.1  # the flip's features are not the image's


def test_each_item_reads_the_features_of_the_flip_its_latent_drew(setup):
    store = setup["store"]
    latents = LatentStore(store, seed=5, random_flip=True, resample=False)
    data = AlignedLatents(latents, StoredFeatures(store, latents.manifest))
    mean, feats = _read_all(store, "mean"), _read_all(store, "features")
    seen = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        items = data.__getitems__(list(range(len(data))))
        for i, (x, label, f) in enumerate(items):
            flip = int(np.argmin([np.abs(x.numpy() / latents.scale - mean[i, k]).max() for k in (0, 1)]))
            seen.add(flip)
            assert torch.equal(f, torch.from_numpy(feats[i, flip])) and label == latents.labels[i]
    assert seen == {0, 1}  # both flips drawn, so a pairing that ignored the flip would have failed


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_from_the_stacked_collate_equal_the_default_collate(setup, workers):
    """`ditkit train`'s loader takes AlignedLatents' batch whole (`collate`, no split and re-stack); its batches
    equal torch's default collate of the same items: values, dtypes, shapes, in a worker and in the process."""
    from torch.utils.data import DataLoader

    store = setup["store"]
    latents = LatentStore(store, seed=3, random_flip=True, resample=True)
    data = AlignedLatents(latents, StoredFeatures(store, latents.manifest))
    batches = [[5, 0, 7], [2, 6], [1]]
    made = {}
    for name, collate in (("stacked", data.collate), ("default", None)):
        loader = DataLoader(data, batch_sampler=batches, num_workers=workers, collate_fn=collate)
        made[name] = list(loader)
    assert len(made["stacked"]) == len(batches)
    for got, want in zip(made["stacked"], made["default"]):
        assert isinstance(got, list) and len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert data.collate([(torch.ones(2), 1)])[1].tolist() == [1]  # other items: torch's default collate


def test_step_loss_with_stored_targets_equals_targets_computed_on_the_fly(setup):
    """One TrainStep on the same latents and draws: targets from the store vs the encoder run on the drawn flips
    of the crops. REPA's cosine moves by at most the targets' relative round-off (2^-11), times coeff."""
    from ditkit.diffusion import create_diffusion
    from ditkit.models import DiT, DiTConfig
    from ditkit.train.methods import MethodHooks
    from ditkit.train.step import TrainStep
    from ditkit.training_methods import Alignment, TrainingMethods

    store = setup["store"]
    latents = LatentStore(store, seed=1, random_flip=True, resample=True)
    index = [0, 3, 4, 7]
    x, flips = latents.latents_and_flips(index)
    stored = StoredFeatures(store, latents.manifest).batch(index, flips)
    positions = _read_all(store, "index")[index].tolist()
    crops = _crops(setup["folder"], positions)
    drawn = torch.where(torch.from_numpy(flips).bool()[:, None, None, None], crops.flip(-1), crops)
    other = torch.where(torch.from_numpy(flips).bool()[:, None, None, None], crops, crops.flip(-1))
    encoder = _encoder(setup["dino"])
    y = torch.as_tensor(latents.labels[index])

    def loss(targets):
        config = DiTConfig(input_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                           )
        hooks = MethodHooks(TrainingMethods(Alignment("tiny-dino", 16, depth=1, coeff=0.5, projector_dim=16)))
        torch.manual_seed(0)
        model, ema = hooks.attach(DiT(config)), hooks.attach(DiT(config))
        step = TrainStep(model, model, ema, torch.optim.SGD(model.parameters(), lr=0.0), create_diffusion(""),
                         device=torch.device("cpu"), precision="fp32", global_batch=4, seed=3, methods=hooks)
        return float(step(x, y, 0, targets=targets).terms[0])

    on_the_fly, from_store = loss(encoder(drawn)), loss(MethodHooks.stored_targets(stored, 2))
    assert math.isfinite(on_the_fly)
    assert abs(from_store - on_the_fly) <= 0.5 * FP16_ROUNDOFF + 1e-6
    assert abs(loss(encoder(other)) - on_the_fly) > 10 * 0.5 * FP16_ROUNDOFF  # the wrong flips would show


def test_interrupted_feature_extract_resumes_to_the_same_bytes(tmp_path, setup, monkeypatch):
    import shutil

    from ditkit.data import feature_store

    store = tmp_path / "store"
    shutil.copytree(setup["store"], store)
    for f in store.glob("features-*"):
        f.unlink()
    real, calls = feature_store._save, []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped while writing the second feature shard
        real(*args, **kwargs)

    monkeypatch.setattr(feature_store, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_features(setup["folder"], store, _encoder(setup["dino"]), "tiny-dino", workers=0, progress=False)
    monkeypatch.setattr(feature_store, "_save", real)
    first = (store / feature_file(0)).stat().st_mtime_ns
    manifest = extract_features(setup["folder"], store, _encoder(setup["dino"]), "tiny-dino", batch_size=3,
                                workers=0, progress=False)
    assert (store / feature_file(0)).stat().st_mtime_ns == first  # not encoded again
    for name in manifest["features"]["files"]:
        assert (store / name).read_bytes() == (setup["store"] / name).read_bytes()


def test_damaged_or_missing_feature_file_is_named_in_one_line(tmp_path, setup):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(setup["store"], store)
    path = store / feature_file(1)
    path.write_bytes(path.read_bytes()[:-40])  # a copy cut short
    with pytest.raises(UserError, match="features-00001.safetensors is damaged") as err:
        StoredFeatures(store, read_manifest(store))
    assert "\n" not in str(err.value) and "--repa-encoder tiny-dino" in str(err.value)
    path.unlink()
    with pytest.raises(UserError, match="features-00001.safetensors is damaged \\(the file is missing\\)"):
        StoredFeatures(store, read_manifest(store))
    extract_features(setup["folder"], store, _encoder(setup["dino"]), "tiny-dino", workers=0, progress=False)
    assert path.read_bytes() == (setup["store"] / feature_file(1)).read_bytes()  # a rerun repairs it


def _train_opts(setup, store, run, **kw):
    from ditkit.train import TrainOptions

    settings = dict(data_path=str(store), image_size=SIZE, model="DiT-S/2", global_batch_size=4,
                    model_overrides=dict(depth=2, hidden_size=32, num_heads=2), log_every=1, num_workers=0,
                    results_dir=str(run), progress=False, repa_encoder=str(setup["dino"]), repa_depth=1,
                    repa_projector_dim=16, lr=1e-3)
    return TrainOptions(**{**settings, **kw})


@pytest.fixture(scope="module")
def cli_store(setup):
    """A store made by the CLI with --repa-encoder (the tiny DINOv2 at its default 224 px: a 16×16 grid)."""
    from ditkit.cli import main

    out = setup["base"] / "cli-store"
    assert main(["extract", str(setup["folder"]), "--out", str(out), "--vae", str(setup["vae_dir"]), "--image-size",
                 str(SIZE), "--workers", "0", "--device", "cpu", "--shard-size", "4", "--no-progress",
                 "--repa-encoder", str(setup["dino"])]) == 0
    return out


def test_train_on_stored_features_records_them_and_resumes_bit_exactly(tmp_path, setup, cli_store):
    import ditkit
    from ditkit.train import train
    from ditkit.train.checkpoint import read_safetensors

    info = read_manifest(cli_store)["features"]
    assert (info["encoder"], info["tokens"], info["channels"]) == (str(setup["dino"]), 256, 16)
    straight = train(_train_opts(setup, cli_store, tmp_path / "a", max_steps=4, ckpt_every=2))
    assert all(math.isfinite(loss) for _, loss in straight.losses)
    recipe = ditkit.load_model_with_recipe(straight.results_dir / "checkpoints" / "0000004")[1]
    assert recipe.training.alignment.encoder == str(setup["dino"]) and recipe.training.alignment.feature_dim == 16
    assert "REPA targets stored" in json.loads((straight.results_dir / "config.json").read_text())["data"]
    train(_train_opts(setup, cli_store, tmp_path / "b", max_steps=2, ckpt_every=2))
    resumed = train(_train_opts(setup, cli_store, tmp_path / "b", max_steps=4, ckpt_every=2, resume="auto"))
    assert resumed.step == 4
    for name in ("model", "ema"):
        a, _ = read_safetensors(tmp_path / "a" / "checkpoints" / "0000004" / f"{name}.safetensors")
        b, _ = read_safetensors(tmp_path / "b" / "checkpoints" / "0000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_another_encoder_or_a_store_without_features_is_refused_in_one_line(tmp_path, setup, cli_store):
    from ditkit.train import train

    with pytest.raises(UserError, match="holds features of") as err:
        train(_train_opts(setup, cli_store, tmp_path / "c", max_steps=1, repa_encoder="digits-mae"))
    assert "\n" not in str(err.value) and "--repa-encoder digits-mae" in str(err.value)
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(setup["store"], bare)
    manifest = read_manifest(bare)
    del manifest["features"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="ditkit extract --repa-encoder") as err:
        train(_train_opts(setup, cli_store, tmp_path / "d", max_steps=1, data_path=str(bare)))
    assert "\n" not in str(err.value)


def test_fast_encoder_matches_the_float32_encoder_to_bfloat16_roundoff(setup):
    """bf16 weights and input, channels-last: each feature within a few bf16 roundings (2^-8 relative, through
    one block's ~6 rounded steps) of the float32 encoder's, and REPA's cosine to it within 1e-3 of 1."""
    from ditkit.encoders.features import fast_encoder

    images = _crops(setup["folder"], [0, 1, 2, 5])
    plain = _encoder(setup["dino"])
    want = plain(images).double()
    fast = fast_encoder(_encoder(setup["dino"]))
    got = fast(images)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=6 * 2.0**-8 * scale)
    cos = torch.nn.functional.cosine_similarity(got.double(), want, dim=-1)
    assert float(cos.min()) > 1 - 1e-3
    assert float((got.double() - want).abs().max()) > 0  # it did run in bf16
