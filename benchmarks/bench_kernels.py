"""ditkit's fast path (fused Triton kernels + measured attention backend, optionally FP8) against its plain PyTorch
path, under one training loop: bf16 autocast, fused AdamW, each block compiled, `ditkit.train.step.TrainStep`.

Sections (each writes its results to the JSON file as soon as it finishes, so a run stopped by its time budget
keeps what it measured):
  check    the kernels on the GPU against float64 references (relative errors, tolerances stated in the output)
  tune     kernel-only times of the fused forward/backward over launch shapes at the three DiT widths
  profile  CUDA kernel time of one training step by kernel, plain vs fast
  micro    one fused op vs the same math compiled by inductor (fwd+bwd ms at DiT-XL/2 batch 128)
  train    images/s of plain / fast / fp8 for the models and batches given by --train
  curve    loss curves from the same initialisation and noise: fast bf16 and fp8 against plain bf16
  memory   largest DiT-XL/2 batch that fits without activation checkpointing, plain vs fast
  cli      `ditkit train` (its own images/s) and `ditkit sample` wall clock, DiT-XL/2 + SD-VAE random weights

    python benchmarks/bench_kernels.py --out kernels.json                 # one H200: everything
    python benchmarks/bench_kernels.py --quick --device cpu --out q.json  # CPU smoke run (tiny models)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
import harness
from ditkit.diffusion import create_diffusion
from ditkit.models import create_model
from ditkit.models.flops import count_macs
from ditkit.models.kernels.fp8 import BLOCK_LINEARS
from ditkit.models.precision import Precision, prepare
from ditkit.train.step import TrainStep
from harness import run_sections

ROOT = harness.ROOT

# autotune: fast, blocks compiled "max-autotune-no-cudagraphs"; torchao-<recipe>: fast with the block linears
# as torchao's Float8Linear (its float8 training, recipe "rowwise" or "tensorwise"; torchao carried as a wheel)
MODES = ("plain", "fast", "fp8", "autotune", "torchao-rowwise", "torchao-tensorwise")
TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp8_fwd": 0.05, "fp8_grad": 0.10}


class Bench(harness.Bench):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.results = {"env": env_info(self.device), "args": vars(args)}


def env_info(device: torch.device) -> dict[str, Any]:
    """The harness's environment (torch, triton, device, GPU, date)."""
    return harness.environment(device)


def time_cuda(fn: Callable[[], Any], warmup: int, repeats: int, bench: Bench) -> float:
    """Mean ms per call after warm-up: the harness's timer with the calls back to back (CUDA events on a GPU,
    the host clock on a CPU)."""
    return sum(bench.times_ms(fn, warmup, repeats, sync_each=False)) / repeats


def matmul_rate(bench: Bench) -> float | None:
    """Measured dense bf16 matmul TFLOP/s (8192³ on random data), the MFU denominator."""
    if bench.device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=bench.device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=bench.device, dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, 3, 10, bench)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------ check


def section_check(bench: Bench) -> None:
    from ditkit.models.kernels import attention, fp8
    from kernel_check import check_ops

    dev = str(bench.device)
    out: dict[str, Any] = {"tolerances": TOL}
    out["ops_fp32"] = check_ops(4, 257, 1152, torch.float32, torch.float32, device=dev)
    out["ops_bf16"] = check_ops(4, 256, 1152, torch.bfloat16, torch.bfloat16, device=dev)
    out["ops_bf16_S"] = check_ops(3, 64, 384, torch.bfloat16, torch.bfloat16, device=dev)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 1152, generator=gen).to(bench.device, torch.bfloat16).requires_grad_()
    w = (torch.randn(4608, 1152, generator=gen) * 0.02).to(bench.device).requires_grad_()
    b = torch.randn(4608, generator=gen).to(bench.device).requires_grad_()
    gy = torch.randn(4096, 4608, generator=gen).to(bench.device, torch.bfloat16)
    with torch.autocast(bench.device.type, dtype=torch.bfloat16):
        y8 = fp8.fp8_linear(x, w, b)
    (y8.float() * gy.float()).sum().backward()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.linear(xr, wr, br)
    (ref * gy.double()).sum().backward()

    def rel(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.detach().double() - r.detach()).norm() / r.detach().norm())

    out["fp8_linear"] = {"out": rel(y8, ref), "dx": rel(x.grad, xr.grad), "dw": rel(w.grad, wr.grad)}
    if bench.device.type == "cuda":
        out["attention_ms"] = {
            f"b{b} {h}x{t}x{d}": attention.measure_backends(b, h, t, d, torch.bfloat16, bench.device)
            for b, h, t, d in ((128, 16, 256, 72), (256, 16, 256, 72), (256, 12, 256, 64), (256, 6, 256, 64))
        }
    worst = {k: max(v.values()) for k, v in out.items() if k.startswith("ops")}
    out["pass"] = (
        worst["ops_fp32"] < TOL["fp32"] and worst["ops_bf16"] < TOL["bf16"] and worst["ops_bf16_S"] < TOL["bf16"]
        and out["fp8_linear"]["out"] < TOL["fp8_fwd"]
        and max(out["fp8_linear"]["dx"], out["fp8_linear"]["dw"]) < TOL["fp8_grad"]
    )
    bench.results["check"] = out


# ------------------------------------------------------------------------------------------------ micro


def section_micro(bench: Bench) -> None:
    """Fused op vs inductor's fusion of the same math, forward+backward, at DiT-XL/2 batch 128."""
    from ditkit.models.dit import LN_EPS, modulate
    from ditkit.models.kernels import adaln, residual

    n, t, d = (128, 256, 1152) if not bench.args.quick else (2, 16, 64)
    dev = bench.device
    x = torch.randn(n, t, d, device=dev, requires_grad=True)
    y = torch.randn(n, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mod = torch.randn(n, 3 * d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    shift, scale, gate = mod.chunk(3, dim=1)
    g_h = torch.randn(n, t, d, device=dev, dtype=torch.bfloat16)

    def plain_ln(x, shift, scale):
        return modulate(torch.nn.functional.layer_norm(x, (d,), eps=LN_EPS), shift, scale).to(torch.bfloat16)

    def plain_res_ln(x, y, gate, shift, scale):
        x1 = x + gate.unsqueeze(1) * y
        return x1, plain_ln(x1, shift, scale)

    def plain_res(x, y, gate):
        return x + gate.unsqueeze(1) * y

    backend = "inductor" if dev.type == "cuda" else "eager"
    c_ln, c_rl, c_r = (torch.compile(f, backend=backend) for f in (plain_ln, plain_res_ln, plain_res))
    cases = {
        "ln_modulate": (lambda: adaln.ln_modulate(x, shift, scale, LN_EPS, torch.bfloat16),
                        lambda: c_ln(x, shift, scale)),
        "residual_ln_modulate": (lambda: adaln.residual_ln_modulate(x, y, gate, shift, scale, LN_EPS,
                                                                    torch.bfloat16)[1],
                                 lambda: c_rl(x, y, gate, shift, scale)[1]),
        "gated_residual": (lambda: residual.gated_residual(x, y, gate), lambda: c_r(x, y, gate)),
    }
    out = {}
    for name, (fused, plain) in cases.items():
        row = {}
        for label, fn in (("fused", fused), ("inductor", plain)):
            def step(fn=fn):
                o = fn()
                o.backward(g_h if o.dtype == torch.bfloat16 else g_h.float())
                x.grad = y.grad = mod.grad = None

            row[f"{label}_ms"] = time_cuda(step, 3, 20 if not bench.args.quick else 2, bench)
        row["speedup"] = row["inductor_ms"] / row["fused_ms"]
        out[name] = row
    bench.results["micro"] = out


# ------------------------------------------------------------------------------------------------ train


def build_step(name: str, batch: int, mode: str, bench: Bench, input_size: int = 32) -> tuple[Callable, Any]:
    """A TrainStep for `mode` (plain | fast | fp8) on fixed synthetic latents; returns (run(step), model)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    overrides = {"depth": 2, "hidden_size": 64, "num_heads": 4} if bench.args.quick else {}
    input_size = 8 if bench.args.quick else input_size
    model = create_model(name, input_size=input_size, num_classes=1000, **overrides)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)
    model.to(bench.device).train()
    ema.to(bench.device).eval()
    cuda = bench.device.type == "cuda"
    precision = "fp8" if mode == "fp8" else ("bf16" if cuda or not bench.args.quick else "fp32")
    if mode.startswith("torchao-"):
        torchao_fp8(model, mode.removeprefix("torchao-"))
    prepare(model, Precision(precision, bench.device.type), training=True, fused=mode != "plain",
            compile={"backend": "inductor" if cuda else "eager",
                     "mode": "max-autotune-no-cudagraphs" if mode == "autotune" else None})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    diffusion = create_diffusion("", learn_sigma=model.config.learn_sigma)
    step = TrainStep(model, model, ema, opt, diffusion, device=bench.device, precision=precision,
                     global_batch=batch)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    # smooth latents (8×8 noise upsampled): a distribution the model can learn, so the loss curve moves
    coarse = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=cfg.input_size, mode="bilinear").to(bench.device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(bench.device)
    return (lambda i: step(x, y, i)), model


def torchao_fp8(model: torch.nn.Module, recipe: str) -> None:
    """Swap the four block linears (qkv, proj, fc1, fc2) for torchao's Float8Linear under `recipe`."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(recipe),
        module_filter_fn=lambda mod, fqn: fqn.startswith("blocks.") and fqn.endswith(BLOCK_LINEARS))


def train_row(name: str, batch: int, mode: str, bench: Bench, peak_tflops: float | None) -> dict[str, Any]:
    run, model = build_step(name, batch, mode, bench)
    counter = [0]

    def one() -> None:
        run(counter[0])
        counter[0] += 1

    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    one()
    bench.sync()
    compile_s = time.monotonic() - t0
    repeats = bench.args.repeats
    ms = time_cuda(one, 2, repeats, bench)
    row = {"model": name, "batch": batch, "mode": mode, "step_ms": ms, "img_s": batch / ms * 1e3,
           "first_step_s": compile_s}
    flops = 6 * count_macs(model.config) * batch / (ms * 1e-3)  # 3 × (2 × MACs): forward + backward
    row["mfu_pct"] = 100 * flops / (peak_tflops * 1e12) if peak_tflops else None
    if bench.device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    row["attention"] = getattr(model.blocks[0].attn, "backend", None)
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def section_train(bench: Bench) -> None:
    peak = bench.results.setdefault("bf16_matmul_tflops", matmul_rate(bench))
    rows = bench.results.setdefault("train", [])
    for item in bench.args.train:
        name, batch = item.split(":")
        for mode in bench.args.modes:
            if bench.left() < bench.args.reserve_s:
                rows.append({"model": name, "batch": int(batch), "mode": mode, "skipped": "time budget"})
                continue
            try:
                rows.append(train_row(name, int(batch), mode, bench, peak))
            except torch.OutOfMemoryError:
                rows.append({"model": name, "batch": int(batch), "mode": mode, "error": "out of memory"})
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
            bench.save()
        by_mode = {r["mode"]: r for r in rows if r.get("model") == name and "img_s" in r}
        for mode in MODES[1:]:
            if mode in by_mode and "plain" in by_mode:
                by_mode[mode]["vs_plain"] = by_mode[mode]["img_s"] / by_mode["plain"]["img_s"]


# ------------------------------------------------------------------------------------------------ curve


def window_means(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[i:i + window]) / window for i in range(0, len(values) - window + 1, window)]


def section_curve(bench: Bench) -> None:
    """Loss curves from the same initialisation and noise: every --modes entry against plain bf16, by the
    largest gap of 10-step means. "plain" in --modes runs plain a second time: the gap that the GPU's
    non-deterministic reductions alone leave (the floor the other gaps are read against)."""
    name, batch = bench.args.curve_model.split(":")
    steps = bench.args.curve_steps
    curves: dict[str, list[float]] = {}
    runs = ["plain"] + [("plain again" if m == "plain" else m) for m in bench.args.modes]
    for key in runs:
        if bench.left() < bench.args.reserve_s:
            break
        run, _ = build_step(name, int(batch), key.removesuffix(" again"), bench)
        losses = [run(i).terms[0] for i in range(steps)]
        curves[key] = [float(v) for v in torch.stack(losses).cpu()]
    out: dict[str, Any] = {"model": name, "batch": int(batch), "steps": steps}
    if "plain" in curves:
        ref = window_means(curves["plain"])
        out["plain"] = {"first": ref[0], "last": ref[-1], "window_means": [round(v, 5) for v in ref]}
        for key in runs[1:]:
            if key in curves:
                means = window_means(curves[key])
                gaps = [abs(a - b) / abs(b) for a, b in zip(means, ref)]
                worst = max(range(len(gaps)), key=gaps.__getitem__)
                out[key] = {"first": means[0], "last": means[-1], "largest_gap_pct": 100 * gaps[worst],
                            "largest_gap_window": worst, "window_means": [round(v, 5) for v in means]}
    bench.results["curve"] = out


# ------------------------------------------------------------------------------------------------ tune


def triton_block(d: int) -> int:
    return 1 << (d - 1).bit_length()


def _time_fused(x, y, gate, shift, scale, dh, dxin) -> tuple[float, float]:
    """Median ms of one fused forward and one fused backward of residual_ln_modulate (kernels only)."""
    import triton.testing

    from ditkit.models.kernels import adaln

    x_new, _, mean, rstd, _ = adaln._forward(x, y, gate, shift, scale, 1e-6, torch.bfloat16)
    if not x.is_cuda:  # --quick under TRITON_INTERPRET: a smoke run of the code path, not a timing
        t0 = time.perf_counter()
        adaln._backward(x_new, dh, mean, rstd, scale, gate, y, dxin)
        return 1e-3, (time.perf_counter() - t0) * 1e3
    f = triton.testing.do_bench(lambda: adaln._forward(x, y, gate, shift, scale, 1e-6, torch.bfloat16),
                                return_mode="median")
    b = triton.testing.do_bench(lambda: adaln._backward(x_new, dh, mean, rstd, scale, gate, y, dxin),
                                return_mode="median")
    return f, b


def section_tune(bench: Bench) -> None:
    """Kernel-only times (no autograd, triton.testing.do_bench medians) of the fused forward and backward of
    residual_ln_modulate over launch shapes, at the three DiT widths; the fastest shape is reported per width."""
    from ditkit.models.kernels import adaln

    dev = bench.device
    out: dict[str, Any] = {}
    grid = [(te, ch, w) for te in (2048, 4096, 8192) for ch in (16, 32, 64) for w in (4, 8)]
    shapes = ((128, 1152), (256, 768), (256, 384))
    t = 256
    if bench.args.quick:
        grid, shapes, t = grid[:2], ((2, 40),), 19
    for n, d in shapes:
        x = torch.randn(n, t, d, device=dev)
        y = torch.randn(n, t, d, device=dev, dtype=torch.bfloat16)
        mod = torch.randn(n, 3 * d, device=dev, dtype=torch.bfloat16)
        shift, scale, gate = mod.chunk(3, dim=1)
        dh = torch.randn(n, t, d, device=dev, dtype=torch.bfloat16)
        dxin = torch.randn(n, t, d, device=dev)
        moved_f = n * t * d * (4 + 2 + 4 + 2)  # x, y read; x', h written
        moved_b = n * t * d * (4 + 2 + 4 + 2 + 4 + 2)  # x', dh, dx_in, y read; dx, dy written
        rows = []
        for te, ch, w in grid:
            if bench.left() < bench.args.reserve_s:
                break
            adaln.TUNING.update(tile_elems=te, bwd_chunk=ch, warps=w)
            try:
                f, b = _time_fused(x, y, gate, shift, scale, dh, dxin)
            except Exception as exc:  # a shape Triton cannot compile (too many registers, ...)
                rows.append({"tile_elems": te, "bwd_chunk": ch, "warps": w, "error": str(exc)[:200]})
                continue
            rows.append({"tile_elems": te, "bwd_chunk": ch, "warps": w, "fwd_ms": f, "bwd_ms": b,
                         "fwd_tb_s": moved_f / f / 1e9, "bwd_tb_s": moved_b / b / 1e9})
        ok = [r for r in rows if "fwd_ms" in r]
        out[f"D{d}"] = {
            "best_fwd": min(ok, key=lambda r: r["fwd_ms"]) if ok else None,
            "best_bwd": min(ok, key=lambda r: r["bwd_ms"]) if ok else None,
            "best_sum": min(ok, key=lambda r: r["fwd_ms"] + r["bwd_ms"]) if ok else None,
            "tuned": next((r for r in ok if (r["tile_elems"], r["bwd_chunk"], r["warps"]) ==
                           adaln.TUNED.get(triton_block(d))), None),
            "all": rows,
        }
        bench.results["tune"] = out
        bench.save()
    adaln.TUNING.clear()


# ------------------------------------------------------------------------------------------------ profile


# Kernel-name fragments → where the time goes (first match wins; "other" is everything else: aten's
# elementwise/reduction kernels outside the compiled blocks, copies, the loss terms).
CATEGORIES = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("ditkit triton", ("_fwd_kernel", "_bwd_kernel", "_quantize_rows")),
    ("inductor triton", ("triton_",)),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, ms out): the time the GPU ran any kernel."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def section_profile(bench: Bench) -> None:
    """One training step of --profile-model, plain vs fast: CUDA kernel time by category and by kernel (top 25),
    the GPU's busy time (union of kernel intervals) against the step's wall time (so the idle time shows), and
    the host's time to issue one step when it never waits for the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    name, batch = bench.args.profile_model.split(":")
    cuda = bench.device.type == "cuda"
    out: dict[str, Any] = {}
    for mode in bench.args.modes:
        run, _ = build_step(name, int(batch), mode, bench)
        for i in range(3):
            run(i)
        bench.sync()
        t0 = time.perf_counter()
        run(3)  # the queue is empty, so this is the host's own time to launch one step (if it never syncs)
        host_ms = (time.perf_counter() - t0) * 1e3
        bench.sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run(4)
            bench.sync()
            wall_ms = (time.perf_counter() - t0) * 1e3
        totals: dict[str, float] = {}
        categories: dict[str, float] = {}
        intervals = []
        for evt in prof.events():
            if cuda and evt.device_type != DeviceType.CUDA:
                continue
            ms = evt.time_range.elapsed_us() / 1e3  # a kernel's own duration on the GPU
            totals[evt.key] = totals.get(evt.key, 0.0) + ms
            category = kernel_category(evt.key)
            categories[category] = categories.get(category, 0.0) + ms
            intervals.append((evt.time_range.start, evt.time_range.end))
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
        busy = busy_ms(intervals)
        out[mode] = {"kernel_ms_total": round(sum(totals.values()), 2), "gpu_busy_ms": round(busy, 2),
                     "step_wall_ms": round(wall_ms, 2), "gpu_idle_ms": round(wall_ms - busy, 2),
                     "host_issue_ms": round(host_ms, 2), "kernels": len(intervals),
                     "by_category": {k: round(v, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
                     "top": [[k[:120], round(v, 2)] for k, v in top]}
        print(json.dumps({mode: {k: v for k, v in out[mode].items() if k != "top"}}), flush=True)
        del run
        bench.results["profile"] = out
        bench.save()


# ------------------------------------------------------------------------------------------------ cli


def _run_cli(cmd: list[str], timeout: float) -> dict[str, Any]:
    """`python -m ditkit VERB ...` timed whole: {"cmd" (from the verb on), "rc", "wall_s", "tail"}."""
    return {"cmd": " ".join(cmd[3:]), **harness.run_command(cmd, timeout)}


def section_cli(bench: Bench) -> None:
    """`ditkit train` from a synthetic latent store (its own images/s), and `ditkit sample` wall clock (start-up,
    VAE decoding and the .npz included) with DiT-XL/2 and the SD-VAE architecture, random weights."""
    import tempfile

    from synthetic_store import make_store

    quick = bench.args.quick
    work = Path(tempfile.mkdtemp(prefix="ditkit_cli_"))
    py = [sys.executable, "-m", "ditkit"]
    name = "DiT-S/2" if quick else "DiT-XL/2"
    out: dict[str, Any] = {}
    bench.results["cli"] = out
    store = work / "store"
    store.mkdir()
    make_store(store, 64 if quick else 8192, side=8 if quick else 32, shard_size=32 if quick else 1024)
    batch, steps = (8, 4) if quick else (128, 80)
    if "train" in bench.args.cli_jobs:
        out["train"] = _train_cli(py, store, name, batch, steps, work, bench)
        bench.save()
    # a random DiT-XL/2 (official state_dict layout) and a random SD-VAE folder
    torch.manual_seed(0)
    image = 64 if quick else 256
    model = create_model(name, input_size=image // 8, num_classes=1000)
    torch.save(model.state_dict(), work / "dit.pt")
    from diffusers import AutoencoderKL

    from ditkit.encoders.autoencoder import SD_VAE_CONFIG

    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(work / "vae")
    n = 16 if quick else 1024
    for k, job in enumerate(j for j in bench.args.cli_jobs if j != "train"):
        sampler, _, flag = job.partition("+")
        key = f"{k}:{job}"
        if bench.left() < bench.args.reserve_s + 20:
            out[key] = {"skipped": "time budget"}
            continue
        cmd = py + ["sample", "--ckpt", str(work / "dit.pt"), "--model", name, "--image-size", str(image),
                    "--num-classes", "1000", "--vae", str(work / "vae"), "--num-samples", str(n),
                    "--batch-size", str(8 if quick else 256), "--sampler", sampler,
                    "--num-steps", str(4 if quick else {"ddpm": 250, "dpm-solver": 20}[sampler]), "--cfg-scale",
                    "4.0", "--out", str(work / f"samples_{k}"), "--no-progress"] + (["--no-compile"] if flag else [])
        row = _run_cli(cmd, max(bench.left() - bench.args.reserve_s, 20))
        row["images_per_s"] = n / row["wall_s"] if row["rc"] == 0 else None
        row["npz"] = [p.name for p in (work / f"samples_{k}").glob("samples_*.npz")]
        out[key] = row
        bench.save()


def _train_cli(py, store, name, batch, steps, work, bench) -> dict[str, Any]:
    cmd = py + ["train", "--data-path", str(store), "--model", name, "--global-batch-size", str(batch),
                "--max-steps", str(steps), "--log-every", str(steps // 4), "--ckpt-every", "100000",
                "--results-dir", str(work / "run"), "--num-workers", "4", "--no-progress"]
    row = _run_cli(cmd, min(240.0, max(bench.left() - 200, 30)))
    metrics = work / "run" / "metrics.jsonl"
    if metrics.exists():
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if "images_per_sec" in line]
        row["images_per_sec"] = [round(r["images_per_sec"], 1) for r in recs]
    return row


# ------------------------------------------------------------------------------------------------ memory


def section_memory(bench: Bench) -> None:
    """Largest DiT-XL/2 batch without checkpointing: peak memory at two batches gives fixed + per-image bytes,
    the capacity gives the predicted largest batch, and one step at that batch (rounded down to 8) checks it."""
    if bench.device.type != "cuda":
        return
    capacity = torch.cuda.get_device_properties(bench.device).total_memory
    out: dict[str, Any] = {"capacity_gb": capacity / 1e9}
    for mode in ("plain", "fast"):
        peaks = {}
        for batch in (32, 64):
            if bench.left() < bench.args.reserve_s:
                break
            peaks[batch] = train_row("DiT-XL/2", batch, mode, bench, None)["peak_gb"] * 1e9
        if len(peaks) < 2:
            continue
        per = (peaks[64] - peaks[32]) / 32
        fixed = peaks[32] - 32 * per
        predicted = int((capacity * 0.97 - fixed) / per) // 8 * 8
        row: dict[str, Any] = {"gb_per_image": per / 1e9, "fixed_gb": fixed / 1e9, "predicted_max": predicted}
        if bench.left() > bench.args.reserve_s + 60:
            try:
                r = train_row("DiT-XL/2", predicted, mode, bench, None)
                row["checked"] = {"batch": predicted, "fits": True, "peak_gb": r["peak_gb"], "img_s": r["img_s"]}
            except torch.OutOfMemoryError:
                row["checked"] = {"batch": predicted, "fits": False}
                torch.cuda.empty_cache()
        out[mode] = row
        bench.results["memory"] = out
        bench.save()
    bench.results["memory"] = out


SECTIONS = {"check": section_check, "tune": section_tune, "profile": section_profile, "micro": section_micro,
            "train": section_train, "curve": section_curve, "memory": section_memory, "cli": section_cli}


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, SECTIONS, budget_s=540.0, reserve_s=30.0,
                       quick_help="tiny models, few steps (a CPU smoke run)")
    p.add_argument("--train", nargs="+", default=["DiT-XL/2:128", "DiT-B/2:256", "DiT-S/2:256"],
                   help="model:batch pairs for the train section")
    p.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--curve-model", default="DiT-B/2:64",
                   help="at least 768 wide: narrower models take the plain path (kernels.MIN_WIDTH)")
    p.add_argument("--profile-model", default="DiT-XL/2:128")
    p.add_argument("--cli-jobs", nargs="+", default=["train", "dpm-solver", "ddpm"],
                   help="cli section: train, ddpm, dpm-solver, or SAMPLER+nocompile")
    p.add_argument("--curve-steps", type=int, default=300)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.curve_steps = 2, 20
    bench = Bench(args)
    return run_sections(bench, args.sections, SECTIONS, args.reserve_s)


if __name__ == "__main__":
    raise SystemExit(main())
