"""Multi-GPU training throughput of DiT-XL/2 (issue 8): DDP and FSDP2, images/s per world size, scaling
efficiency, and peak memory per GPU.

    torchrun --nproc_per_node 1 benchmarks/bench_ddp.py --out $OUT/ddp1.json
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --out $OUT/ddp2.json --baseline $OUT/ddp1.json
    PYTHONPATH=src python benchmarks/bench_ddp.py --quick --out /tmp/ddp1.json        # CPU smoke run (gloo)

(torchrun needs ditkit importable: `pip install -e .` or PYTHONPATH=src.) Each process trains DiT-XL/2 at
256×256 (32×32×4 synthetic latents, 1000 classes) in bf16 with train.py's own step (`ditkit.train.step.TrainStep`:
the global-batch draws, fp32 loss, AdamW, EMA) at a per-GPU batch of 64, first replicated under DDP, then sharded
with FSDP2 (`ditkit.distributed.shard_dit`, EMA sharded alike). Throughput is global images per second over the
timed steps (after warm-up), between two barriers with the GPU synchronised. Peak memory is the largest
`torch.cuda.max_memory_allocated` over the ranks. With --baseline (the 1-GPU run's JSON), scaling efficiency =
images/s on N GPUs / (N × images/s on 1 GPU), per strategy. A strategy that runs out of memory retries at half
the per-GPU batch (recorded in its row).

Every row also records the last step's loss (mean over ranks): at the same global batch and seed, DDP and FSDP
in fp32 (--quick) must give the same loss on any world size; the test checks this.
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

from ditkit import distributed as dist_utils
from ditkit.diffusion import create_diffusion
from ditkit.io import atomic_write
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.train.step import TrainStep


def build_config(quick: bool) -> DiTConfig:
    if quick:  # tiny: seconds on a CPU
        return DiTConfig.from_name("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64,
                                   num_heads=4)
    return DiTConfig.from_name("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)


def run_strategy(strategy: str, config: DiTConfig, per_gpu: int, args: argparse.Namespace,
                 info: dist_utils.DistInfo) -> dict[str, Any]:
    """Build a fresh model under `strategy`, warm up, time `args.steps` steps; one row of results."""
    device = info.device
    precision = "fp32" if args.quick else "bf16"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)  # the same initial weights on every rank and for both strategies
    model = DiT(config)
    ema = DiT(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # as train.py: update_ema pairs the trained parameters
    model.to(device).train()
    ema.to(device).eval()
    forward: torch.nn.Module = model
    if strategy == "fsdp":
        dist_utils.shard_dit(model, bf16=precision == "bf16")
        dist_utils.shard_dit(ema, bf16=False)
    elif info.world_size > 1:
        forward = dist_utils.wrap_ddp(model, device)
    if args.compile:
        from ditkit.fast import compile_blocks

        compile_blocks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {}))
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

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist_utils.barrier()

    for i in range(args.warmup):
        out = step(x, y, i)
    sync()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        out = step(x, y, i)
    sync()
    elapsed = time.perf_counter() - start
    loss = dist_utils.all_reduce_mean(out.terms[0].detach().float().clone()).item()
    peak = None
    if device.type == "cuda":
        peak_t = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
        if dist.is_initialized():
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        peak = round(peak_t.item(), 2)
    del model, ema, forward, opt, step, out
    gc.collect()
    return {
        "strategy": strategy,
        "world_size": info.world_size,
        "per_gpu_batch": per_gpu,
        "global_batch": global_batch,
        "grad_accum_steps": args.grad_accum_steps,
        "steps": args.steps,
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "images_per_sec": round(global_batch * args.steps / elapsed, 2),
        "images_per_sec_per_gpu": round(global_batch * args.steps / elapsed / info.world_size, 2),
        "peak_mem_gb": peak,
        "last_loss": loss,
    }


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def add_efficiency(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """scaling_efficiency = img/s on N / (N × img/s on 1), strategy by strategy, in place."""
    one = {r["strategy"]: r for r in baseline if r["world_size"] == 1}
    for row in rows:
        base = one.get(row["strategy"])
        if base is not None and base["images_per_sec"] > 0:
            row["scaling_efficiency"] = round(row["images_per_sec"] / (row["world_size"] * base["images_per_sec"]), 4)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| strategy | GPUs | batch/GPU | img/s | img/s/GPU | scaling eff. | peak mem/GPU (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        lines.append(f"| {r['strategy']} | {r['world_size']} | {r['per_gpu_batch']} | {r['images_per_sec']:.1f} | "
                     f"{r['images_per_sec_per_gpu']:.1f} | {eff} | {mem} |")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the rows (written by rank 0)")
    parser.add_argument("--baseline", default=None, help="the 1-GPU run's JSON, for the scaling efficiency")
    parser.add_argument("--quick", action="store_true", help="tiny model in fp32, a few steps (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 64; --quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick 1)")
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated, from ddp,fsdp")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (train.py's GPU default)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 64)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    strategies = [s for s in args.strategies.split(",") if s]
    if not set(strategies) <= set(dist_utils.STRATEGIES):
        parser.error(f"--strategies: choose from {', '.join(dist_utils.STRATEGIES)}")
    if "RANK" not in os.environ:  # run without torchrun: a one-process group (FSDP2 needs one)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    info = dist_utils.init(prefer_cuda=not args.quick, always=True)
    try:
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as train.py for bf16 runs
            torch.backends.cudnn.allow_tf32 = True
        config = build_config(args.quick)
        rows = []
        for strategy in strategies:
            per_gpu = args.batch
            while True:
                try:
                    row = run_strategy(strategy, config, per_gpu, args, info)
                    break
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err) or per_gpu <= 1:
                        raise
                    gc.collect()
                    torch.cuda.empty_cache()
                    per_gpu //= 2  # every rank runs out alike (same shapes), so all retry together
            rows.append(row)
            if info.is_main:
                print(json.dumps(row), flush=True)
        if args.baseline:
            add_efficiency(rows, json.loads(Path(args.baseline).read_text())["rows"])
        if info.is_main:
            result = {
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
            text = json.dumps(result, indent=1)
            atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
            print(table(rows), flush=True)
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
