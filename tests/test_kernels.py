"""The fused GPU kernels (ditkit.models.kernels) against float64 references, on the CPU.

The Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1 on CPU tensors) in a subprocess
(benchmarks/kernel_check.py, which the GPU benchmarks import), so the variable is set before Triton is imported
and no other test sees it. The FP8 GEMMs run through torch._scaled_mm, which PyTorch also implements on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from ditkit.models import create_model, kernels  # noqa: E402
from ditkit.models.kernels import fp8  # noqa: E402
from ditkit.models.precision import Precision, prepare  # noqa: E402

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_check.py"

# Tolerances on ‖out − ref‖/‖ref‖. fp32 storage: fp32 arithmetic lands near 1e-7, so 1e-5 leaves room for
# reduction order only. bf16 storage of h, dy and the modulation gradients: one bf16 rounding is 2^-9 ≈ 0.2%
# per element, so 1e-2. The residual stream x stays fp32 in both modes (1e-6).
FP32_TOL = 1e-5
BF16_TOL = 1e-2


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_fp32_kernels_match_float64(interpreted):
    errors = interpreted["fp32"]
    assert set(errors) == {"h1", "x1", "h2", "x2", "dx", "dy", "dmod"}
    assert max(errors.values()) < FP32_TOL, errors


def test_kernels_with_several_token_chunks_match_float64(interpreted):
    errors = interpreted["fp32_small_tiles"]
    assert max(errors.values()) < FP32_TOL, errors


def test_bf16_kernels_match_float64(interpreted):
    errors = interpreted["bf16"]
    assert errors["x1"] < 1e-6 and errors["x2"] < 1e-6, errors  # fp32 stream, bf16 branch: exact-ish
    assert max(errors.values()) < BF16_TOL, errors
    assert errors["h1"] > 1e-4, "bf16 outputs should show bf16 rounding; were they written in fp32?"


def test_fused_block_matches_plain_model(interpreted):
    # Two adaLN-Zero blocks and the final layer through the kernels vs the plain path in float64.
    errors = interpreted["block_fp32"]
    assert errors["out"] < FP32_TOL and errors["worst_param_grad"] < FP32_TOL, errors


def test_fused_block_with_qk_norm_rope_and_swiglu_matches_plain_model(interpreted):
    # LayerNorm blocks with the modern recipe's other switches (models/knobs.py) keep the fused kernels.
    errors = interpreted["block_knobs"]
    assert errors["fused_calls"] > 0, "the fused kernels did not run"
    assert errors["out"] < FP32_TOL and errors["worst_param_grad"] < FP32_TOL, errors


# Row-wise FP8 (sampling). Before the cast the kernels' float32 rows are exact up to fp32 arithmetic (1e-5);
# one e4m3 rounding is up to 2^-4 relative per element (RMS ≈ 2.5% for these random values), so the dequantised
# weight lands near 2.5% and the 2-block DiT (width 64) with all eight linears in FP8 near 3.5%: 5% bounds both.
# The GEMM is compared with float64 of its own FP8 operands, leaving the bf16 output rounding (2^-9): 5e-3.
FP8_TOL = 5e-2


def test_fp8_row_kernels_match_float64(interpreted):
    errors = interpreted["fp8_rows"]
    assert max(errors[k] for k in ("h1", "x1", "h2", "rows", "gelu_rows")) < FP32_TOL, errors
    assert max(errors[f"gelu_rows_k{k}"] for k in (1152, 256, 200)) < FP32_TOL, errors  # the two-block rows
    assert max(errors[f"split_vs_padded_k{k}"] for k in (1152, 256, 200)) < 1e-6, errors
    assert errors["row_max"] < 1e-6, "each row's largest value should map to e4m3's 448"
    assert errors["gemm"] < 5e-3, errors
    assert 1e-3 < errors["weight"] < FP8_TOL, errors  # really rounded to FP8, and only that


def test_fp8_row_block_follows_the_float64_model(interpreted):
    errors = interpreted["fp8_block"]
    assert errors["fused_fp32_out"] < FP32_TOL, errors  # the same model without FP8 rows: exact
    assert 1e-3 < errors["out"] < FP8_TOL, errors  # FP8 error, so the FP8 path ran
    # A bf16 residual stream (fp8_rows.STREAM, not the default) adds bf16 roundings (2^-9 a store, 2 stores a
    # block) to the FP8 ones. The two runs differ (a perturbation flips some e4m3 roundings, so they differ by
    # about as much as either differs from float64); at 2 blocks the bf16 one stays within half a point.
    assert errors["stream_gap"] > 1e-5, errors  # the setting took effect
    assert errors["out_bf16_stream"] < errors["out"] + 5e-3, errors


@pytest.mark.parametrize("custom_ops", [False, True])
def test_a_no_grad_fused_forward_does_not_import_dynamo(custom_ops):
    # The custom ops' first call imports torch._dynamo (3.7 s of every sampling start on the H200); sampling
    # launches the kernels directly. The custom-op run shows that the check can see the import.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    argv = [sys.executable, str(CHECK), "dynamo", *(["custom-ops"] if custom_ops else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["dynamo"] is custom_ops


def test_fp8_row_path_is_inference_only_and_keeps_the_state_dict():
    model = create_model("DiT-S/2", input_size=8, num_classes=10, depth=2)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert fp8.enable_fp8(model, rowwise=True) == 8
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    x = torch.zeros(1, 384)
    assert not kernels.use_fp8_rows(x, model.blocks[0].mlp.fc2)  # CPU tensors: the plain path


def test_fp8_linear_forward_and_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen, requires_grad=True)
    w = (torch.randn(32, 48, generator=gen) * 0.1).requires_grad_()
    b = torch.randn(32, generator=gen, requires_grad=True)
    gy = torch.randn(64, 32, generator=gen)
    (fp8.fp8_linear(x, w, b) * gy).sum().backward()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.linear(xr, wr, br)
    (ref * gy.double()).sum().backward()
    out = fp8.fp8_linear(x.detach(), w.detach(), b.detach())

    def rel(a, r):
        return float((a.detach().double() - r.detach()).norm() / r.detach().norm())

    # e4m3 keeps 3 mantissa bits (relative step 1/16 at worst, ~2% rms per element after scaling); e5m2
    # keeps 2 for the gradient. Errors average down over the 48-term (and 64-term) sums: 5% / 10% bounds.
    assert rel(out, ref) < 0.05
    assert rel(x.grad, xr.grad) < 0.10 and rel(w.grad, wr.grad) < 0.10
    assert rel(b.grad, br.grad) < 1e-6  # the bias gradient is an fp32 sum, not an FP8 product
    assert rel(out, ref) > 1e-4, "no FP8 rounding seen: did the product run in full precision?"


def test_fp8_falls_back_for_odd_shapes_and_keeps_state_dict():
    model = create_model("DiT-S/2", input_size=8, num_classes=10, depth=2)
    keys = list(model.state_dict())
    assert fp8.enable_fp8(model) == 8  # qkv, proj, fc1, fc2 in each of 2 blocks
    assert list(model.state_dict()) == keys
    assert isinstance(model.blocks[0].mlp.fc1, fp8.Float8Linear)
    assert not isinstance(model.final_layer.linear, fp8.Float8Linear)
    x = torch.randn(5, 48)
    w, b = torch.randn(24, 48), torch.randn(24)
    torch.testing.assert_close(fp8.fp8_linear(x, w, b), torch.nn.functional.linear(x, w, b))  # 5 rows: plain


def test_prepare_sets_the_kernel_path_and_one_float8_linear_for_training_and_sampling():
    """`precision.prepare`: `fused` on every layer that has a kernel path; FP8 as one class, Float8Linear, whose
    training form is the tensorwise FP8 product and whose sampling form keeps the row-wise weights for the
    block's FP8 path and is exactly F.linear when called directly; `disable_fp8` gives nn.Linear back."""
    fp8_prec = Precision("fp8", "cuda")  # built directly: resolve would refuse it without an FP8 GPU
    model = create_model("DiT-S/2", input_size=8, num_classes=10, depth=2)
    prepare(model, Precision("fp32"), training=False, fused=False)
    layers = [m for m in model.modules() if hasattr(m, "fused")]
    assert len(layers) == 1 + 2 * 2 + 1 and not any(m.fused for m in layers)  # DiT, 2×(block, MLP), final layer
    assert model.choose_attention(4, torch.float32, torch.device("cpu"), training=False) == "default"
    x = torch.randn(32, 384, generator=torch.Generator().manual_seed(0))
    fc1 = model.blocks[0].mlp.fc1
    plain = torch.nn.functional.linear(x, fc1.weight, fc1.bias).detach()
    prepare(model, fp8_prec, training=True)
    assert type(fc1) is fp8.Float8Linear and fc1.rows is None and not kernels.plain_linear(fc1)
    assert all(m.fused for m in layers)
    assert 1e-4 < float((fc1(x).detach() - plain).norm() / plain.norm()) < 0.05  # e4m3 rounding, as in the test above
    assert fp8.disable_fp8(model) == 8 and type(fc1) is torch.nn.Linear
    prepare(model, fp8_prec, training=False)
    assert type(fc1) is fp8.Float8Linear and fc1.rows is not None and kernels.plain_linear(fc1)
    assert torch.equal(fc1(x), plain)
    # The stored rows: each row's largest magnitude at e4m3's largest (448), every element within e4m3's
    # rounding (half a step: 2^-4 relative for normals, 2^-10 of the scale below the smallest normal, 2^-6).
    data, scale = fc1.rows.data.float(), fc1.rows.scale[:, None]
    assert torch.equal(data.abs().amax(dim=1), torch.full((1536,), 448.0))
    w = fc1.weight.detach()
    assert bool(((data * scale - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all())


def test_cpu_tensors_take_the_plain_path():
    assert not kernels.use_fused(torch.zeros(1, 2, 1152))


def test_fp8_needs_a_gpu_with_fp8_units():
    import argparse

    from ditkit.models.precision import Precision
    from ditkit.runtime.errors import UserError
    from ditkit.sample.pipeline import _fast_path

    with pytest.raises(UserError, match="--precision fp8 needs a CUDA GPU"):
        Precision.resolve("fp8", torch.device("cpu"))  # the one check, for training and sampling
    model = create_model("DiT-S/2", input_size=8, num_classes=10, depth=1)
    with pytest.raises(UserError, match="--precision fp8 needs a CUDA GPU"):
        _fast_path(model, argparse.Namespace(precision="fp8", compile=None), torch.device("cpu"))
    # the CPU default stays fp32 and uncompiled (the reference path)
    assert _fast_path(model, argparse.Namespace(precision=None, compile=None), torch.device("cpu")) == "fp32"
    assert not hasattr(model.blocks[0], "_compiled_call_impl") or model.blocks[0]._compiled_call_impl is None


def test_the_measured_attention_backend_is_kept_across_runs(tmp_path, monkeypatch, capsys):
    # The probe's timings are kept in ditkit's cache, keyed by GPU, library versions and shape: a second process
    # (here: the in-process memo cleared) reads them instead of measuring; a damaged file is measured again.
    from ditkit.models.kernels import attention

    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path))
    calls = []

    def fake_measure(*args):
        calls.append(args)
        return {"cudnn": 0.9, "flash": 1.4, "efficient": None}

    monkeypatch.setattr(attention, "measure_backends", fake_measure)
    monkeypatch.setattr(attention, "_CHOICE", {})
    shape = (256, 16, 256, 72, torch.bfloat16, torch.device("cpu"), False)
    assert attention.select_backend(*shape) == "cudnn" and len(calls) == 1
    stored = json.loads((tmp_path / attention.CACHE_FILE).read_text())
    assert stored == {attention.disk_key(*shape): {"cudnn": 0.9, "flash": 1.4, "efficient": None}}

    monkeypatch.setattr(attention, "_CHOICE", {})
    assert attention.select_backend(*shape) == "cudnn" and len(calls) == 1  # read back, not measured
    assert "measured on an earlier run" in capsys.readouterr().err
    other = (256, 16, 256, 64, torch.bfloat16, torch.device("cpu"), False)  # another head dim: its own entry
    assert attention.select_backend(*other) == "cudnn" and len(calls) == 2

    (tmp_path / attention.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(attention, "_CHOICE", {})
    assert attention.select_backend(*shape) == "cudnn" and len(calls) == 3
    assert attention.disk_key(*shape) in json.loads((tmp_path / attention.CACHE_FILE).read_text())

    from ditkit.runtime.errors import UserError

    def disk_full(path, write):  # atomic_write's report of a full disk
        raise UserError(f"disk full while writing {path}")

    monkeypatch.setattr(attention, "atomic_write", disk_full)
    monkeypatch.setattr(attention, "_CHOICE", {})
    assert attention.select_backend(*other) == "cudnn"  # still chosen; only the cache entry is not written
