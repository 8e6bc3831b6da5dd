"""One writer per output folder, and what the files it writes look like to others.

- A second `ditkit train` on a results folder in use, a second `extract --out` or `sample --out` on a folder in
  use: refused with one line naming the folder and the running process; the folder is untouched. The lock dies
  with its holder, so a SIGKILLed run leaves nothing locked (issue 17, item 2).
- Files are written with the process's umask, like any other program's (item 16).
- An identical run writes identical checkpoint bytes (item 17).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.runtime.errors import UserError
from ditkit.runtime.folder_lock import FolderLock
from ditkit.weights.checkpoints import save_model
from helpers.models import TINY
from helpers.processes import ENV

TRAIN = textwrap.dedent(
    f"""
    import sys
    from ditkit import train as t
    from ditkit.cli import main
    real = t.TrainOptions
    t.TrainOptions = lambda **kw: real(**kw, model_overrides={TINY!r})
    sys.exit(main(["train", "--data-path", "digits", "--model", "DiT-S/2", "--image-size", "8",
                   "--global-batch-size", "16", "--log-every", "1", "--ckpt-every", "2", "--num-workers", "0",
                   "--no-progress", "--resume", "auto", "--results-dir", sys.argv[1], "--max-steps", sys.argv[2]]))
    """
)
HOLD = textwrap.dedent(
    """
    import sys, time
    from ditkit.runtime.folder_lock import FolderLock
    lock = FolderLock(sys.argv[1], sys.argv[2], "--out")
    print("held", flush=True)
    time.sleep(120)
    """
)


def _holder(folder: Path, what: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), what], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _err(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(model, path)
    return path


def test_second_trainer_on_a_results_folder_in_use_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", TRAIN, str(run), "100000"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "0000002").is_dir():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.05)
        options = (run / "options.json").read_bytes()
        code, err = _err(["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                          "--global-batch-size", "16", "--num-workers", "0", "--no-progress", "--resume", "auto",
                          "--max-steps", "3", "--results-dir", str(run)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{run} is in use by another process (ditkit train, pid {first.pid} on" in err, err
        assert "choose another --results-dir" in err
        assert (run / "options.json").read_bytes() == options  # the refused run wrote nothing
    finally:
        _kill(first)
    FolderLock(run, "test", "--results-dir").release()  # the SIGKILLed holder left no lock behind


@pytest.mark.parametrize("verb", ["sample", "extract"])
def test_second_writer_of_sample_or_extract_out_is_refused_until_the_holder_dies(tmp_path, tiny_ckpt, capsys,
                                                                                 verb):
    out = tmp_path / "out"
    if verb == "sample":
        argv = ["sample", "--ckpt", str(tiny_ckpt), "--num-samples", "4", "--batch-size", "4", "--sampler", "ddim",
                "--num-steps", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    else:  # refused before the VAE is read, so none is needed for the refusal
        images = tmp_path / "images"
        images.mkdir()
        argv = ["extract", str(images), "--out", str(out), "--vae", str(tmp_path / "no-vae"), "--device", "cpu"]
    holder = _holder(out, f"ditkit {verb}")
    try:
        code, err = _err(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"ditkit {verb}: error: {out} is in use by another process (ditkit {verb}, pid {holder.pid}" in err
        assert err.rstrip().endswith("choose another --out"), err
    finally:
        _kill(holder)
    if verb == "sample":
        assert main(argv) == 0  # the lock died with its holder
        assert list(out.glob("samples_4x8x8x3.npz"))
    else:
        FolderLock(out, "test", "--out").release()


def test_lock_is_released_in_process_and_refuses_a_second_holder(tmp_path):
    with FolderLock(tmp_path / "f", "ditkit train", "--results-dir"):
        with pytest.raises(UserError, match=rf"pid {os.getpid()} on .*; wait for it to end, or choose another"):
            FolderLock(tmp_path / "f", "ditkit train", "--results-dir")
    FolderLock(tmp_path / "f", "ditkit train", "--results-dir").release()


# ----------------------------------------------------------------------------------------------- files


def _train_tiny(results: Path, **kw):
    from ditkit.train import TrainOptions, train

    return train(TrainOptions(data_path="digits", model="DiT-S/2", image_size=8, global_batch_size=16, log_every=1,
                              lr=1e-3, num_workers=0, progress=False, model_overrides=TINY, results_dir=str(results),
                              **kw))


@pytest.fixture
def umask_027():
    old = os.umask(0o027)  # group may read, others nothing: tells the umask apart from 0644 and from 0600
    yield 0o640
    os.umask(old)


def test_outputs_are_written_with_the_process_umask(tmp_path, tiny_ckpt, umask_027, one_thread, capsys):
    """Issue 17, item 16: checkpoints, model files, sample shards, .npz, grids, settings and converted folders
    were 0600 (mkstemp; safetensors' own writer) while state.pt was 0644."""
    _train_tiny(tmp_path / "run", max_steps=1, ckpt_every=1)
    save_model(ditkit.load_model(tiny_ckpt), tmp_path / "model.safetensors")
    base = ["sample", "--ckpt", str(tiny_ckpt), "--sampler", "ddim", "--num-steps", "2", "--device", "cpu",
            "--no-progress"]
    assert main(base + ["--num-samples", "4", "--batch-size", "2", "--out", str(tmp_path / "npz")]) == 0
    assert main(base + ["--save-images", "--out", str(tmp_path / "grid")]) == 0
    folders = [tmp_path / "run", tmp_path / "npz", tmp_path / "grid"]
    if __import__("importlib").util.find_spec("diffusers") is not None:
        latent = ditkit.create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, **TINY)
        save_model(latent, tmp_path / "latent.safetensors")
        assert main(["convert", "--to", "diffusers", str(tmp_path / "latent.safetensors"),
                     str(tmp_path / "converted")]) == 0
        folders.append(tmp_path / "converted")
    files = [tmp_path / "model.safetensors"] + [p for f in folders for p in f.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "ema.safetensors", "state.pt", "settings.json", "grid.png"} <= names, names
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != umask_027}
    assert not wrong, f"not written with the umask (expected {oct(umask_027)}): {wrong}"


def test_an_identical_run_writes_identical_checkpoint_bytes(tmp_path, one_thread):
    """Issue 17, item 17: safetensors wrote its metadata map in a different order each time."""
    for name in ("a", "b"):
        _train_tiny(tmp_path / name, max_steps=2, ckpt_every=2)
    for file in ("model.safetensors", "ema.safetensors", "state.pt"):
        a = (tmp_path / "a" / "checkpoints" / "0000002" / file).read_bytes()
        b = (tmp_path / "b" / "checkpoints" / "0000002" / file).read_bytes()
        assert a == b, f"{file} differs between two identical runs"
    model = ditkit.load_model(tmp_path / "a" / "checkpoints" / "0000002")
    copies = []
    for i in range(5):  # in one process too: the map's order is randomised per map
        save_model(model, tmp_path / f"m{i}.safetensors")
        copies.append((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(set(copies)) == 1


def test_a_filesystem_without_locks_warns_and_works_on(tmp_path, monkeypatch, capsys):
    """Lustre mounted without `-o flock` and some FUSE filesystems refuse flock (ENOSYS, ENOLCK): the run
    must not die of it; it goes on unguarded and says so."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with FolderLock(tmp_path / "f", "ditkit train", "--results-dir"):
        pass
    assert "does not support locks (Function not implemented)" in capsys.readouterr().err
