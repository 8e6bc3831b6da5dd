"""Training and sampling speed of ditkit's DiT on one GPU (issue 7), with the fp32-eager baseline alongside.

    PYTHONPATH=src python benchmarks/bench_speed.py --out $OUT/speed.json            # the GPU run, ~8 min
    PYTHONPATH=src python benchmarks/bench_speed.py --quick --out /tmp/speed.json    # CPU smoke run, seconds

What it does, in order of importance (a `--budget-s` cut drops the tail and still prints the table):
  1. the GPU's own bf16 matmul rate (the MFU denominator), median of CUDA-event-timed repeats;
  2. DiT-XL/2 training at 256×256 (32×32×4 synthetic latents, the store's shape) in the fast mode (bf16
     autocast with fp32 master weights, flash SDPA, fused AdamW, EMA by foreach lerp, regional torch.compile)
     at batch 128 and 256; then, with --profile, one step's GPU time per kernel class;
  3. guided DiT-XL/2 sampling throughput, DDPM-250 and DPM-Solver++-20 (batch 256 = 512 rows; median step
     time × steps), and end-to-end latency for batch 1 and 8;
  4. the baseline: the same training step and sampler step with every optimisation off (fp32 without TF32,
     eager, math SDPA, for-each AdamW), so every row's speed-up is a ratio measured in this process;
  5. a short DiT-S/2 training run in bf16 against the same run in fp32 (the loss curves must agree), and
     batch 256 with activation checkpointing (required if plain batch 256 runs out of memory);
  6. DiT-S/2, B/2, L/2 at batch 256 and DiT-XL/2 at 512×512 (64×64 latents, batch 64 or else 32), each with
     its baseline;
  7. the leads one at a time at batch 64 (TF32, bf16, flash SDPA, fused AdamW), bf16 eager at batch 128;
  8. the EMA update (torch._foreach_lerp_ against a per-parameter loop);
  9. slow-to-compile leads that only a larger --budget-s reaches: whole-model torch.compile of the training
     forward, and max-autotune for sampling.

The training step is train.py's, built from the same functions (the model, `training_losses` with the fp32
loss, AdamW, `update_ema`, the per-step generator); only the data loader is left out. FLOPs are counted by
`ditkit.models.flops.count_macs`: a training image costs 6×MACs (forward 2×, backward 4×), a guided sampling step
costs 2 rows × 2×MACs per image. MFU = counted FLOPs / time / the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
import harness
from ditkit.diffusion import create_diffusion, samplers
from ditkit.diffusion.guidance import guided
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.models.flops import count_macs
from ditkit.runtime.fast import compile_blocks
from ditkit.train.step import TrainStep, _autocast, update_ema

CFG_SCALE = 4.0  # the sample.py default of the official code; the cost does not depend on it


# ----------------------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """One combination of the leads. `precision`: fp32 (TF32 off), tf32, or bf16 (autocast, fp32 weights)."""

    name: str
    precision: str = "bf16"
    compile: bool = False
    flash: bool = True  # SDPA's flash / memory-efficient kernels; False forces the math backend
    fused_adam: bool = True
    checkpointing: bool = False
    bf16_weights: bool = False  # sampling only: the EMA weights cast to bf16 once (no per-call weight casts)
    whole_model: bool = False  # torch.compile of the whole model instead of each block
    compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune"


BASELINE = Mode("fp32 eager (all off)", precision="fp32", flash=False, fused_adam=False)
FAST = Mode("bf16 compile", compile=True)
FAST_CKPT = Mode("bf16 compile + act. ckpt", compile=True, checkpointing=True)
SAMPLE_FAST = Mode("bf16 compile", compile=True, bf16_weights=True)
WHOLE = Mode("bf16 compile (whole model)", compile=True, whole_model=True)
# Without CUDA graphs: graphs of each block separately would hand out outputs that the next replay overwrites.
SAMPLE_AUTOTUNE = Mode(
    "bf16 compile max-autotune", compile=True, bf16_weights=True, compile_mode="max-autotune-no-cudagraphs"
)
SAMPLE_EAGER = Mode("bf16 eager", bf16_weights=True)
SAMPLE_BASELINE = Mode("fp32 eager (all off)", precision="fp32", flash=False)
LADDER = (
    Mode("tf32 eager", precision="tf32", flash=False, fused_adam=False),
    Mode("bf16 eager, math SDPA", flash=False, fused_adam=False),
    Mode("bf16 eager, flash SDPA", fused_adam=False),
    Mode("bf16 eager, flash, fused AdamW (train.py)"),
)


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    section: str
    config: str
    batch: int
    mode: str
    images_per_s: float | None = None
    step_ms: float | None = None
    mfu_pct: float | None = None
    peak_mem_gb: float | None = None
    speedup: float | None = None
    note: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


# ----------------------------------------------------------------------------------------------- timing


class Bench(harness.Bench):
    """Device, timer, budget and results of one benchmark run (the harness's bench with this benchmark's rows,
    skips and JSON layout)."""

    def __init__(self, device: torch.device, budget_s: float, quick: bool, out: str | None = None):
        super().__init__(device=device, budget_s=budget_s, out=out)
        self.cuda = device.type == "cuda"
        self.quick = quick
        self.peak_flops: float | None = None
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.profile: dict[str, Any] | None = None
        self.baselines: dict[tuple[str, str], float] = {}  # (config, kind) -> baseline images/s

    def loop_times(self, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
        """Per-call times in ms after `warmup` calls: the harness's timer with the calls back to back (on a GPU
        no host sync between calls, so the CPU may run ahead as in a real loop; one synchronize at the end)."""
        return self.times_ms(fn, warmup, repeats, sync_each=False)

    # the harness's hooks, in this benchmark's format
    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(name)
        print(f"# skipped (budget): {name}", flush=True)

    def done(self, name: str, seconds: float) -> None:
        pass  # run_job prints each row with its time

    def stopped(self, exc: BaseException) -> None:
        print(f"# stopped: {exc}", flush=True)
        self.skipped.append(f"stopped: {exc}")

    def save(self, done: bool = False) -> None:
        write_json(self, self.out, done)

    def reset_compiled(self) -> None:
        """Drop dynamo's caches before a job builds new models, so that nothing compiled for an earlier
        job keeps GPU memory alive."""
        torch._dynamo.reset()
        self.reset_memory()

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def mfu(self, flops_per_s: float) -> float | None:
        return 100.0 * flops_per_s / self.peak_flops if self.peak_flops else None


@contextlib.contextmanager
def applied(mode: Mode, device: torch.device):
    """TF32 flags and the SDPA backend of `mode` for the duration of a call."""
    if device.type == "cuda":
        tf32 = mode.precision in ("tf32", "bf16")  # as train.py: TF32 on for bf16 runs, off for fp32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    with contextlib.ExitStack() as stack:
        if not mode.flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def measure_peak(bench: Bench) -> float:
    """The device's bf16 matmul rate in FLOP/s: the best median over a few square sizes."""
    sizes = (256,) if bench.quick else (4096, 8192, 16384)
    best = 0.0
    for n in sizes:
        repeats = 3 if bench.quick else (10 if n >= 16384 else 30)
        times = bench.loop_times(_matmul(n, bench.device), warmup=2 if bench.quick else 5, repeats=repeats)
        best = max(best, 2 * n**3 / (statistics.median(times) / 1e3))
    return best


def _matmul(n: int, device: torch.device) -> Callable[[], torch.Tensor]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return lambda: torch.mm(a, b)


# ----------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    """A model to benchmark: a paper name at a latent size (or a tiny config for --quick)."""

    label: str
    name: str
    input_size: int
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self) -> DiTConfig:
        return DiTConfig.from_name(
            self.name, input_size=self.input_size, num_classes=1000, **dict(self.overrides)
        )

    def build(self) -> DiT:
        return DiT(self.config())


TINY_OVERRIDES = (("depth", 2), ("hidden_size", 64), ("num_heads", 4))


def specs(quick: bool) -> dict[str, Spec]:
    if quick:
        tiny = Spec("tiny/2 (8x8)", "DiT-S/2", 8, TINY_OVERRIDES)
        return {
            "XL/2": tiny,
            "S/2": Spec("tiny-S/2 (8x8)", "DiT-S/2", 8, (("depth", 1),) + TINY_OVERRIDES[1:]),
            "XL/2-512": Spec("tiny/2 (16x16)", "DiT-S/2", 16, TINY_OVERRIDES),
        }
    return {
        "XL/2": Spec("DiT-XL/2 256", "DiT-XL/2", 32),
        "S/2": Spec("DiT-S/2 256", "DiT-S/2", 32),
        "B/2": Spec("DiT-B/2 256", "DiT-B/2", 32),
        "L/2": Spec("DiT-L/2 256", "DiT-L/2", 32),
        "XL/2-512": Spec("DiT-XL/2 512", "DiT-XL/2", 64),
    }


# ----------------------------------------------------------------------------------------------- training


class TrainJob:
    """`ditkit train`'s own step (`ditkit.train.step.TrainStep`, without the loader) on synthetic latents:
    the (seed, step) draws, loss in fp32, backward, AdamW, EMA."""

    def __init__(self, spec: Spec, batch: int, mode: Mode, device: torch.device, quick: bool):
        self.device, self.mode, self.batch = device, mode, batch
        precision = "bf16" if mode.precision == "bf16" else "fp32"
        self.precision = precision
        torch.manual_seed(0)
        model = spec.build()
        config = model.config
        ema = copy.deepcopy(model)
        ema.requires_grad_(False)
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.requires_grad_(p.requires_grad)  # as train.py: update_ema pairs the trained parameters
        self.model, self.ema = model.to(device).train(), ema.to(device).eval()
        if mode.checkpointing:
            self.model.set_grad_checkpointing(True)
        self.forward: Callable[..., torch.Tensor] = self.model
        backend = "inductor" if device.type == "cuda" else "eager"  # --quick on a CPU: dynamo's tracing only
        if mode.compile and mode.whole_model:
            self.forward = torch.compile(self.model, backend=backend, dynamic=False)
        elif mode.compile:
            compile_blocks(self.model, backend=backend, mode=mode.compile_mode)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=1e-4,
            weight_decay=0.0,
            **(
                {"fused": True}
                if mode.fused_adam and device.type == "cuda"
                else {"foreach": device.type == "cuda"}
            ),
        )
        self.diffusion = create_diffusion("", learn_sigma=config.learn_sigma)
        self.dropout = config.class_dropout_prob
        g = torch.Generator(device="cpu").manual_seed(1)
        shape = (batch, config.in_channels, config.input_size, config.input_size)
        self.x = torch.randn(shape, generator=g).to(device)
        self.y = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
        self.step_index = 0
        self.sums = torch.zeros(3, device=device)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.macs = count_macs(config)
        self.step = TrainStep(self.model, self.forward, self.ema, self.opt, self.diffusion, device=device,
                              precision=precision, global_batch=batch, seed=0, ema_decay=0.9999,
                              class_dropout_prob=self.dropout)

    def __call__(self) -> None:
        out = self.step(self.x, self.y, self.step_index)
        self.last_loss = out.terms[0]
        self.first_bad = torch.where((self.first_bad < 0) & ~out.finite, self.step_index + 1, self.first_bad)
        self.sums += out.terms
        self.step_index += 1


def train_job(
    bench: Bench, spec: Spec, batch: int, mode: Mode, section: str, repeats: int, profile: bool = False
) -> Row:
    bench.reset_compiled()
    with applied(mode, bench.device):
        step = TrainJob(spec, batch, mode, bench.device, bench.quick)
        times = bench.loop_times(step, warmup=1 if bench.quick else 3, repeats=repeats)
        ms = statistics.median(times)
        if profile:
            bench.profile = profile_step(bench, step, f"{spec.label}, batch {batch}, {mode.name}", ms)
    if int(step.first_bad) >= 0:
        raise RuntimeError("the loss became non-finite")
    ips = batch / (ms / 1e3)
    row = Row(
        section,
        spec.label,
        batch,
        mode.name,
        ips,
        ms,
        bench.mfu(6 * step.macs * ips),
        bench.peak_memory_gb(),
        note=f"median of {len(times)}",
    )
    if mode == BASELINE:
        bench.baselines[(spec.label, "train")] = ips
    return row


def moving_average(values: list[float], window: int) -> list[float]:
    """Means of `window` consecutive values (len − window + 1 of them)."""
    return [sum(values[i : i + window]) / window for i in range(len(values) - window + 1)]


def loss_curve_job(bench: Bench, spec: Spec, batch: int, steps: int, section: str) -> Row:
    """The same short training run (same init, batch, timesteps and noise per step) in fp32 and in the fast
    bf16 mode: the bf16 loss curve must follow the fp32 one. Reported: the largest gap between their
    `window`-step moving averages, relative to the fp32 average."""
    window = max(2, steps // 20)
    curves: dict[str, list[float]] = {}
    for mode in (BASELINE, Mode("bf16")):
        bench.reset_compiled()
        with applied(mode, bench.device):
            step = TrainJob(spec, batch, mode, bench.device, bench.quick)
            losses = []
            for _ in range(steps):
                step()
                losses.append(step.last_loss)
            curves[mode.precision] = torch.stack(losses).float().cpu().tolist()
    ref, fast = moving_average(curves["fp32"], window), moving_average(curves["bf16"], window)
    gap = max(abs(a - b) / abs(a) for a, b in zip(ref, fast))
    note = (
        f"loss {ref[0]:.4f} -> {ref[-1]:.4f} (fp32), {fast[0]:.4f} -> {fast[-1]:.4f} (bf16); "
        f"largest gap of {window}-step means {100 * gap:.2f} %"
    )
    return Row(
        section,
        f"{spec.label} loss curve, {steps} steps",
        batch,
        "bf16 vs fp32",
        note=note,
        extra={"window": window, "max_rel_gap": gap, "fp32": curves["fp32"], "bf16": curves["bf16"]},
    )


# ----------------------------------------------------------------------------------------------- sampling


class Sampler:
    """A guided EMA-style model (eval mode) and the samplers' own step functions at one batch size."""

    def __init__(self, spec: Spec, batch: int, mode: Mode, device: torch.device):
        torch.manual_seed(0)
        model = spec.build().to(device).eval()
        if mode.bf16_weights:
            model = model.to(torch.bfloat16)  # cast once: no per-call cast of 675M weights at small batches
        dtype = torch.bfloat16 if mode.precision == "bf16" else torch.float32
        model.choose_attention(2 * batch, dtype, device, training=False)  # guided rows; as the pipeline does
        if mode.compile:
            backend = "inductor" if device.type == "cuda" else "eager"
            compile_blocks(model, backend=backend, mode=mode.compile_mode)
        self.model, self.mode, self.device, self.batch = model, mode, device, batch
        self.config = model.config
        self.macs = count_macs(self.config)
        self.guided = guided(self._forward, CFG_SCALE, null_label=self.config.num_classes)
        g = torch.Generator(device="cpu").manual_seed(2)
        c, s = self.config.in_channels, self.config.input_size
        self.noise = torch.randn(batch, c, s, s, generator=g).to(device)
        self.y = torch.randint(0, self.config.num_classes, (batch,), generator=g).to(device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, "bf16" if self.mode.precision == "bf16" else "fp32"):
            return self.model(x, t, y).float()

    def step_fn(self, num_steps: int) -> Callable[[], torch.Tensor]:
        """One DDPM step of the `num_steps`-respaced process, exactly the call `samplers.ddpm` makes."""
        diffusion = create_diffusion(str(num_steps))
        state = {"i": num_steps - 1, "x": self.noise.clone()}

        @torch.no_grad()
        def step() -> torch.Tensor:
            i = state["i"]
            t = torch.full((self.batch,), i, device=self.device, dtype=torch.long)
            state["x"] = diffusion.p_sample(
                self.guided, state["x"], t, clip_denoised=False, model_kwargs={"y": self.y}
            )["sample"]
            state["i"] = i - 1 if i > 1 else num_steps - 1
            return state["x"]

        return step

    def run(self, sampler: str, num_steps: int) -> torch.Tensor:
        """A full sampling run through `samplers.sample` (guided)."""
        return samplers.sample(
            self.guided, self.noise, sampler=sampler, num_steps=num_steps, model_kwargs={"y": self.y}
        )


def sample_throughput_job(
    bench: Bench,
    sampler: Sampler,
    spec: Spec,
    kind: str,
    num_steps: int,
    section: str,
    repeats: int,
    end_to_end: bool = False,
) -> Row:
    """Images/s of a guided sampler: median step time × steps (extrapolated), or timed runs (end_to_end)."""
    with applied(sampler.mode, bench.device):
        if end_to_end:
            times = bench.loop_times(lambda: sampler.run(kind, num_steps), warmup=1, repeats=repeats)
            total_ms = statistics.median(times)
            step_ms = total_ms / num_steps
            note = f"end to end, median of {len(times)}"
        else:
            times = bench.loop_times(
                sampler.step_fn(250 if kind == "ddpm" else num_steps),
                warmup=1 if bench.quick else 2,
                repeats=repeats,
            )
            step_ms = statistics.median(times)
            total_ms = step_ms * num_steps
            note = f"extrapolated: median step ({len(times)}) x {num_steps}"
    b = sampler.batch
    ips = b / (total_ms / 1e3)
    flops = 2 * 2 * sampler.macs * b * num_steps / (total_ms / 1e3)  # guided: 2 rows per image per step
    label = f"{spec.label} {'DDPM' if kind == 'ddpm' else 'DPM++'}-{num_steps}"
    row = Row(
        section,
        label,
        b,
        sampler.mode.name,
        ips,
        step_ms,
        bench.mfu(flops),
        bench.peak_memory_gb(),
        note=note,
        extra={"sampler": kind, "num_steps": num_steps, "total_s": total_ms / 1e3},
    )
    if sampler.mode == SAMPLE_BASELINE:
        bench.baselines[(spec.label, "sample-step")] = b / (step_ms / 1e3)
    return row


def latency_job(
    bench: Bench, spec: Spec, batch: int, mode: Mode, runs: list[tuple[str, int]], section: str, repeats: int
) -> list[Row]:
    """End-to-end latency of full guided sampling runs at a small batch; the model-only share shows the
    sampler's overhead (its coefficient look-ups and host syncs) at sizes where launches dominate."""
    bench.reset_compiled()
    sampler = Sampler(spec, batch, mode, bench.device)
    rows = []
    with applied(mode, bench.device), torch.no_grad():
        t = torch.full((batch,), 500, device=bench.device, dtype=torch.long)
        forward_ms = statistics.median(
            bench.loop_times(
                lambda: sampler.guided(sampler.noise, t, sampler.y),
                warmup=1 if bench.quick else 3,
                repeats=3 if bench.quick else 10,
            )
        )
        for kind, steps in runs:
            times = bench.loop_times(lambda k=kind, n=steps: sampler.run(k, n), warmup=1, repeats=repeats)
            total = statistics.median(times)
            flops = 2 * 2 * sampler.macs * batch * steps / (total / 1e3)
            name = "DDPM" if kind == "ddpm" else "DPM++"
            rows.append(
                Row(
                    section,
                    f"{spec.label} {name}-{steps} latency",
                    batch,
                    mode.name,
                    batch / (total / 1e3),
                    total / steps,
                    bench.mfu(flops),
                    bench.peak_memory_gb(),
                    note=f"latency {total / 1e3:.3f} s; guided forward alone {forward_ms:.2f} ms/step",
                    extra={"latency_s": total / 1e3, "forward_ms": forward_ms, "num_steps": steps},
                )
            )
    return rows


# ------------------------------------------------------------------------------------------- profile and EMA


# Checked in this order: attention first (cuDNN's and cutlass' attention kernels also say wgmma / cutlass).
# fmt: off
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("matmul", ("gemm", "gemv", "splitk", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "aten::mm",
                "aten::addmm", "aten::bmm", "conv2d", "convolution", "implicit")),
    ("optimizer+EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("copy/memset", ("memcpy", "memset", "aten::copy_", "copy_kernel")),
)
# fmt: on


def kernel_class(name: str) -> str:
    """The class of a GPU kernel (or, without a GPU, of an aten op) by its name."""
    lower = name.lower()
    if lower.startswith("triton_"):
        # Inductor's kernels: templates ("triton_tem_") are matmuls, the rest fused pointwise / reductions.
        return "matmul" if lower.startswith("triton_tem") else "norm/elementwise"
    for cls, keys in KERNEL_CLASSES:
        if any(k in lower for k in keys):
            return cls
    return "norm/elementwise"


def profile_step(bench: Bench, fn: Callable[[], Any], what: str, step_ms: float) -> dict[str, Any]:
    """Time per kernel class of one call of `fn` (GPU kernel self time; CPU op self time without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    fn()
    bench.sync()
    with profile(activities=activities) as prof:
        fn()
        bench.sync()
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for evt in prof.key_averages():
        if bench.cuda:
            if str(getattr(evt, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0.0)
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        if not us:
            continue
        cls = kernel_class(evt.key)
        totals[cls] = totals.get(cls, 0.0) + us / 1e3
        top.append((us / 1e3, evt.key))
    busy = sum(totals.values())
    top.sort(reverse=True)
    return {
        "what": what,
        "step_ms": step_ms,
        "busy_ms": busy,
        "classes_ms": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"ms": ms, "name": name[:120]} for ms, name in top[:12]],
    }


def ema_job(bench: Bench, spec: Spec, section: str) -> list[Row]:
    """update_ema (one torch._foreach_lerp_) against a per-parameter loop, on the model's parameters."""
    model = spec.build().to(bench.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)

    @torch.no_grad()
    def loop() -> None:
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            if p.requires_grad:
                p_ema.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)

    rows = []
    for name, fn in (
        ("torch._foreach_lerp_ (update_ema)", lambda: update_ema(ema, model, 0.9999)),
        ("per-parameter loop", loop),
    ):
        ms = statistics.median(
            bench.loop_times(fn, warmup=1 if bench.quick else 2, repeats=3 if bench.quick else 20)
        )
        rows.append(Row(section, f"{spec.label} EMA update", 0, name, None, ms, note="one EMA update"))
    return rows


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Job:
    title: str
    estimate_s: float  # rough cost on an H100, compile included; the budget check uses it
    run: Callable[[], Row | list[Row] | None]
    on_fail: Callable[[BaseException], None] | None = None


class Planner:
    """Builds the job list of one run; the jobs share the sampling model and the compile/profile state."""

    def __init__(self, bench: Bench, profile: bool):
        self.bench, self.profile, self.q = bench, profile, bench.quick
        q = self.q
        self.sp = specs(q)
        self.xl = self.sp["XL/2"]
        self.reps = 2 if q else 10
        self.big, self.mid = (8, 4) if q else (256, 128)
        self.small_b = 4 if q else 64
        # fp32 / eager runs keep every activation (and the math backend the attention matrices): at batch 64
        # XL/2 is near 80 GB, so they fall back to half the batch rather than fail.
        self.small_bs = (4,) if q else (64, 32)
        self.sample_b = 4 if q else 256
        self.state: dict[str, Any] = {"profiled": False, "compiled": False}
        self.samp: dict[str, Sampler] = {}

    def train(
        self, spec: Spec, batches: int | tuple[int, ...], mode: Mode, section: str, repeats: int | None = None
    ) -> Callable[[], Row]:
        """A train job; with several batches, the first that fits in memory (the others are noted)."""
        sizes = (batches,) if isinstance(batches, int) else batches
        repeats = self.reps if repeats is None else repeats
        bench, state = self.bench, self.state

        def run() -> Row:
            nonlocal mode
            if self.q and mode.compile and state["compiled"]:
                # --quick traces one training shape through dynamo; more would only cost the smoke test time.
                mode = dataclasses.replace(mode, name=mode.name.replace("compile", "eager"), compile=False)
            state["compiled"] = state["compiled"] or mode.compile
            want_profile = self.profile and not state["profiled"] and spec is self.xl and mode.compile
            notes = []
            for i, batch in enumerate(sizes):
                fits = True
                try:
                    row = train_job(bench, spec, batch, mode, section, repeats, profile=want_profile)
                except OOM_ERRORS:
                    if i == len(sizes) - 1:
                        raise
                    fits = False
                if fits:
                    break
                bench.reset_memory()  # outside the except block: the traceback no longer holds the model
                notes.append(f"b{batch} out of memory")
            state["profiled"] = state["profiled"] or want_profile
            row.note = "; ".join([row.note, *notes])
            return row

        return run

    def sampling(self, kind: str, steps: int, end_to_end: bool, repeats: int) -> Callable[[], Row]:
        def run() -> Row:
            if "fast" not in self.samp:
                self.bench.reset_compiled()
                self.samp["fast"] = Sampler(self.xl, self.sample_b, SAMPLE_FAST, self.bench.device)
            return sample_throughput_job(
                self.bench, self.samp["fast"], self.xl, kind, steps, "sample", repeats, end_to_end
            )

        return run

    def drop_sampler(self) -> Row | None:
        self.samp.clear()
        self.bench.reset_memory()
        return None

    def sample_baseline(self) -> Row:
        self.bench.reset_compiled()
        s = Sampler(self.xl, 4 if self.q else 64, SAMPLE_BASELINE, self.bench.device)
        return sample_throughput_job(self.bench, s, self.xl, "ddpm", 250, "baseline", 2 if self.q else 3)

    def autotuned(self) -> Row:
        self.bench.reset_compiled()
        s = Sampler(self.xl, self.sample_b, SAMPLE_AUTOTUNE, self.bench.device)
        return sample_throughput_job(self.bench, s, self.xl, "ddpm", 250, "leads", 6)

    def head(self) -> list[Job]:
        """2. XL/2 training in the fast mode at two batches (the best is chosen in the table); 3. guided
        sampling throughput and latency; 4. the baselines (every optimisation off) for the speed-up column."""
        q, xl, bench = self.q, self.xl, self.bench
        jobs = [
            Job(f"{xl.label} train b{self.mid} {FAST.name}", 45, self.train(xl, self.mid, FAST, "train")),
            Job(f"{xl.label} train b{self.big} {FAST.name}", 30, self.train(xl, self.big, FAST, "train")),
            Job(f"{xl.label} DDPM-250 b{self.sample_b}", 35, self.sampling("ddpm", 250, False, 3 if q else 6)),
            Job(f"{xl.label} DPM-20 b{self.sample_b}", 20, self.sampling("dpm-solver", 4 if q else 20, True, 2)),
            Job("free the sampling model", 0, self.drop_sampler),
        ]
        lat_runs = [("ddpm", 3), ("dpm-solver", 3)] if q else [("ddpm", 250), ("dpm-solver", 20)]
        for b in (1,) if q else (1, 8):
            jobs.append(
                Job(
                    f"{xl.label} latency b{b}",
                    30,
                    lambda b=b: latency_job(
                        bench, xl, b, SAMPLE_EAGER if q else SAMPLE_FAST, lat_runs, "latency", 1 if q else 3
                    ),
                )
            )
        jobs.append(
            Job(
                f"{xl.label} train b{self.small_b} baseline",
                12,
                self.train(xl, self.small_bs, BASELINE, "baseline", 3 if q else 5),
            )
        )
        jobs.append(Job(f"{xl.label} DDPM step baseline", 10, self.sample_baseline))
        return jobs

    def tail(self) -> list[Job]:
        """The bf16 loss curve against fp32; 5. batch 256 with activation checkpointing; 6. the other sizes,
        each with its baseline; 7. the leads one at a time; 8. EMA; 9. slow-to-compile leads, last."""
        q, xl, bench, sp = self.q, self.xl, self.bench, self.sp
        curve_spec = sp["S/2"]  # DiT-S/2: small enough for a few hundred steps in seconds
        jobs = [
            Job(
                f"{curve_spec.label} loss curve bf16 vs fp32",
                30,
                lambda: loss_curve_job(bench, curve_spec, 8 if q else 64, 6 if q else 200, "numerics"),
            ),
            Job(f"{xl.label} train b{self.big} {FAST_CKPT.name}", 35, self.train(xl, self.big, FAST_CKPT, "memory")),
        ]
        for key in ("S/2",) if q else ("S/2", "B/2", "L/2", "XL/2-512"):
            spec = sp[key]
            b_fast, b_base = (self.big, self.small_b) if key != "XL/2-512" else ((4, 2) if q else ((64, 32), (8, 4)))
            jobs.append(Job(f"{spec.label} train {FAST.name}", 30, self.train(spec, b_fast, FAST, "sizes")))
            jobs.append(
                Job(f"{spec.label} train baseline", 8, self.train(spec, b_base, BASELINE, "sizes", 2 if q else 3))
            )
        # The leads one at a time (eager, batch 64), and bf16 eager at batch 128 (the compile gain).
        for mode in LADDER[-1:] if q else LADDER:
            jobs.append(
                Job(
                    f"{xl.label} train b{self.small_b} {mode.name}",
                    8,
                    self.train(xl, self.small_bs, mode, "leads", 3 if q else 5),
                )
            )
        mid = self.mid
        if not q:
            eager = LADDER[-1]
            jobs.append(Job(f"{xl.label} train b{mid} {eager.name}", 10, self.train(xl, mid, eager, "leads", 5)))
        jobs.append(Job("EMA update", 5, lambda: ema_job(bench, xl, "ema")))
        if not q:  # they run only with a larger --budget-s
            jobs.append(Job(f"{xl.label} train b{mid} {WHOLE.name}", 150, self.train(xl, mid, WHOLE, "leads", 5)))
            jobs.append(Job(f"{xl.label} DDPM-250 b{self.sample_b} {SAMPLE_AUTOTUNE.name}", 240, self.autotuned))
        return jobs


def plan(bench: Bench, profile: bool) -> list[Job]:
    """Every job of the run, in order of importance (a budget cut drops the tail)."""
    planner = Planner(bench, profile)
    return planner.head() + planner.tail()


# ----------------------------------------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if abs(value) >= 10 or value == 0 else f"{value:.3g}"


def finish_rows(bench: Bench) -> None:
    """Fill the speed-up column from the baselines measured in this run."""
    for row in bench.rows:
        if row.images_per_s is None or row.error:
            continue
        base_config = row.config.split(" DDPM")[0].split(" DPM++")[0]
        if row.section in ("sample", "baseline") and row.extra.get("num_steps"):
            per_step = bench.baselines.get((base_config, "sample-step"))
            if per_step:
                row.speedup = row.images_per_s / (per_step / row.extra["num_steps"])
        else:
            base = bench.baselines.get((row.config, "train"))
            if base:
                row.speedup = row.images_per_s / base


def table(bench: Bench) -> str:
    head = (
        "config",
        "batch",
        "precision/mode",
        "images/s",
        "step ms",
        "MFU %",
        "peak GB",
        "vs fp32 eager",
        "note",
    )
    lines = []
    for r in bench.rows:
        if r.error:
            lines.append((r.config, str(r.batch), r.mode, "-", "-", "-", "-", "-", f"FAILED: {r.error}"))
            continue
        lines.append(
            (
                r.config,
                str(r.batch),
                r.mode,
                fmt(r.images_per_s),
                fmt(r.step_ms, 2),
                fmt(r.mfu_pct),
                fmt(r.peak_mem_gb, 2),
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                r.note,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


# The goals: (what, config label, section kinds, images/s at least).
GOALS = (
    ("train DiT-XL/2 256", "DiT-XL/2 256", ("train", "memory", "leads"), 700.0),
    ("sample DDPM-250, guided", "DiT-XL/2 256 DDPM-250", ("sample", "leads"), 5.0),
    ("sample DPM-Solver++ 20, guided", "DiT-XL/2 256 DPM++-20", ("sample",), 50.0),
    ("train DiT-S/2 256", "DiT-S/2 256", ("sizes",), 8000.0),
    ("train DiT-B/2 256", "DiT-B/2 256", ("sizes",), 2500.0),
)


def goals(bench: Bench) -> list[dict[str, Any]]:
    """The best measured row for each goal of the issue, and whether batch 256 of XL/2 fits."""
    out = []
    for what, config, sections, target in GOALS:
        rows = [r for r in bench.rows if r.config == config and r.section in sections and r.images_per_s]
        best = max(rows, key=lambda r: r.images_per_s) if rows else None
        out.append(
            {
                "goal": f"{what} >= {target:,.0f} img/s",
                "best": None if best is None else round(best.images_per_s, 2),
                "batch": None if best is None else best.batch,
                "mode": None if best is None else best.mode,
                "met": None if best is None else best.images_per_s >= target,
            }
        )
    fits = [r for r in bench.rows if r.config == "DiT-XL/2 256" and r.batch == 256 and r.images_per_s]
    out.append(
        {
            "goal": "DiT-XL/2 256 trains at batch 256 in one GPU",
            "best": None if not fits else round(max(r.images_per_s for r in fits), 2),
            "batch": 256,
            "mode": ", ".join(f"{r.mode} ({r.peak_mem_gb or 0:.1f} GB)" for r in fits) or None,
            # Failed jobs are rows named by their job title, e.g. "DiT-XL/2 256 train b256 bf16 compile".
            "met": True
            if fits
            else (False if any("DiT-XL/2 256 train b256" in r.config for r in bench.rows) else None),
        }
    )
    return out


def goals_text(items: list[dict[str, Any]]) -> str:
    lines = ["goals:"]
    for g in items:
        state = "not measured" if g["met"] is None else ("MET" if g["met"] else "not met")
        best = "" if g["best"] is None else f": {g['best']:,} img/s at batch {g['batch']}, {g['mode']}"
        lines.append(f"  [{state}] {g['goal']}{best}")
    return "\n".join(lines)


def profile_text(p: dict[str, Any]) -> str:
    lines = [f"profile: {p['what']} (step {p['step_ms']:.1f} ms, kernels busy {p['busy_ms']:.1f} ms)"]
    for cls, ms in p["classes_ms"].items():
        lines.append(f"  {cls:<18} {ms:9.2f} ms  {100 * ms / max(p['busy_ms'], 1e-9):5.1f} %")
    lines.append("  top kernels:")
    lines += [f"    {k['ms']:9.2f} ms  {k['name']}" for k in p["top_kernels"]]
    return "\n".join(lines)


def write_json(bench: Bench, path: str | None, done: bool) -> None:
    """The results so far (rows, skips, profile, goals) with the device and date, written atomically."""
    if not path:
        return
    env = harness.environment(bench.device)
    data = {
        "benchmark": "ditkit speed (issue 7)",
        "command": " ".join(sys.argv),
        "date": env["date"],
        "device": env["gpu"] if bench.cuda else f"cpu ({platform.processor() or '?'})",
        "torch": torch.__version__,
        "env": env,
        "quick": bench.quick,
        "complete": done,
        "budget_s": bench.budget_s,
        "elapsed_s": bench.elapsed(),
        "peak_bf16_tflops": bench.peak_flops / 1e12 if bench.peak_flops else None,
        "rows": [asdict(r) for r in bench.rows],
        "skipped": bench.skipped,
        "profile": bench.profile,
        "goals": goals(bench),
    }
    harness.write_json(path, data)


# ----------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny models, a couple of steps (CPU smoke run)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip jobs that would end past this many seconds (default 440; --quick 300); a job still "
        "running 40 s past it is stopped, and the table is printed",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time per kernel class for one XL/2 train step (default: on for the GPU run)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="TEXT",
        help="run only the jobs whose title contains TEXT (repeatable), e.g. 'DiT-S/2' or 'DDPM'",
    )
    parser.add_argument(
        "--list", action="store_true", help="print the jobs in order with their estimates, exit"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def _device(name: str | None) -> torch.device:
    device = harness.pick_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def run_job(bench: Bench, job: Job) -> None:
    """One job: its rows appended and printed; a failure (OOM, compile error) becomes a failed row, so that
    one failing config does not lose the others."""
    t0 = time.perf_counter()
    try:
        result = job.run()
    except harness.BudgetExceeded:
        raise
    except Exception as err:
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        if isinstance(err, OOM_ERRORS):
            msg = "out of memory"
        else:
            traceback.print_exc(file=sys.stderr)
        print(f"# FAILED {job.title}: {msg}", flush=True)
        result = Row("failed", job.title, 0, "", error=msg)
    finally:
        bench.reset_memory()
    rows = result if isinstance(result, list) else ([result] if result is not None else [])
    for row in rows:
        bench.rows.append(row)
        print(
            f"# {row.config} b{row.batch} {row.mode}: {fmt(row.images_per_s)} img/s, "
            f"{fmt(row.step_ms, 2)} ms, MFU {fmt(row.mfu_pct)} % ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def run(bench: Bench, profile: bool, only: list[str] | None) -> None:
    """The peak measurement, then every planned job (those matching `only`) that fits the budget, under a hard
    limit 40 s past it."""
    try:
        with harness.hard_limit(bench.budget_s + 40):
            bench.peak_flops = measure_peak(bench)
            print(f"# measured bf16 matmul: {bench.peak_flops / 1e12:.4g} TFLOP/s", flush=True)
            jobs = [j for j in plan(bench, profile) if not only or any(text in j.title for text in only)]
            sections = {j.title: harness.Section(lambda b, j=j: run_job(b, j), j.estimate_s) for j in jobs}
            harness.run_sections(bench, list(sections), sections, reserve_s=0.0, report=False)
    except harness.BudgetExceeded as err:
        bench.stopped(err)


def report(bench: Bench) -> None:
    """The speed-ups, the final JSON, then the profile, the goals and the table (last, so a tail shows it)."""
    finish_rows(bench)
    bench.save(done=True)
    if bench.profile:
        print(profile_text(bench.profile))
    peak = f"{bench.peak_flops / 1e12:.4g} TFLOP/s" if bench.peak_flops else "?"
    print(
        f"\nditkit speed, {bench.device} ({'quick' if bench.quick else 'full'}), measured bf16 matmul {peak}, "
        f"{bench.elapsed():.0f} s; sampling images/s marked 'extrapolated' = batch / (median step x steps)"
    )
    print(goals_text(goals(bench)))
    print(table(bench))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = _device(args.device)
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.quick else 440.0)
    if budget < 0:
        parser.error("--budget-s must be >= 0")
    profile = args.profile if args.profile is not None else (device.type == "cuda" and not args.quick)
    bench = Bench(device, budget, args.quick, out=args.out)
    if args.list:
        for job in plan(bench, profile):
            print(f"{job.estimate_s:5.0f} s  {job.title}")
        return 0
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: threads only contend with each other (and with other jobs)
    if not args.quick and device.type != "cuda":
        print("warning: no GPU; the full configs on a CPU take hours (use --quick)", file=sys.stderr)
    print(
        f"# ditkit speed benchmark on {device} (torch {torch.__version__}), budget {budget:.0f} s", flush=True
    )
    run(bench, profile, args.only)
    report(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
