"""`torchrun -m ditkit extract` with two CPU processes (gloo): the real multi-process path, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import IMAGES, make_image_folder
from helpers.vae import make_tiny_vae


@pytest.mark.slow
def test_torchrun_extract_matches_single_process(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    vae = make_tiny_vae(tmp_path / "vae")
    common = [str(folder), "--vae", str(vae), "--image-size", "32", "--shard-size", "2", "--batch-size", "2",
              "--workers", "0", "--device", "cpu", "--no-progress", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ditkit", "extract", "--out",
         str(tmp_path / "two"), *common],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    import torch

    from ditkit.data.extract import extract
    from ditkit.encoders.autoencoder import load_vae

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): CPU convolutions vary with thread count
    try:
        extract(folder, tmp_path / "one", load_vae(str(vae)), image_size=32, shard_size=2, batch_size=2,
                workers=0, dtype="float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    m_two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    m_one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert m_two["count"] == len(IMAGES) and m_two == m_one
    for s in m_one["shards"]:
        assert (tmp_path / "two" / s["file"]).read_bytes() == (tmp_path / "one" / s["file"]).read_bytes()
