"""The DiT model family against independent references written here (float64 formulas, the paper's tables)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import ditkit
from ditkit.models.config import CLASS_CONDITIONINGS, DiTConfig
from ditkit.models.embeddings import sincos_2d, timestep_embedding
from ditkit.models.flops import count_macs, count_params
from helpers.models import tiny_dit

TINY = dict(input_size=8, in_channels=4, num_classes=10)


def tiny(conditioning: str = "adaln-zero", **kw) -> ditkit.DiT:
    """A 2-block, 64-wide DiT: fast enough for many tests on a 2-core CPU."""
    return tiny_dit(**{"conditioning": conditioning, **TINY, **kw})


def test_registry_lists_the_twelve_paper_models():
    names = ditkit.list_models()
    assert len(names) == 12
    assert {"DiT-S/8", "DiT-B/4", "DiT-L/2", "DiT-XL/2"} <= set(names)
    cfg = DiTConfig.from_name("DiT-L/4", num_classes=1)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.num_classes) == (24, 1024, 16, 4, 1)


def test_patchify_unpatchify_round_trip():
    model = tiny(learn_sigma=False)
    x = torch.randn(3, 4, 8, 8)
    p, g = 2, 4
    # Independent patchify: token (i, j) holds the p×p×C patch at rows i·p.., cols j·p.., channel-last inside.
    tokens = torch.stack(
        [x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(0, 2, 3, 1).reshape(3, -1) for i in range(g)
         for j in range(g)],
        dim=1,
    )
    assert torch.equal(model.unpatchify(tokens), x)


def test_sincos_positions_against_float64_formula():
    dim, grid = 16, 5
    table = sincos_2d(dim, grid)
    assert table.shape == (grid * grid, dim)
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            expected = []
            for pos in (col, row):  # first half: column, second half: row (the official/MAE order)
                freqs = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
                expected += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
            np.testing.assert_allclose(table[row * grid + col], expected, rtol=0, atol=1e-12)


def test_model_stores_positions_as_pos_embed():
    model = tiny()
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), sincos_2d(64, 4), atol=1e-6)
    assert not model.pos_embed.requires_grad


def test_timestep_embedding_against_float64_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    dim = 10
    emb = timestep_embedding(t, dim).double()
    half = dim // 2
    for n, tv in enumerate(t.tolist()):
        freqs = [math.exp(-math.log(10000.0) * k / half) for k in range(half)]
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        np.testing.assert_allclose(emb[n].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert timestep_embedding(t, 7).shape == (4, 7)  # odd dims are zero-padded


@pytest.mark.parametrize("conditioning", CLASS_CONDITIONINGS)
def test_zero_initialised_model_returns_zeros(conditioning):
    model = tiny(conditioning)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 10]))
    assert out.shape == (2, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def expected_params(depth: int, d: int, p: int, c: int = 4, classes: int = 1000, tokens: int = 256) -> int:
    """Parameter count of an adaLN-Zero DiT written out layer by layer."""
    out = 2 * c
    patch = c * p * p * d + d
    temb = 256 * d + d + d * d + d
    label = (classes + 1) * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    final = (d * p * p * out + p * p * out) + (d * 2 * d + 2 * d)
    return tokens * d + patch + temb + label + depth * block + final


PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("name", ditkit.MODEL_NAMES)
def test_parameter_count_of_every_config(name):
    cfg = DiTConfig.from_name(name)
    n = count_params(cfg)
    assert n == expected_params(cfg.depth, cfg.hidden_size, cfg.patch_size, tokens=cfg.num_patches)
    size = name.split("-")[1].split("/")[0]
    assert abs(n / 1e6 - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.01
    if name == "DiT-XL/2":
        assert n == 675_129_632  # the count the official code prints for DiT-XL/2


PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}


def test_gflops_reproduce_paper_table4_within_one_percent():
    for name, paper in PAPER_GFLOPS.items():
        ours = count_macs(DiTConfig.from_name(name)) / 1e9
        assert abs(ours - paper) / paper < 0.01, (name, ours, paper)


@pytest.mark.parametrize("conditioning", CLASS_CONDITIONINGS)
def test_analytic_flops_match_torch_flop_counter(conditioning):
    """A second, independent count: PyTorch's FlopCounterMode (2 flops per multiply-add) on a real forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(conditioning, input_size=16)
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into batched matmuls, which the counter sees.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.tensor([3]))
    measured = counter.get_total_flops() / 2
    assert abs(measured - count_macs(model.config)) / measured < 0.01


def test_flops_cli_json():
    cmd = [sys.executable, "-m", "ditkit", "flops", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["model"] for r in rows] == list(ditkit.MODEL_NAMES)
    assert set(rows[0]) == {"model", "params", "gflops"}
    assert abs(rows[-1]["gflops"] - 118.64) < 0.5


def official_keys(depth: int) -> set[str]:
    """The key set of the authors' checkpoints, written out from their file layout (DESIGN.md)."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    keys |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for b in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{b}.{layer}.weight", f"blocks.{b}.{layer}.bias"}
    keys |= {f"final_layer.{layer}.{w}" for layer in ("linear", "adaLN_modulation.1") for w in ("weight", "bias")}
    return keys


def official_like_state_dict(depth: int = 2) -> dict[str, torch.Tensor]:
    model = tiny(depth=depth)
    torch.manual_seed(0)
    return {k: torch.randn_like(v) if k != "pos_embed" else v.clone() for k, v in model.state_dict().items()}


def test_state_dict_keys_are_exactly_the_official_ones():
    assert set(tiny(depth=3).state_dict()) == official_keys(3)


def test_bare_official_state_dict_loads_strictly(tmp_path):
    sd = official_like_state_dict()
    assert set(sd) == official_keys(2)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(sd, path)
    model = ditkit.load_model(path)  # config inferred from shapes
    assert model.config.input_size == 8 and model.config.num_classes == 10 and model.config.depth == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_official_train_checkpoint_takes_ema(tmp_path):
    import argparse

    ema = official_like_state_dict()
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    args = argparse.Namespace(model="DiT-XL/2", image_size=64, num_classes=10, epochs=1400)
    path = tmp_path / "0010000.pt"
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()}, "ema": ema, "opt": {}, "args": args}, path)
    model = ditkit.load_model(path)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])


def test_ditkit_safetensors_round_trip(tmp_path):
    model = tiny("cross-attention", num_classes=1)
    path = tmp_path / "m.safetensors"
    ditkit.save_model(model, path)
    loaded = ditkit.load_model(path)
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)


def test_config_inferred_for_each_conditioning(tmp_path):
    for cond in CLASS_CONDITIONINGS:
        model = tiny(cond, learn_sigma=False)
        path = tmp_path / f"{cond}.pt"
        torch.save(model.state_dict(), path)
        # Heads leave no trace in the shapes: inferred only for the paper sizes, so state it here.
        assert ditkit.load_model(path, num_heads=4).config == model.config


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    sd = official_like_state_dict()
    sd["x"] = _Payload(str(marker))
    torch.save(sd, path)
    with pytest.raises(ditkit.UserError, match="refusing to load"):
        ditkit.load_model(path)
    assert not marker.exists()


def test_mismatched_checkpoint_names_tensor_and_shapes(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ditkit.UserError) as err:
        ditkit.load_model(path, model="DiT-S/2", input_size=8, num_classes=10)
    msg = str(err.value)
    assert "\n" not in msg
    assert "pos_embed" in msg and "(1, 16, 64)" in msg and "(1, 16, 384)" in msg


def test_bad_config_values_get_one_line():
    with pytest.raises(ditkit.UserError, match="not divisible by patch_size"):
        ditkit.create_model("DiT-S/8", input_size=12)
    with pytest.raises(ditkit.UserError, match="unknown model"):
        ditkit.create_model("DiT-M/2")
    with pytest.raises(ditkit.UserError, match="conditioning"):
        ditkit.create_model("DiT-S/8", input_size=8, conditioning="film")


def test_forward_with_cfg_follows_the_formula():
    torch.manual_seed(0)
    model = tiny()
    for p in model.parameters():  # leave the zero init so the output depends on inputs
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    xx = torch.cat([x, x])
    t = torch.tensor([10, 600, 10, 600])
    y = torch.tensor([3, 7, 10, 10])
    with torch.no_grad():
        full = model(xx, t, y)
        cond, uncond = full[:2], full[2:]
        for channels, k in ((3, 3), ("all", 4)):
            out = model.forward_with_cfg(xx, t, y, 4.0, guide_channels=channels)
            guided = uncond[:, :k] + 4.0 * (cond[:, :k] - uncond[:, :k])
            torch.testing.assert_close(out[:2, :k], guided, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[2:, :k], guided, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[:, k:], full[:, k:], rtol=1e-5, atol=1e-5)


def test_label_dropout_uses_null_class():
    model = tiny()
    labels = torch.tensor([1, 2, 3, 4])
    dropped = model.y_embedder.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert dropped.tolist() == [10, 2, 10, 4]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.train()
    model.y_embedder.dropout_prob = 0.0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2])
    model(x, t, y).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x, t, y).square().mean().backward()
    for a, p in zip(ref, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conditioning", CLASS_CONDITIONINGS)
def test_each_conditioning_block_trains(conditioning):
    """Noise prediction on a fixed small set: the loss after 60 Adam steps is well below the start."""
    torch.manual_seed(0)
    model = tiny(conditioning, learn_sigma=False).train()
    data = torch.randn(16, 4, 8, 8)
    labels = torch.arange(16) % 10
    alphas_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        t = torch.randint(0, 1000, (16,))
        noise = torch.randn_like(data)
        a = alphas_bar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * data + (1 - a).sqrt() * noise
        loss = (model(xt, t, labels) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-10:])
