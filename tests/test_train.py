"""Training on the CPU: a few steps, exact resume after a kill, DDP equivalence, atomic checkpoints, guard rails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ditkit.runtime.errors import UserError
from ditkit.train import train, validate
from ditkit.train.checkpoint import list_checkpoints, load_training_checkpoint, save_training_checkpoint
from helpers.models import TINY
from helpers.models import tiny_dit as _tiny_model
from helpers.processes import ENV, SRC, assert_sigkill_resume_matches_uninterrupted
from helpers.processes import free_port as _free_port
from helpers.processes import train_script as _train_script
from helpers.processes import wait_for as _wait_for
from helpers.training import TINY_FLAGS, options, read_losses


def test_few_steps_write_checkpoints_and_logs(tmp_path):
    result = train(options(tmp_path))
    assert result.step == 6
    assert [p.name for p in list_checkpoints(result.results_dir / "checkpoints")] == ["0000003", "0000006"]
    losses = read_losses(result.results_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert (result.results_dir / "tensorboard").is_dir()
    record = json.loads((result.results_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "mse", "vb", "grad_norm", "lr", "images_per_sec"} <= set(record)


def test_sample_grids_and_digit_scores_during_training(tmp_path):
    result = train(options(tmp_path, max_steps=2, sample_every=2, eval_every=2, eval_samples=20))
    assert (result.results_dir / "samples" / "0000002" / "grid.png").stat().st_size > 0
    records = [json.loads(line) for line in (result.results_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval_accuracy" in r]
    assert scored and scored[0]["step"] == 2 and 0.0 <= scored[0]["eval_accuracy"] <= 1.0


def test_a_training_checkpoint_folder_loads_as_its_ema(tmp_path):
    import ditkit

    result = train(options(tmp_path, max_steps=3))
    loaded = ditkit.load_model(result.results_dir / "checkpoints" / "0000003")
    for k, v in result.ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k


def test_resume_continues_with_exactly_the_same_losses(tmp_path):
    full = train(options(tmp_path / "a"))
    first = train(options(tmp_path / "b", max_steps=3))
    assert first.step == 3
    resumed = train(options(tmp_path / "b", resume="auto"))
    assert resumed.step == 6
    a, b = read_losses(full.results_dir), read_losses(resumed.results_dir)
    for step in range(1, 7):
        assert a[step] == b[step], (step, a[step], b[step])
    ema_a = full.ema.state_dict()
    for k, v in resumed.ema.state_dict().items():
        assert torch.equal(v, ema_a[k]), k
    # The checkpoints' global RNG state too (what a later resume restores), not only the weights: the resumed run
    # starts one DataLoader iterator more than the uninterrupted one.
    last = [r.results_dir / "checkpoints" / "0000006" / "state.pt" for r in (full, resumed)]
    rng_a, rng_b = (torch.load(path, weights_only=True)["torch_rng"] for path in last)
    assert torch.equal(rng_a, rng_b)


def test_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL after its step-4 checkpoint resumes and ends with the uninterrupted weights."""
    assert_sigkill_resume_matches_uninterrupted(tmp_path, _train_script(max_steps=40, ckpt_every=2, resume="auto"), 40)


@pytest.mark.slow
@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    one = train(options(tmp_path / "one", max_steps=4, ckpt_every=4))
    path = tmp_path / "ddp_train.py"  # torchrun runs a script file
    path.write_text(_train_script(max_steps=4, ckpt_every=4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(path), str(tmp_path / "two")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_losses(one.results_dir), read_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    w1 = load_training_checkpoint(one.results_dir / "checkpoints" / "0000004", _tiny_model()).model
    w2 = load_training_checkpoint(tmp_path / "two" / "checkpoints" / "0000004", _tiny_model()).model
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_checkpoint_write_killed_midway_leaves_previous_intact(tmp_path):
    model = _tiny_model()
    folder = tmp_path / "checkpoints"
    save_training_checkpoint(folder, 1, model, model, {"step": 1, "optimizer": {}}, "{}")
    script = textwrap.dedent(
        """
        import sys, time
        import safetensors.torch as st
        from ditkit.models import DiT, DiTConfig
        from ditkit.train import checkpoint as tc
        real = st.save_file
        def slow(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            print("written", flush=True)
            time.sleep(60)
        st.save_file = slow
        cfg = DiTConfig.from_name("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64,
                                  num_heads=4)
        m = DiT(cfg)
        tc.save_training_checkpoint(sys.argv[1], 2, m, m, {"step": 2, "optimizer": {}}, "{}")
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(folder)] == ["0000001"]
    assert list(folder.glob(".tmp-*")), "the killed write should have left only a temporary folder"
    assert load_training_checkpoint(folder / "0000001", model).step == 1


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / "term"
    script = _train_script(max_steps=100_000, ckpt_every=100_000)
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal SIGTERM" in err and out.startswith("stopped by signal")
    (ckpt,) = list_checkpoints(run_dir / "checkpoints")
    assert int(ckpt.name) == int(out.split()[-1])


def poison_loss(monkeypatch, at_call: int, value: float) -> None:
    """Make the `at_call`-th training loss (1-based) non-finite by multiplying it with `value`."""
    from ditkit.diffusion.gaussian import GaussianDiffusion

    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            terms["loss"] = terms["loss"] * value
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_call=5, value=float("nan"))
    with pytest.raises(UserError, match=r"NaN/Inf at step 5.*0000003"):
        train(options(tmp_path, max_steps=8))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["0000003"]


def test_skip_nonfinite_skips_the_step(tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_call=2, value=float("inf"))
    result = train(options(tmp_path, max_steps=4, skip_nonfinite=True))
    assert result.step == 4
    assert all(torch.isfinite(p).all() for p in result.ema.parameters())


def test_guard_rails_each_give_one_line(tmp_path):
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        validate(options(tmp_path, global_batch_size=16), world_size=3)
    with pytest.raises(UserError, match="label 9 but --num-classes is 5"):
        train(options(tmp_path, num_classes=5))
    train(options(tmp_path, max_steps=1))
    with pytest.raises(UserError, match="another config"):
        train(options(tmp_path, max_steps=1, model_overrides={**TINY, "depth": 3}))
    with pytest.raises(UserError, match="already has checkpoints"):
        train(options(tmp_path, max_steps=1))
    with pytest.raises(UserError, match="--lr"):
        validate(options(tmp_path, lr=-1.0), world_size=1)
    for name in ("num_workers", "keep_last", "sample_every", "eval_every"):
        with pytest.raises(UserError, match=f"--{name.replace('_', '-')} must be 0 or more, got -1"):
            validate(options(tmp_path, **{name: -1}), world_size=1)
    with pytest.raises(UserError, match="--vae does not apply"):
        validate(options(tmp_path, vae="stabilityai/sd-vae-ft-ema"), world_size=1)


def test_cli_bad_arguments_exit_2_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "ditkit", "train", *TINY_FLAGS, "--global-batch-size", "0"]
    done = subprocess.run(cmd + ["--results-dir", str(tmp_path / "x")], env=ENV, capture_output=True, text=True)
    err = done.stderr
    assert done.returncode == 2
    assert "Traceback" not in err and "--global-batch-size must be at least 1" in err
