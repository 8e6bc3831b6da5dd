"""Where `ditkit sample`'s wall clock goes on a GPU, and the variants of its network evaluation side by side.

DiT-XL/2 (random weights, official layout) with the SD-VAE architecture (random weights), 256 px, guided
(cfg 4): every guided step is one forward over 2 × batch rows. Sections (each saved to the JSON file as it
finishes, so a run stopped by its budget keeps what it measured):
  forward  ms per guided forward (batch 256 → 512 rows) for: plain eager, fused eager, fused eager + fc1's GELU
           in the GEMM epilogue (the sampling default), compiled blocks (the old default; compile time too),
           FP8; each checked against fp32 eager on the same inputs; the GELU epilogue against float64
  vae      SD-VAE decode of 256 latents: fp32 weights under bf16 autocast (the default), bf16 weights,
           bf16 + channels_last; errors against fp32
  sampler  one DPM-Solver++ 20 / DDPM shard loop against its forwards alone (host work per step)
  fp8      row-wise FP8 (`--precision fp8`): its kernels against float64 with the hardware's FP8 cast, and the
           four block GEMMs of a guided step in bf16, FP8 row-wise and FP8 tensorwise
  cli      `ditkit sample --num-samples 1024 --batch-size 256` wall clock, instrumented: the child process
           records when each phase (imports, checkpoint, model, VAE, each shard's sampling and decoding,
           the .npz) starts and ends, relative to the process's start

    python benchmarks/bench_sample.py --out sample.json                     # one H200
    python benchmarks/bench_sample.py --quick --device cpu --out q.json     # CPU smoke run (DiT-S/2, tiny)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
import harness
from ditkit.models import create_model
from ditkit.models.dit import Mlp
from ditkit.models.precision import Precision, prepare
from harness import run_sections

ROOT = harness.ROOT


class Bench(harness.Bench):
    """The harness's bench with this benchmark's sizes; `time_ms` is the harness's timer (median ms per call,
    a host sync after each)."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.results = {"torch": torch.__version__, "device": str(self.device), "args": vars(args),
                        "env": harness.environment(self.device)}
        if self.device.type == "cuda":
            self.results["gpu"] = torch.cuda.get_device_name(self.device)
        self.name = "DiT-S/2" if args.quick else "DiT-XL/2"
        self.image = 64 if args.quick else 256
        self.batch = 4 if args.quick else 256


def random_model(bench: Bench, fp8: bool = False) -> torch.nn.Module:
    """The model with every weight random (the official init zeroes the adaLN and output layers, which would
    make every block the identity and hide wrong kernels); with `fp8`, its block linears prepared as
    `--precision fp8` prepares them."""
    with torch.device(bench.device):
        model = create_model(bench.name, input_size=bench.image // 8, num_classes=1000)
    gen = torch.Generator(device=bench.device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02, generator=gen)
    prepare(model, Precision("fp8" if fp8 else "bf16", bench.device.type), training=False)
    model.choose_attention(2 * bench.batch, torch.bfloat16, bench.device, training=False)  # as the pipeline does
    return model.eval()


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------------ forward


def gelu_check(bench: Bench) -> dict[str, Any]:
    """`_addmm_activation(use_gelu=True)` against float64 GELU (tanh and erf): which GELU it computes, and how
    close, in fp32 (TF32 off) and bf16."""
    gen = torch.Generator(device=bench.device).manual_seed(1)
    x = torch.randn(4096, 1152, device=bench.device, generator=gen)
    w = torch.randn(4608, 1152, device=bench.device, generator=gen) / 34
    b = torch.randn(4608, device=bench.device, generator=gen)
    pre = torch.addmm(b.double(), x.double(), w.double().t())
    refs = {a: torch.nn.functional.gelu(pre, approximate=a) for a in ("tanh", "none")}
    out: dict[str, Any] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype in (torch.float32, torch.bfloat16):
            y = torch._addmm_activation(b.to(dtype), x.to(dtype), w.to(dtype).t(), use_gelu=True)
            out[str(dtype).removeprefix("torch.")] = {a: rel(y, r) for a, r in refs.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def _variants() -> dict[str, dict[str, Any]]:
    # name -> fused kernels on, GELU epilogue on, compiled blocks, fp8 (False, "tensorwise" or "rows")
    return {
        "plain eager": dict(fused=False, gelu=False, compile=False, fp8=False),
        "fused eager": dict(fused=True, gelu=False, compile=False, fp8=False),
        "fused eager + GELU epilogue (default)": dict(fused=True, gelu=True, compile=False, fp8=False),
        "compiled blocks, fused (old default)": dict(fused=True, gelu=False, compile=True, fp8=False),
        "compiled blocks, plain": dict(fused=False, gelu=False, compile=True, fp8=False),
        "fp8 tensorwise (training's kernels.fp8)": dict(fused=True, gelu=False, compile=False, fp8="tensorwise"),
        "fp8 rows (--precision fp8: row-wise scales, weights once)": dict(fused=True, gelu=True, compile=False,
                                                                         fp8="rows"),
        "fp8 rows, bf16 residual stream (fp8_rows.STREAM)": dict(fused=True, gelu=True, compile=False,
                                                                fp8="rows", stream=torch.bfloat16),
    }


def section_forward(bench: Bench) -> None:
    out: dict[str, Any] = {"gelu_epilogue_check": gelu_check(bench) if bench.device.type == "cuda" else None}
    bench.results["forward"] = out
    names = bench.args.variants or list(_variants())
    bench.save()
    rows = 2 * bench.batch
    gen = torch.Generator(device=bench.device).manual_seed(2)
    g = bench.image // 8
    x = torch.randn(rows, 4, g, g, device=bench.device, generator=gen)
    t = torch.randint(0, 1000, (rows,), device=bench.device, generator=gen)
    y = torch.randint(0, 1001, (rows,), device=bench.device, generator=gen)
    base = random_model(bench)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    prepare(base, Precision("fp32", bench.device.type), training=False, fused=False)
    with torch.no_grad():
        ref = base(x, t, y).float()  # fp32 eager plain (TF32 as the CLI sets it for bf16 runs: off here)
    del base
    torch.backends.cuda.matmul.allow_tf32 = True
    for name, v in _variants().items():
        if not any(name.startswith(n) for n in names):
            continue
        if bench.left() < bench.args.reserve_s + 60:
            out[name] = {"skipped": "time budget"}
            continue
        try:
            out[name] = _forward_row(bench, state, v, x, t, y, ref)
        except Exception as exc:  # keep the other rows
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            _reset_stream()
            torch.cuda.empty_cache() if bench.device.type == "cuda" else None
        print(f"forward {name}: {out[name]}", flush=True)
        bench.save()


def _reset_stream() -> None:
    try:
        from ditkit.models.kernels import fp8_rows
    except ImportError:  # no Triton: no FP8 rows either
        return
    fp8_rows.STREAM = torch.float32


def _forward_row(bench, state, v, x, t, y, ref) -> dict[str, Any]:
    with torch.device("meta"):
        model = create_model(bench.name, input_size=bench.image // 8, num_classes=1000)
    model.load_state_dict(state, assign=True)
    model.eval()
    # fp8 "tensorwise": the block linears as training prepares them; "rows": as `ditkit sample` prepares them
    precision = Precision("fp8" if v["fp8"] else "bf16", bench.device.type)
    prepare(model, precision, training=v["fp8"] == "tensorwise", compile=v["compile"], fused=v["fused"])
    if not v["gelu"]:  # the MLPs' one fused path is fc1's GELU epilogue
        for mlp in (m for m in model.modules() if isinstance(m, Mlp)):
            mlp.fused = False
    if v["fp8"] == "rows":
        from ditkit.models.kernels import fp8_rows

        fp8_rows.STREAM = v.get("stream", torch.float32)  # section_forward restores the default
    model.choose_attention(len(x), torch.bfloat16, bench.device, training=False)  # as the pipeline does

    def fwd() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
            return model(x, t, y)

    t0 = time.monotonic()
    first = fwd()
    bench.sync()
    first_s = time.monotonic() - t0
    ms = bench.time_ms(fwd, warmup=1, repeats=5)
    row = {"ms": round(ms, 2), "first_call_s": round(first_s, 2), "rel_err_vs_fp32": rel(first.float(), ref)}
    if bench.device.type == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
        torch.cuda.reset_peak_memory_stats()
    return row


def section_profile(bench: Bench) -> None:
    """CUDA kernel time of one guided forward (the sampling default, or --precision fp8's with --profile-fp8),
    by kernel, summed over the 28 blocks."""
    model = random_model(bench, fp8=bench.args.profile_fp8)
    rows, g = 2 * bench.batch, bench.image // 8
    gen = torch.Generator(device=bench.device).manual_seed(6)
    x = torch.randn(rows, 4, g, g, device=bench.device, generator=gen)
    t = torch.randint(0, 1000, (rows,), device=bench.device, generator=gen)
    y = torch.randint(0, 1001, (rows,), device=bench.device, generator=gen)

    def fwd() -> None:
        with torch.no_grad(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
            model(x, t, y)

    ms = bench.time_ms(fwd, warmup=2, repeats=3)
    key = "profile_fp8" if bench.args.profile_fp8 else "profile"
    bench.results[key] = {"forward_ms": round(ms, 2), **kernel_profile(bench, fwd)}
    for row in bench.results[key]["top"][:20]:
        print("profile", row, flush=True)


def kernel_profile(bench: Bench, fn: Callable[[], Any], top: int = 30) -> dict[str, Any]:
    """One call of fn under the CUDA profiler: its kernels' total time and the `top` kernels by summed time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        bench.sync()
    kernels_ = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, "device_time_total", 0) for e in kernels_) / 1e3
    ranked = sorted(kernels_, key=lambda e: -getattr(e, "device_time_total", 0))[:top]
    return {"kernel_ms": round(total, 2),
            "top": [(e.key[:160], round(e.device_time_total / 1e3, 2), e.count) for e in ranked]}


# ------------------------------------------------------------------------------------------------ vae


def vae_folder(work: Path) -> Path:
    from diffusers import AutoencoderKL

    from ditkit.encoders.autoencoder import SD_VAE_CONFIG

    path = work / "vae"
    if not path.exists():
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(path)
    return path


def section_vae(bench: Bench) -> None:
    from ditkit.encoders.autoencoder import load_vae

    out: dict[str, Any] = {}
    bench.results["vae"] = out
    vae = load_vae(str(vae_folder(bench.work)), device=bench.device)
    n = bench.batch
    gen = torch.Generator(device=bench.device).manual_seed(3)
    z = torch.randn(n, 4, bench.image // 8, bench.image // 8, device=bench.device, generator=gen)
    ref = vae.decode(z[:8])
    variants = {"fp32 weights, bf16 autocast (default)": (torch.float32, False, True),
                "fp32": (torch.float32, False, False),
                "bf16 weights": (torch.bfloat16, False, False),
                "bf16 weights, channels_last": (torch.bfloat16, True, False),
                "fp32 weights, bf16 autocast, channels_last": (torch.float32, True, True)}
    for name, (dtype, cl, autocast) in variants.items():
        if bench.left() < bench.args.reserve_s + 30:
            break
        vae.model.to(dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)

        def dec(k: int = n, autocast: bool = autocast) -> torch.Tensor:
            with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=autocast):
                return vae.decode(z[:k])

        out[name] = _decode_row(bench, dec, ref)
        print(f"vae {name}: {out[name]}", flush=True)
        bench.save()
    # ditkit's own decoder (what `ditkit sample` loads: no diffusers import), bf16 weights, same latents
    mine = load_vae(str(vae_folder(bench.work)), device=bench.device, dtype=torch.bfloat16, decode_only=True)
    name = "ditkit.encoders.vae_decoder, bf16 weights (ditkit sample's)"
    out[name] = _decode_row(bench, lambda k=n: mine.decode(z[:k]), ref)
    out[name]["class"] = type(mine.model).__name__  # DecoderKL: ditkit's, not diffusers' fallback
    print(f"vae {name}: {out[name]}", flush=True)
    bench.save()
    vae.model.to(dtype=torch.bfloat16, memory_format=torch.contiguous_format)
    out["interleaved"] = _interleaved_decodes(bench, {"diffusers": vae, "ditkit": mine}, z)
    print(f"vae interleaved: {out['interleaved']}", flush=True)
    bench.save()
    for name, v in {"diffusers": vae, "ditkit": mine}.items():  # the same arithmetic, 20% apart: which kernels?
        out[f"profile {name}"] = kernel_profile(bench, lambda v=v: v.decode(z), top=25)
        for row in out[f"profile {name}"]["top"]:
            print(f"vae profile {name}", row, flush=True)
    bench.save()


def _interleaved_decodes(bench: Bench, vaes: dict[str, Any], z: torch.Tensor) -> dict[str, Any]:
    """The two bf16 decoders timed in alternation (A B A B …, so clocks and heat treat them alike), with cuDNN's
    heuristic algorithm choice and then with `cudnn.benchmark` (which times the algorithms at each new shape:
    its first call is reported apart)."""
    result: dict[str, Any] = {}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        mode = "cudnn.benchmark" if benchmark else "heuristic"
        try:
            if benchmark:
                for name, v in vaes.items():
                    t0 = time.monotonic()
                    v.decode(z)
                    bench.sync()
                    result[f"{name} {mode} first call s"] = round(time.monotonic() - t0, 2)
            times: dict[str, list[float]] = {name: [] for name in vaes}
            for _ in range(4):
                if bench.left() < bench.args.reserve_s + 10:
                    break
                for name, v in vaes.items():
                    times[name].append(round(bench.time_ms(lambda v=v: v.decode(z), warmup=1, repeats=1), 1))
            for name, ts in times.items():
                result[f"{name} {mode} ms"] = ts
        finally:
            torch.backends.cudnn.benchmark = False
    return result


def _decode_row(bench: Bench, dec: Callable[..., torch.Tensor], ref: torch.Tensor) -> dict[str, Any]:
    """ms per batch of `dec()` (all the latents) and its error on the first 8 (`dec(8)`) against `ref`."""
    n = bench.batch
    try:
        err = rel(dec(8), ref)
        ms = bench.time_ms(dec, warmup=1, repeats=3)
        return {"ms_per_batch": round(ms, 1), "batch": n, "images_per_s": round(n / ms * 1e3, 1),
                "rel_err_vs_fp32": err}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


# ------------------------------------------------------------------------------------------------ sampler


def section_sampler(bench: Bench) -> None:
    """A shard's sampling loop (guided, fused eager default path) against its forwards alone."""
    from ditkit.diffusion.guidance import guided
    from ditkit.diffusion.samplers import sample

    out: dict[str, Any] = {}
    bench.results["sampler"] = out
    model = random_model(bench, fp8=bench.args.profile_fp8)
    g = bench.image // 8
    gen = torch.Generator(device=bench.device).manual_seed(4)
    noise = torch.randn(bench.batch, 4, g, g, device=bench.device, generator=gen)
    y = torch.randint(0, 1000, (bench.batch,), device=bench.device, generator=gen)
    den = guided(model, 4.0, 1000)
    for sampler, steps in (("dpm-solver", 20), ("ddpm", 25)):
        if bench.left() < bench.args.reserve_s + 30:
            break

        def run(sampler=sampler, steps=steps) -> None:
            with torch.no_grad(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
                sample(den, noise, sampler=sampler, num_steps=steps, model_kwargs={"y": y}, learn_sigma=True,
                       generator=torch.Generator(device=bench.device).manual_seed(5))

        def fwd() -> None:
            with torch.no_grad(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
                den(noise, torch.full((bench.batch,), 500, device=bench.device), y)

        def sustained(steps=steps) -> None:  # the forwards alone, back to back as in the loop (clocks, heat)
            for _ in range(steps):
                fwd()

        loop = bench.time_ms(run, warmup=1, repeats=3)
        one = bench.time_ms(fwd, warmup=1, repeats=5)
        back_to_back = bench.time_ms(sustained, warmup=0, repeats=3) / steps
        out[f"{sampler} {steps}"] = {"loop_ms": round(loop, 1), "forward_ms": round(one, 2),
                                     "sustained_forward_ms": round(back_to_back, 2),
                                     "overhead_ms_per_step": round(loop / steps - back_to_back, 2),
                                     "fp8": bool(bench.args.profile_fp8)}
        print(f"sampler {sampler}: {out[f'{sampler} {steps}']}", flush=True)
        bench.save()


# ------------------------------------------------------------------------------------------------ cli


def _timed(events: list, label: str, fn: Callable, sync: bool = False) -> Callable:
    """fn, recording (label, start, end) in seconds since the process started."""
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*a, **k)
        finally:
            if sync and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            events.append((label, t0 - PROCESS_START, time.time() - PROCESS_START))
    return wrapper


PROCESS_START = 0.0


def _first_calls_timed(events: list, label: str, fn: Callable, calls: int) -> Callable:
    """fn with its first `calls` calls timed (synchronised: where the first batch's warm-up goes)."""
    count = [0]

    def wrapper(*a: Any, **k: Any) -> Any:
        count[0] += 1
        if count[0] > calls:
            return fn(*a, **k)
        return _timed(events, f"{label} {count[0]}", fn, sync=True)(*a, **k)
    return wrapper


def process_start() -> float:
    """This process's start (epoch seconds) from /proc: the kernel's clock-tick start time after boot."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def child(argv: list[str], out: str) -> int:
    """Run `ditkit sample argv` in this (fresh) process with its phases timed; the events go to `out`."""
    global PROCESS_START
    PROCESS_START = process_start()
    events: list = [("python start → bench imports done", 0.0, time.time() - PROCESS_START)]
    t0 = time.time()
    import ditkit.cli as cli
    import ditkit.encoders.autoencoder as ae
    import ditkit.sample.npz as npz
    import ditkit.sample.pipeline as pipe
    import ditkit.weights.checkpoints as ck

    events.append(("import ditkit (cli, sample, checkpoints)", t0 - PROCESS_START, time.time() - PROCESS_START))
    ck.read_checkpoint = _timed(events, "read checkpoint", ck.read_checkpoint)
    ck.check_finite = _timed(events, "finite check (on device)", ck.check_finite)
    ck.build_checked = _timed(events, "build model + weights to device", ck.build_checked, sync=True)
    pipe._load_vae = _timed(events, "load VAE", pipe._load_vae, sync=True)
    pipe._fast_path = _timed(events, "fast path set-up", pipe._fast_path, sync=True)
    pipe.Sampler.images = _timed(events, "shard: sample + decode + to host", pipe.Sampler.images)
    pipe.Sampler.settings = _timed(events, "settings fingerprint", pipe.Sampler.settings)
    ae.VAE.decode = _timed(events, "VAE decode", ae.VAE.decode, sync=True)
    npz._write_npz = _timed(events, "write npz", npz._write_npz)
    npz.sample_npz = _timed(events, "sample_npz total", npz.sample_npz)
    import ditkit.models.dit as dit

    # the first call measures (or reads the cache); timing every call would add a host sync to every step
    dit.select_backend = _first_calls_timed(events, "attention probe", dit.select_backend, calls=1)
    dit.DiT.forward = _first_calls_timed(events, "network evaluation", dit.DiT.forward, calls=3)
    import ditkit.sample.cli as scli

    scli.sample_npz = npz.sample_npz
    scli.load_for_sampling = _timed(events, "load_for_sampling total", pipe.load_for_sampling)
    try:
        rc = cli.main(["sample", *argv])
    finally:
        events.append(("exit", time.time() - PROCESS_START, time.time() - PROCESS_START))
        Path(out).write_text(json.dumps(sorted(events, key=lambda e: e[1])))
    return rc


def section_cli(bench: Bench) -> None:
    """The CLI wall clock, each job in a fresh instrumented process (the parent's clock includes everything)."""
    from ditkit.models import create_model as make

    out: dict[str, Any] = {}
    bench.results["cli"] = out
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()  # the children need the GPU's memory, not this process's cache
    ckpt = bench.work / "dit.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(make(bench.name, input_size=bench.image // 8, num_classes=1000).state_dict(), ckpt)
    vae = vae_folder(bench.work)
    n = 16 if bench.args.quick else 1024
    for k, job in enumerate(bench.args.cli_jobs):
        sampler, _, flag = job.partition("+")
        if bench.left() < bench.args.reserve_s + 20:
            out[f"{k}:{job}"] = {"skipped": "time budget"}
            continue
        steps = 4 if bench.args.quick else {"ddpm": 250, "dpm-solver": 20}[sampler]
        args = ["--ckpt", str(ckpt), "--model", bench.name, "--image-size", str(bench.image), "--num-classes",
                "1000", "--vae", str(vae), "--num-samples", str(n), "--batch-size", str(bench.batch),
                "--sampler", sampler, "--num-steps", str(steps), "--cfg-scale", "4.0",
                "--out", str(bench.work / f"samples_{k}"), "--no-progress"]
        if flag:  # FLAG or FLAG=VALUE
            args.append(f"--{flag}")
        row = harness.sample_in_child(args, bench.work / f"events_{k}.json",
                                      timeout=max(bench.left() - bench.args.reserve_s, 20))
        row["images_per_s"] = round(n / row["wall_s"], 2) if row["rc"] == 0 else None
        out[f"{k}:{job}"] = row
        print(f"cli {job}: rc {row['rc']} wall {row['wall_s']:.1f} s", flush=True)
        bench.save()


# ------------------------------------------------------------------------------------------------ fp8


def section_fp8(bench: Bench) -> None:
    """Row-wise FP8 on the GPU: the kernels against float64 (kernel_check.py with the hardware's FP8
    cast), and each block GEMM of a guided XL/2 step (M = 512 rows × 256 tokens) in bf16, FP8 row-wise and FP8
    tensorwise, with the row quantisation pass that proj and fc2 need."""
    import kernel_check

    out: dict[str, Any] = {"check_rows": kernel_check.check_fp8_rows(str(bench.device)),
                           "check_block": kernel_check.check_fp8_block(str(bench.device))}
    bench.results["fp8"] = out
    print(f"fp8 checks: {out}", flush=True)
    bench.save()
    m = 2 * bench.batch * (bench.image // 16) ** 2
    gen = torch.Generator(device=bench.device).manual_seed(7)
    shapes = {"qkv": (3456, 1152), "proj": (1152, 1152), "fc1": (4608, 1152), "fc2": (1152, 4608)}
    gemms: dict[str, Any] = {}
    for name, (n, k) in shapes.items():
        gemms[f"{name} {m}x{k}->{n}"] = row = _gemm_row(bench, m, n, k, gen)
        print(f"gemm {name}: {row}", flush=True)
    out["gemms"] = gemms
    bench.save()


def section_quant_tune(bench: Bench) -> None:
    """`fp8_rows.quantize_rows` at the two widths of a guided XL/2 step (M = 131,072 rows; K = 1,152 plain, for
    proj, and 4,608 with GELU, for fc2) for each (rows per program, warps), with each row read as two
    power-of-two blocks (the default) and as one padded block (the old layout); ms medians and GB/s (bytes
    once)."""
    from ditkit.models.kernels import fp8_rows

    m = 2 * bench.batch * (bench.image // 16) ** 2
    out: dict[str, Any] = {}
    bench.results["quant_tune"] = out
    saved = dict(fp8_rows.TUNING)

    def entry(x: torch.Tensor, rows: int, warps: int, **kw: Any) -> dict[str, float]:
        fp8_rows.TUNING[(x.shape[-1], kw.get("gelu", False))] = (rows, warps)
        ms = bench.time_ms(lambda: fp8_rows.quantize_rows(x, **kw), repeats=7)
        return {"ms": round(ms, 3), "gb_s": round(x.numel() * 3 / ms / 1e6, 1)}

    try:
        for k, gelu in ((1152, False), (4608, True)):
            x = torch.randn(m, k, device=bench.device, dtype=torch.bfloat16)
            block = 1 << (k - 1).bit_length()
            for padded in (False, True):
                for rows in (1, 2, 4, 8):
                    for warps in (4, 8, 16, 32):
                        if rows * block <= 32768 and warps * 32 <= rows * block:
                            out[f"K={k} gelu={gelu} {'padded ' if padded else ''}rows={rows} warps={warps}"] = entry(
                                x, rows, warps, gelu=gelu, padded=padded)
            if gelu:  # the GELU's tanh as exp + division (two special-function ops) instead of tanh.approx (one)
                for rows, warps in ((1, 4), (2, 8)):
                    out[f"K={k} gelu={gelu} exp-tanh rows={rows} warps={warps}"] = entry(
                        x, rows, warps, gelu=True, hw_tanh=False)
            rows, warps = saved.get((k, gelu), (1, 4))
            best = min((v["ms"], name) for name, v in out.items() if name.startswith(f"K={k} "))
            print(f"quant K={k}: best {best}, default {out.get(f'K={k} gelu={gelu} rows={rows} warps={warps}')}",
                  flush=True)
    finally:
        fp8_rows.TUNING.clear()
        fp8_rows.TUNING.update(saved)
    bench.save()


def _gemm_row(bench: Bench, m: int, n: int, k: int, gen: torch.Generator) -> dict[str, Any]:
    """One block GEMM (M×K by N×K, bias) timed in bf16, FP8 row-wise and FP8 tensorwise; errors vs float64."""
    import torch.nn.functional as F

    from ditkit.models.kernels import fp8_rows

    x = torch.randn(m, k, device=bench.device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=bench.device, generator=gen) / k**0.5
    b = torch.randn(n, device=bench.device, generator=gen)
    wb, bb = w.bfloat16(), b.bfloat16()
    rows = fp8_rows.quantize_rows(x)
    weight = fp8_rows.quantize_weight(w, b, torch.bfloat16)
    x8t = x.float().div(x.abs().amax() / 448).to(fp8_rows.E4M3)
    one = torch.ones((), device=bench.device)
    ref = x.double() @ w.double().t() + b.double()
    row = {"bf16_ms": bench.time_ms(lambda: F.linear(x, wb, bb)),
           "fp8_rows_ms": bench.time_ms(lambda: fp8_rows.linear(rows, weight)),
           "fp8_tensorwise_ms": bench.time_ms(lambda: torch._scaled_mm(
               x8t, weight.data.t(), scale_a=one, scale_b=one, bias=bb, out_dtype=torch.bfloat16)),
           "quantize_rows_ms": bench.time_ms(lambda: fp8_rows.quantize_rows(x)),
           "quantize_rows_gelu_ms": bench.time_ms(lambda: fp8_rows.quantize_rows(x, gelu=True)),
           "rel_err_fp8_rows": rel(fp8_rows.linear(rows, weight), ref),
           "rel_err_bf16": rel(F.linear(x, wb, bb), ref)}
    for key in ("bf16", "fp8_rows", "fp8_tensorwise"):
        row[f"{key}_tflops"] = round(2 * m * n * k / row[f"{key}_ms"] / 1e9, 1)
    return row


SECTIONS = {"forward": section_forward, "profile": section_profile, "vae": section_vae, "sampler": section_sampler,
            "cli": section_cli, "fp8": section_fp8, "quant-tune": section_quant_tune}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[3:], argv[1])
    p = harness.parser(__doc__, SECTIONS, budget_s=540.0, reserve_s=20.0,
                       quick_help="DiT-S/2 at 64 px, tiny batches (a CPU smoke run)")
    p.add_argument("--cli-jobs", nargs="+", default=["dpm-solver", "ddpm"],
                   help="cli section: ddpm, dpm-solver, or SAMPLER+FLAG[=VALUE] (e.g. ddpm+precision=fp8)")
    p.add_argument("--profile-fp8", action="store_true",
                   help="profile and sampler sections: the --precision fp8 forward")
    p.add_argument("--variants", nargs="+", default=None,
                   help="forward section: only the variants whose names start with these (default: all)")
    args = p.parse_args(argv)
    bench = Bench(args)
    bench.work = Path(tempfile.mkdtemp(prefix="ditkit_sample_"))
    return run_sections(bench, args.sections, SECTIONS, args.reserve_s, tail_chars=6000)


if __name__ == "__main__":
    raise SystemExit(main())
