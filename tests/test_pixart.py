"""The text-conditional DiT (PixArt-α) against references written here: a float64 block from the formulas,
masks by dropping tokens, the dropout rate by a binomial bound, flops by PyTorch's own counter."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import ditkit
from ditkit.models.config import DiTConfig
from ditkit.models.flops import count_macs, count_params
from ditkit.models.pixart import PixArtDiT
from helpers.models import randomise
from helpers.models import tiny_text_dit as tiny_text

C, L = 24, 6  # caption features and tokens of the tiny model
randomised = partial(randomise, std=0.3)  # (model, seed=0): every trained weight random, eval


def inputs(n: int = 3, seed: int = 1, tokens: int = L):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=gen)
    t = torch.linspace(1, 900, n)
    y = torch.randn(n, tokens, C, generator=gen)
    return x, t, y


# --------------------------------------------------------------------------- a float64 reference block


def layer_norm(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def attend(q, k, v, heads):
    """Softmax attention written out: per head, softmax(q kᵀ / √d) v over the given keys only."""
    n, t, d = q.shape
    hd = d // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., sl] = w @ v[..., sl]
    return out


def reference_block(block, x, y, t0):
    """PixArt-α's block from the paper's formulas, float64; y holds only the real caption tokens."""
    p = {k: v.double() for k, v in block.state_dict().items()}
    lin = lambda z, name: z @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    d = x.shape[-1]
    mod = p["scale_shift_table"][None] + t0.reshape(x.shape[0], 6, d)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i : i + 1] for i in range(6))
    h = layer_norm(x) * (1 + scale1) + shift1
    q, k, v = lin(h, "attn.qkv").split(d, dim=-1)
    x = x + gate1 * lin(attend(q, k, v, block.attn.num_heads), "attn.proj")
    q = lin(x, "cross_attn.q_linear")
    k, v = lin(y, "cross_attn.kv_linear").split(d, dim=-1)
    x = x + lin(attend(q, k, v, block.cross_attn.num_heads), "cross_attn.proj")
    h = layer_norm(x) * (1 + scale2) + shift2
    return x + gate2 * lin(gelu_tanh(lin(h, "mlp.fc1")), "mlp.fc2")


def test_block_matches_the_float64_formulas_and_ignores_masked_tokens():
    model = randomised(tiny_text()).double()
    block = model.blocks[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 64, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 5, 64, generator=gen, dtype=torch.float64)
    t0 = torch.randn(2, 6 * 64, generator=gen, dtype=torch.float64)
    lengths = [5, 2]  # the second caption has 3 padding tokens
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]
    with torch.no_grad():
        ours = block(x, y, t0, mask)
        for i, n in enumerate(lengths):
            ref = reference_block(block, x[i : i + 1], y[i : i + 1, :n], t0[i : i + 1])
            torch.testing.assert_close(ours[i : i + 1], ref, rtol=0, atol=1e-10)


def test_padding_tokens_change_nothing():
    """A caption padded with garbage under mask 0 gives the output of the caption alone (float32 round-off)."""
    model = randomised(tiny_text())
    x, t, y = inputs(tokens=4)
    garbage = torch.randn(3, 2, C) * 100
    padded = torch.cat([y, garbage], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3)
    with torch.no_grad():
        alone = model(x, t, y)
        with_padding = model(x, t, padded, mask)
        # Dropped to the null caption, a caption's mask still applies: the null caption's first 4 tokens.
        drop = torch.ones(3, dtype=torch.long)
        null_alone = model(x, t, y, force_drop_ids=drop)
        null_padded = model(x, t, padded, mask, force_drop_ids=drop)
    torch.testing.assert_close(with_padding, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(null_padded, null_alone, rtol=0, atol=1e-5)
    assert (alone - null_alone).abs().max() > 1e-2  # the caption matters at all


def test_pixart_layout_of_captions_and_a_mask_of_ones_are_accepted():
    model = randomised(tiny_text())
    x, t, y = inputs()
    with torch.no_grad():
        plain = model(x, t, y)
        torch.testing.assert_close(model(x, t, y[:, None], torch.ones(3, L)), plain, rtol=0, atol=1e-6)


def test_zero_initialisation_makes_every_block_the_identity_and_the_output_zero():
    model = tiny_text()
    x, t, y = inputs()
    tokens = torch.randn(3, 16, 64)
    t0 = model.t_block(model.t_embedder(t))
    context = model.y_embedder(y, False)
    mask = torch.ones(3, 1, 1, L, dtype=torch.bool)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(tokens, context, t0, mask), tokens)
        assert torch.count_nonzero(model(x, t, y)) == 0
    assert model.blocks[0].scale_shift_table[[0, 1, 3, 4]].abs().sum() > 0  # only the gates start at zero


def test_caption_dropout_rate_and_the_null_caption():
    p = 0.3
    model = tiny_text(class_dropout_prob=p)
    n = 20_000
    caption = torch.randn(n, 3, C)
    torch.manual_seed(0)
    out = model.y_embedder.token_drop(caption)
    null = model.y_embedder.y_embedding[:3]
    dropped = (out == null).all(dim=(1, 2))
    kept = (out == caption).all(dim=(1, 2))
    assert bool((dropped | kept).all())
    # Binomial(n, p): 5 standard deviations either side.
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    forced = model.y_embedder.token_drop(caption[:4], torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced[0], null) and torch.equal(forced[1], caption[1])


def test_training_mode_drops_captions_eval_mode_never():
    model = randomised(tiny_text(class_dropout_prob=0.5))
    x, t, y = inputs(n=8)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x, t, y), model(x, t, y))
        model.train()
        cond = model(x, t, y, force_drop_ids=torch.zeros(8))
        null = model(x, t, y, force_drop_ids=torch.ones(8))
        model.eval()
        torch.testing.assert_close(cond, model(x, t, y), rtol=0, atol=1e-6)
        torch.testing.assert_close(null, model(x, t, model.null_caption(8, L)), rtol=0, atol=1e-6)


def _float64(model: torch.nn.Module, *tensors: torch.Tensor):
    """The model and inputs in float64: the guidance formula is then checked to 1e-10, not to float32 round-off,
    which differs between a batch of 2 and of 4 rows (other GEMM blockings) and grows with the guidance scale."""
    return (model.double(), *(v.double() if v.is_floating_point() else v for v in tensors))


def test_forward_with_cfg_follows_the_formula_with_the_null_caption():
    model, x, t, y = _float64(randomised(tiny_text()), *inputs(n=2))
    null = model.null_caption(2, L)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0,
                                     guide_channels="all")
        cond, uncond = model(x, t, y), model(x, t, null)
    expected = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    tol = 1e-10 * expected.abs().max().item()
    torch.testing.assert_close(out[:2, :4], expected, rtol=0, atol=tol)
    torch.testing.assert_close(out[2:, :4], expected, rtol=0, atol=tol)


def pixart_keys(depth: int) -> set[str]:
    """The key set of PixArt-α's released state_dicts, written out from its model files."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.y_embedding",
            "final_layer.scale_shift_table", "final_layer.linear.weight", "final_layer.linear.bias"}
    for layer in ("t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
                  "y_embedder.y_proj.fc2"):
        keys |= {f"{layer}.weight", f"{layer}.bias"}
    for b in range(depth):
        keys.add(f"blocks.{b}.scale_shift_table")
        for layer in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                      "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{b}.{layer}.weight", f"blocks.{b}.{layer}.bias"}
    return keys


def test_state_dict_keys_are_pixart_alphas():
    assert set(tiny_text(depth=3).state_dict()) == pixart_keys(3)


def expected_text_params(depth: int, d: int, p: int, c: int, caption: int, tokens: int, patches: int) -> int:
    """Parameters of a PixArt-α model written out layer by layer (learned variance: 2c outputs)."""
    patch = c * p * p * d + d
    temb = 256 * d + d + d * d + d
    t_block = d * 6 * d + 6 * d
    captions = caption * d + d + d * d + d + tokens * caption
    cross = (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d)  # q, kv, output projection
    block = 6 * d + (d * 3 * d + 3 * d) + (d * d + d) + cross + (d * 4 * d + 4 * d) + (4 * d * d + d)
    final = 2 * d + d * p * p * 2 * c + p * p * 2 * c
    return patches * d + patch + temb + t_block + captions + depth * block + final


def test_parameter_count_of_pixart_xl_2():
    cfg = DiTConfig.from_name("DiT-XL/2", conditioning="text", input_size=64)  # PixArt-XL-2-512x512
    n = count_params(cfg)
    assert n == expected_text_params(28, 1152, 2, 4, 4096, 120, 1024)
    # Without the null caption and the fixed positions, the count diffusers reports for PixArt-α (0.61B).
    assert abs((n - 120 * 4096 - 1024 * 1152) / 1e6 - 610.9) < 0.1


def test_analytic_flops_match_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_text(input_size=16)
    x = torch.randn(1, 4, 16, 16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, torch.tensor([10]), torch.randn(1, L, C))
    measured = counter.get_total_flops() / 2
    assert abs(measured - count_macs(model.config)) / measured < 0.01
    # The cross-attention is in it: a model reading twice the tokens costs more by the formula's amount.
    longer = count_macs(tiny_text(input_size=16, max_tokens=2 * L).config) - count_macs(model.config)
    d, tokens = 64, 64
    assert longer == 2 * (2 * L * d * d + 2 * tokens * L * d) + L * (C * d + d * d)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomised(tiny_text()).train()
    x, t, y = inputs()
    drop = torch.tensor([0, 1, 0])

    def grads():
        model.zero_grad()
        model(x, t, y, force_drop_ids=drop).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_config_of_class_models_stores_no_text_fields_and_text_round_trips():
    assert "caption_channels" not in DiTConfig().to_dict()
    cfg = tiny_text(interpolation_scale=2.0).config
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ditkit.UserError, match="text models"):
        DiTConfig(interpolation_scale=2.0)
    with pytest.raises(ditkit.UserError, match="PixArtDiT"):
        ditkit.DiT(cfg)


def test_wrong_caption_shape_is_named():
    model = tiny_text()
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="captions must be"):
        model(x, t, torch.randn(3, L, C + 1))
    with pytest.raises(ValueError, match="at most"):
        model(x, t, torch.randn(3, L + 1, C), force_drop_ids=torch.ones(3))


def test_a_text_model_learns_to_read_its_caption():
    """Two captions, two targets: a few dozen steps separate them (the cross-attention carries the signal)."""
    torch.manual_seed(0)
    model = tiny_text(class_dropout_prob=0.0).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    y = torch.randn(2, L, C)
    target = torch.stack([torch.ones(8, 8, 8), -torch.ones(8, 8, 8)])
    for _ in range(80):  # fresh inputs and timesteps each step: only the caption tells the targets apart
        x, t = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000
        opt.zero_grad()
        F.mse_loss(model(x, t, y), target).backward()
        opt.step()
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model.eval()(x, torch.tensor([500.0, 500.0]), y)
    assert out[0].mean() > 0.5 and out[1].mean() < -0.5


def test_text_checkpoints_save_load_and_bare_pixart_state_dicts_infer_their_config(tmp_path):
    model = randomised(tiny_text(interpolation_scale=2.0, input_size=16, hidden_size=128, num_heads=2))
    path = tmp_path / "text.safetensors"
    ditkit.save_model(model, path)
    loaded = ditkit.load_model(path)
    assert isinstance(loaded, PixArtDiT) and loaded.config == model.config
    # A bare state_dict as PixArt-α releases it (.pth, no config): the config comes from the tensors.
    bare = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": model.state_dict()}, bare)
    inferred = ditkit.load_model(bare)
    assert inferred.config.to_dict() == {**model.config.to_dict(), "class_dropout_prob": 0.1}
    _, t, y = inputs()
    z = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(inferred(z, t, y), model(z, t, y))


def test_guided_captions_use_the_null_caption_or_a_negative_prompt():
    """Every sampler gets guidance through this wrapper: its halves must be the formula's."""
    from ditkit.diffusion.guidance import guided_captions

    model, x, t, y = _float64(randomised(tiny_text()), *inputs(n=2, tokens=5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        cond = model(x, t, y, mask)
        null = model(x, t, y, mask, force_drop_ids=torch.ones(2))
        out = guided_captions(model, 3.0)(x, t, y, mask=mask)
        expected = null + 3.0 * (cond - null)
        tol = 1e-10 * expected.abs().max().item()
        torch.testing.assert_close(out[:, :4], expected[:, :4], rtol=0, atol=tol)
        # A negative prompt of another length (one row for the batch): padded, it is what the model says of it.
        neg, neg_mask = torch.randn(1, 3, C, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
        negative = model(x, t, neg.expand(2, -1, -1), neg_mask.expand(2, -1))
        out = guided_captions(model, 3.0, negative=(neg, neg_mask))(x, t, y, mask=mask)
        expected = negative + 3.0 * (cond - negative)
        torch.testing.assert_close(out[:, :4], expected[:, :4], rtol=0, atol=1e-10 * expected.abs().max().item())
        torch.testing.assert_close(guided_captions(model, 1.0)(x, t, y, mask=mask), cond, rtol=0, atol=0)
        # The variance channels come from the conditional half (as for class guidance).
        torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=0, atol=1e-10 * cond.abs().max().item())
