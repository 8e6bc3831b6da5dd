"""`ditkit train` with REPA and TREAD on the digits: recorded, resumed bit-exactly after SIGKILL, refused with other
settings, sampled without the projector."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ditkit.encoders.features import DigitsPatchEncoder, digits_encoder_path
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import save_safetensors
from ditkit.train import TrainOptions, train
from ditkit.train.checkpoint import read_safetensors

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = {"depth": 3, "hidden_size": 32, "num_heads": 2}
METHODS = dict(repa_encoder="digits-mae", repa_depth=1, repa_projector_dim=16, tread_rate=0.5, tread_start=1,
               tread_end=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A random digits encoder in a private cache (training the real one takes ~20 s)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("DITKIT_CACHE", str(folder))
    torch.manual_seed(0)
    save_safetensors(DigitsPatchEncoder().state_dict(), digits_encoder_path(folder), {})
    return folder


def _settings(**kw):
    return dict(data_path="digits", model="DiT-S/2", image_size=8, global_batch_size=8, log_every=1, lr=1e-3,
                num_workers=0, progress=False, model_overrides=TINY, **{**METHODS, **kw})


def test_train_records_methods_keeps_projector_and_refuses_other_settings(tmp_path, cache):
    import ditkit

    result = train(TrainOptions(results_dir=str(tmp_path / "run"), **_settings(max_steps=2, ckpt_every=2)))
    weights, meta = read_safetensors(result.results_dir / "checkpoints" / "0000002" / "model.safetensors")
    assert "projectors.0.4.weight" in weights and weights["projectors.0.4.weight"].shape == (64, 16)
    recipe = ditkit.load_model_with_recipe(result.results_dir / "checkpoints" / "0000002")[1]
    assert recipe.training.alignment.encoder == "digits-mae" and recipe.training.routing.end == 1
    with pytest.raises(UserError, match="--tread-"):
        train(TrainOptions(results_dir=str(tmp_path / "run"), resume="auto", **_settings(max_steps=4, tread_rate=0.25)))


def test_repa_on_a_latent_store_is_refused_in_one_line(tmp_path, cache):
    from types import SimpleNamespace

    from ditkit.recipe import LatentSpace
    from ditkit.train.methods import method_hooks

    opts = TrainOptions(data_path="store", **{k: v for k, v in _settings().items() if k != "data_path"})
    data = SimpleNamespace(latents=LatentSpace.sd_vae(), encoder=None)
    with pytest.raises(UserError, match="latent store"):
        method_hooks(opts, SimpleNamespace(conditioning="adaln-zero", depth=3), data, torch.device("cpu"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_with_repa_and_tread(tmp_path, cache):
    settings = _settings(max_steps=10, ckpt_every=2, resume="auto")
    script = textwrap.dedent(f"""
        import sys
        from ditkit.train import TrainOptions, train
        train(TrainOptions(results_dir=sys.argv[1], **{settings!r}))
        """)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "DITKIT_CACHE": str(cache)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], env=env, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 120
    while not (killed / "checkpoints" / "0000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    for folder in (killed, tmp_path / "clean"):
        done = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    for name in ("model", "ema"):
        a, _ = read_safetensors(killed / "checkpoints" / "0000010" / f"{name}.safetensors")
        b, _ = read_safetensors(tmp_path / "clean" / "checkpoints" / "0000010" / f"{name}.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("projectors.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
