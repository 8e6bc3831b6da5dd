"""TREAD token routing (ditkit.models.routing): the plain loop without routing, exactly the configured fraction
routed around exactly the configured blocks, an independent re-implementation, sampling unchanged."""

from __future__ import annotations

import pytest
import torch

from ditkit.models import DiT, DiTConfig
from ditkit.models.routing import TrainingPath, keep_ids, kept_count
from ditkit.training_methods import Routing

CONFIG = DiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=5, num_heads=2, num_classes=10)


def _model() -> DiT:
    torch.manual_seed(0)
    model = DiT(CONFIG)
    for p in model.parameters():  # nonzero gates: every block changes its tokens
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g) * 999, torch.tensor([1, 4, 10])


def _forward(model, path=None, train=True):
    x, t, y = _inputs()
    model.training_path = path
    model.train(train)
    return model(x, t, y, force_drop_ids=torch.zeros(3, dtype=torch.long))


def test_no_routing_is_the_plain_loop_exactly():
    model = _model()
    plain = _forward(model)
    assert torch.equal(_forward(model, TrainingPath()), plain)
    assert torch.equal(_forward(model, TrainingPath(routing=Routing(0.0, 1, 3))), plain)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.7])
def test_exactly_the_configured_fraction_skips_exactly_the_configured_blocks(rate):
    model = _model()
    seen: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0].shape[1], args[0], out)))
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    _forward(model, TrainingPath(routing=Routing(rate, 1, 3), scores=scores))
    keep = kept_count(16, rate)
    assert keep == 16 - int(16 * rate)
    assert [seen[i][0] for i in range(5)] == [16, keep, keep, keep, 16]
    ids = keep_ids(scores, rate)
    routed = torch.ones(3, 16, dtype=torch.bool)
    routed[torch.arange(3)[:, None], ids] = False
    assert int(routed.sum()) == 3 * int(16 * rate)
    before, after = seen[0][2], seen[4][1]  # the tokens entering block 1, and leaving block 3 (re-inserted)
    assert torch.equal(after[routed], before[routed])  # the routed tokens skipped blocks 1..3 untouched
    assert not torch.isclose(after[~routed], before[~routed]).all()


def test_routed_forward_matches_an_independent_reimplementation():
    model = _model()
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(7))
    out = _forward(model, TrainingPath(routing=Routing(0.5, 1, 3), scores=scores))
    x, t, y = _inputs()
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    order = torch.sort(scores, dim=1).indices[:, :8]
    tokens = model.blocks[0](tokens, c)
    sub = torch.stack([tokens[n, order[n]] for n in range(3)])
    for i in (1, 2, 3):
        sub = model.blocks[i](sub, c)
    merged = tokens.clone()
    for n in range(3):
        merged[n, order[n]] = sub[n]
    expected = model.unpatchify(model.final_layer(model.blocks[4](merged, c), c))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_sampling_runs_every_token_exactly():
    model = _model()
    plain = _forward(model, None, train=False)
    assert torch.equal(_forward(model, TrainingPath(routing=Routing(0.5, 1, 3)), train=False), plain)


def test_routing_is_fixed_by_seed_and_step_and_differs_between_steps():
    from ditkit.train.methods import MethodHooks
    from ditkit.training_methods import TrainingMethods

    hooks = MethodHooks(TrainingMethods(routing=Routing(0.5, 1, 3)))
    model = hooks.attach(_model())
    hooks.use(model)
    draws = []
    for step in (4, 4, 5):
        hooks.before_forward(0, step, 6, slice(3, 6), 16, torch.device("cpu"))
        draws.append(hooks.path.scores.clone())
    assert draws[0].shape == (3, 16)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
