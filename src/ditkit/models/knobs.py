"""The modern recipe's layers (LightningDiT, Yao et al. 2025): RMSNorm, QK-norm, 2D RoPE and the SwiGLU MLP.

Each is one switch of the model config (`DiTConfig.norm`, `qk_norm`, `rope`, `mlp`); `apply_knobs` swaps the
layers of a built DiT in place, so a config with every switch at its default builds exactly the paper's DiT.
The module and parameter names are LightningDiT's (`models/lightningdit.py`), so its state dicts load strictly:

    blocks.i.norm1.weight, blocks.i.norm2.weight, final_layer.norm_final.weight   RMSNorm (norm "rmsnorm")
    blocks.i.attn.q_norm.*, blocks.i.attn.k_norm.*                                 QK-norm, per head
    feat_rope.freqs_cos, feat_rope.freqs_sin                                       2D RoPE tables (buffers)
    blocks.i.mlp.w12.*, blocks.i.mlp.w3.*                                          SwiGLU (mlp "swiglu")

The fused Triton kernels cover LayerNorm + modulate only: a block with RMSNorm takes the plain (compiled) path
(`fused_ok`); QK-norm, RoPE and SwiGLU live inside the attention and MLP modules the fused path calls as they are.
The FP8 sampling path needs the plain LayerNorm and GELU MLP (`fp8_ok`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.runtime.errors import UserError

RMS_EPS = 1e-6  # LightningDiT's RMSNorm default
QK_LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which LightningDiT's LayerNorm QK-norm keeps
ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dimension, computed in float32 and returned in x's dtype
    (bf16 activations of q and k would otherwise be squared in bf16)."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) → (−x1, x0, −x3, x2, ...): a quarter turn of each adjacent pair of features."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_tables(head_dim: int, grid: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (grid², head_dim) of axial 2D RoPE, as EVA-02's VisionRotaryEmbeddingFast builds them.

    The first half of each head's features rotates with the token's row, the second half with its column;
    within a half, feature pair j turns at frequency theta^(−2j / (head_dim/2)). Tokens are in row-major order.
    """
    half = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    pos = torch.arange(grid) / grid * grid  # LightningDiT's positions (training grid = sampling grid)
    angles = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (grid, half): each angle for one pair
    rows = angles[:, None, :].expand(grid, grid, half)
    cols = angles[None, :, :].expand(grid, grid, half)
    full = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return full.cos(), full.sin()


class Rope2D(nn.Module):
    """Axial 2D rotary position embedding on q and k (N×heads×T×head_dim); T must be the model's grid²."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid)
        # Persistent buffers: LightningDiT's files store them (feat_rope.freqs_cos / freqs_sin).
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.freqs_cos.shape[0]:  # e.g. TREAD's routed blocks see a subset of the tokens
            raise UserError(f"2D RoPE needs every token of the {self.freqs_cos.shape[0]}-token grid, got "
                            f"{x.shape[-2]}: token routing with --rope is not supported yet; drop one of them")
        # In float32 with the float32 tables (bf16 tables would be off by up to 2^-9), back in x's dtype.
        xf = x.float()
        return (xf * self.freqs_cos + rotate_pairs(xf) * self.freqs_sin).to(x.dtype)


class SwiGLU(nn.Module):
    """SiLU(x·W1ᵀ) ⊙ (x·W2ᵀ) → W3, with W1 and W2 as one linear `w12` (LightningDiT's SwiGLUFFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU width: two thirds of the GELU MLP's (same parameters and FLOPs), truncated:
    int(2/3 · int(D · mlp_ratio)); 3,072 for D = 1,152."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


def qk_norm_layer(kind: str, head_dim: int) -> nn.Module:
    """The per-head norm of q and k: RMSNorm (LightningDiT with RMSNorm blocks) or an affine LayerNorm."""
    if kind == "rmsnorm":
        return RMSNorm(head_dim)
    return nn.LayerNorm(head_dim, eps=QK_LAYERNORM_EPS)


class _RopeRef:
    """A shared, unregistered reference to the model's one `Rope2D` (its buffers are stored once, at the model
    level as in LightningDiT's files, and follow the model across devices)."""

    def __init__(self, rope: Rope2D):
        self.module = rope


def apply_knobs(model: nn.Module, config: Any) -> None:
    """Swap a freshly built DiT's layers for the ones `config` switches on (before its weights are initialised).

    Nothing changes for a config with every knob at its default, so the paper's DiT stays bit-identical."""
    if config.norm == "layernorm" and config.qk_norm == "none" and not config.rope and config.mlp == "gelu":
        return
    d, heads = config.hidden_size, config.num_heads
    if config.rope:
        model.feat_rope = Rope2D(d // heads, config.grid_size)
    for block in model.blocks:
        if config.norm == "rmsnorm":
            block.norm1, block.norm2 = RMSNorm(d), RMSNorm(d)
        if config.qk_norm != "none":
            block.attn.q_norm = qk_norm_layer(config.qk_norm, d // heads)
            block.attn.k_norm = qk_norm_layer(config.qk_norm, d // heads)
        if config.rope:
            block.attn.rope = _RopeRef(model.feat_rope)
        if config.mlp == "swiglu":
            block.mlp = SwiGLU(d, swiglu_hidden(d, config.mlp_ratio))
        block.fused_ok = config.norm == "layernorm"
        block.fp8_ok = False
    if config.norm == "rmsnorm":
        model.final_layer.norm_final = RMSNorm(d)
        model.final_layer.fused_ok = False


def prepare_qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE on q and k (N×heads×T×head_dim), in LightningDiT's order; identity when both are off."""
    q_norm = getattr(attn, "q_norm", None)  # registered submodules, present only when switched on
    if q_norm is not None:
        q, k = q_norm(q), attn.k_norm(k)
    rope = getattr(attn, "rope", None)
    if rope is not None:
        q, k = rope.module(q), rope.module(k)
    return q, k


def knobs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The switches a DiT state dict shows by its tensor names (LightningDiT's names, see the module doc), and the
    head count where a per-head tensor (RoPE table, QK-norm weight) states the head width."""
    found: dict[str, Any] = {}
    per_head = state_dict.get("feat_rope.freqs_cos", state_dict.get("blocks.0.attn.q_norm.weight"))
    width = state_dict.get("blocks.0.attn.proj.weight")
    if per_head is not None and width is not None and width.shape[0] % per_head.shape[-1] == 0:
        found["num_heads"] = width.shape[0] // per_head.shape[-1]
    if "blocks.0.norm1.weight" in state_dict and "blocks.0.norm1.bias" not in state_dict:  # affine LN has a bias
        found["norm"] = "rmsnorm"
    if "blocks.0.attn.q_norm.weight" in state_dict:
        found["qk_norm"] = "layernorm" if "blocks.0.attn.q_norm.bias" in state_dict else "rmsnorm"
    if "feat_rope.freqs_cos" in state_dict:
        found["rope"] = True
    if "blocks.0.mlp.w12.weight" in state_dict:
        found["mlp"] = "swiglu"
    return found
