"""Multi-GPU training throughput of DiT-XL/2 (issues 8, 18): DDP and FSDP2, eager and compiled, images/s per
GPU against one GPU, peak memory per GPU, and the time to save and to load a training checkpoint.

    # everything, one call: 1, 4 and 8 GPUs, one torchrun launch each, into $OUT/ddp (re-run to resume)
    PYTHONPATH=src python benchmarks/bench_ddp.py --sweep 1,4,8 --out $OUT/ddp
    # the multi-node code path on real NCCL: 8 GPUs as two simulated nodes of 4 (c10d rendezvous)
    PYTHONPATH=src python benchmarks/bench_ddp.py --sweep 8 --nodes 2 --out $OUT/ddp2n --modes eager
    # one world size by hand
    torchrun --nproc_per_node 1 benchmarks/bench_ddp.py --out $OUT/ddp1.json
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --out $OUT/ddp2.json --baseline $OUT/ddp1.json
    PYTHONPATH=src python benchmarks/bench_ddp.py --quick --out /tmp/ddp1.json        # CPU smoke run (gloo)

(torchrun needs ditkit importable: `pip install -e .` or PYTHONPATH=src.) Each process trains DiT-XL/2 at
256×256 (32×32×4 synthetic latents, 1000 classes) in bf16 with train.py's own step (`ditkit.train.step.TrainStep`:
the global-batch draws, fp32 loss, AdamW, EMA) at a per-GPU batch of 64, replicated under DDP and sharded with
FSDP2 (`ditkit.runtime.distributed.shard_dit`, EMA sharded alike), each eager and with every block compiled (as
train.py on GPUs). Throughput is global images per second over the timed steps (after warm-up), between two
barriers with the GPU synchronised. Peak memory is the largest `torch.cuda.max_memory_allocated` over the ranks.
With --baseline (the 1-GPU run's JSON; --sweep does this itself), scaling efficiency = images/s on N GPUs /
(N × images/s on 1 GPU), per strategy and mode. A strategy that runs out of memory retries at half the per-GPU
batch (recorded in its row).

Checkpoint (eager rows; compiling does not change what is saved): the time from a synchronised start until the
checkpoint is on disk, as train.py writes it (full model, EMA and by-name AdamW state gathered to rank 0, which
writes `ditkit.train.checkpoint.save_training_checkpoint`'s folder), and the time for every rank to read it back
on the CPU and restore model and optimizer into its (sharded) copies. Where safetensors is not installed (the
GPU machine), the same gathered state is written with torch.save instead, and the row says so (`ckpt_writer`).

Every row also records the last step's loss (mean over ranks): at the same global batch and seed, DDP and FSDP
in fp32 (--quick) must give the same loss on any world size; the test checks this.

Expected wall time for `--sweep 1,4,8` on 8 × H200 (not measured yet; from the 2-GPU runs): a few minutes per
world size, most of it compiling and writing 11 GB checkpoints. Finished world sizes are kept in OUT, so a run
cut off by a time limit continues where it stopped when the same command is given again.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
from ditkit.diffusion import create_diffusion
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.runtime import distributed as dist_utils
from ditkit.runtime.io import atomic_write
from ditkit.train.step import TrainStep


def build_config(quick: bool) -> DiTConfig:
    if quick:  # tiny: seconds on a CPU
        return DiTConfig.from_name("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64,
                                   num_heads=4)
    return DiTConfig.from_name("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)


def _build(strategy: str, config: DiTConfig, compiled: bool, precision: str, info: dist_utils.DistInfo):
    """(model, ema, forward, AdamW) as train.py builds them for `strategy` (compiled blocks before sharding)."""
    device = info.device
    torch.manual_seed(0)  # the same initial weights on every rank and for every row
    model = DiT(config)
    ema = DiT(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # as train.py: update_ema pairs the trained parameters
    model.to(device).train()
    ema.to(device).eval()
    forward: torch.nn.Module = model
    if compiled:
        from ditkit.runtime.fast import compile_blocks

        compile_blocks(model)  # in place; DDP's and FSDP's hooks stay outside the compiled graphs
    if strategy == "fsdp":
        dist_utils.shard_dit(model, bf16=precision == "bf16")
        dist_utils.shard_dit(ema, bf16=False)
    elif info.world_size > 1:
        forward = dist_utils.wrap_ddp(model, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {}))
    return model, ema, forward, opt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist_utils.barrier()


def time_checkpoint(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, config: DiTConfig,
                    info: dist_utils.DistInfo, folder: Path) -> dict[str, Any]:
    """Seconds to save one training checkpoint as train.py does, and to load it back on every rank."""
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ditkit.train import checkpoint as ckpt

    _sync(info.device)
    start = time.perf_counter()
    weights, ema_weights = ckpt.gather_model_state(model), ckpt.gather_model_state(ema)
    optimizer = ckpt.gather_optimizer_state(model, opt)
    state = {"step": 1, "optimizer": optimizer, "optimizer_format": ckpt.OPTIMIZER_FORMAT,
             "world_size": info.world_size}
    writer = "save_training_checkpoint"
    path = folder / "0000001"
    if info.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            path = ckpt.save_training_checkpoint(folder, 1, weights, ema_weights, state, json.dumps(config.to_dict()))
        except ImportError:  # no safetensors here: the same tensors through torch.save
            writer = "torch.save (safetensors missing)"
            path.mkdir(parents=True)
            for name, obj in (("model.pt", weights), ("ema.pt", ema_weights), ("state.pt", state)):
                torch.save(obj, path / name)
    del weights, ema_weights, optimizer, state
    writer = dist_utils.broadcast_object(writer)  # rank 0 knows which writer it used
    _sync(info.device)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**30 if info.is_main else None

    start = time.perf_counter()  # every rank reads the full files on the CPU, then keeps its shard
    if writer == "save_training_checkpoint":
        loaded = ckpt.load_training_checkpoint(path, model)
        weights, ema_weights, state = loaded.model, loaded.ema, loaded.state
    else:
        weights, ema_weights, state = (torch.load(path / n, weights_only=True) for n in ("model.pt", "ema.pt",
                                                                                          "state.pt"))
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    set_model_state_dict(ema, ema_weights, options=full)
    ckpt.load_optimizer_state(model, opt, state)
    _sync(info.device)
    load_s = time.perf_counter() - start
    _sync(info.device)
    if info.is_main:
        shutil.rmtree(folder, ignore_errors=True)
    return {"ckpt_save_s": round(save_s, 2), "ckpt_load_s": round(load_s, 2),
            "ckpt_gib": round(size, 2) if size is not None else None, "ckpt_writer": writer}


def run_strategy(strategy: str, config: DiTConfig, per_gpu: int, args: argparse.Namespace,
                 info: dist_utils.DistInfo, compiled: bool = False, checkpoint: bool = False) -> dict[str, Any]:
    """Build a fresh model under `strategy`, warm up, time `args.steps` steps (then, with `checkpoint`, a save
    and a load); one row of results."""
    device = info.device
    precision = "fp32" if args.quick else "bf16"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, ema, forward, opt = _build(strategy, config, compiled, precision, info)
    global_batch = per_gpu * info.world_size
    step = TrainStep(model, forward, ema, opt, create_diffusion("", learn_sigma=config.learn_sigma), device=device,
                     precision=precision, global_batch=global_batch, rank=info.rank, world=info.world_size,
                     accum=args.grad_accum_steps, seed=0, class_dropout_prob=config.class_dropout_prob)
    # Synthetic latents: rank r holds rows r·per_gpu.. of one global batch drawn from a fixed seed.
    g = torch.Generator().manual_seed(1)
    shape = (global_batch, config.in_channels, config.input_size, config.input_size)
    mine = slice(info.rank * per_gpu, (info.rank + 1) * per_gpu)
    x = torch.randn(shape, generator=g)[mine].to(device)
    y = torch.randint(0, config.num_classes, (global_batch,), generator=g)[mine].to(device)

    for i in range(args.warmup):
        out = step(x, y, i)
    _sync(device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        out = step(x, y, i)
    _sync(device)
    elapsed = time.perf_counter() - start
    loss = dist_utils.all_reduce_mean(out.terms[0].detach().float().clone()).item()
    peak = None
    if device.type == "cuda":
        peak_t = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
        if dist.is_initialized():
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        peak = round(peak_t.item(), 2)
    folder = Path(args.ckpt_dir) / "bench_ddp_checkpoint"  # only this sub-folder is written and removed
    saved = time_checkpoint(model, ema, opt, config, info, folder) if checkpoint else {}
    del model, ema, forward, opt, step, out
    gc.collect()
    return {
        "strategy": strategy,
        "compiled": compiled,
        "world_size": info.world_size,
        "nodes": int(os.environ.get("GROUP_WORLD_SIZE", 1)),  # torchrun's count of agents (simulated nodes)
        "per_gpu_batch": per_gpu,
        "global_batch": global_batch,
        "grad_accum_steps": args.grad_accum_steps,
        "steps": args.steps,
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "images_per_sec": round(global_batch * args.steps / elapsed, 2),
        "images_per_sec_per_gpu": round(global_batch * args.steps / elapsed / info.world_size, 2),
        "peak_mem_gb": peak,
        "last_loss": loss,
        **saved,
    }


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def add_efficiency(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """scaling_efficiency = img/s on N / (N × img/s on 1), per strategy and mode (eager/compiled), in place."""
    one = {(r["strategy"], r.get("compiled", False)): r for r in baseline if r["world_size"] == 1}
    for row in rows:
        base = one.get((row["strategy"], row.get("compiled", False)))
        if base is not None and base["images_per_sec"] > 0:
            row["scaling_efficiency"] = round(row["images_per_sec"] / (row["world_size"] * base["images_per_sec"]), 4)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| strategy | mode | GPUs | nodes | batch/GPU | img/s | img/s/GPU | scaling eff. | peak mem/GPU (GiB) | "
             "ckpt save (s) | ckpt load (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        save = f"{r['ckpt_save_s']:.1f}" if "ckpt_save_s" in r else "-"
        load = f"{r['ckpt_load_s']:.1f}" if "ckpt_load_s" in r else "-"
        mode = "compiled" if r.get("compiled") else "eager"
        lines.append(f"| {r['strategy']} | {mode} | {r['world_size']} | {r.get('nodes', 1)} | {r['per_gpu_batch']} | "
                     f"{r['images_per_sec']:.1f} | {r['images_per_sec_per_gpu']:.1f} | {eff} | {mem} | {save} | "
                     f"{load} |")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="JSON file for the rows (written by rank 0); with --sweep, a folder")
    parser.add_argument("--baseline", default=None, help="the 1-GPU run's JSON, for the scaling efficiency")
    parser.add_argument("--quick", action="store_true", help="tiny model in fp32, a few steps (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 64; --quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick 1)")
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated, from ddp,fsdp")
    parser.add_argument("--modes", default=None,
                        help="comma-separated, from eager,compiled (default both; --quick eager)")
    parser.add_argument("--compile", action="store_true", help="same as --modes compiled")
    parser.add_argument("--no-ckpt", action="store_true", help="skip the checkpoint save/load timing")
    parser.add_argument("--ckpt-dir", default=None,
                        help="where the timed checkpoint is written and removed (default: a new folder in /tmp; "
                        "on several real nodes give a folder that all of them see)")
    parser.add_argument("--sweep", default=None,
                        help="comma-separated GPU counts, e.g. 1,4,8: one torchrun launch each, OUT a folder")
    parser.add_argument("--nodes", type=int, default=1,
                        help="with --sweep: split each launch into this many simulated nodes (c10d on 127.0.0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 64)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    modes = "compiled" if args.compile else (args.modes or ("eager" if args.quick else "eager,compiled"))
    args.mode_list = [m for m in modes.split(",") if m]
    strategies = [s for s in args.strategies.split(",") if s]
    if not set(strategies) <= set(dist_utils.STRATEGIES):
        parser.error(f"--strategies: choose from {', '.join(dist_utils.STRATEGIES)}")
    if not set(args.mode_list) <= {"eager", "compiled"}:
        parser.error("--modes: choose from eager,compiled")
    if args.sweep:
        return sweep(args, argv)
    if "RANK" not in os.environ:  # run without torchrun: a one-process group (FSDP2 needs one)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    info = dist_utils.init(prefer_cuda=not args.quick, always=True)
    try:
        made = args.ckpt_dir is None
        if made:  # rank 0 picks a fresh folder; every rank must read the same one
            import tempfile

            args.ckpt_dir = dist_utils.broadcast_object(tempfile.mkdtemp(prefix="bench_ddp_ckpt_")
                                                        if info.is_main else None)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as train.py for bf16 runs
            torch.backends.cudnn.allow_tf32 = True
        config = build_config(args.quick)
        rows = []
        for strategy in strategies:
            for mode in args.mode_list:
                # The checkpoint is timed once per strategy: compiling does not change what is saved.
                timed = not args.no_ckpt and mode == args.mode_list[0]
                rows.append(_row_with_retry(strategy, config, args, info, mode == "compiled", timed))
                if info.is_main:
                    print(json.dumps(rows[-1]), flush=True)
        if args.baseline:
            add_efficiency(rows, json.loads(Path(args.baseline).read_text())["rows"])
        if info.is_main:
            _write(args.out, _result(config, args, info, rows))
            print(table(rows), flush=True)
            if made:
                Path(args.ckpt_dir).rmdir()  # empty again: each timed checkpoint was removed
    finally:
        dist_utils.cleanup()
    return 0


def _row_with_retry(strategy: str, config: DiTConfig, args: argparse.Namespace, info: dist_utils.DistInfo,
                    compiled: bool, checkpoint: bool) -> dict[str, Any]:
    per_gpu = args.batch
    while True:
        try:
            return run_strategy(strategy, config, per_gpu, args, info, compiled, checkpoint)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or per_gpu <= 1:
                raise
            gc.collect()
            torch.cuda.empty_cache()
            per_gpu //= 2  # every rank runs out alike (same shapes), so all retry together


def _result(config: DiTConfig, args: argparse.Namespace, info: dist_utils.DistInfo, rows: list) -> dict[str, Any]:
    return {
        "benchmark": "bench_ddp",
        "model": config.name,
        "quick": args.quick,
        "device": (torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
                   else platform.processor() or "cpu"),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def _write(path: str | Path, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _forwarded(argv: list[str]) -> list[str]:
    """The command line without the sweep's own options (each launch gets its own --out and --baseline)."""
    own = {"--sweep", "--nodes", "--out", "--baseline"}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in own:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def _launch(world: int, nodes: int, out: Path, argv: list[str]) -> None:
    """One world size: `nodes` torchrun launches of world/nodes processes each (c10d on 127.0.0.1 when more
    than one, each "node" seeing its own GPUs), this script in each, writing `out`."""
    import subprocess

    if world % nodes:
        raise SystemExit(f"--nodes {nodes} does not divide {world} GPUs")
    per_node = world // nodes
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(per_node)]
    if nodes == 1:
        base += ["--standalone"]
    else:
        base += ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                 "--rdzv-id", f"bench-ddp-{world}"]
    cmd_tail = [os.path.abspath(__file__), *argv, "--out", str(out)]
    procs = []
    for node in range(nodes):
        env = dict(os.environ)
        if nodes > 1 and torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * per_node + i) for i in range(per_node))
        procs.append(subprocess.Popen(base + cmd_tail, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"the {world}-GPU launch failed (exit codes {codes}); its output is above")


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """Every world size of --sweep, one after the other; world sizes already in OUT are kept (so the same
    command resumes a cut-off sweep). Writes OUT/sweep.json and OUT/sweep.md, efficiency against 1 GPU."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(n) for n in args.sweep.split(",") if n]
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for world in sizes:
        path = out / f"ddp{world}{'' if args.nodes == 1 or world == 1 else f'-{args.nodes}nodes'}.json"
        if not path.exists():
            _launch(world, args.nodes if world > 1 else 1, path, _forwarded(argv))
        data = json.loads(path.read_text())
        meta = {k: v for k, v in data.items() if k != "rows"}
        rows.extend(data["rows"])
    baseline = [r for r in rows if r["world_size"] == 1]
    if not baseline and (out / "ddp1.json").exists():
        baseline = json.loads((out / "ddp1.json").read_text())["rows"]
    add_efficiency(rows, baseline)
    _write(out / "sweep.json", {**meta, "rows": rows})
    text = table(rows)
    (out / "sweep.md").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
