"""Gradient accumulation, FSDP2 and checkpoints across world sizes, on the CPU with gloo under torchrun.

The reference for every multi-process or accumulated run is a plain 1-process run at the same global batch:
the training loop draws all randomness for the global batch from (seed, step), so the results must agree up to
fp32 round-off of a differently ordered reduction (tolerance 1e-5 relative on losses, 1e-4/1e-5 on weights).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from ditkit.runtime.errors import UserError
from ditkit.train import train, validate
from ditkit.train.checkpoint import load_training_checkpoint
from ditkit.train.step import TrainStep
from helpers.models import TINY
from helpers.models import tiny_dit as tiny_model
from helpers.processes import ENV
from helpers.processes import free_port as _free_port
from helpers.training import read_losses, train_options

options = partial(train_options, max_steps=4, ckpt_every=2)  # a 4-step run, checkpoints at 2 and 4


def assert_losses_close(a: dict[int, float], b: dict[int, float], steps: list[int]) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    """accum 2 × micro-batch 8 == accum 1 × batch 16: losses, weights and EMA, to fp32 round-off."""
    full = train(options(tmp_path / "full", max_steps=3, ckpt_every=3))
    accum = train(options(tmp_path / "accum", max_steps=3, ckpt_every=3, grad_accum_steps=2))
    assert_losses_close(read_losses(full.results_dir), read_losses(accum.results_dir), [1, 2, 3])
    assert_weights_close(full.model.state_dict(), accum.model.state_dict())
    assert_weights_close(full.ema.state_dict(), accum.ema.state_dict())
    # The updates are not trivially equal: three AdamW steps at lr 1e-3 moved the weights.
    moved = max((p - q).abs().max().item() for p, q in zip(full.model.parameters(), tiny_model().parameters()))
    assert moved > 1e-3


def test_accumulated_gradient_is_the_float64_full_batch_mean():
    """TrainStep's accumulated gradient against the float64 gradient of the mean loss over the whole batch,
    computed by an independent loop (same draws, one float64 forward per sample)."""
    from ditkit.diffusion import create_diffusion
    from ditkit.train.step import draw_step_randomness

    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():  # adaLN-Zero starts with zero outputs: give every weight a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    diffusion = create_diffusion("", learn_sigma=True)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    ema = tiny_model()
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # as train.py: update_ema pairs the trained parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights for the comparison
    step = TrainStep(model, model, ema, opt, diffusion, device=torch.device("cpu"), precision="fp32",
                     global_batch=8, accum=4, seed=3, class_dropout_prob=0.1)
    step(x, y, step=5)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = tiny_model().double()
    ref.load_state_dict(model.state_dict())
    t, noise, drop = draw_step_randomness(3, 5, 8, (1, 8, 8), diffusion.num_timesteps, 0.1, torch.device("cpu"))
    total = 0.0
    for i in range(8):  # one sample at a time: a different reduction order than the micro-batches
        terms = diffusion.training_losses(ref, x[i : i + 1].double(), t[i : i + 1],
                                          model_kwargs={"y": y[i : i + 1], "force_drop_ids": drop[i : i + 1]},
                                          noise=noise[i : i + 1].double())
        total = total + terms["loss"].sum() / 8
    total.backward()
    checked = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert len(checked) == len(got) > 20
    for n, p in ref.named_parameters():
        if not p.requires_grad:
            continue
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_accumulation_guard_rails(tmp_path):
    with pytest.raises(UserError, match="--grad-accum-steps must be at least 1"):
        validate(options(tmp_path, grad_accum_steps=0), world_size=1)
    with pytest.raises(UserError, match="not divisible by --grad-accum-steps 3"):
        validate(options(tmp_path, grad_accum_steps=3), world_size=2)
    with pytest.raises(UserError, match="--strategy must be one of ddp, fsdp"):
        validate(options(tmp_path, strategy="zero3"), world_size=1)


def test_cli_rejects_a_bad_accumulation_with_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "ditkit", "train", "--data-path", "digits", "--model", "DiT-S/2", "--image-size",
           "8", "--global-batch-size", "16", "--grad-accum-steps", "5", "--results-dir", str(tmp_path / "x")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "not divisible by --grad-accum-steps 5" in done.stderr


# ----------------------------------------------------------------------------------------------- torchrun


def _torchrun(tmp_path: Path, results: Path, nproc: int = 2, **kw) -> None:
    settings = dict(data_path="digits", model="DiT-S/2", image_size=8, global_batch_size=16, log_every=1, lr=1e-3,
                    num_workers=0, progress=False, model_overrides=TINY, **kw)
    script = tmp_path / f"train_{results.name}.py"  # torchrun runs a script file
    script.write_text(textwrap.dedent(
        f"""
        import sys
        from ditkit.train import TrainOptions, train
        train(TrainOptions(results_dir=sys.argv[1], **{settings!r}))
        """
    ))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), str(script), str(results)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_its_checkpoint_resumes_in_one(tmp_path):
    """2-process FSDP (with 2 micro-steps) == 1 plain process; its step-2 checkpoint, resumed by 1 process,
    continues with the losses and weights of the uninterrupted 1-process run."""
    one = train(options(tmp_path / "one"))
    _torchrun(tmp_path, tmp_path / "fsdp", strategy="fsdp", grad_accum_steps=2, max_steps=4, ckpt_every=2)
    a, b = read_losses(one.results_dir), read_losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert_losses_close(a, b, [1, 2, 3, 4])
    ref4 = load_training_checkpoint(one.results_dir / "checkpoints" / "0000004", tiny_model())
    got4 = load_training_checkpoint(tmp_path / "fsdp" / "checkpoints" / "0000004", tiny_model())
    assert got4.state["world_size"] == 2 and got4.state["strategy"] == "fsdp"
    assert_weights_close(ref4.model, got4.model)
    assert_weights_close(ref4.ema, got4.ema)  # the sharded EMA, gathered

    ckpt2 = tmp_path / "fsdp" / "checkpoints" / "0000002"
    resumed = train(options(tmp_path / "resumed", resume=str(ckpt2)))  # 1 process, DDP strategy
    assert resumed.step == 4
    c = read_losses(resumed.results_dir)
    assert sorted(c) == [3, 4]
    assert_losses_close(a, c, [3, 4])
    assert_weights_close(ref4.model, resumed.model.state_dict())
    assert_weights_close(ref4.ema, resumed.ema.state_dict())
    # The AdamW moments were restored by name, not re-initialised: a fresh optimizer would give other losses.
    fresh_opt = load_training_checkpoint(ckpt2, tiny_model())
    assert set(fresh_opt.state["optimizer"]["state"]) >= {"x_embedder.proj.weight", "blocks.0.attn.qkv.weight"}


@pytest.mark.slow
def test_ddp_two_processes_with_accumulation_match_one(tmp_path):
    one = train(options(tmp_path / "one", max_steps=3, ckpt_every=3))
    _torchrun(tmp_path, tmp_path / "ddp", grad_accum_steps=2, max_steps=3, ckpt_every=3)
    a, b = read_losses(one.results_dir), read_losses(tmp_path / "ddp")
    assert sorted(b) == [1, 2, 3]
    assert_losses_close(a, b, [1, 2, 3])
    got = load_training_checkpoint(tmp_path / "ddp" / "checkpoints" / "0000003", tiny_model())
    assert_weights_close(one.model.state_dict(), got.model)


@pytest.mark.slow
def test_meanflow_ddp_two_processes_match_one(tmp_path):
    """MeanFlow under DDP: the dual JVP pass reads the weights through the DDP wrapper (models.dual.network_of)
    without a collective of its own, so 2 processes with 2 micro-steps give the losses and weights of 1."""
    one = train(options(tmp_path / "one", max_steps=3, ckpt_every=3, objective="meanflow"))
    _torchrun(tmp_path, tmp_path / "ddp", grad_accum_steps=2, max_steps=3, ckpt_every=3, objective="meanflow")
    a, b = read_losses(one.results_dir), read_losses(tmp_path / "ddp")
    assert sorted(b) == [1, 2, 3]
    assert_losses_close(a, b, [1, 2, 3])
    got = load_training_checkpoint(tmp_path / "ddp" / "checkpoints" / "0000003", tiny_model(interval_time=True))
    assert_weights_close(one.model.state_dict(), got.model)
