"""MeanFlow's dual-number JVP (models/dual.py, issue 27): the network's (u, du) against torch.func.jvp of the plain
model and against float64 central differences, each layer's tangent rule against torch.func.jvp alone, the
compiled block against the eager one, which models fall back to torch.func.jvp, and the training loss equal on
both paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditkit.models import dual, forward_mode
from ditkit.models.dit import LN_EPS
from ditkit.recipe import MeanFlowProcess
from ditkit.transport import meanflow as mf
from helpers.models import MEANFLOW_TINY, float64_meanflow_dit

TINY = MEANFLOW_TINY
ODD = dict(depth=3, hidden_size=24, num_heads=3, patch_size=3, input_size=9, in_channels=3, num_classes=5,
           learn_sigma=True, interval_time=True, mlp_ratio=2.5)  # 3 heads of 8, 3×3 patches, 9 tokens
CONFIGS = {
    "adaln-zero": {},
    "learn-sigma": {"learn_sigma": True},
    "adaln": {"conditioning": "adaln"},
    "no-r-embedder": {"interval_time": False},
    "odd": ODD,
}


_model = float64_meanflow_dit


def _draws(model: torch.nn.Module, n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs and a random direction in all of (z, t, r)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.2
    return {"z": randn(*shape), "dz": randn(*shape), "t": t, "dt": randn(n),
            "r": t * torch.rand(n, generator=g, dtype=torch.float64), "dr": randn(n),
            "y": torch.randint(0, cfg.num_classes + 1, (n,), generator=g)}


def _reference(model, d):
    """(u, du) by torch.func.jvp on the forward-differentiable path (the existing MeanFlow JVP)."""
    interval = model.r_embedder is not None

    def u(z, r, t):
        return model(z, t, d["y"], r=r if interval else None)

    return forward_mode.jvp(model, u, (d["z"], d["r"], d["t"]), (d["dz"], d["dr"], d["dt"]))


def _dual(model, d, **kwargs):
    interval = model.r_embedder is not None
    return dual.forward(model, d["z"], d["dz"], d["t"], d["dt"], d["y"], r=d["r"] if interval else None,
                        dr=d["dr"] if interval else None, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dual_forward_equals_torch_func_jvp_in_float64(name):
    """u and du equal torch.func.jvp's to 1e-10 (float64), learned sigma, adaLN, no r embedder and odd sizes."""
    model = _model(**CONFIGS[name])
    assert dual.unsupported(model, {"y": None}) is None
    d = _draws(model)
    (out, tangent), (ref_out, ref_tangent) = _dual(model, d), _reference(model, d)
    assert ref_tangent.abs().max() > 0.1  # a real derivative
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-10, atol=1e-10)


def test_dual_forward_in_training_mode_drops_the_labels_it_is_told_to():
    """Training mode with force_drop_ids: the dropped rows see the null label, as the network's own forward."""
    model = _model(class_dropout_prob=0.1).train()
    d = _draws(model, n=4)
    drop = torch.tensor([1, 0, 1, 0])
    out, tangent = dual.forward(model, d["z"], d["dz"], d["t"], d["dt"], d["y"], drop, r=d["r"], dr=d["dr"])
    ref = forward_mode.jvp(model, lambda z, r, t: model(z, t, d["y"], drop, r=r), (d["z"], d["r"], d["t"]),
                           (d["dz"], d["dr"], d["dt"]))
    torch.testing.assert_close(out, ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, ref[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["adaln-zero", "odd"])
def test_dual_tangent_matches_central_differences(name):
    """du against (u(x + h·dx) − u(x − h·dx))/2h in float64, h = 1e-6: O(h²) truncation, O(1e-16/h) rounding."""
    model = _model(**CONFIGS[name])
    d = _draws(model, seed=4)
    _, tangent = _dual(model, d)
    h = 1e-6

    def u(sign):
        return model(d["z"] + sign * h * d["dz"], d["t"] + sign * h * d["dt"], d["y"], r=d["r"] + sign * h * d["dr"])

    with torch.no_grad():
        fd = (u(1) - u(-1)) / (2 * h)
    assert fd.abs().max() > 0.1
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


# ----------------------------------------------------------------------------------------------- each rule


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_rule(rule, fn, primals):
    """rule(*primals, *tangents) against torch.func.jvp(fn) with random tangents, float64, 1e-12."""
    tangents = tuple(_rand(*p.shape, seed=10 + i) for i, p in enumerate(primals))
    out, tangent = rule(*primals, *tangents)
    ref_out, ref_tangent = torch.func.jvp(fn, primals, tangents)
    assert ref_tangent.abs().max() > 1e-3
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-12, atol=1e-12)


def test_elementwise_and_norm_rules():
    x = _rand(2, 5, 16, seed=1) * 2
    _check_rule(dual.silu, F.silu, (x,))
    _check_rule(dual.gelu_tanh, lambda a: F.gelu(a, approximate="tanh"), (x,))
    _check_rule(lambda a, da: dual.layer_norm(a, da, LN_EPS), lambda a: F.layer_norm(a, (16,), eps=LN_EPS), (x,))
    w, b = _rand(7, 16, seed=2), _rand(7, seed=3)
    _check_rule(lambda a, da: dual.linear(a, da, w, b), lambda a: F.linear(a, w, b), (x,))


def test_modulate_rule():
    def rule(h, shift, scale, dh, dshift, dscale):
        return dual.modulate(h, dh, (shift, dshift), (scale, dscale))

    def fn(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    _check_rule(rule, fn, (_rand(2, 5, 8, seed=1), _rand(2, 8, seed=2), _rand(2, 8, seed=3)))


@pytest.mark.parametrize("tokens,head_dim", [(7, 4), (16, 8)])
def test_attention_rule_with_random_tangents_of_q_k_v(tokens, head_dim):
    """O and dO against torch.func.jvp of the explicit softmax attention, random dQ, dK, dV (and large scores,
    so that the softmax is far from uniform)."""
    q, k, v = (_rand(2, 3, tokens, head_dim, seed=s) * 2 for s in (1, 2, 3))
    _check_rule(dual.attention, forward_mode.math_attention, (q, k, v))


def test_time_features_rule_equals_timestep_embedding_and_its_jvp():
    from ditkit.models.embeddings import timestep_embedding

    for dim in (256, 9):
        _check_rule(lambda t, dt, dim=dim: dual.time_features(t, dt, dim),
                    lambda t, dim=dim: timestep_embedding(t, dim), (_rand(4, seed=5).abs(),))


def test_one_block_rule():
    """dual_block against torch.func.jvp of the DiTBlock itself, in x and c at once."""
    block = _model().blocks[0]
    x, c = _rand(2, 16, 32, seed=1), _rand(2, 32, seed=2)

    def rule(x, c, dx, dc):
        return dual.dual_block(x, dx, *dual.silu(c, dc), dual.BlockWeights.of(block), block.attn.num_heads, True,
                               LN_EPS)

    with forward_mode.plain(block):
        _check_rule(rule, block, (x, c))


# ----------------------------------------------------------------------------------------------- compiled


def test_compiled_block_traces_whole_and_equals_eager(monkeypatch):
    """The compiled path (dynamo tracing the block as one graph, aot_eager on the CPU) equals the eager one, at
    two row counts (the second turns the batch dynamic)."""
    import torch._dynamo

    model = _model(**ODD)
    torch._dynamo.reset()
    block = torch.compile(dual.dual_block, backend="aot_eager", fullgraph=True)  # fails on a graph break
    monkeypatch.setattr(dual, "compiled_block", lambda backend="inductor": block)
    for n in (3, 5):
        d = _draws(model, n=n, seed=n)
        torch.testing.assert_close(_dual(model, d, compiled=True), _dual(model, d), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("overrides,reason", [
    ({"norm": "rmsnorm"}, "knobs norm"), ({"qk_norm": "rmsnorm"}, "qk_norm"), ({"rope": True}, "rope"),
    ({"mlp": "swiglu"}, "mlp"), ({"conditioning": "in-context"}, "in-context"),
    ({"conditioning": "cross-attention"}, "cross-attention"),
    ({"conditioning": "text", "caption_channels": 16, "max_tokens": 4}, "PixArtDiT"),
])
def test_models_the_dual_path_does_not_cover_fall_back(overrides, reason, monkeypatch):
    """unsupported() names why, and meanflow_target then takes torch.func.jvp (dual.forward never runs)."""
    model = _model(**overrides)
    assert reason in dual.unsupported(model, {"y": None})
    monkeypatch.setattr(dual, "forward", lambda *a, **k: pytest.fail("the dual path ran on an uncovered model"))
    if overrides.get("conditioning") == "text":
        return  # its inputs are captions; the reason is what matters here
    d = _draws(model, n=2)
    target = mf.meanflow_target(model, d["z"], d["r"], d["t"], d["dz"], {"y": d["y"]})
    assert torch.isfinite(target).all()


def test_routing_unknown_inputs_and_sharding_fall_back():
    model = _model().train()
    assert "y" in dual.unsupported(model, {})
    assert "mask" in dual.unsupported(model, {"y": None, "mask": None})
    model.training_path = object()
    assert "TREAD" in dual.unsupported(model, {"y": None})
    assert dual.unsupported(model.eval(), {"y": None}) is None  # sampling does not route


def test_covered_model_takes_the_dual_path_through_the_training_wrapper(monkeypatch):
    """A covered DiT behind the training step's wrapper (a function with `.network`) runs the dual path, and
    its target equals the torch.func.jvp path's to round-off."""
    model = _model(**ODD)
    d = _draws(model, n=4)
    d["r"][1] = d["t"][1]
    kwargs = {"y": d["y"]}
    with monkeypatch.context() as m:  # the reference: torch.func.jvp on the forward-differentiable path
        m.setattr(dual, "covers", lambda *a: False)
        old = mf.meanflow_target(model, d["z"], d["r"], d["t"], d["dz"], kwargs)

    def wrapper(*a, **k):
        return model(*a, **k)

    wrapper.network = model
    monkeypatch.setattr(forward_mode, "jvp", lambda *a, **k: pytest.fail("took torch.func.jvp"))
    new = mf.meanflow_target(wrapper, d["z"], d["r"], d["t"], d["dz"], kwargs)
    torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-10)
    assert torch.equal(new[1], d["dz"][1])


def test_training_loss_equal_on_both_paths(monkeypatch):
    """MeanFlow's loss (folded guidance, class dropout) for the same draws: the dual path and torch.func.jvp."""
    model = _model(class_dropout_prob=0.1).train()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    draws = torch.rand(8, 3, generator=g, dtype=torch.float64)
    kwargs = {"y": torch.randint(0, 3, (8,), generator=g), "force_drop_ids": torch.tensor([0, 1] * 4)}
    training = mf.MeanFlowTraining(MeanFlowProcess(omega=1.5, kappa=0.2))
    new = training.training_losses(model, x, draws, kwargs, noise)
    monkeypatch.setattr(dual, "covers", lambda *a: False)
    old = training.training_losses(model, x, draws, kwargs, noise)
    assert (mf.sample_times(draws, training.process)[0] != mf.sample_times(draws, training.process)[1]).any()
    for key in ("loss", "mse"):
        torch.testing.assert_close(new[key], old[key], rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_the_plain_path_to_bf16_accuracy():
    """Under CPU bf16 autocast (as the training step runs) du agrees with torch.func.jvp's within bf16 error."""
    model = _model().float()
    d = {k: (v.float() if v.is_floating_point() else v) for k, v in _draws(model, n=2).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, tangent = _dual(model, d)
        _, ref = _reference(model, d)
    assert tangent.dtype == ref.dtype
    scale = float(ref.float().abs().max())
    torch.testing.assert_close(tangent.float(), ref.float(), rtol=0.05, atol=0.03 * scale)


def test_the_training_step_takes_the_dual_path_and_reports_the_same_loss(monkeypatch):
    """One `TrainStep` (its fp32 wrapper carries the module) runs the dual JVP, and its loss equals the step's
    with torch.func.jvp from the same weights and draws."""
    import copy

    from ditkit.objectives import objective_for
    from ditkit.recipe import Recipe
    from ditkit.train.step import TrainStep

    model = _model(class_dropout_prob=0.1).float().train()
    recipe = Recipe(model=model.config, process=MeanFlowProcess(omega=1.5, ratio_r_neq_t=0.75))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)

    def loss(net, target, name, value):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        step = TrainStep(net, net, copy.deepcopy(net), opt, objective_for(recipe).training,
                         device=torch.device("cpu"), precision="fp32", global_batch=4)
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            return float(step(x, y, 0).terms[0])

    new = loss(copy.deepcopy(model), forward_mode, "jvp", lambda *a, **k: pytest.fail("took torch.func.jvp"))
    old = loss(copy.deepcopy(model), dual, "covers", lambda *a: False)
    assert new == pytest.approx(old, rel=1e-5)
