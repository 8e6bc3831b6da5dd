"""Kill anywhere (short CI version of benchmarks/soak_kill.py): SIGKILL `ditkit train`, `ditkit extract` and
`ditkit sample --num-samples` at random moments and while a checkpoint or shard is being written, resume, and
check that every checkpoint/shard left on disk reads back, nothing finished is lost or redone, and the final
output equals an uninterrupted run's bit for bit (the reference run is independent: one process, no kills)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from soak_kill import HOW, kill_loop, make_inputs, make_jobs, run_in_process, second_writer  # noqa: E402


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    torch.set_num_threads(1)  # the machine's cores are shared
    inputs = make_inputs(tmp_path_factory.mktemp("inputs"), num_images=6)
    return make_jobs(inputs, train_steps=10)


@pytest.mark.parametrize("name,max_delay", [("train", 4.0), ("train-workers", 6.0), ("train-meanflow", 4.0),
                                            ("sample", 4.0), ("extract", 6.0)])
def test_kill_resume_loop_loses_nothing_and_matches_uninterrupted(jobs, tmp_path, name, max_delay):
    """SIGKILL at random moments; for train-workers SIGTERM to the whole process group, DataLoader workers
    included (what a scheduler sends before pre-emption), which must checkpoint and exit 0 each time."""
    job = jobs[name]
    run_in_process(job, tmp_path / "reference")
    report = kill_loop(job, tmp_path / "killed", tmp_path / "reference", kills=2, rng=random.Random(1),
                       max_delay=max_delay, how=HOW.get(name, "kill"))
    print(report.summary())
    assert report.kills >= 1, "the job finished before it could be killed; raise the job size"
    assert not report.unreadable, report.unreadable
    assert not report.data_lost, report.data_lost
    assert report.final_equal, "the resumed output differs from the uninterrupted run's"
    if name in ("train", "train-meanflow"):
        assert max(report.lost_per_kill) <= 1, "checkpoints are written every step: at most one step is lost"
    elif name == "train-workers":
        assert max(report.lost_per_kill) == 0, "a SIGTERM must leave a checkpoint at the step reached"
    else:
        assert max(report.lost_per_kill) == 0
    temporaries = job.temporaries(tmp_path / "killed")
    assert not temporaries, f"temporary files left after the final run: {sorted(temporaries)}"


def test_a_second_writer_is_refused_and_the_lock_dies_with_the_first(jobs, tmp_path):
    """Two trainers on one folder: the second is refused at once naming the first's pid; after the first is
    SIGKILLed the folder is free, and the run finishes equal to an uninterrupted one. (extract and sample:
    test_reliability_writers.py; all three for longer: benchmarks/soak_kill.py.)"""
    job = jobs["train"]
    run_in_process(job, tmp_path / "reference")
    assert second_writer(job, tmp_path / "two") is None
    run_in_process(job, tmp_path / "two")
    assert job.result(tmp_path / "two") == job.result(tmp_path / "reference")
