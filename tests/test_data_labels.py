"""A stable label map (issue 17 item 8): label k is the k-th class sub-folder in sorted order, empty folders
included, and the latent store records the map so that extract, train and sample agree on it."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ditkit.data import open_training_data
from ditkit.data.images import find_images
from helpers.images import smooth_image
from helpers.vae import make_tiny_vae


def _folder(root, layout: dict[str, int]):
    for seed, (cls, n) in enumerate(layout.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(smooth_image(40, 36, 10 * seed + i)).save(root / cls / f"{i}.png")
    return root


def test_an_empty_class_folder_keeps_its_label_and_is_named(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", {"ant": 2, "bee": 0, "cat": 1, "dog": 2})
    paths, labels, classes = find_images(root)
    assert classes == ["ant", "bee", "cat", "dog"]
    assert [(p.parent.name, y) for p, y in zip(paths, labels)] == [
        ("ant", 0), ("ant", 0), ("cat", 2), ("dog", 3), ("dog", 3)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bee" in err and "ant" not in err


def test_stray_empty_sub_folders_leave_a_flat_folder_flat(tmp_path, capsys):
    root = tmp_path / "flat"
    (root / "thumbs").mkdir(parents=True)
    Image.fromarray(smooth_image(20, 20, 0)).save(root / "a.png")
    paths, labels, classes = find_images(root)
    assert classes == [] and labels == [0] and len(paths) == 1


def test_training_data_and_the_store_manifest_carry_the_label_map(tmp_path):
    from ditkit.data.extract import extract
    from ditkit.encoders.autoencoder import load_vae

    root = _folder(tmp_path / "imgs", {"ant": 1, "bee": 0, "cat": 1})
    folder_data = open_training_data(str(root), 32, None, seed=0)
    assert folder_data.num_classes == 3 and folder_data.classes == ["ant", "bee", "cat"]
    assert list(folder_data.labels) == [0, 2]
    store = tmp_path / "store"
    extract(root, store, load_vae(str(make_tiny_vae(tmp_path / "vae"))), image_size=32, shard_size=2,
            batch_size=2, workers=0, dtype="float32", progress=False)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["classes"] == ["ant", "bee", "cat"] and manifest["num_classes"] == 3
    store_data = open_training_data(str(store), None, None, seed=0)
    assert store_data.classes == ["ant", "bee", "cat"] and store_data.num_classes == 3
    assert np.array_equal(np.sort(store_data.labels), [0, 2])


def _train(data, results, **kw):
    from ditkit.train import TrainOptions, train

    settings = dict(data_path=str(data), model="DiT-S/2", image_size=8, global_batch_size=2, max_steps=1,
                    ckpt_every=1, log_every=1, results_dir=str(results), num_workers=0, progress=False,
                    model_overrides={"depth": 1, "hidden_size": 32, "num_heads": 2})
    return train(TrainOptions(**{**settings, **kw}))


def test_a_run_records_its_label_map_and_refuses_another(tmp_path, one_thread):
    import pytest

    from ditkit.runtime.errors import UserError

    root = _folder(tmp_path / "imgs", {"ant": 1, "bee": 0, "cat": 1})
    _train(root, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["classes"] == ["ant", "bee", "cat"]
    (root / "bee").rename(root / "bat")  # same count and layout, another meaning for label 1
    with pytest.raises(UserError, match="another label map \\(label 1 is class 'bee' there, 'bat' now\\)"):
        _train(root, tmp_path / "run", resume="auto", max_steps=2)


def test_exif_transpose_reaches_training_and_the_store(tmp_path, one_thread):
    import pytest

    from ditkit.data.extract import extract
    from ditkit.encoders.autoencoder import load_vae
    from ditkit.runtime.errors import UserError

    root = _folder(tmp_path / "imgs", {"ant": 1, "cat": 1})
    result = _train(root, tmp_path / "run", exif_transpose=True)
    assert "EXIF orientation applied" in json.loads((result.results_dir / "config.json").read_text())["data"]
    vae = load_vae(str(make_tiny_vae(tmp_path / "vae")))
    kw = dict(image_size=32, shard_size=2, batch_size=2, workers=0, dtype="float32", progress=False)
    plain = extract(root, tmp_path / "plain", vae, **kw)
    turned = extract(root, tmp_path / "turned", vae, exif_transpose=True, **kw)
    assert plain["exif_transpose"] is False and turned["exif_transpose"] is True
    assert plain["fingerprint"] != turned["fingerprint"]  # a store is never resumed with the other choice
    with pytest.raises(UserError, match="extracted without --exif-transpose"):
        open_training_data(str(tmp_path / "plain"), None, None, seed=0, exif_transpose=True)
    assert open_training_data(str(tmp_path / "turned"), None, None, seed=0, exif_transpose=True).num_classes == 2
