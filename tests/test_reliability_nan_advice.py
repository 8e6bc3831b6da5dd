"""After a NaN, "the last good checkpoint" is good, and the advice works when followed (issue 30, class 6).

The run used to name its newest checkpoint, whose weights had already diverged, and suggest a lower `--lr` that
resuming ignored, so following the advice looped. Now a checkpoint is good by the rule in
`ditkit.train.health` (finite weights, EMA and optimizer state; the loss window that trained from it finite and
at most 10× the run's lowest), `--lr` on resume is applied, and the test below follows the advice to the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ditkit.runtime.errors import UserError
from ditkit.runtime.io import read_safetensors, safe_torch_load
from ditkit.train.health import GoodCheckpoints, all_finite


def _options(results: Path, **kw):
    from ditkit.train import TrainOptions

    settings = dict(data_path="digits", model="DiT-S/2", image_size=8, global_batch_size=16, log_every=1,
                    num_workers=0, progress=False, model_overrides={"depth": 2, "hidden_size": 32, "num_heads": 4},
                    results_dir=str(results), grad_clip=0.0)
    return TrainOptions(**{**settings, **kw})


def test_the_advice_after_a_nan_names_a_good_checkpoint_and_following_it_works(tmp_path, capsys, one_thread):
    from ditkit.train import train

    run = tmp_path / "run"
    train(_options(run, lr=1e-3, max_steps=2, ckpt_every=2))  # a healthy start
    with pytest.raises(UserError) as caught:  # then the learning rate is raised far too high: it diverges
        train(_options(run, lr=1.0, max_steps=40, ckpt_every=1, keep_last=1, resume="auto"))
    # --lr on resume was applied (class 5), logged, and is what the diverging steps ran at
    assert "--lr 1 applied from the resumed step on (the checkpoint was trained at 0.001)" in \
        (run / "log.txt").read_text()
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert rates[:2] == [1e-3, 1e-3] and set(rates[2:]) == {1.0}, rates
    message = str(caught.value)
    found = re.search(r"The last good checkpoint \(.*\) is (\S+): resume from it with --resume (\S+) --lr 0\.1 ",
                      message)
    assert found and found[1] == found[2], message
    good = Path(found[1])
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert good != newest  # the newest one is where the weights had already run away
    assert good.is_dir()  # --keep-last 1 pruned the others, not the one the advice names
    assert all_finite(read_safetensors(good / "model.safetensors")[0], read_safetensors(good / "ema.safetensors")[0],
                      safe_torch_load(good / "state.pt")["optimizer"])
    # Follow the advice exactly: resume from the named checkpoint with the named --lr.
    step = int(good.name)
    result = train(_options(run, lr=0.1, max_steps=step + 6, ckpt_every=3, resume=str(good)))
    assert result.step == step + 6
    state = safe_torch_load(run / "checkpoints" / f"{step + 6:07d}" / "state.pt")
    assert all(group["lr"] == 0.1 for group in state["optimizer"]["param_groups"])  # saved as applied
    assert all(torch.isfinite(p).all() for p in result.ema.parameters())
    assert all(loss == loss and loss < 1e3 for _, loss in result.losses), result.losses
    superseded = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".superseded"))
    assert superseded and f"{newest.name}.superseded" in superseded  # kept aside, never deleted
    assert "renamed *.superseded" in (run / "log.txt").read_text()


def test_the_rule_looks_at_the_window_after_each_checkpoint():
    good = GoodCheckpoints()
    good.logged(1, 1.0)
    good.saved(2, Path("0000002"), finite=True)
    good.logged(2, 0.9)  # trained from step-1 weights: says nothing about checkpoint 2 yet
    assert good.last_good is None and good.protected() == [Path("0000002")]
    good.logged(3, 0.8)  # trained from checkpoint 2's weights, and fine
    assert good.last_good == Path("0000002")
    good.saved(4, Path("0000004"), finite=True)
    good.saved(5, Path("0000005"), finite=True)
    assert good.protected() == [Path("0000002"), Path("0000005")]  # the newest pending one is all that can win
    good.logged(6, 50.0)  # more than 10× the lowest (0.8): checkpoint 4 is not good
    good.saved(6, Path("0000006"), finite=False)  # a non-finite state is never good
    good.logged(7, 0.7)
    assert good.last_good == Path("0000002")
    good.saved(8, Path("0000008"), finite=True)
    good.logged(9, float("nan"))
    assert good.last_good == Path("0000002")
