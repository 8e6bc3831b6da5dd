"""The sampling start-up path (issue 13): models built on the meta device with the file's tensors assigned,
mmap'd `.pt` reads, the one-sum finite check, the settings fingerprint, and the CPU path left as it was.
(The GPU-only parts, fc1's GELU epilogue and the forward-only attention probe, are checked in
benchmarks/bench_sample.py on the GPU: the epilogue against float64 GELU-tanh.)"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ditkit.models import kernels
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import safe_torch_load
from ditkit.weights.checkpoints import check_finite, load_model
from helpers.models import random_dit

small = partial(random_dit, in_channels=4, num_heads=2)  # seed -> a tiny DiT, every weight N(0, 0.05²), eval

pytestmark = pytest.mark.usefixtures("one_thread")


def outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_model_assigns_the_files_tensors_as_fp32_parameters(tmp_path, dtype):
    ref = small()
    path = tmp_path / "m.pt"
    torch.save({k: v.to(dtype) for k, v in ref.state_dict().items()}, path)
    model = load_model(path, "DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not model.pos_embed.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad
    expected = {k: v.to(dtype).float() for k, v in ref.state_dict().items()}
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    if dtype == torch.float32:  # the same function as a model that copied the weights in
        assert torch.equal(outputs(model), outputs(ref))


def test_mmap_reads_zip_files_and_legacy_files_alike(tmp_path):
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(4)}
    torch.save(tensors, tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        got = safe_torch_load(tmp_path / name, mmap=True)
        assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_finite_check_passes_huge_finite_values_and_names_a_nan():
    check_finite({"big": torch.full((1000,), 3e38), "ok": torch.ones(3)}, "f.pt")  # the sum overflows; exact test
    with pytest.raises(UserError, match="tensor 'bad' holds NaN"):
        check_finite({"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan")])}, "f.pt")


def test_settings_fingerprint_is_the_per_tensor_float64_sum_in_order():
    from ditkit.sample.pipeline import Sampler

    model = small()
    expected = sum(float(p.detach().double().sum()) for p in model.parameters())
    assert Sampler(model=model, vae=None).settings()["weights"] == f"{expected:.10g}"


def test_cpu_keeps_the_plain_mlp():
    model = small()
    x = torch.randn(2, 16, 64)
    assert not kernels.use_gelu_epilogue(x)
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.fc2(mlp.act(mlp.fc1(x))))


def test_the_runners_choose_the_attention_backend_before_the_first_batch(monkeypatch):
    """The training step and the sampling pipeline ask the model to measure its attention backends (once, with
    the rows and dtype the blocks will see); the forward itself never does (tests/test_structure.py)."""
    import ditkit
    from ditkit.diffusion import create_diffusion
    from ditkit.sample import SamplingPipeline
    from ditkit.train.step import TrainStep

    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32,
                                num_heads=2)
    calls = []
    monkeypatch.setattr(model, "choose_attention", lambda *a, **k: calls.append((a, k)) or "default")
    ema = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32,
                              num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = TrainStep(model, model, ema, opt, create_diffusion(""), device=torch.device("cpu"), precision="bf16",
                     global_batch=4, accum=2)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    step(x, y, 0)
    step(x, y, 1)
    assert calls == [((2, torch.bfloat16, torch.device("cpu")), {"training": True})]
    calls.clear()
    pipe = SamplingPipeline(model=model.eval(), vae=None, sampler="ddim", num_steps=2, cfg_scale=2.0)
    pipe.images(torch.tensor([1, 2, 3]), torch.Generator().manual_seed(0))
    assert calls == [((6, torch.float32, torch.device("cpu")), {"training": False})]
