"""Disk full while writing a checkpoint or a shard: one clear line, the previous file intact, no temp left.

Two ways to run out of space:
- a real one: a tmpfs of a few KiB mounted for the test (needs root; skipped elsewhere), filled up, so the
  libraries (safetensors, torch.save, numpy) fail exactly as they do on a full disk;
- a deterministic stand-in that runs everywhere: the writer writes part of the file, then raises the exception
  that library raises on a full disk (the types and messages were taken from the real runs above).
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write, disk_full
from ditkit.weights.checkpoints import load_model, save_model
from helpers.models import output_random_dit as tiny_model
from helpers.training import TRAIN_TINY

TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=4)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs: real ENOSPC once filled. Skipped where mounting is not allowed."""
    mount = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the stand-in tests cover the code path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem of `folder` until fewer than `leave` bytes are free."""
    with open(folder / f"filler-{uuid.uuid4().hex[:6]}", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
                if leave and os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < leave:
                    return
        except OSError as err:
            assert err.errno == errno.ENOSPC


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------- real ENOSPC

WRITERS = {
    "safetensors": lambda tmp: __import__("safetensors.torch").torch.save_file({"w": torch.randn(300_000)}, tmp),
    "torch.save": lambda tmp: torch.save({"w": torch.randn(300_000)}, tmp),
    "numpy": lambda tmp: np.savez(open(tmp, "wb"), arr_0=np.random.rand(300_000)),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_real_full_disk_gives_one_line_and_keeps_the_old_file(small_fs, writer):
    target = small_fs / "weights.bin"
    target.write_bytes(b"previous checkpoint")
    fill(small_fs)
    with pytest.raises(UserError, match=r"^disk full while writing .*weights.bin; the previous file is intact"):
        atomic_write(target, WRITERS[writer])
    assert target.read_bytes() == b"previous checkpoint"
    assert temporaries(small_fs) == [] and not list(small_fs.glob(".weights.bin.*"))


def test_real_full_disk_during_sampling_keeps_finished_shards_and_resumes(small_fs, tmp_path, capsys):
    """The finished shards survive a full disk; after space is freed the run ends equal to one without."""
    ckpt = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), ckpt)
    argv = ["sample", "--ckpt", str(ckpt), "--num-samples", "12", "--batch-size", "4", "--sampler", "ddim",
            "--num-steps", "3", "--device", "cpu", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "reference")]) == 0
    out = small_fs / "out"
    assert main(argv[:4] + ["8"] + argv[5:] + ["--out", str(out)]) == 0  # first two shards only...
    shards = {p.name: p.read_bytes() for p in (out / "shards").glob("*.npz")}
    assert len(shards) == 2
    (out / "settings.json").unlink()  # ...recorded under 8 samples; the 12-sample run records its own
    fill(small_fs, leave=6 * 1024)  # room for settings.json and one shard at most
    capsys.readouterr()
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ditkit sample: error: disk full while writing"), err
    for name, data in shards.items():
        assert (out / "shards" / name).read_bytes() == data, f"{name} changed on a full disk"
    assert temporaries(small_fs) == []
    for filler in small_fs.glob("filler-*"):
        filler.unlink()
    assert main(argv + ["--out", str(out)]) == 0
    for name, data in shards.items():
        assert (out / "shards" / name).read_bytes() == data, f"{name} was redone"
    (mine,) = out.glob("samples_12x*.npz")
    (ref,) = (tmp_path / "reference").glob("samples_*.npz")
    with np.load(mine) as a, np.load(ref) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_real_full_disk_during_training_checkpoint(small_fs):
    from ditkit.train.checkpoint import list_checkpoints, load_training_checkpoint, save_training_checkpoint

    model = ditkit.create_model("DiT-S/2", **TINY)
    folder = small_fs / "checkpoints"
    save_training_checkpoint(folder, 1, model, model, {"step": 1, "optimizer": {}}, "{}")
    fill(small_fs, leave=64 * 1024)  # less room than one checkpoint of the wider model below
    wide = ditkit.create_model("DiT-S/2", **{**TINY, "hidden_size": 256})
    with pytest.raises(UserError, match="disk full"):
        save_training_checkpoint(folder, 2, wide, wide, {"step": 2, "optimizer": {}}, "{}")
    assert [p.name for p in list_checkpoints(folder)] == ["0000001"]
    assert load_training_checkpoint(folder / "0000001", model).step == 1


# ----------------------------------------------------------------------------------------------- stand-ins


def _partial_then(exc: BaseException):
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise exc

    return write


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    "make_exc",
    [
        lambda: OSError(errno.ENOSPC, "No space left on device"),  # numpy, PIL, plain writes
        _safetensor_error,  # safetensors
    ],
    ids=["oserror", "safetensors"],
)
def test_stand_in_full_disk_keeps_the_old_file(tmp_path, make_exc):
    target = tmp_path / "model.safetensors"
    save_model(tiny_model(), target)
    before = target.read_bytes()
    with pytest.raises(UserError, match=r"^disk full while writing .*model.safetensors; the previous file is intact"):
        atomic_write(target, _partial_then(make_exc()))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    load_model(target)  # still a valid checkpoint


def test_other_errors_are_not_called_disk_full(tmp_path):
    """A failure with space to spare keeps its own error (it is a bug or a bad input, not a full disk)."""
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="boom"):
        atomic_write(target, _partial_then(ValueError("boom")))
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    assert not disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)  # plenty of space here
    assert disk_full(OSError(errno.ENOSPC, "full"), tmp_path)


def test_stand_in_full_disk_during_sample_shard_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC from numpy while writing the third shard: exit 2, one line, shards 0 and 1 intact."""
    ckpt = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), ckpt)
    real = np.savez
    calls = {"n": 0}

    def savez(file, **arrays):
        calls["n"] += 1
        if calls["n"] == 3:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    out = tmp_path / "out"
    code = main(["sample", "--ckpt", str(ckpt), "--num-samples", "16", "--batch-size", "4", "--sampler", "ddim",
                 "--num-steps", "3", "--device", "cpu", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "disk full while writing" in err and "shard_000002" in err
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_000000.npz", "shard_000001.npz"]
    for name in ("shard_000000.npz", "shard_000001.npz"):
        with np.load(out / "shards" / name) as f:
            assert f["arr_0"].shape == (4, 8, 8, 3)


# ----------------------------------------------------------------------------------------------- logs (item 3)


def test_log_writes_that_fail_warn_once_and_training_goes_on(tmp_path, capsys, monkeypatch, one_thread):
    """log.txt and metrics.jsonl on a device that is always full (/dev/full: real ENOSPC on every write),
    TensorBoard's writer failing the same way: one warning each, and the run trains and checkpoints to the end."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    from ditkit.train import TrainOptions, train
    from ditkit.train.checkpoint import list_checkpoints, load_training_checkpoint

    results = tmp_path / "run"
    results.mkdir()
    for name in ("log.txt", "metrics.jsonl"):
        (results / name).symlink_to("/dev/full")
    tensorboard = pytest.importorskip("torch.utils.tensorboard")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorboard.SummaryWriter, "add_scalar", full)
    result = train(TrainOptions(results_dir=str(results), max_steps=4, ckpt_every=2, **TRAIN_TINY))
    err = capsys.readouterr().err
    assert result.step == 4 and not result.stopped_by_signal
    assert [p.name for p in list_checkpoints(results / "checkpoints")] == ["0000002", "0000004"]
    load_training_checkpoint(results / "checkpoints" / "0000004", result.model)
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 3, warnings  # once per file, not once per write
    assert any("log.txt (No space left on device)" in w for w in warnings)
    assert any("metrics.jsonl (No space left on device)" in w for w in warnings)
    assert any("TensorBoard logging stopped" in w for w in warnings)
    assert "step 4: checkpoint" in err  # the log lines still reach stderr


def test_real_full_disk_while_training_warns_then_stops_naming_the_intact_checkpoint(small_fs, capsys, one_thread):
    """On a filesystem that fills up mid-run the logs fail first (warned once), training goes on, and the first
    checkpoint that no longer fits stops the run with one line naming the newest intact one (issue 17, item 3)."""
    from ditkit.runtime.errors import UserError
    from ditkit.train import TrainOptions, train
    from ditkit.train.checkpoint import list_checkpoints

    results = small_fs / "run"
    train(TrainOptions(results_dir=str(results), max_steps=2, ckpt_every=2, **TRAIN_TINY))
    fill(small_fs, leave=8 * 1024)
    capsys.readouterr()
    with pytest.raises(UserError) as caught:
        train(TrainOptions(results_dir=str(results), max_steps=6, ckpt_every=2, resume="auto", **TRAIN_TINY))
    message = str(caught.value)
    assert message.startswith(f"disk full while writing checkpoint {results / 'checkpoints' / '0000004'}")
    assert f"the newest intact checkpoint is {results / 'checkpoints' / '0000002'}" in message
    assert "\n" not in message
    assert [p.name for p in list_checkpoints(results / "checkpoints")] == ["0000002"]
    assert temporaries(small_fs) == [] and not list((results / "checkpoints").glob(".tmp-*"))


def test_disk_full_on_the_first_checkpoint_does_not_claim_earlier_ones(tmp_path, monkeypatch):
    """Issue 17, item 15: "earlier checkpoints are intact" was said when there were none."""
    import safetensors.torch

    from ditkit.train.checkpoint import save_training_checkpoint

    def full(*args, **kwargs):
        raise _safetensor_error()

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = ditkit.create_model("DiT-S/2", **TINY)
    with pytest.raises(UserError, match=r"disk full while writing checkpoint .*0000001; no earlier checkpoint exists"):
        save_training_checkpoint(tmp_path / "checkpoints", 1, model, model, {"step": 1, "optimizer": {}}, "{}")
