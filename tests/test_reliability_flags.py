"""Options that cannot apply are refused; options that can apply on resume are applied and logged (issue 30,
class 5).

`--prompt` on a class-conditional checkpoint wrote a class grid and exited 0; a flow `--guidance-interval 0.2 1.5`
was accepted and a reversed one was told the diffusion's 0..999; `--lr` with `--resume auto` was overwritten by
the checkpoint's optimizer state while the log showed the old value.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.recipe import DiffusionProcess, FlowProcess, LatentSpace, Recipe, infer_recipe
from ditkit.weights.checkpoints import save_model
from helpers.cli import refusal_line

TINY = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, in_channels=1, num_classes=10)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints: class-conditional diffusion (1000 and 100 steps), flow, and a text model."""
    base = tmp_path_factory.mktemp("flags")
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", **{k: v for k, v in TINY.items() if k != "patch_size"})
    out = {}
    for name, process in (("diffusion", DiffusionProcess()), ("diffusion100", DiffusionProcess(diffusion_steps=100)),
                          ("flow", FlowProcess())):
        out[name] = base / f"{name}.safetensors"
        save_model(model, out[name], recipe=Recipe(model=model.config, process=process, latents=LatentSpace()))
    text = build_model(DiTConfig(**TINY, conditioning="text", caption_channels=16, max_tokens=4))
    out["text"] = base / "text.safetensors"
    save_model(text, out["text"], recipe=infer_recipe(text.config, LatentSpace()))
    return out




@pytest.mark.parametrize("ckpt, extra, message", [
    ("diffusion", ["--prompt", "a red cat"], r"--prompt applies to text models, but this checkpoint is class-cond"),
    ("diffusion", ["--negative-prompt", "blurry"], r"--negative-prompt applies to text models"),
    ("flow", ["--prompt-file", "p.txt"], r"--prompt-file applies to text models"),
    ("text", ["--class-labels", "3"], r"--class-labels applies to class-conditional models, but this checkpoint is a"),
    ("flow", ["--guidance-interval", "0.2", "1.5"],
     r"flow time t in 0\.\.1 \(1 = data\) for this flow model; got 0\.2 1\.5"),
    ("flow", ["--guidance-interval", "0.8", "0.2"], r"flow time t in 0\.\.1 .*got 0\.8 0\.2"),
    ("diffusion", ["--eta", "0.5"], r"--eta 0\.5 applies to --sampler ddim only \(this run samples with ddpm\)"),
    ("diffusion", ["--guidance-interval", "500", "100"], r"diffusion timesteps in 0\.\.999 for this diffusion model"),
    ("diffusion100", ["--guidance-interval", "10", "200"], r"diffusion timesteps in 0\.\.99 "),
])
def test_flags_that_cannot_apply_are_refused_naming_the_flag(ckpts, tmp_path, capsys, ckpt, extra, message):
    line = refusal_line(["sample", "--ckpt", str(ckpts[ckpt]), "--num-steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "s"), *extra], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "s" / "grid.png").exists()


def test_flow_guidance_interval_inside_0_1_is_accepted(ckpts, tmp_path, capsys):
    argv = ["sample", "--ckpt", str(ckpts["flow"]), "--num-steps", "2", "--sampler", "euler", "--device", "cpu",
            "--per-label", "1", "--class-labels", "1", "--out", str(tmp_path / "s"), "--guidance-interval", "0.2",
            "0.9", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "s" / "grid.png").is_file()


# --lr on --resume (applied and logged) is tested with the NaN advice it serves: test_reliability_nan_advice.py
