"""Absurd counts from flags are refused in one line before any work (issue 30, class 4).

`ditkit sample --num-samples 10^12` used to allocate until memory ran out; `demo` and `scaling` took such counts
and started minutes of training first. Each case here must end with exit code 2 and one line, in well under a
second of work (no model is trained, no checkpoint is sampled).
"""

from __future__ import annotations

import re
import time

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.runtime import counts
from ditkit.weights.checkpoints import save_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=4)
    path = tmp_path_factory.mktemp("c") / "tiny.safetensors"
    save_model(model, path)
    return path


def _refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ditkit")]
    assert len(lines) == 1, err
    assert took < 10, f"{argv[0]} worked {took:.1f} s before refusing"
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", str(10**12)], r"--num-samples must be at least 1 and at most 10,000,000, got 1000000000000"),
    (["--num-samples", "100", "--batch-size", str(10**9)], r"--batch-size must be at least 1 and at most 65,536"),
    (["--per-label", str(10**9)], r"--per-label must be at least 1 and at most 4,096"),
    (["--class-labels", *map(str, range(10)), "--per-label", "500"], r"10 labels × --per-label 500 = 5,000 images"),
    (["--num-steps", str(10**9)], r"--num-steps must be at least 1 and at most 10,000"),
])
def test_sample_counts_are_bounded_before_the_checkpoint_is_read(tiny, tmp_path, capsys, extra, message):
    line = _refused(["sample", "--ckpt", str(tiny), "--out", str(tmp_path / "s"), *extra], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "s").exists()


def test_sample_num_samples_that_the_disk_cannot_hold_is_refused_before_sampling(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setattr(counts, "free_bytes", lambda folder: 100_000)  # a nearly full disk
    line = _refused(["sample", "--ckpt", str(tiny), "--out", str(tmp_path / "s"), "--num-samples", "5000",
                     "--num-steps", "2", "--device", "cpu"], capsys)
    # 2 copies (shards and final .npz) × 5000 × 8×8 × 3 bytes = 1.92 MB
    assert re.search(r"--num-samples 5,000 at 8×8 needs about 1\.92 MB in .* but its disk has 100 kB free", line)
    assert not list((tmp_path / "s").glob("shards/*.npz"))


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", str(10**12)], r"--steps must be at least 1 and at most 100,000,000"),
    (["demo", "--num-samples", str(10**12)], r"--num-samples must be at least 20 and at most 10,000,000"),
    (["demo", "--per-class", str(10**6)], r"--per-class must be at least 1 and at most 409"),
    (["scaling", "--steps", str(10**12), "--eval-at", "10"], r"--steps must be at least 1 and at most 100,000,000"),
    (["scaling", "--num-samples", str(10**12)], r"--num-samples must be at least 20 and at most 10,000,000"),
    (["scaling", "--models", "DiT-S/8", "--model-overrides", '{"depth": 1000000}'],
     r"--models DiT-S/8 with --model-overrides: model config: depth must be an integer in 1\.\.1,024"),
    (["scaling", "--models", "DiT-S/8", "--model-overrides", '{"hidden_size": 65536, "num_heads": 1}'],
     r"describes a model of ~.* numbers"),
    (["train", "--data-path", "digits", "--max-steps", str(10**12)],
     r"--max-steps must be at least 1 and at most 100,000,000"),
    (["extract", "imgs", "--out", "store", "--shard-size", str(10**12)], r"--shard-size must be at least 1 and"),
    (["extract", "imgs", "--out", "store", "--batch-size", str(10**9)], r"--batch-size must be at least 1 and at most"),
    (["evaluate", "imgs", "--batch-size", str(10**9)], r"--batch-size must be at least 1 and at most 65,536"),
    (["train", "--data-path", "digits", "--global-batch-size", str(10**9)],
     r"--global-batch-size must be at least 1 and at most 65,536"),
])
def test_demo_scaling_and_train_counts_are_refused_before_training(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # default output folders land here, not in the checkout
    (tmp_path / "imgs").mkdir()
    line = _refused(argv, capsys)
    assert re.search(message, line), line
