"""MeanFlow on one GPU (issue 27): its training step beside flow matching's, the JVP pass alone, and
`ditkit sample --sampler meanflow --num-steps 1` wall clock.

Sections (each saved to `--out` as it finishes; the section runner of bench_sample.py):
  train    `ditkit.train.step.TrainStep` (the loop's own step: draws, loss, backward, AdamW, EMA) on DiT-XL/2,
           batch 128, bf16, blocks compiled (the GPU default), synthetic latents: flow matching (the baseline,
           in the same process and call), MeanFlow without guidance, MeanFlow with folded guidance
           (ω 2, κ 0: one extra no-gradient forward of 2N rows), both with the dual JVP (models.dual), and
           MeanFlow with the JVP by torch.func.jvp (the path before); img/s, ms per step and peak memory each
  jvp      where a MeanFlow step goes (batch 128, every row's JVP: the training step takes only r ≠ t rows,
           25 %): a no-gradient forward on the fast path (fused kernels, measured attention), the same forward
           on the forward-differentiable path (explicit attention, plain LayerNorm), the JVP pass
           (`models.forward_mode.jvp`), the dual-number JVP (`models.dual`: eager, blocks compiled, and
           compiled on a quarter of the rows), forward + backward, the JVP call compiled whole (a candidate),
           and how far the dual path's du is from torch.func.jvp's
  cli      `ditkit sample --sampler meanflow --num-steps 1` for 1,024 images at batch 256, DiT-XL/2 (random
           weights, MeanFlow recipe) with the SD-VAE architecture (random weights), instrumented by
           bench_sample.py's child (start-up, checkpoint, VAE, each shard's sampling and decoding, the .npz)

    python benchmarks/bench_meanflow.py --out meanflow.json                  # one H100 / H200, ~3-4 min
    python benchmarks/bench_meanflow.py --quick --device cpu --out q.json    # CPU smoke run (DiT-S/2, tiny)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import _src  # noqa: F401  (first: src/, or --baseline-src's tree in its child, on sys.path)
import harness
from bench_sample import Bench as SampleBench
from bench_sample import vae_folder

ROOT = Path(__file__).resolve().parents[1]

# Only what a ditkit tree before MeanFlow has too (the --baseline-src child imports this file); the MeanFlow
# pieces are imported where they are used.
from ditkit.models.config import DiTConfig  # noqa: E402
from ditkit.models.dit import DiT  # noqa: E402
from ditkit.objectives import objective_for  # noqa: E402
from ditkit.recipe import FlowProcess, LatentSpace, Recipe  # noqa: E402
from ditkit.train.step import TrainStep  # noqa: E402
from ditkit.weights.checkpoints import save_model  # noqa: E402
from sections import run_sections  # noqa: E402


class Bench(SampleBench):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.train_batch = 4 if args.quick else 128

    def config(self, meanflow: bool) -> DiTConfig:
        extra = {"interval_time": True} if meanflow else {}  # a key older trees do not know
        return DiTConfig.from_name(self.name, input_size=self.image // 8, num_classes=1000, **extra)

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def _random_dit(bench: Bench, meanflow: bool) -> DiT:
    """A DiT with every weight random (non-zero adaLN and output layers, so no block is the identity)."""
    torch.manual_seed(0)
    with torch.device(bench.device):
        model = DiT(bench.config(meanflow))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    return model


PLAIN_JVP = "meanflow, JVP by torch.func.jvp (the path before models.dual)"


def _train_row(bench: Bench, process: Any, label: str) -> dict[str, Any]:
    """img/s, ms and peak memory of the training step for `process` (compiled blocks on a GPU, bf16); the
    MeanFlow rows take the dual JVP path (models.dual), except the PLAIN_JVP row."""
    if label != PLAIN_JVP:
        return _time_train(bench, process, label)
    from ditkit.models import dual

    covers = dual.covers
    dual.covers = lambda *a: False  # the fallback decision, made for every model: torch.func.jvp
    try:
        return _time_train(bench, process, label)
    finally:
        dual.covers = covers


def _time_train(bench: Bench, process: Any, label: str) -> dict[str, Any]:
    from ditkit.runtime.fast import compile_blocks

    bench.reset_peak()
    meanflow = process.kind == "meanflow"
    model = _random_dit(bench, meanflow).train()
    ema = _random_dit(bench, meanflow).eval()  # update_ema pairs requires_grad
    if bench.device.type == "cuda":
        compile_blocks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if bench.device.type == "cuda" else {}))
    recipe = Recipe(model=model.config, process=process, latents=LatentSpace.sd_vae())
    precision = "bf16" if bench.device.type == "cuda" else "fp32"
    step = TrainStep(model, model, ema, opt, objective_for(recipe).training, device=bench.device,
                     precision=precision, global_batch=bench.train_batch, seed=0, class_dropout_prob=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bench.train_batch, 4, bench.image // 8, bench.image // 8, generator=g).to(bench.device)
    y = torch.randint(0, 1000, (bench.train_batch,), generator=g).to(bench.device)
    counter = iter(range(10**6))
    losses: list[float] = []

    def one() -> None:
        losses.append(step(x, y, next(counter)).terms[0])

    t0 = time.monotonic()
    one()
    bench.sync()
    first = time.monotonic() - t0  # includes compiling the blocks
    ms = bench.time_ms(one, warmup=1 if bench.args.quick else 3, repeats=3 if bench.args.quick else 8)
    row = {"objective": label, "batch": bench.train_batch, "ms_per_step": round(ms, 1),
           "img_per_s": round(bench.train_batch / ms * 1e3, 1), "peak_gb": bench.peak_gb(),
           "first_step_s": round(first, 1), "last_loss": float(losses[-1])}
    print(f"train {label}: {row['img_per_s']} img/s, {row['ms_per_step']} ms, peak {row['peak_gb']} GB", flush=True)
    return row


def _baseline_row(bench: Bench) -> dict[str, Any]:
    """The flow row measured in a child process that imports the ditkit tree at --baseline-src (before/after)."""
    out = bench.work / "baseline.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sections", "train", "--flow-only", "--out", str(out)]
    cmd += ["--quick"] if bench.args.quick else []
    cmd += ["--device", bench.args.device] if bench.args.device else []
    env = {**os.environ, "BENCH_DITKIT_SRC": str(Path(bench.args.baseline_src).resolve())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(bench.left(), 60))
    if proc.returncode != 0 or not out.exists():
        return {"objective": f"flow, {bench.args.baseline_src}", "error": (proc.stdout + proc.stderr)[-1000:]}
    row = json.loads(out.read_text())["train"][0]
    row["objective"] = f"flow, ditkit from {bench.args.baseline_src}"
    return row


def section_train(bench: Bench) -> None:
    rows = bench.results.setdefault("train", [])
    jobs = [(FlowProcess(), "flow (baseline)")]
    if not bench.args.flow_only:
        from ditkit.recipe import MeanFlowProcess

        jobs += [(MeanFlowProcess(), "meanflow"), (MeanFlowProcess(omega=2.0), "meanflow, guidance folded (omega 2)"),
                 (MeanFlowProcess(), PLAIN_JVP)]
    for process, label in jobs:
        rows.append(_train_row(bench, process, label))
        bench.save()
    if bench.args.baseline_src and not bench.args.flow_only:
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(_baseline_row(bench))
    base = rows[0]["img_per_s"]
    for row in rows:
        if "img_per_s" in row:
            row["vs_flow"] = round(row["img_per_s"] / base, 3)


def _dual_agreement(model: Any, args: tuple, autocast: Any) -> float:
    """max |du_dual − du_jvp| / max |du_jvp| in the benchmark's precision: the two JVP paths' agreement."""
    from ditkit.models import dual, forward_mode

    z, v, r, t, y, drop = args
    with torch.no_grad(), autocast:
        _, ref = forward_mode.jvp(model, lambda zz, rr, tt: model(zz, tt, y, force_drop_ids=drop, r=rr),
                                  (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        _, got = dual.forward(model, z, v, t, torch.ones_like(t), y, drop, r=r, compiled=z.is_cuda)
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def section_jvp(bench: Bench) -> None:
    """The pieces of a MeanFlow step, each timed alone (bf16 autocast on a GPU; the dual path's blocks compiled
    on a GPU as in training, the rest uncompiled)."""
    from ditkit.models import dual, forward_mode

    out: dict[str, Any] = {}
    bench.results["jvp"] = out
    model = _random_dit(bench, True).train()
    n, side = bench.train_batch, bench.image // 8
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, 4, side, side, generator=g).to(bench.device)
    v = torch.randn(n, 4, side, side, generator=g).to(bench.device)
    t = torch.rand(n, generator=g).to(bench.device)
    r, y = t * 0.5, torch.randint(0, 1000, (n,), generator=g).to(bench.device)
    drop = torch.zeros(n, dtype=torch.long, device=bench.device)
    autocast = torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.device.type == "cuda")
    cuda = bench.device.type == "cuda"

    def u(zz: torch.Tensor, rr: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return model(zz, tt, y, force_drop_ids=drop, r=rr)

    def fast_forward() -> None:
        with torch.no_grad(), autocast:
            u(z, r, t)

    def plain_forward() -> None:
        with torch.no_grad(), autocast, forward_mode.plain(model):
            u(z, r, t)

    def jvp_pass() -> None:
        with torch.no_grad(), autocast:
            forward_mode.jvp(model, u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))

    def dual_pass(compiled: bool, rows: int = n) -> None:
        with torch.no_grad(), autocast:
            dual.forward(model, z[:rows], v[:rows], t[:rows], torch.ones_like(t[:rows]), y[:rows], drop[:rows],
                         r=r[:rows], compiled=compiled)

    compiled = torch.compile(lambda zz, rr, tt, vv: torch.func.jvp(u, (zz, rr, tt), (vv, torch.zeros_like(rr),
                                                                                   torch.ones_like(tt)))[1])

    def jvp_compiled() -> None:  # the whole jvp call compiled (dynamo traces torch.func.jvp), not used in training
        with torch.no_grad(), autocast, forward_mode.plain(model, eager=False):
            compiled(z, r, t, v)

    def forward_backward() -> None:
        with autocast:
            u(z, r, t).float().square().mean().backward()

    quarter = max(1, n // 4)
    rows = [("forward, fast path (no grad)", fast_forward),
            ("forward, forward-mode path (no grad)", plain_forward),
            ("JVP pass (forward-mode path, no grad)", jvp_pass),
            ("JVP pass, dual path (models.dual, eager)", lambda: dual_pass(False)),
            *([("JVP pass, dual path (models.dual, blocks compiled: the training step's)", lambda: dual_pass(True)),
               (f"JVP pass, dual path compiled, {quarter} rows (a step's r != t share)",
                lambda: dual_pass(True, quarter))] if cuda else []),
            ("forward + backward, fast path", forward_backward),
            *([("JVP pass, whole call compiled (not used in training)", jvp_compiled)]
              if bench.args.compiled_jvp else [])]
    _time_rows(bench, out, rows)
    out["dual vs torch.func.jvp, max |diff| / max |du|"] = _dual_agreement(model, (z, v, r, t, y, drop), autocast)
    print(f"jvp dual vs torch.func.jvp: {out['dual vs torch.func.jvp, max |diff| / max |du|']:.2e}", flush=True)


def _time_rows(bench: Bench, out: dict[str, Any], rows: list[tuple[str, Any]]) -> None:
    """ms and peak memory of each (name, fn), an error recorded instead where one fails."""
    for name, fn in rows:
        bench.reset_peak()
        try:
            ms = bench.time_ms(fn, warmup=2, repeats=3 if bench.args.quick else 5)
        except Exception as exc:  # the compiled JVP may not trace on this torch: record it, keep the rest
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        out[name] = {"ms": round(ms, 1), "peak_gb": bench.peak_gb()}
        print(f"jvp {name}: {ms:.1f} ms", flush=True)


def section_cli(bench: Bench) -> None:
    """`ditkit sample --sampler meanflow --num-steps 1` (and 2) in a fresh instrumented process each."""
    out: dict[str, Any] = {}
    bench.results["cli"] = out
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    from ditkit.recipe import MeanFlowProcess

    ckpt = bench.work / "meanflow.safetensors"
    model = _random_dit(bench, True)
    recipe = Recipe(model=model.config, process=MeanFlowProcess(), latents=LatentSpace.sd_vae())
    save_model(model, ckpt, recipe=recipe)
    del model
    vae = vae_folder(bench.work)
    n = 16 if bench.args.quick else 1024
    for steps in bench.args.cli_steps:
        args = ["--ckpt", str(ckpt), "--vae", str(vae), "--num-samples", str(n), "--batch-size", str(bench.batch),
                "--sampler", "meanflow", "--num-steps", str(steps), "--out", str(bench.work / f"samples_{steps}"),
                "--no-progress"]
        row = harness.sample_in_child(args, bench.work / f"events_{steps}.json",
                                      timeout=max(bench.left() - bench.args.reserve_s, 20))
        row["images_per_s"] = round(n / row["wall_s"], 1) if row["rc"] == 0 else None
        if "events" in row:
            row["vae_decode_s"] = round(sum(e[2] - e[1] for e in row["events"] if e[0] == "VAE decode"), 2)
        out[f"{steps} step"] = row
        print(f"cli meanflow {steps} step: rc {row['rc']} wall {row['wall_s']:.1f} s", flush=True)
        bench.save()


SECTIONS = {"train": section_train, "cli": section_cli, "jvp": section_jvp}  # the goals' figures first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="DiT-S/2 at 64 px, tiny batches (a CPU smoke run)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--cli-steps", nargs="+", type=int, default=[1, 2], help="cli section: --num-steps values")
    p.add_argument("--baseline-src", default=None,
                   help="train section: also time the flow step with the ditkit tree at this src folder (e.g. main "
                   "before this branch: git archive MAIN_COMMIT src | tar -x -C base), in a child process")
    p.add_argument("--flow-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compiled-jvp", action="store_true",
                   help="jvp section: also the whole JVP call under torch.compile (a candidate; slow to compile)")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new sections after this")
    p.add_argument("--reserve-s", type=float, default=20.0)
    args = p.parse_args(argv)
    bench = Bench(args)
    bench.work = Path(tempfile.mkdtemp(prefix="ditkit_meanflow_"))
    return run_sections(bench, args.sections, SECTIONS, args.reserve_s, tail_chars=6000)


if __name__ == "__main__":
    raise SystemExit(main())
