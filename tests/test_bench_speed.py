"""The speed benchmark's CPU smoke mode (--quick) and the regional-compile helper.

The GPU figures themselves are benchmarks, not tests; here we check that the script runs every job end to end,
that its arithmetic is right (images/s from step times, MFU from FLOPs counted independently here by hooking
the model's matrix products, speed-ups from the baseline rows), and that a budget cut still prints the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.runtime.fast import compile_blocks
from helpers.gpu_machine import without_gpu_machine_missing_packages

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_speed.py"
TINY = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=1000)


def hooked_macs(config: DiTConfig) -> int:
    """Multiply-adds of one image's forward pass, counted on the live model: every Linear and the patch
    convolution by their hooks, plus the two attention products (QKᵀ and AV: 2·T²·D per block)."""
    model = DiT(config).eval()
    total = 0

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() // out.shape[-1] * module.in_features * module.out_features
        else:  # the patch convolution: one output pixel = in_channels·p·p multiply-adds per output channel
            total += out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(
            torch.zeros(1, config.in_channels, config.input_size, config.input_size),
            torch.zeros(1),
            torch.zeros(1, dtype=torch.long),
        )
    for h in hooks:
        h.remove()
    return total + config.depth * 2 * config.num_patches**2 * config.hidden_size


def _load_script():
    if "bench_speed" not in sys.modules:
        if str(SCRIPT.parent) not in sys.path:  # as `python benchmarks/bench_speed.py` has it: its harness
            sys.path.insert(0, str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_speed"] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules["bench_speed"]


def _run_main(args: list[str]) -> int:
    """The script's main() in this process (no second torch import); it sets one CPU thread: restore it."""
    threads = torch.get_num_threads()
    try:
        return _load_script().main(args)
    finally:
        torch.set_num_threads(threads)


RUN_WITHOUT = without_gpu_machine_missing_packages(SCRIPT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict]:
    """The --quick run from the command line, as the lead runs it (PYTHONPATH=src), without the packages
    that the GPU machine lacks."""
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, "--quick", "--profile", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_a_zero_budget_skips_every_job_and_still_prints_the_table(tmp_path, capsys):
    assert _run_main(["--quick", "--budget-s", "0", "--no-profile", "--out", str(tmp_path / "s.json")]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["rows"] == [] and len(data["skipped"]) >= 10 and data["complete"]
    out = capsys.readouterr().out
    assert "skipped (budget)" in out and out.rstrip().splitlines()[-2].startswith("config ")


def test_quick_run_completes_every_job_and_prints_the_table_last(quick_run):
    stdout, data = quick_run
    assert data["complete"] and data["quick"] and not data["skipped"]
    assert data["peak_bf16_tflops"] > 0
    rows = data["rows"]
    assert not [r for r in rows if r["error"]], [r["error"] for r in rows if r["error"]]
    sections = {r["section"] for r in rows}
    assert {
        "train",
        "sample",
        "latency",
        "baseline",
        "numerics",
        "memory",
        "leads",
        "sizes",
        "ema",
    } <= sections
    # The table is the last thing printed: its header, then one line per row.
    lines = stdout.rstrip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config "))
    for word in ("batch", "precision/mode", "images/s", "step ms", "MFU %", "peak GB", "vs fp32 eager"):
        assert word in lines[header]
    assert len(lines) - header - 2 == len(rows)


def test_images_per_second_mfu_and_speedups_follow_from_the_timings(quick_run):
    _, data = quick_run
    peak = data["peak_bf16_tflops"] * 1e12
    macs = {
        "tiny/2 (8x8)": hooked_macs(DiTConfig(**TINY)),
        "tiny-S/2 (8x8)": hooked_macs(DiTConfig(**{**TINY, "depth": 1})),
    }
    baseline = {
        r["config"]: r["images_per_s"]
        for r in data["rows"]
        if r["mode"].startswith("fp32 eager")
        and r["section"] in ("baseline", "sizes")
        and "DDPM" not in r["config"]
    }
    train_rows = [
        r
        for r in data["rows"]
        if r["section"] in ("train", "baseline", "memory", "leads", "sizes") and "DDPM" not in r["config"]
    ]
    assert len(train_rows) >= 7
    for r in train_rows:
        ips = r["batch"] / (r["step_ms"] / 1e3)
        assert r["images_per_s"] == pytest.approx(ips, rel=1e-9)
        # A training image: forward (2 FLOPs per multiply-add) and backward (twice the forward).
        assert r["mfu_pct"] == pytest.approx(100 * 6 * macs[r["config"]] * ips / peak, rel=1e-9)
        assert r["speedup"] == pytest.approx(ips / baseline[r["config"]], rel=1e-9)
    # Guided sampling: 2 rows per image per step; the DDPM row is its median step time times 250.
    step_base = next(r for r in data["rows"] if r["section"] == "baseline" and "DDPM" in r["config"])
    for r in [r for r in data["rows"] if r["section"] == "sample"]:
        steps = r["extra"]["num_steps"]
        ips = r["batch"] / (r["step_ms"] * steps / 1e3)
        assert r["images_per_s"] == pytest.approx(ips, rel=1e-9)
        assert r["mfu_pct"] == pytest.approx(100 * 4 * macs["tiny/2 (8x8)"] * ips * steps / peak, rel=1e-9)
        base_ips = step_base["batch"] / (step_base["step_ms"] * steps / 1e3)
        assert r["speedup"] == pytest.approx(ips / base_ips, rel=1e-9)
    ddpm = next(r for r in data["rows"] if r["section"] == "sample" and "DDPM-250" in r["config"])
    assert "extrapolated" in ddpm["note"]
    for r in [r for r in data["rows"] if r["section"] == "latency"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["extra"]["latency_s"], rel=1e-9)


def test_the_loss_curve_row_compares_the_bf16_and_fp32_runs(quick_run):
    _, data = quick_run
    row = next(r for r in data["rows"] if r["section"] == "numerics")
    fp32, bf16, w = np.array(row["extra"]["fp32"]), np.array(row["extra"]["bf16"]), row["extra"]["window"]
    assert len(fp32) == len(bf16) == 6 and np.isfinite(fp32).all() and np.isfinite(bf16).all()
    kernel = np.ones(w) / w
    ref, fast = np.convolve(fp32, kernel, mode="valid"), np.convolve(bf16, kernel, mode="valid")
    assert row["extra"]["max_rel_gap"] == pytest.approx(np.max(np.abs(ref - fast) / np.abs(ref)), abs=1e-12)
    assert row["extra"]["max_rel_gap"] < 0.05  # six steps from the same init: the curves barely separate


def test_profile_splits_one_train_step_into_kernel_classes(quick_run):
    stdout, data = quick_run
    prof = data["profile"]
    assert "batch" in prof["what"]
    assert sum(prof["classes_ms"].values()) == pytest.approx(prof["busy_ms"], rel=1e-9)
    assert prof["classes_ms"]["matmul"] > 0 and prof["classes_ms"]["optimizer+EMA"] > 0
    assert "profile:" in stdout


def test_kernel_names_fall_into_the_profile_classes():
    kernel_class = _load_script().kernel_class
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "matmul",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn": "matmul",
        "triton_tem_fused_mm_0": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer+EMA",
        "triton_per_fused_native_layer_norm_add_mul_0": "norm/elementwise",
        "triton_poi_fused__to_copy_convert_element_type_3": "norm/elementwise",
        "void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>": "norm/elementwise",
        "Memcpy HtoD (Pageable -> Device)": "copy/memset",
        "aten::addmm": "matmul",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, 128, 16, 4, 4, false>": "matmul",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float>": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128": "attention",
    }
    assert {name: kernel_class(name) for name in cases} == cases


def test_compile_blocks_keeps_outputs_and_state_dict_keys():
    torch.manual_seed(0)
    model = DiT(DiTConfig(**{**TINY, "num_classes": 10}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        expected = model.eval()(x, t, y)
    keys = list(model.state_dict())
    # The eager backend runs dynamo's tracing only; fullgraph=True fails on any graph break in a block.
    compile_blocks(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = model(x, t, y)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="blocks"):
        compile_blocks(nn.Linear(2, 2))


def test_a_config_that_runs_out_of_memory_falls_back_to_the_next_batch(monkeypatch):
    """The full plan's DiT-XL/2 512 job tries batch 64, then 32; the out-of-memory attempt is noted."""
    bench_speed = _load_script()
    tried = []

    def fake_train_job(bench, spec, batch, mode, section, repeats, profile=False):
        tried.append(batch)
        if batch == 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return bench_speed.Row(section, spec.label, batch, mode.name, 1.0, 1.0, note="median of 5")

    monkeypatch.setattr(bench_speed, "train_job", fake_train_job)
    bench = bench_speed.Bench(torch.device("cpu"), budget_s=1e9, quick=False)
    job = next(
        j for j in bench_speed.plan(bench, profile=False) if j.title == "DiT-XL/2 512 train bf16 compile"
    )
    row = job.run()
    assert tried == [64, 32] and row.batch == 32 and row.note == "median of 5; b64 out of memory"


def test_goals_pick_the_best_row_and_judge_the_batch_256_fit():
    bench_speed = _load_script()
    Row = bench_speed.Row
    bench = bench_speed.Bench(torch.device("cpu"), budget_s=1.0, quick=False)
    bench.rows = [
        Row("train", "DiT-XL/2 256", 128, "bf16 compile", 650.0, 197.0, peak_mem_gb=40.0),
        Row("failed", "DiT-XL/2 256 train b256 bf16 compile", 0, "", error="out of memory"),
        Row("memory", "DiT-XL/2 256", 256, "bf16 compile + act. ckpt", 710.0, 360.0, peak_mem_gb=50.0),
        Row("baseline", "DiT-XL/2 256", 64, "fp32 eager (all off)", 90.0, 711.0),
        Row("sample", "DiT-XL/2 256 DDPM-250", 256, "bf16 compile", 4.5, 227.0),
        Row("sizes", "DiT-S/2 256", 256, "bf16 compile", 9000.0, 28.0),
    ]
    by_goal = {g["goal"].split(" >=")[0]: g for g in bench_speed.goals(bench)}
    xl = by_goal["train DiT-XL/2 256"]
    assert (xl["best"], xl["batch"], xl["met"]) == (710.0, 256, True)  # the baseline row never counts
    assert by_goal["sample DDPM-250, guided"]["met"] is False
    assert by_goal["sample DPM-Solver++ 20, guided"]["met"] is None  # not measured
    assert by_goal["train DiT-S/2 256"]["met"] is True and by_goal["train DiT-B/2 256"]["met"] is None
    fit = by_goal["DiT-XL/2 256 trains at batch 256 in one GPU"]
    assert fit["met"] is True and "act. ckpt (50.0 GB)" in fit["mode"]
    bench.rows = bench.rows[:2]
    fit = {g["goal"]: g for g in bench_speed.goals(bench)}["DiT-XL/2 256 trains at batch 256 in one GPU"]
    assert fit["met"] is False  # tried and ran out of memory
