"""Protocol presets (`ditkit sample --preset`), the protocol recorded in settings.json, and `ditkit evaluate`
printing it (issue 28)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import ditkit
from ditkit import sample as sample_mod
from ditkit.cli import main
from ditkit.metrics import inception as inc
from ditkit.models.config import DiTConfig
from ditkit.runtime.errors import UserError
from ditkit.sample import presets

pytestmark = pytest.mark.usefixtures("one_thread")

# The cited values, written out here from the sources (not read from the table under test):
# DiT sample_ddp.py:152-161 + models.py:262; SiT sample_ddp.py:210-218, models.py:261, train_utils.py:24-31,
# issue #18 (Heun 125 = 250 NFE); REPA README.md:124-135, generate.py:174-197, samplers.py:131/150;
# LightningDiT 800ep_cfg.yaml:59-76, integrators.py:94-101, lightningdit.py:432-439.
EXPECTED = {
    "dit-xl-2-256": dict(sampler="ddpm", num_steps=250, cfg_scale=1.5, guide_channels="3", guidance_interval=None,
                         time_shift=1.0, num_samples=50000, seed=0, vae="stabilityai/sd-vae-ft-ema",
                         precision="tf32", image_size=256, process="diffusion", fid=2.27),
    "dit-xl-2-512": dict(sampler="ddpm", num_steps=250, cfg_scale=1.5, guide_channels="3", guidance_interval=None,
                         time_shift=1.0, num_samples=50000, seed=0, vae="stabilityai/sd-vae-ft-ema",
                         precision="tf32", image_size=512, process="diffusion", fid=3.04),
    "sit-xl-2-sde": dict(sampler="sde-euler", num_steps=250, cfg_scale=1.5, guide_channels="3",
                         guidance_interval=None, time_shift=1.0, num_samples=50000, seed=0,
                         vae="stabilityai/sd-vae-ft-ema", precision="tf32", image_size=256, process="flow", fid=2.06),
    "sit-xl-2-ode": dict(sampler="heun", num_steps=125, cfg_scale=1.5, guide_channels="3", guidance_interval=None,
                         time_shift=1.0, num_samples=50000, seed=0, vae="stabilityai/sd-vae-ft-ema",
                         precision="tf32", image_size=256, process="flow", fid=2.15),
    # REPA's t = 1 is noise: guidance for its t <= 0.7 is ditkit's t in [0.3, 1]
    "repa-sit-xl-2": dict(sampler="sde-euler", num_steps=250, cfg_scale=1.8, guide_channels="all",
                          guidance_interval=[0.3, 1.0], time_shift=1.0, num_samples=50000, seed=0,
                          vae="stabilityai/sd-vae-ft-ema", precision="tf32", image_size=256, process="flow",
                          fid=1.42),
    # 250 grid points = 249 Euler steps; timestep_shift 0.3 on SiT's t = SD3's shift 1/0.3 of the noise level
    "lightningdit-xl-1": dict(sampler="euler", num_steps=249, cfg_scale=6.7, guide_channels="3",
                              guidance_interval=[0.125, 1.0], time_shift=1 / 0.3, num_samples=50000, seed=0,
                              vae=None, precision=None, image_size=256, process="flow", fid=1.35),
}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sample_mod.add_arguments(parser)
    return parser.parse_args(["--ckpt", "x", *argv])


def test_each_preset_holds_the_cited_values():
    assert set(presets.PRESETS) == set(EXPECTED)
    for name, want in EXPECTED.items():
        p = presets.PRESETS[name]
        settings = p.settings()
        for key in presets.FIELDS:
            assert settings[key] == pytest.approx(want[key]) if isinstance(want[key], float) else \
                settings[key] == want[key], (name, key)
        assert (p.image_size, p.process, p.reported["fid"]) == (want["image_size"], want["process"], want["fid"])
        assert p.labels == "uniform" and p.sources, name
    # LightningDiT's shift, checked against its own formula: t' = s·t / (1 + (s − 1)·t) on SiT's time (s = 0.3)
    from ditkit.transport.transport import shifted_grid

    t = torch.linspace(0, 1, 250, dtype=torch.float64)
    theirs = 0.3 * t / (1 + (0.3 - 1) * t)
    ours = shifted_grid(0.0, 1.0, 250, presets.PRESETS["lightningdit-xl-1"].time_shift, dtype=torch.float64)
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_flags_given_override_the_preset_and_are_reported():
    args = parse("--preset", "dit-xl-2-256", "--cfg-scale", "4.0", "--seed", "7")  # 4.0 is the flag's default
    overrides = presets.apply_preset(args)
    assert args.cfg_scale == 4.0 and args.seed == 7  # given explicitly: kept
    assert (args.sampler, args.num_steps, args.guide_channels, args.num_samples) == ("ddpm", 250, "3", 50000)
    assert args.vae == "stabilityai/sd-vae-ft-ema" and args.precision == "tf32"
    assert overrides == ["--cfg-scale 4 (preset: 1.5)", "--seed 7 (preset: 0)"]
    plain = parse()
    # no preset: nothing filled (--cfg-scale stays unset: its default is resolved with the objective, 4 or 1)
    assert presets.apply_preset(plain) == [] and plain.cfg_scale is None and plain.num_samples is None


def test_a_preset_on_the_wrong_kind_of_checkpoint_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64,
                                num_heads=2)
    ckpt = tmp_path / "tiny.safetensors"
    ditkit.save_model(model, ckpt)
    code = main(["sample", "--ckpt", str(ckpt), "--preset", "dit-xl-2-256", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--preset dit-xl-2-256 is for DiT-XL/2" in err[0], err
    assert not (tmp_path / "o").exists()
    xl = DiTConfig(depth=28, hidden_size=1152, num_heads=16, patch_size=2, input_size=32)
    presets.check_fits("dit-xl-2-256", xl, "diffusion")  # the right kind passes
    with pytest.raises(UserError, match="a flow model"):
        presets.check_fits("dit-xl-2-256", xl, "flow")  # SiT's weights are DiT-shaped: the process tells them apart
    with pytest.raises(UserError, match="use the preset of that resolution"):
        presets.check_image_size("dit-xl-2-256", 512)
    with pytest.raises(UserError, match="without norm rmsnorm, rope True, mlp swiglu"):
        presets.check_fits("lightningdit-xl-1", DiTConfig(patch_size=1, in_channels=32, input_size=16), "flow")


def _tiny_sampler(**kw) -> sample_mod.Sampler:
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=2).eval()
    return sample_mod.Sampler(model=model, vae=None, sampler="ddim", num_steps=2, cfg_scale=1.5, **kw)


def test_the_protocol_round_trips_and_evaluate_prints_it(tmp_path, monkeypatch, capsys):
    from helpers.inception import TinyInception

    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "cache"))
    sampler = _tiny_sampler(cache="fora-2", preset="dit-xl-2-256", preset_overrides=("--num-samples 6",))
    npz = sample_mod.sample_npz(sampler, 6, 4, seed=3, out=tmp_path / "s")
    stored = json.loads((tmp_path / "s" / "settings.json").read_text())
    protocol = stored["protocol"]
    assert (protocol["num_samples"], protocol["seed"], protocol["image_size"]) == (6, 3, 8)
    assert protocol["labels"] == "uniform over 10 classes" and protocol["preset"] == "dit-xl-2-256"
    assert protocol["preset_overrides"] == ["--num-samples 6"] and protocol["decoder_dtype"] is None
    assert stored["cache"] == "fora-2" and stored["cfg_scale"] == 1.5 and stored["precision"] == "fp32"
    # Extending the run to more samples keeps the shards and rewrites the protocol's count.
    sample_mod.sample_npz(sampler, 8, 4, seed=3, out=tmp_path / "s")
    assert json.loads((tmp_path / "s" / "settings.json").read_text())["protocol"]["num_samples"] == 8
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(inc, "load_inception", lambda path, device="cpu": TinyInception())
    argv = ["evaluate", str(npz), str(tmp_path / "ref.npz"), "--inception-weights", "w.pth", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "FID:" in out and "Reference batch:" in out and "20 images, 8×8" in out
    assert "sampler ddim, 2 steps, cfg 1.5 on 3 channels" in out and "cache fora-2" in out
    assert "6 samples, labels uniform over 10 classes, seed 3" in out and "preset dit-xl-2-256" in out
    # Against its preset: every deviation that moves FID is named.
    for what in ("sampler ddim (preset ddpm", "num_steps 2 (preset 250", "6 samples (preset 50000",
                 "vae None (preset stabilityai/sd-vae-ft-ema", "precision fp32 (preset tf32", "cache fora-2"):
        assert what in err, what
    written = json.loads((tmp_path / "s" / "samples_6x8x8x3.eval.json").read_text())
    assert written["fid"] > 0 and written["protocol"]["preset"] == "dit-xl-2-256"
    assert written["evaluation"]["reference"]["resolution"] == [8, 8]
    # A reference batch of another resolution is refused before any feature is computed.
    np.savez(tmp_path / "ref12.npz", arr_0=rng.integers(0, 255, (20, 12, 12, 3), dtype=np.uint8))
    assert main([*argv[:2], str(tmp_path / "ref12.npz"), *argv[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the samples are 8×8 but the reference batch ref12.npz is 12×12" in err[0]


def test_a_protocol_matching_its_preset_gives_no_warning(tmp_path):
    from ditkit.metrics.protocol_report import deviations

    settings = {"sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "guide_channels": 3, "interval": None,
                "time_shift": 1.0, "vae": "stabilityai/sd-vae-ft-ema", "precision": "tf32", "seed": 0,
                "model": {"depth": 28, "hidden_size": 1152, "patch_size": 2, "in_channels": 4},
                "recipe": {"process": {"kind": "diffusion"}}, "protocol": {"image_size": 256, "num_samples": 50000}}
    preset, found = deviations(settings, 50000)
    assert preset.name == "dit-xl-2-256" and found == []  # found by its checkpoint kind, no preset recorded
    preset, found = deviations({**settings, "guide_channels": "all"}, 50000)
    assert found == ["guide_channels all (preset 3: guidance on other channels)"]
