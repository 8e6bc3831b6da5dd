"""bf16 autocast (the training and fast sampling precision) against float64 and float32 references on a CPU.

The model keeps fp32 master weights; under autocast the matrix products run in bf16 (8 significant bits, unit
round-off u = 2⁻⁸ ≈ 0.0039) while LayerNorm, the timestep embedding and the diffusion loss stay fp32. A
product of bf16-rounded operands with fp32 accumulation has a relative error of about u per rounding, and a
2-block model chains about a dozen of them, partly cancelling (measured: 0.5% ≈ 1.2u): we allow 2% relative
(Frobenius) error of the whole output against the float64 reference, about 5u, while fp32 must be within 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ditkit.diffusion import create_diffusion
from ditkit.models.dit import DiT
from helpers.models import tiny_dit

BF16_REL_TOL = 0.02  # ≈ 5 × bf16's unit round-off, for the whole output (see the module docstring)
FP32_REL_TOL = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def model() -> DiT:
    """A 2-block, 64-wide DiT, all weights non-zero (adaLN-Zero init would make the blocks identities)."""
    return tiny_dit(0, init="fan-in", in_channels=4, eval=True)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    y = torch.randint(0, 11, (6,), generator=g)  # 10 is the null label
    return x, t, y


def test_bf16_autocast_output_matches_float64_within_bf16_tolerance(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), t, y)
        fp32 = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t, y)
    assert bf16.dtype == torch.bfloat16  # the output projection ran in bf16
    assert ref.abs().mean() > 0.1  # the weights make the output non-trivial
    assert rel_err(fp32, ref) < FP32_REL_TOL
    err = rel_err(bf16, ref)
    assert err < BF16_REL_TOL
    # bf16 really ran: its error is of bf16's size, far above fp32's.
    assert err > 1e-3


def test_layernorm_and_timestep_embedding_stay_fp32_under_autocast(model, inputs):
    x, t, y = inputs
    dtypes: dict[str, torch.dtype] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)):
            hooks.append(
                module.register_forward_hook(
                    lambda mod, args, out, name=name: dtypes.__setitem__(name, out.dtype)
                )
            )
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    norms = [n for n in dtypes if "norm" in n]
    assert len(norms) == 2 * 2 + 1  # norm1, norm2 per block and the final norm
    assert all(dtypes[n] == torch.float32 for n in norms), {n: dtypes[n] for n in norms}
    assert dtypes["blocks.0.attn.qkv"] == torch.bfloat16
    assert dtypes["blocks.1.mlp.fc2"] == torch.bfloat16


def test_training_loss_stays_fp32_and_matches_float64(model, inputs):
    """train.py's step: the network under autocast, its output cast to fp32 before the hybrid loss."""
    x, t, y = inputs
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    diffusion = create_diffusion("")
    drop = torch.zeros(len(y), dtype=torch.long)
    train_model = copy.deepcopy(model).train()

    def fp32_output(*args, **kwargs):
        return train_model(*args, **kwargs).float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = diffusion.training_losses(
            fp32_output, x, t, model_kwargs={"y": y, "force_drop_ids": drop}, noise=noise
        )
    assert {k: v.dtype for k, v in terms.items()} == {
        "loss": torch.float32,
        "mse": torch.float32,
        "vb": torch.float32,
    }
    terms["loss"].mean().backward()
    grads = [p.grad for p in train_model.parameters() if p.requires_grad]
    assert all(
        g is not None and g.dtype == torch.float32 for g in grads
    )  # fp32 master weights get fp32 grads

    ref_model = copy.deepcopy(model).double().train()
    with torch.no_grad():
        ref = diffusion.training_losses(
            ref_model, x.double(), t, model_kwargs={"y": y, "force_drop_ids": drop}, noise=noise.double()
        )
    assert rel_err(terms["mse"].detach(), ref["mse"]) < BF16_REL_TOL
    # The VB term is a KL that can be tiny per sample; compare it on the scale of the total loss.
    assert float((terms["loss"].detach().double() - ref["loss"]).abs().max()) < BF16_REL_TOL * float(
        ref["loss"].abs().max()
    )


def test_bf16_weights_for_sampling_stay_within_bf16_tolerance(model, inputs):
    """The benchmark's fast sampling mode casts the EMA weights to bf16 once (the residual stream is then
    bf16 too): its output must still be within the bf16 tolerance of float64."""
    x, t, y = inputs
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = copy.deepcopy(model).to(torch.bfloat16)(x, t, y)
    assert 1e-3 < rel_err(out, ref) < BF16_REL_TOL
