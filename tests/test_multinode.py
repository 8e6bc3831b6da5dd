"""Two torchrun "nodes" on 127.0.0.1 (one CPU process each, gloo): the multi-node launch path end to end.

Each node is its own `torchrun --nnodes 2 --nproc-per-node 1` launch, as on a cluster; they meet through a
c10d rendezvous (training, the launch line that docs/distributed.md recommends) or the static one with
`--node-rank 0|1` (sampling, extraction). The references are one plain process, run with one thread like the
workers (CPU kernels may round differently with other thread counts).

Training is compared bit for bit: 2 ranks × 8 rows against 1 process × 2 micro-batches of 8 (the same rows,
timesteps and noise). The two sum the same two half-gradients, g₁/2 + g₂/2: DDP halves each rank's gradient
and adds the two (a sum of two terms does not depend on the order), accumulation backpropagates loss/2, and
scaling by a power of two is exact in floating point. A different split (1 process, no accumulation) only
agrees to fp32 round-off: that case is in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditkit.cli import main as cli_main
from helpers.models import TINY
from helpers.processes import ENV
from helpers.processes import free_port as _free_port
from helpers.training import read_losses as _losses

# `ditkit train` with a 2-block, 64-wide DiT (the CLI offers only the paper's sizes); the rest is the real CLI.
TRAIN_CLI = f"""
import sys
from ditkit.cli import main
from ditkit.models.config import DiTConfig

paper_config = DiTConfig.from_name.__func__
DiTConfig.from_name = classmethod(lambda cls, name, **kw: paper_config(cls, name, **{{**kw, **{TINY!r}}}))
sys.exit(main(sys.argv[1:]))
"""
TRAIN_ARGS = ["train", "--data-path", "digits", "--model", "DiT-S/2", "--image-size", "8", "--global-batch-size",
              "16", "--lr", "1e-3", "--log-every", "1", "--num-workers", "0", "--no-progress"]


def _start_nodes(worker: list[str], cwds: tuple[Path, Path], rdzv: str, log_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start node 0, then node 1: two torchrun launches of one process each, in their own session (so a test
    can signal a whole "node": its torchrun agent and its worker)."""
    port = _free_port()
    procs = []
    for node, cwd in enumerate(cwds):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        if rdzv == "c10d":  # ranks are assigned by the rendezvous; --node-rank would be ignored
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ditkit-test"]
        else:
            cmd += ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        if log_dir is not None:  # the worker's own stdout/stderr, apart from torchrun's report
            cmd += ["--log-dir", str(log_dir / f"node{node}"), "--redirects", "3"]
        cwd.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(cmd + worker, cwd=cwd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
        if node == 0 and rdzv == "c10d":
            _wait_for_port(port, procs[0])  # node 0 hosts the rendezvous store, as HEAD does on a cluster
    return procs


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None and time.monotonic() < deadline, "node 0 did not open the rendezvous port"
        time.sleep(0.1)


def _run_nodes(worker: list[str], cwds: tuple[Path, Path], rdzv: str, timeout: float = 300) -> None:
    procs = _start_nodes(worker, cwds, rdzv)
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            _kill_node(p)
    for node, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}: {err[-3000:]}"


def _signal_node(proc: subprocess.Popen, sig: int) -> None:
    """Signal a whole "node": its torchrun agent and the worker that it started (torchrun gives each worker a
    session of its own, so signalling the agent's group alone would leave the worker running)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the node (agent and worker), if anything of it still runs."""
    if proc.poll() is None:
        _signal_node(proc, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def one_thread_cli(monkeypatch):
    """In-process `ditkit` runs as the workers run: one thread, the tiny training config."""
    from ditkit.models.config import DiTConfig

    paper_config = DiTConfig.from_name.__func__
    monkeypatch.setattr(DiTConfig, "from_name",
                        classmethod(lambda cls, name, **kw: paper_config(cls, name, **{**kw, **TINY})))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_device_follows_the_local_rank_and_only_global_rank_0_is_main(monkeypatch):
    """Rank 9 of 16 on the second 8-GPU node uses its cuda:1 (not a cuda:9 that does not exist), and rank 8, the
    second node's local rank 0, is not the writer."""
    from ditkit.runtime.distributed import env_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for rank, local, device, main in [(9, 1, 1, False), (8, 0, 0, False), (0, 0, 0, True), (15, 7, 7, False)]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("WORLD_SIZE", "16")
        for chosen in (None, torch.device("cuda")):  # default, and a bare --device cuda
            info = env_info(device=chosen)
            assert (info.rank, info.local_rank, info.world_size) == (rank, local, 16)
            assert info.device == torch.device("cuda", device) and info.is_main == main
        assert env_info(device=torch.device("cpu")).device == torch.device("cpu")


def test_dist_timeout_from_the_environment(monkeypatch):
    from datetime import timedelta

    from ditkit.runtime.distributed import timeout_from_env
    from ditkit.runtime.errors import UserError

    default = timedelta(minutes=30)
    monkeypatch.delenv("DITKIT_DIST_TIMEOUT", raising=False)
    assert timeout_from_env(default) == default
    monkeypatch.setenv("DITKIT_DIST_TIMEOUT", "7.5")
    assert timeout_from_env(default) == timedelta(seconds=7.5)
    for bad in ("0", "-3", "nan", "inf", "ten"):
        monkeypatch.setenv("DITKIT_DIST_TIMEOUT", bad)
        with pytest.raises(UserError, match="DITKIT_DIST_TIMEOUT=.* is not a positive number of seconds"):
            timeout_from_env(default)


def test_peer_failures_are_recognised_and_nothing_else(monkeypatch):
    from ditkit.runtime.distributed import describe_peer_failure

    closed = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[127.0.0.1]:34978. This is typically caused by a remote worker crashing.")
    silent = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                          "5000ms for recv operation to complete")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = describe_peer_failure(closed, "train")
    assert line.startswith("rank 1 of 2 stopped: ") and "died" in line and "--resume auto" in line
    assert "did not answer" in describe_peer_failure(silent, "sample") and "\n" not in line
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("Connection closed by peer"),
                  RuntimeError("CUDA error: timeout")):
        assert describe_peer_failure(other, "train") is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no peers to lose, the error is the error
    assert describe_peer_failure(closed, "train") is None


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
def test_two_nodes_train_checkpoint_and_resume_on_one_process_bit_exactly(tmp_path, one_thread_cli):
    script = tmp_path / "train_cli.py"  # torchrun runs a script file
    script.write_text(TRAIN_CLI)
    nodes = (tmp_path / "node0", tmp_path / "node1")
    # A relative --results-dir, and each node in its own folder: only the node of global rank 0 may write.
    _run_nodes([str(script), *TRAIN_ARGS, "--max-steps", "4", "--ckpt-every", "2", "--results-dir", "run"],
               nodes, rdzv="c10d")
    written = [n for n in nodes if any(n.iterdir())]
    assert len(written) == 1, [sorted(p.name for p in n.iterdir()) for n in nodes]
    two = written[0] / "run"
    assert "world 2 (ddp)" in (two / "log.txt").read_text()

    one = tmp_path / "one"
    assert cli_main([*TRAIN_ARGS, "--grad-accum-steps", "2", "--max-steps", "4", "--ckpt-every", "2",
                     "--results-dir", str(one)]) == 0
    a, b = _losses(one), _losses(two)
    assert sorted(a) == [1, 2, 3, 4] and a == b  # every logged float, bit for bit
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same_tensors(one / "checkpoints" / "0000004" / name, two / "checkpoints" / "0000004" / name)

    resumed = tmp_path / "resumed"  # the 2-node step-2 checkpoint, continued by one process
    assert cli_main([*TRAIN_ARGS, "--grad-accum-steps", "2", "--max-steps", "4", "--ckpt-every", "2",
                     "--results-dir", str(resumed), "--resume", str(two / "checkpoints" / "0000002")]) == 0
    c = _losses(resumed)
    assert sorted(c) == [3, 4] and all(c[s] == a[s] for s in (3, 4))
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same_tensors(one / "checkpoints" / "0000004" / name, resumed / "checkpoints" / "0000004" / name)
    # The check can fail: the losses moved (training happened) and step 4's weights differ from step 2's.
    assert a[1] != a[4]
    w2, w4 = (load_file(two / "checkpoints" / s / "model.safetensors") for s in ("0000002", "0000004"))
    assert not torch.equal(w2["blocks.0.attn.qkv.weight"], w4["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_two_nodes_sample_npz_matches_one_process(tmp_path, one_thread_cli):
    import ditkit
    from helpers.models import sampling_dit as tiny_model

    ckpt = tmp_path / "tiny.safetensors"
    ditkit.save_model(tiny_model(), ckpt)
    args = ["sample", "--ckpt", str(ckpt), "--num-samples", "7", "--batch-size", "2", "--sampler", "dpm-solver",
            "--num-steps", "3", "--cfg-scale", "2", "--seed", "5", "--no-progress"]
    # Both nodes write into one folder, as on the shared file system that the docs ask for.
    _run_nodes(["-m", "ditkit", *args, "--out", str(tmp_path / "two")], (tmp_path / "n0", tmp_path / "n1"),
               rdzv="static")
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    (one,) = (tmp_path / "one").glob("samples_*.npz")
    with np.load(one) as a, np.load(tmp_path / "two" / one.name) as b:
        assert a["arr_0"].shape == (7, 8, 8, 3) and a["arr_0"].std() > 0
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


@pytest.mark.slow
def test_two_nodes_extract_matches_one_process(tmp_path, one_thread_cli):
    from helpers.images import IMAGES, make_image_folder
    from helpers.vae import make_tiny_vae

    folder = make_image_folder(tmp_path / "images")
    vae = make_tiny_vae(tmp_path / "vae")
    args = ["extract", str(folder), "--vae", str(vae), "--image-size", "32", "--shard-size", "2", "--batch-size",
            "2", "--workers", "0", "--device", "cpu", "--no-progress", "--dtype", "float32"]
    _run_nodes(["-m", "ditkit", *args, "--out", str(tmp_path / "two")], (tmp_path / "n0", tmp_path / "n1"),
               rdzv="static")
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    m_two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    m_one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert m_one["count"] == len(IMAGES) and m_two == m_one and len(m_one["shards"]) > 2
    for s in m_one["shards"]:
        assert (tmp_path / "two" / s["file"]).read_bytes() == (tmp_path / "one" / s["file"]).read_bytes()


def _wait_for_training(results: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Until rank 0 has logged a step (both ranks are then inside the training loop's collectives)."""
    deadline = time.monotonic() + timeout
    metrics = results / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def _worker_stderr(log_dir: Path) -> str:
    (path,) = log_dir.glob("**/attempt_0/0/stderr.log")
    return path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_dead_or_frozen_node_makes_the_other_exit_with_one_line(tmp_path, how):
    """Node 1 is SIGKILLed (its sockets close: the peer notices at its next collective) or SIGSTOPped (nothing
    closes: the peer waits DITKIT_DIST_TIMEOUT seconds, here 5). Node 0 must exit non-zero in time, its worker
    having printed one line and no traceback."""
    script = tmp_path / "train_cli.py"
    script.write_text(TRAIN_CLI)
    results = tmp_path / "run"
    logs = tmp_path / "logs"
    timeout = 5
    procs = _start_nodes([str(script), *TRAIN_ARGS, "--max-steps", "100000", "--ckpt-every", "100000",
                          "--results-dir", str(results)], (tmp_path / "n0", tmp_path / "n1"), rdzv="c10d",
                         log_dir=logs, env={"DITKIT_DIST_TIMEOUT": str(timeout)})
    try:
        _wait_for_training(results, procs)
        _signal_node(procs[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        for p in procs:
            _kill_node(p)
    assert procs[0].returncode != 0, err[-2000:]
    # Killed: seconds (the next collective fails at once). Frozen: the timeout, plus torchrun's exit (~3 s) and
    # slack for a loaded CI machine.
    assert took < (20 if how == "killed" else timeout + 20), took
    worker = _worker_stderr(logs / "node0")
    # Rank 0 logs one start-up line ("DiT-..."); apart from it the worker said exactly one thing.
    lines = [line for line in worker.splitlines() if line.strip() and not line.startswith("DiT-")]
    assert len(lines) == 1 and "Traceback" not in worker, worker[-3000:]
    assert lines[0].startswith("ditkit train: error: rank ") and "another process of the run" in lines[0], lines
    if how == "frozen":
        assert f"did not answer for {timeout} s" in lines[0] and "DITKIT_DIST_TIMEOUT" in lines[0], lines
    else:
        assert "died" in lines[0], lines


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    """A scheduler's SIGTERM reaches the ranks at different moments, at worst only one of them (here: node 1's
    worker alone). Every rank must stop after the same step, rank 0 must write that step's checkpoint, and both
    nodes must exit 0 — not one rank entering a collective that the other never joins."""
    script = tmp_path / "train_cli.py"
    script.write_text(TRAIN_CLI)
    results = tmp_path / "run"
    procs = _start_nodes([str(script), *TRAIN_ARGS, "--max-steps", "100000", "--ckpt-every", "100000",
                          "--results-dir", str(results)], (tmp_path / "n0", tmp_path / "n1"), rdzv="c10d")
    try:
        _wait_for_training(results, procs)
        worker = int(Path(f"/proc/{procs[1].pid}/task/{procs[1].pid}/children").read_text().split()[0])
        os.kill(worker, signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            _kill_node(p)
    for node, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}: {err[-3000:]}"
    log = (results / "log.txt").read_text()
    stopped = [line for line in log.splitlines() if "stopped by signal SIGTERM at step" in line]
    assert len(stopped) == 1, log[-2000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert (results / "checkpoints" / f"{step:07d}" / "model.safetensors").exists()
    assert max(_losses(results)) <= step
