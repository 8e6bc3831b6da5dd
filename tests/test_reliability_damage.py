"""Damaged or left-over files from earlier runs: each is named and repaired, never a traceback or a dead end.

- The newest checkpoint folder is incomplete: `--resume auto` falls back to the newest complete one and says
  which (issue 17, item 4).
- A latent-store shard is truncated, or the manifest's counts disagree with the shards: opening the store names
  the broken file, and rerunning the same `ditkit extract` encodes it again (item 5).
- A SIGKILLed `ditkit convert` leaves `.DST.tmp-PID`: the next convert removes it (item 6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ditkit
from ditkit.cli import main
from ditkit.runtime.errors import UserError
from ditkit.weights.checkpoints import save_model
from helpers.images import smooth_image
from helpers.models import TINY
from helpers.training import train_options as _options
from helpers.vae import make_tiny_vae


@pytest.mark.parametrize("damage", ["state.pt missing", "ema truncated"])
def test_resume_auto_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys, one_thread, damage):
    from ditkit.train import train

    run = tmp_path / "run"
    full = train(_options(tmp_path / "full", max_steps=6, ckpt_every=2))
    train(_options(run, max_steps=4, ckpt_every=2))
    newest = run / "checkpoints" / "0000004"
    if damage == "state.pt missing":
        (newest / "state.pt").unlink()
    else:
        data = (newest / "ema.safetensors").read_bytes()
        (newest / "ema.safetensors").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    resumed = train(_options(run, max_steps=6, ckpt_every=2, resume="auto"))
    err = capsys.readouterr().err
    assert f"{newest} is incomplete" in err and f"resuming from {run / 'checkpoints' / '0000002'} at step 2" in err
    assert resumed.step == 6
    for key, value in full.ema.state_dict().items():  # the fallback loses steps, never exactness
        assert torch.equal(value, resumed.ema.state_dict()[key]), key


def test_resume_auto_with_only_incomplete_checkpoints_starts_fresh_and_says_so(tmp_path, capsys, one_thread):
    from ditkit.train import train

    run = tmp_path / "run"
    train(_options(run, max_steps=2, ckpt_every=2))
    (run / "checkpoints" / "0000002" / "model.safetensors").unlink()
    capsys.readouterr()
    assert train(_options(run, max_steps=2, ckpt_every=2, resume="auto")).step == 2
    err = capsys.readouterr().err
    assert "0000002 is incomplete" in err and "starting fresh" in err


# ----------------------------------------------------------------------------------------------- latent store


@pytest.fixture(scope="module")
def store_inputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("store")
    images = base / "images"
    for i in range(6):
        (images / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(36, 40, seed=i)).save(images / f"c{i % 2}" / f"{i}.png")
    return {"images": images, "vae": make_tiny_vae(base / "vae")}


def _extract_argv(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["extract", str(inputs["images"]), "--out", str(out), "--vae", str(inputs["vae"]), "--image-size", "32",
            "--shard-size", "2", "--dtype", "float32", "--workers", "0", "--device", "cpu", "--no-progress"]


def _train_argv(store: Path, results: Path) -> list[str]:
    return ["train", "--data-path", str(store), "--model", "DiT-S/2", "--global-batch-size", "2", "--max-steps",
            "1", "--num-workers", "0", "--no-progress", "--results-dir", str(results)]


def test_truncated_shard_is_named_on_open_and_extract_encodes_it_again(tmp_path, store_inputs, capsys):
    store = tmp_path / "store"
    assert main(_extract_argv(store_inputs, store)) == 0
    shard = store / "shard-00001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) - 100])  # a copy cut short (disk full, interrupted rsync)
    capsys.readouterr()
    assert main(_train_argv(store, tmp_path / "r1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shard) in err and "rerun ditkit extract" in err, err
    assert main(_extract_argv(store_inputs, store)) == 0
    err = capsys.readouterr().err
    assert "shard-00001.safetensors" in err and "already complete" not in err, err
    assert shard.read_bytes() == good


def test_manifest_counts_that_disagree_with_the_shards_are_named(tmp_path, store_inputs, capsys):
    from ditkit.data import open_training_data

    store = tmp_path / "store"
    assert main(_extract_argv(store_inputs, store)) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["count"] += 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest.json says 7 images but its shards hold 6.*rerun ditkit extract"):
        open_training_data(str(store), None, None, 0)


# ----------------------------------------------------------------------------------------------- convert


def test_convert_removes_temporaries_of_killed_runs_only(tmp_path):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_model(ditkit.create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, **TINY), ckpt)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_pid = 4_194_305  # above Linux's largest pid: no such process
        stale = [tmp_path / f".pipe.tmp-{dead_pid}", tmp_path / f".pipe.old-{dead_pid}"]
        for folder in stale:
            folder.mkdir()
            (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
        in_use = tmp_path / f".pipe.tmp-{live.pid}"  # another convert still writing
        in_use.mkdir()
        assert main(["convert", "--to", "diffusers", str(ckpt), str(tmp_path / "pipe")]) == 0
        assert not any(p.exists() for p in stale), "a killed convert's temporary folder was left behind"
        assert in_use.is_dir(), "a running convert's temporary folder was removed"
        back = tmp_path / "back.safetensors"
        (tmp_path / f".back.safetensors.{dead_pid}.x1y2.tmp").write_bytes(b"half")
        assert main(["convert", "--to", "ditkit", str(tmp_path / "pipe"), str(back)]) == 0
        assert sorted(p.name for p in tmp_path.glob(".back*")) == []
    finally:
        live.kill()
        live.wait()
    assert os.path.exists(back)
