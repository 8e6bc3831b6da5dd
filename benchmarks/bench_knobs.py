"""Training throughput of the modern recipe's knobs (LightningDiT; docs/lightningdit.md) against the plain DiT.

    PYTHONPATH=src python benchmarks/bench_knobs.py --out $OUT/knobs.json            # one GPU, <= ~3 min
    PYTHONPATH=src python benchmarks/bench_knobs.py --quick --out /tmp/knobs.json    # CPU smoke run, seconds

Every row is the same loop: `ditkit.train.step.TrainStep` (train.py's step: per-step draws, bf16 autocast with
fp32 master weights, fused AdamW, EMA), each block compiled as `ditkit train` does on a GPU (`fast.compile_blocks`),
the fused Triton kernels on wherever the row's layers allow them (RMSNorm rows take the compiled plain path), on
synthetic DiT-XL/2 latents (32×32×4) at batch 128. A row is: build the model and the recipe's training objective,
warm up (compiles), then time `--repeats` steps with CUDA events; img/s = batch / median step time. The rows run
most important first, and a `--budget-s` cut (default 170 s) skips the rest and still prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
import harness
from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.objectives import objective_for
from ditkit.recipe import DiffusionProcess, FlowProcess, Recipe
from ditkit.runtime.fast import compile_blocks
from ditkit.runtime.io import atomic_write
from ditkit.train.step import TrainStep

MODEL_ALL = {"norm": "rmsnorm", "qk_norm": "rmsnorm", "rope": True, "mlp": "swiglu"}
FLOW_TERMS = FlowProcess(t_sampling="lognormal", cosine_weight=1.0)
# (row name, model switches, process), most important first: a budget cut drops the tail.
ROWS: list[tuple[str, dict[str, Any], Any]] = [
    ("plain (diffusion)", {}, DiffusionProcess()),
    ("all knobs (+ flow lognormal + cosine)", MODEL_ALL, FLOW_TERMS),
    ("rmsnorm", {"norm": "rmsnorm"}, DiffusionProcess()),
    ("qk-norm", {"qk_norm": "rmsnorm"}, DiffusionProcess()),
    ("rope", {"rope": True}, DiffusionProcess()),
    ("swiglu", {"mlp": "swiglu"}, DiffusionProcess()),
    ("plain (flow)", {}, FlowProcess()),
    ("flow lognormal + cosine", {}, FLOW_TERMS),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_for(config: DiTConfig, process: Any, batch: int, device: torch.device, compile_: bool) -> Any:
    """A training step of `config` under `process`, as `ditkit train` builds it, and its fixed batch."""
    torch._dynamo.reset()  # nothing compiled for an earlier row is reused or kept alive
    gc.collect()
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    ema = build_model(config).to(device).eval()
    ema.load_state_dict(model.state_dict())
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # as ditkit train: update_ema pairs the trained parameters
    if compile_:
        compile_blocks(model, backend="inductor" if device.type == "cuda" else "eager")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    training = objective_for(Recipe(model=config, process=process)).training
    precision = "bf16" if device.type == "cuda" else "fp32"
    step = TrainStep(model, model, ema, opt, training, device=device, precision=precision, global_batch=batch,
                     class_dropout_prob=config.class_dropout_prob)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g).to(device)
    y = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
    return step, x, y


def time_row(config: DiTConfig, process: Any, batch: int, device: torch.device, warmup: int, repeats: int,
             compile_: bool) -> dict[str, float]:
    """Median step time (ms), img/s and the last loss of one row; the warm-up (with the compile) timed apart."""
    step, x, y = _step_for(config, process, batch, device, compile_)
    t0 = time.perf_counter()
    for i in range(warmup):
        out = step(x, y, i)
    _sync(device)
    warm_s = time.perf_counter() - t0
    index = iter(range(warmup, warmup + repeats))

    def one(run: Any = step) -> None:  # bound now: `step` is deleted below
        nonlocal out
        out = run(x, y, next(index))

    # the harness's timer: CUDA events around each step with a sync after it (perf_counter on a CPU)
    ms = statistics.median(harness.times_ms(one, device, warmup=0, repeats=repeats, sync_each=True))
    loss = float(out.terms[0])
    del step, one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ms": ms, "img_per_s": batch / (ms / 1e3), "warmup_s": warm_s, "loss": loss}


def _config(quick: bool, knobs: dict[str, Any]) -> DiTConfig:
    if quick:
        return DiTConfig.from_name("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=4,
                                   **knobs)
    return DiTConfig.from_name("DiT-XL/2", input_size=32, num_classes=1000, **knobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, a tiny model, batch 4: checks the script runs")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (4 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop starting rows after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="eager blocks (default: compiled, as ditkit train)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--rows", default=None,
                        help="only these rows, comma-separated names (e.g. 'plain (diffusion),rope,swiglu': the rows "
                        "a budget cut skipped before); default all")
    args = parser.parse_args(argv)
    chosen = _chosen_rows(args.rows)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    batch = args.batch or (4 if args.quick else 128)
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start, rows = time.perf_counter(), []
    for name, knobs, process in chosen:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipped {name}")
            continue
        config = _config(args.quick, knobs)
        process_dict = Recipe(model=config, process=process).to_dict()["process"]
        rows.append({"row": name, "knobs": knobs, "process": process_dict,
                     **time_row(config, process, batch, device, warmup, repeats, not args.no_compile)})
        print(f"{name:40s} {rows[-1]['img_per_s']:9.1f} img/s  ({rows[-1]['ms']:.1f} ms/step, "
              f"warm-up {rows[-1]['warmup_s']:.0f} s)", flush=True)
    _report(rows, args, device, batch)
    return 0


def _chosen_rows(names: str | None) -> list[tuple[str, dict[str, Any], Any]]:
    """The rows of `--rows` in ROWS' order (all without it); one line naming an unknown row and the known ones."""
    if names is None:
        return ROWS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [name for name, _, _ in ROWS]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--rows: no row named {unknown[0]!r}; the rows are: {', '.join(known)}")
    return [row for row in ROWS if row[0] in wanted]


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device, batch: int) -> None:
    """The table (img/s and the ratio to the plain diffusion row) and the JSON file."""
    base = next((r["img_per_s"] for r in rows if r["row"] == "plain (diffusion)"), None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = "tiny DiT" if args.quick else "DiT-XL/2"
    print(f"\n{model} training, batch {batch}, {name}, torch {torch.__version__}")
    print("| row | img/s | × plain | ms/step |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['img_per_s'] / base:.3f}" if base else "-"
        print(f"| {r['row']} | {r['img_per_s']:.1f} | {ratio} | {r['ms']:.1f} |")
    if args.out:
        record = {"device": name, "torch": torch.__version__, "batch": batch, "quick": args.quick,
                  "compile": not args.no_compile, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "rows": rows}
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


if __name__ == "__main__":
    raise SystemExit(main())
