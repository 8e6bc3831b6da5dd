"""`torchrun -m ditkit sample --num-samples` with two CPU processes (gloo): the real multi-process path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ditkit
from ditkit import sample as sample_mod
from helpers.cli import parse
from helpers.models import sampling_dit as tiny_model


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    ditkit.save_model(tiny_model(), ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    args = ["--sampler", "dpm-solver", "--num-steps", "3", "--cfg-scale", "2", "--seed", "5"]
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ditkit", "sample", "--ckpt", str(ckpt),
         "--num-samples", "7", "--batch-size", "2", "--out", str(tmp_path / "two"), "--no-progress", *args],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(list((tmp_path / "two" / "shards").glob("shard_*.npz"))) == 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: CPU kernels may round differently with other thread counts
    try:
        sampler = sample_mod.load_for_sampling(parse(ckpt, *args), torch.device("cpu"))
        one = sample_mod.sample_npz(sampler, 7, 2, 5, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    with np.load(one) as a, np.load(tmp_path / "two" / one.name) as b:
        assert a["arr_0"].shape == (7, 8, 8, 3)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
