"""The modern recipe's layers (models/knobs.py) against float64 formulas, LightningDiT's own model (a fixture
built from its code), the fused-kernel routing, and the model config / recipe records of the switches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ditkit.models import DiTConfig, build_model, create_model, kernels
from ditkit.models.knobs import RMSNorm, Rope2D, SwiGLU, rope_tables, swiglu_hidden
from ditkit.runtime.errors import UserError
from ditkit.weights.checkpoints import infer_config

FIXTURE = Path(__file__).with_name("fixtures") / "lightningdit_tiny.safetensors"
ALL = dict(norm="rmsnorm", qk_norm="rmsnorm", rope=True, mlp="swiglu")
TINY = dict(input_size=8, num_classes=10, depth=2, hidden_size=48, num_heads=4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_rmsnorm_matches_the_float64_formula():
    torch.manual_seed(0)
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24) * 3 + 1
    x64, w64 = x.double(), norm.weight.double()
    ref = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * w64
    assert rel(norm(x), ref) < 1e-6
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # computed in fp32, handed back in the input's dtype


def _complex_rope(x: torch.Tensor, grid: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE written independently: each feature pair a complex number turned by e^{iθ}; the first half of the
    features by the row angle, the second by the column angle (float64)."""
    n, h, t, d = x.shape
    half = d // 2
    freqs = theta ** (-torch.arange(half // 2, dtype=torch.float64) * 2 / half)
    rows = torch.arange(t, dtype=torch.float64) // grid
    cols = torch.arange(t, dtype=torch.float64) % grid
    angle = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (t, d/2): one angle per pair
    z = torch.view_as_complex(x.double().reshape(n, h, t, d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(n, h, t, d)


def test_rope_is_a_rotation_of_feature_pairs_by_row_and_column_angles():
    grid, d = 4, 16
    rope = Rope2D(d, grid)
    x = torch.randn(2, 3, grid * grid, d)
    assert rel(rope(x), _complex_rope(x, grid)) < 1e-6
    assert torch.allclose(rope(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # rotations keep the length
    with pytest.raises(UserError, match="every token"):  # a subset of the tokens (token routing) is refused
        rope(x[:, :, :10])


def test_rope_scores_depend_only_on_the_offset_between_positions():
    grid, d = 6, 16
    cos, sin = rope_tables(d, grid)
    rope = Rope2D(d, grid).double()
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    at = lambda v: rope(v.expand(1, 1, grid * grid, d))[0, 0]  # noqa: E731  the vector placed at every position

    def score(p: tuple[int, int], r: tuple[int, int]) -> float:
        return float(at(q)[p[0] * grid + p[1]] @ at(k)[r[0] * grid + r[1]])

    same_offset = [score((0, 0), (2, 1)), score((3, 2), (5, 3)), score((1, 4), (3, 5))]
    assert max(same_offset) - min(same_offset) < 1e-6 * abs(same_offset[0])  # the tables are float32
    assert abs(score((0, 0), (2, 1)) - score((0, 0), (1, 2))) > 1e-3  # rows and columns are told apart
    assert cos.shape == (grid * grid, d) and sin.shape == (grid * grid, d)


def test_swiglu_matches_the_float64_formula_and_lightningdits_width():
    torch.manual_seed(0)
    mlp = SwiGLU(12, swiglu_hidden(12, 4.0))
    x = torch.randn(2, 5, 12)
    w12, b12 = mlp.w12.weight.double(), mlp.w12.bias.double()
    h = mlp.w3.weight.shape[1]
    a, b = x.double() @ w12[:h].T + b12[:h], x.double() @ w12[h:].T + b12[h:]
    ref = (a / (1 + torch.exp(-a)) * b) @ mlp.w3.weight.double().T + mlp.w3.bias.double()
    assert rel(mlp(x), ref) < 1e-6
    assert swiglu_hidden(1152, 4.0) == 3072 and swiglu_hidden(12, 4.0) == 32  # int(2/3 · int(D · ratio))


def _attention_reference(model, x: torch.Tensor) -> torch.Tensor:
    """Block 0's attention with QK-norm and RoPE re-derived in float64 from the formulas."""
    attn, heads = model.blocks[0].attn, model.config.num_heads
    n, t, d = x.shape
    qkv = x.double() @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    rms = lambda z, w: z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-6) * w.double()  # noqa: E731
    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k = _complex_rope(q, model.config.grid_size), _complex_rope(k, model.config.grid_size)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, t, d)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def test_qk_norm_and_rope_attention_match_float64():
    torch.manual_seed(0)
    model = create_model("DiT-S/2", **TINY, qk_norm="rmsnorm", rope=True)
    with torch.no_grad():
        for norm in (model.blocks[0].attn.q_norm, model.blocks[0].attn.k_norm):
            norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, model.config.num_patches, 48)
    assert rel(model.blocks[0].attn(x), _attention_reference(model, x)) < 1e-5


def _fixture_variant(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(FIXTURE))
    state = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
    return state, tensors


@pytest.mark.parametrize("name", ["released", "qknorm", "qknorm_ln"])
def test_lightningdit_state_dicts_load_strictly_and_match_their_outputs(name):
    """tests/fixtures/lightningdit_tiny.safetensors: LightningDiT's own model class at tiny sizes (weights stored
    exactly in fp16), its outputs for fixed inputs; see tests/fixtures/README.md for how it was made."""
    state, tensors = _fixture_variant(name)
    model = build_model(infer_config(state)).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(tensors["input.x"], tensors["input.t"], tensors["input.y"])
    assert rel(out, tensors[f"output.{name}"]) < 1e-6  # float32 round-off (measured 2-3e-7)
    if model.config.rope:
        assert torch.equal(model.feat_rope.freqs_cos, Rope2D(8, 4).freqs_cos)  # ditkit builds LightningDiT's table


def test_a_lightningdit_training_checkpoint_loads_with_its_recipe(tmp_path):
    """LightningDiT's train.py writes {"model", "ema", "opt", "config": its YAML}: the EMA loads strictly and the
    YAML becomes the recipe (flow, logit-normal t, the cosine term, its time shift and guidance interval)."""
    from ditkit.weights.checkpoints import checkpoint_recipe, read_checkpoint
    from ditkit.weights.checkpoints import load_model as load

    state, tensors = _fixture_variant("released")
    yaml = {"model": {"model_type": "LightningDiT-XL/1", "use_swiglu": True, "use_rope": True, "use_rmsnorm": True},
            "transport": {"path_type": "Linear", "prediction": "velocity", "use_cosine_loss": True,
                          "use_lognorm": True},
            "sample": {"timestep_shift": 0.3, "cfg_interval_start": 0.11},
            "data": {"latent_multiplier": 1.0}, "vae": {"model_name": "vavae_f16d32", "downsample_ratio": 16}}
    path = tmp_path / "0080000.pt"
    torch.save({"model": {k: v + 1 for k, v in state.items()}, "ema": state, "opt": {}, "config": yaml}, path)
    model = load(path)
    with torch.no_grad():
        assert rel(model(tensors["input.x"], tensors["input.t"], tensors["input.y"]), tensors["output.released"]) < 1e-6
    recipe = checkpoint_recipe(read_checkpoint(path), model.config)
    p, s = recipe.process, recipe.sampling
    assert (p.kind, p.t_sampling, p.cosine_weight) == ("flow", "lognormal", 1.0)
    assert s.time_shift == pytest.approx(1 / 0.3) and s.guidance_interval == (0.11, 1.0)
    assert (recipe.latents.vae, recipe.latents.downsample) == ("vavae_f16d32", 16)


def test_default_switches_leave_the_paper_dit_unchanged():
    plain = create_model("DiT-S/2", **TINY)
    assert not plain.config.knobs and not set(plain.config.to_dict()) & set(ALL)
    assert not any("rope" in k or "norm" in k or "w12" in k for k in plain.state_dict())
    knobbed = DiTConfig.from_dict(create_model("DiT-S/2", **TINY, **ALL).config.to_dict())
    assert knobbed.knobs == ALL  # stored and read back


@pytest.mark.parametrize("bad, match", [
    (dict(norm="batchnorm"), "unknown norm"), (dict(mlp="geglu"), "unknown mlp"),
    (dict(rope="yes"), "rope must be true or false"), (dict(rope=True, num_heads=8), "head width"),
    (dict(mlp="swiglu", conditioning="in-context"), "need an adaLN model"),
])
def test_bad_switches_get_one_line(bad, match):
    with pytest.raises(UserError, match=match) as err:
        DiTConfig.from_name("DiT-S/2", **{**TINY, **bad})
    assert "\n" not in str(err.value)


def test_rmsnorm_blocks_take_the_plain_path_when_the_fused_kernels_are_on(monkeypatch):
    """The fused kernels normalise with LayerNorm: an RMSNorm block must not reach them (checked by making
    them fail), and its output must equal the plain path's."""
    torch.manual_seed(0)
    model = create_model("DiT-S/2", **TINY, **ALL).eval()
    for p in model.parameters():
        if p.requires_grad:  # random values exercise every path (adaLN-Zero starts at zero gates)
            torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 10])
    with torch.no_grad():
        plain = model(x, t, y)

    def refuse(*args, **kwargs):
        raise AssertionError("a fused LayerNorm kernel ran on an RMSNorm block")

    monkeypatch.setattr(kernels, "use_fused", lambda tensor: True)
    for name in ("ln_modulate", "residual_ln_modulate", "gated_residual"):
        monkeypatch.setattr(kernels, name, refuse)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), plain)


def test_swapped_layers_do_not_take_the_fp8_row_path():
    model = create_model("DiT-S/2", **TINY, qk_norm="rmsnorm")
    assert all(not b.fp8_ok for b in model.blocks) and all(b.fused_ok for b in model.blocks)


def test_the_released_lightningdit_xl1_state_dict_layout_loads_strictly():
    """Every tensor name and shape of their released LightningDiT-XL/1 (the list their class gives at full size,
    tests/fixtures/lightningdit_xl1_shapes.json): the config read from them builds a DiT that loads it strictly."""
    data = json.loads(FIXTURE.with_name("lightningdit_xl1_shapes.json").read_text())
    state = {k: torch.empty(v, device="meta") for k, v in data["shapes"].items()}
    config = infer_config(state)
    assert (config.depth, config.hidden_size, config.num_heads, config.patch_size, config.in_channels) == (
        28, 1152, 16, 1, 32)
    assert config.knobs == dict(norm="rmsnorm", rope=True, mlp="swiglu") and not config.learn_sigma
    with torch.device("meta"):
        model = build_model(config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == data["shapes"]
    model.load_state_dict(state, strict=True, assign=True)
