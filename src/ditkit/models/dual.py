"""Dual-number forward of the class-conditional adaLN DiT: the output u and its directional derivative du in one
pass, layer by layer, with each layer's tangent written in closed form (MeanFlow's JVP, issue 27).

`torch.func.jvp` (models/forward_mode.py) needs a forward-mode rule for every op, so it runs the network on a
plain path: explicit math attention, no fused kernels, no compiled blocks; that costs 2.6× the fast forward.
Here each layer maps a pair (x, dx) to (f(x), J_f(x)·dx) by hand:

    linear       (W·x + b, W·dx)
    LayerNorm    y = (x − μ)/σ,  dy = (dx − mean dx − y·mean(y·dx))/σ   (no affine: the DiT's norms)
    modulate     y·(1 + s) + b  →  dy·(1 + s) + y·ds + db
    gated res.   x + g·a  →  dx + dg·a + g·da
    SiLU, GELU-tanh   the scalar derivative times the tangent
    attention    O = P·V,  dO = P·dV + (P⊙dS)·V − rowsum(P⊙dS)⊙O = P·dV + A·V,
                 dS = (dQ·Kᵀ + Q·dKᵀ)/√d,  A = P⊙(dS − rowsum(P⊙dS))   (P = softmax(QKᵀ/√d) materialised:
                 256 tokens for DiT-XL/2 at 256 px)
    time embedding    [cos(t·f), sin(t·f)]  →  [−f·sin(t·f)·dt, f·cos(t·f)·dt]

`dual_block` is a plain tensor function of one block's weights, so `torch.compile` compiles it once for every
block (inductor fuses the elementwise tangent math into few kernels); `forward(..., compiled=True)` runs it so
(on a GPU), the eager function otherwise. No process-wide switch is read: the caller chooses.

What the dual path covers is answered in one place, `unsupported(network, kwargs)`: the `DiT` with adaLN-Zero or
adaLN conditioning, LayerNorm, plain attention and the GELU MLP (learned-sigma channels included). The
LightningDiT knobs (RMSNorm, QK-norm, RoPE, SwiGLU), the text (PixArt), cross-attention and in-context models,
TREAD / REPA's training path, FSDP-sharded and FP8 layers are not covered; their callers use `torch.func.jvp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.config import KNOB_DEFAULTS
from ditkit.models.dit import DiT, DiTBlock, Mlp
from ditkit.runtime.errors import UserError

Pair = tuple[torch.Tensor, torch.Tensor]  # (primal, tangent)
GELU_K = math.sqrt(2.0 / math.pi)  # GELU-tanh: 0.5·x·(1 + tanh(k·(x + 0.044715·x³)))
GELU_C = 0.044715
KWARGS = {"y", "force_drop_ids"}  # the model inputs besides (x, t, r) the dual path takes


# ----------------------------------------------------------------------------------------------- coverage


def unsupported(network: Any, kwargs: dict[str, Any]) -> str | None:
    """Why the dual path does not cover `network` called with `kwargs`; None when it does (then
    `forward` equals the network's JVP). The one place that decides between this path and `torch.func.jvp`."""
    if type(network) is not DiT:
        return f"{type(network).__name__} is not the class-conditional DiT"
    config = network.config
    if config.conditioning not in ("adaln-zero", "adaln"):
        return f"conditioning {config.conditioning!r} (only adaLN-Zero and adaLN)"
    knobs = [k for k, default in KNOB_DEFAULTS.items() if getattr(config, k) != default]
    if knobs:
        return f"LightningDiT knobs {', '.join(knobs)}"
    if network.training and getattr(network, "training_path", None) is not None:
        return "TREAD routing / REPA tap (models/routing.py)"
    if network.block_cache is not None:
        return "a sampling block cache"
    if "y" not in kwargs:
        return "no labels y"
    if set(kwargs) - KWARGS:
        return f"model inputs {sorted(set(kwargs) - KWARGS)}"
    if any(hasattr(p, "full_tensor") for p in network.parameters()):
        return "FSDP-sharded weights"
    plain = all(type(b) is DiTBlock and type(b.mlp) is Mlp and all(type(m) is nn.Linear for m in
                (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2, b.adaLN_modulation[-1])) for b in network.blocks)
    return None if plain else "a block with replaced layers (FP8 linears)"


def covers(network: Any, kwargs: dict[str, Any]) -> bool:
    """True when `forward` computes this network's JVP (see `unsupported` for why not)."""
    return unsupported(network, kwargs) is None


def network_of(model: Any) -> nn.Module | None:
    """The nn.Module behind `model`: itself, a DDP wrapper's module, or what a wrapper's `network` attribute holds
    (the training step's fp32 wrapper); None for a bare function."""
    net = model
    while getattr(net, "network", None) is not None:  # the training step's fp32 wrapper (train.step.Float32Output)
        net = net.network
    if isinstance(net, nn.parallel.DistributedDataParallel):
        net = net.module
    return net if isinstance(net, nn.Module) else None


# ----------------------------------------------------------------------------------------------- layer rules


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: the statistics and derivatives of bf16 activations are computed in float32."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def linear(x: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Pair:
    """(W·x + b, W·dx)."""
    return F.linear(x, weight, bias), F.linear(dx, weight)


def silu(x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """SiLU x·σ(x); derivative σ(x)·(1 + x·(1 − σ(x)))."""
    sig = torch.sigmoid(_wide(x))
    slope = sig * (1.0 + _wide(x) * (1.0 - sig))
    return F.silu(x), (slope * _wide(dx)).to(dx.dtype)


def gelu_tanh(x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """GELU, tanh approximation (the DiT's MLP); derivative 0.5·(1 + th) + 0.5·x·(1 − th²)·k·(1 + 3c·x²)."""
    w = _wide(x)
    th = torch.tanh(GELU_K * (w + GELU_C * w * w * w))
    slope = 0.5 * (1.0 + th) + 0.5 * w * (1.0 - th * th) * GELU_K * (1.0 + 3.0 * GELU_C * w * w)
    return F.gelu(x, approximate="tanh"), (slope * _wide(dx)).to(dx.dtype)


def layer_norm(x: torch.Tensor, dx: torch.Tensor, eps: float) -> Pair:
    """LayerNorm without affine over the last dimension: y = (x − μ)/σ, σ = √(var + eps) (biased variance), and
    dy = (dx − mean dx − y·mean(y·dx))/σ; computed in at least float32, returned in x's dtype."""
    w, dw = _wide(x), _wide(dx)
    centred = w - w.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    y = centred * rstd
    dy = (dw - dw.mean(-1, keepdim=True) - y * (y * dw).mean(-1, keepdim=True)) * rstd
    return y.to(x.dtype), dy.to(dx.dtype)


def modulate(h: torch.Tensor, dh: torch.Tensor, shift: Pair, scale: Pair) -> Pair:
    """adaLN's h·(1 + scale) + shift, per-sample (N×D) shift and scale over the tokens."""
    (b, db), (s, ds) = shift, scale
    s1 = 1 + s.unsqueeze(1)
    return h * s1 + b.unsqueeze(1), dh * s1 + h * ds.unsqueeze(1) + db.unsqueeze(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
              dv: torch.Tensor) -> Pair:
    """softmax(Q·Kᵀ/√d)·V and its tangent for N×H×T×d heads (see the module doc); P in at least float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(_wide(torch.matmul(q, k.transpose(-2, -1))) * scale, dim=-1)
    # dQ·Kᵀ + Q·dKᵀ as one product of the head features side by side
    ds = _wide(torch.matmul(torch.cat([dq, q], -1), torch.cat([k, dk], -1).transpose(-2, -1))) * scale
    pds = p * ds
    a = pds - p * pds.sum(-1, keepdim=True)
    both = torch.matmul(p.to(v.dtype), torch.cat([v, dv], -1))  # [P·V, P·dV]
    out, p_dv = both.split(v.shape[-1], dim=-1)
    return out, p_dv + torch.matmul(a.to(v.dtype), v)


# ----------------------------------------------------------------------------------------------- the block


class BlockWeights(NamedTuple):
    """One `DiTBlock`'s tensors (the module's own, not copies), the inputs of `dual_block`."""

    ada_w: torch.Tensor
    ada_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor

    @classmethod
    def of(cls, block: DiTBlock) -> BlockWeights:
        ada, attn, mlp = block.adaLN_modulation[-1], block.attn, block.mlp
        return cls(ada.weight, ada.bias, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                   mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


def self_attention(h: torch.Tensor, dh: torch.Tensor, w: BlockWeights, heads: int) -> Pair:
    """The block's attention layer (qkv projection, heads, output projection) on N×T×D tokens."""
    n, t, d = h.shape
    qkv, dqkv = linear(h, dh, w.qkv_w, w.qkv_b)

    def split(z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(z.view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4))

    out, dout = attention(*split(qkv), *split(dqkv))
    return linear(out.transpose(1, 2).reshape(n, t, d), dout.transpose(1, 2).reshape(n, t, d), w.proj_w, w.proj_b)


def dual_block(x: torch.Tensor, dx: torch.Tensor, cond: torch.Tensor, dcond: torch.Tensor, w: BlockWeights,
               heads: int, gated: bool, eps: float) -> Pair:
    """One adaLN(-Zero) `DiTBlock` on tokens (x, dx) N×T×D with the conditioning SiLU(c) and its tangent
    (N×D, shared by every block); a function of tensors only, so one compiled graph serves every block."""
    mod, dmod = linear(cond, dcond, w.ada_w, w.ada_b)
    chunks = list(zip(mod.chunk(6 if gated else 4, dim=1), dmod.chunk(6 if gated else 4, dim=1)))
    if gated:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
    else:
        shift_msa, scale_msa, shift_mlp, scale_mlp = chunks
    h, dh = modulate(*layer_norm(x, dx, eps), shift_msa, scale_msa)
    a, da = self_attention(h, dh, w, heads)
    x, dx = _residual(x, dx, a, da, gate_msa if gated else None)
    h, dh = modulate(*layer_norm(x, dx, eps), shift_mlp, scale_mlp)
    h, dh = gelu_tanh(*linear(h, dh, w.fc1_w, w.fc1_b))
    m, dm = linear(h, dh, w.fc2_w, w.fc2_b)
    return _residual(x, dx, m, dm, gate_mlp if gated else None)


def _residual(x: torch.Tensor, dx: torch.Tensor, a: torch.Tensor, da: torch.Tensor, gate: Pair | None) -> Pair:
    """x + gate·a (adaLN-Zero's gated residual; x + a without a gate)."""
    if gate is None:
        return x + a, dx + da
    g, dg = gate[0].unsqueeze(1), gate[1].unsqueeze(1)
    return x + g * a, dx + dg * a + g * da


_COMPILED: dict[str, Callable[..., Pair]] = {}  # backend -> the compiled `dual_block` (one per process)


def compiled_block(backend: str = "inductor") -> Callable[..., Pair]:
    """`dual_block` under torch.compile. The shape is static at first and turns dynamic in the batch at the second
    row count (dynamo's automatic dynamic shapes): MeanFlow's JVP rows vary from step to step."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(dual_block, backend=backend)
    return _COMPILED[backend]


# ----------------------------------------------------------------------------------------------- the network


def time_features(t: torch.Tensor, dt: torch.Tensor, dim: int, max_period: float = 10000.0) -> Pair:
    """`embeddings.timestep_embedding` of t ([cos(t·f), sin(t·f)], zero-padded to an odd dim) and its tangent."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t[:, None].to(dtype) * freqs[None]
    rate = dt[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    demb = torch.cat([-torch.sin(args) * rate, torch.cos(args) * rate], dim=-1)
    if dim % 2:
        emb, demb = F.pad(emb, (0, 1)), F.pad(demb, (0, 1))
    return emb, demb


def timestep_embedder(embedder: nn.Module, t: torch.Tensor, dt: torch.Tensor) -> Pair:
    """A `TimestepEmbedder` (frequencies → Linear → SiLU → Linear) on (t, dt)."""
    first, last = embedder.mlp[0], embedder.mlp[2]
    f, df = time_features(t, dt, embedder.frequency_embedding_size)
    h, dh = silu(*linear(f.to(first.weight.dtype), df.to(first.weight.dtype), first.weight, first.bias))
    return linear(h, dh, last.weight, last.bias)


def time_embedding(network: DiT, t: torch.Tensor, dt: torch.Tensor, r: torch.Tensor | None,
                   dr: torch.Tensor | None) -> Pair:
    """`DiT._time_embedding` on (t, dt) and (r, dr): t's embedding plus, on a model with an interval input, the
    embedding of t − r (r None: r = t, an interval of 0 whatever dt)."""
    c, dc = timestep_embedder(network.t_embedder, t, dt)
    if network.r_embedder is None:
        if r is not None:
            raise UserError("this model has no second time input r; it was not trained with --objective meanflow")
        return c, dc
    if r is None:
        ci, dci = timestep_embedder(network.r_embedder, torch.zeros_like(t), torch.zeros_like(dt))
    else:
        ci, dci = timestep_embedder(network.r_embedder, t - r, dt - (torch.zeros_like(dt) if dr is None else dr))
    return c + ci, dc + dci


def forward(network: DiT, x: torch.Tensor, dx: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, y: torch.Tensor,
            force_drop_ids: torch.Tensor | None = None, *, r: torch.Tensor | None = None,
            dr: torch.Tensor | None = None, compiled: bool = False) -> Pair:
    """(u, du): `network(x, t, y, force_drop_ids, r=r)` and its derivative along (dx, dt, dr) (dr None: 0),
    without autograd.

    `network` must be covered (`unsupported(network, kwargs) is None`); labels are dropped as its forward drops
    them (training mode: at random unless force_drop_ids). compiled: each block through `compiled_block()`."""
    proj = network.x_embedder.proj
    tokens = network.x_embedder(x) + network.pos_embed
    dtokens = F.conv2d(dx, proj.weight, None, proj.stride, proj.padding).flatten(2).transpose(1, 2)
    c, dc = time_embedding(network, t, dt, r, dr)
    c = c + network.y_embedder(y, network.training, force_drop_ids)
    cond = silu(c, dc)  # every block's adaLN regression starts with SiLU(c)
    run = compiled_block() if compiled else dual_block
    for block in network.blocks:
        tokens, dtokens = run(tokens, dtokens, *cond, BlockWeights.of(block), network.num_heads, block.gated,
                              block.norm1.eps)
    final = network.final_layer
    ada = final.adaLN_modulation[-1]
    shift, scale = (tuple(zip(*(z.chunk(2, dim=1) for z in linear(*cond, ada.weight, ada.bias)))))
    h, dh = modulate(*layer_norm(tokens, dtokens, final.norm_final.eps), shift, scale)
    out, dout = linear(h, dh, final.linear.weight, final.linear.bias)
    return network.unpatchify(out), network.unpatchify(dout)
