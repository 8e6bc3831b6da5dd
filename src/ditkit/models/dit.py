"""The Diffusion Transformer (Peebles & Xie, 2023) and the four conditioning blocks of its ablation.

Shapes: x is N×C×H×W (latents or pixels), t is N (float or int timesteps), y is N (int labels; `num_classes`
is the null label). The forward pass returns N×C_out×H×W where C_out = 2C when the variance is learned
(first C channels ε, the rest the variance interpolation values).

For the default adaLN-Zero block the module tree and parameter names are exactly the official ones, so the
released checkpoints load with `strict=True`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditkit.models import forward_mode, kernels
from ditkit.models.config import DiTConfig
from ditkit.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from ditkit.models.guidance import cfg_halves
from ditkit.models.kernels.attention import attention as measured_attention
from ditkit.models.kernels.attention import select_backend
from ditkit.models.knobs import apply_knobs, prepare_qk
from ditkit.runtime.errors import UserError

LN_EPS = 1e-6  # the official code's LayerNorm epsilon; diffusers' port must be told this value


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift with per-sample (N×D) shift and scale broadcast over the tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`.

    `backend` is PyTorch's own choice ("default") unless the DiT has measured a faster one on the GPU
    (`kernels.attention.select_backend`: "cudnn", "flash" or "efficient"), or "math" (explicit softmax(QKᵀ/√d)·V,
    which forward mode can differentiate) inside `forward_mode.plain`.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.backend = "default"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._attend(self.qkv(x)))

    def forward_fp8(self, h: Any) -> torch.Tensor:
        """The same from FP8 rows (`kernels.fp8_rows.Rows`; inference, after `fp8.enable_fp8(rowwise=True)`):
        qkv and proj as FP8 GEMMs."""
        from ditkit.models.kernels import fp8_rows  # Triton: only where a GPU path runs

        out = self._attend(fp8_rows.linear(h, self.qkv.rows))
        return fp8_rows.linear(fp8_rows.quantize_rows(out), self.proj.rows)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """N×T×3D projections → N×T×D attention output (heads concatenated), before the output projection."""
        n, t, d3 = qkv.shape
        d = d3 // 3
        q, k, v = qkv.view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = prepare_qk(self, q, k)  # QK-norm and RoPE where the config switches them on (models/knobs.py)
        if self.backend == "math":  # a JVP pass (MeanFlow's target): SDPA's kernels have no forward-mode rule
            out = forward_mode.math_attention(q, k, v)
        elif self.backend == "default" or not q.is_cuda:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = measured_attention(q, k, v, self.backend)
        return out.transpose(1, 2).reshape(n, t, d)


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to the conditioning tokens (keys, values)."""

    backend = "default"  # SDPA; "math" inside `forward_mode.plain` (see `cross_attend`)

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return cross_attend(self.q, self.kv, self.proj, self.num_heads, x, context, backend=self.backend)


def cross_attend(q_proj: nn.Module, kv_proj: nn.Module, out_proj: nn.Module, num_heads: int, x: torch.Tensor,
                 context: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "default") -> torch.Tensor:
    """Attention from tokens x (N×T×D, queries) to `context` (N×L×D, keys and values), with an optional boolean
    mask N×1×1×L (True = attend); the projections are the caller's (their names follow each paper's keys).
    `backend`: "default" (SDPA) or "math" (explicit, forward-differentiable: the caller's module inside
    `forward_mode.plain`)."""
    n, t, d = x.shape
    h = num_heads
    q = q_proj(x).view(n, t, h, d // h).transpose(1, 2)
    k, v = kv_proj(context).view(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
    attend = forward_mode.math_attention if backend == "math" else F.scaled_dot_product_attention
    out = attend(q, k, v, mask)
    return out_proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Pointwise feed-forward: Linear → GELU (tanh approximation, as the official code) → Linear."""

    fused = True  # the kernel path (fc1's GELU epilogue on a GPU without gradient); set by `precision.prepare`

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1 + GELU as one GEMM when sampling on a GPU (not when fc1 is a tensorwise FP8 product: training's fp8)
        if (self.fused and kernels.use_gelu_epilogue(x) and kernels.plain_linear(self.fc1)
                and isinstance(self.act, nn.GELU) and self.act.approximate == "tanh"):
            return self.fc2(kernels.linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))

    def forward_fp8(self, h: Any) -> torch.Tensor:
        """The same from FP8 rows (inference, after `fp8.enable_fp8(rowwise=True)`; GELU-tanh inside fc2's
        quantisation)."""
        from ditkit.models.kernels import fp8_rows

        hidden = fp8_rows.linear(h, self.fc1.rows)
        return fp8_rows.linear(fp8_rows.quantize_rows(hidden, gelu=True), self.fc2.rows)


class DiTBlock(nn.Module):
    """Transformer block with adaptive LayerNorm conditioning.

    adaLN-Zero (`gated=True`, the paper's default): the conditioning vector regresses shift, scale and a
    residual gate for attention and MLP (6·D values), the regression layer starts at zero, so each block starts
    as the identity. adaLN (`gated=False`): shift and scale only (4·D values).
    """

    fused = True  # the kernel path chosen for this block (`precision.prepare`, `forward_mode.plain`)
    fused_ok = True  # False when models/knobs.py swapped in a layer the fused kernels do not cover (RMSNorm)
    fp8_ok = True  # False with any knob on: the FP8 row path assumes LayerNorm and the GELU MLP

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.gated and self.fused and self.fp8_ok and kernels.use_fp8_rows(x, self.mlp.fc2):
            return self._forward_fp8(x, c)
        if self.gated and self.fused and self.fused_ok and kernels.use_fused(x):
            return self._forward_fused(x, c)
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def _forward_fused(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The gated block through the Triton kernels: the same function, three memory passes instead of six."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x.contiguous()  # the first block's input is a transposed view of the patch embedding
        h = kernels.ln_modulate(x, shift_msa, scale_msa, LN_EPS)
        x, h = kernels.residual_ln_modulate(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, LN_EPS)
        return kernels.gated_residual(x, self.mlp(h), gate_mlp)

    def _forward_fp8(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The fused block with the four linears as FP8 GEMMs: the LayerNorm kernels hand qkv and fc1 FP8 rows."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = kernels.fp8_stream(x)  # the stream's storage dtype on this path (fp8_rows.STREAM)
        x, h = kernels.ln_modulate_rows(x, None, None, shift_msa, scale_msa, LN_EPS)
        x, h = kernels.ln_modulate_rows(x, self.attn.forward_fp8(h), gate_msa, shift_mlp, scale_mlp, LN_EPS)
        return kernels.gated_residual(x, self.mlp.forward_fp8(h), gate_mlp)


class CrossAttentionBlock(nn.Module):
    """Pre-norm ViT block with a cross-attention layer (to the timestep and class tokens) after self-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class PlainBlock(nn.Module):
    """Pre-norm ViT block; the in-context variant feeds it the conditioning as two extra tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Final norm (adaptive for the adaLN variants, plain otherwise) and per-token linear decoder to p·p·C_out."""

    fused = True  # the kernel path chosen for this layer (`precision.prepare`, `forward_mode.plain`)
    fused_ok = True  # False when the norm is RMSNorm (models/knobs.py)

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            if self.fused and self.fused_ok and kernels.use_fused(x):
                return self.linear(kernels.ln_modulate(x, shift, scale, LN_EPS))
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))


class TokenGrid:
    """What the DiT networks share around their blocks: activation checkpointing and tokens back to an image.
    A mixin for nn.Modules; `_init_grid` sets what the rest reads, and the patch and timestep embedders."""

    def _init_grid(self, config: DiTConfig) -> None:
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.learn_sigma = config.learn_sigma
        self.grad_checkpointing = False
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        # MeanFlow models (config.interval_time): a second embedder of the interval t − r, added to t's.
        self.r_embedder = TimestepEmbedder(config.hidden_size) if config.interval_time else None

    def _time_embedding(self, t: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """t's embedding, plus the embedding of t − r on a model with an interval input (r None: r = t)."""
        emb = self.t_embedder(t)
        if self.r_embedder is not None:
            return emb + self.r_embedder(t - r if r is not None else torch.zeros_like(t))
        if r is not None:
            raise UserError("this model has no second time input r; it was not trained with --objective meanflow")
        return emb

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, about a third more compute."""
        self.grad_checkpointing = enabled

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """N×T×(p·p·C) tokens → N×C×H×W, the inverse of patch extraction in row-major token order."""
        c, p, g = self.out_channels, self.patch_size, self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    block_cache: Any = None  # sampling only: a `ditkit.sample.cache.StackCache` for one batch, set by `caching`

    def _run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        if self.block_cache is not None:
            return self.block_cache.run(block, args)
        return block(*args)


class DiT(TokenGrid, nn.Module):
    """Diffusion model with a Transformer backbone. Build one with `ditkit.create_model(name, **overrides)`."""

    fused = True  # whether `choose_attention` measures a backend (off: PyTorch's own); set by `precision.prepare`

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.conditioning == "text":  # PixArt-α's block lives in models/pixart.py
            raise UserError("a text model is a PixArtDiT; build it with ditkit.models.build_model(config)")
        self._init_grid(config)
        self.num_classes = config.num_classes
        d = config.hidden_size
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        # Fixed, not trained; a buffer-like parameter because the official files store it in the state_dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, d), requires_grad=False)
        kind = config.conditioning
        if kind in ("adaln-zero", "adaln"):
            gated = kind == "adaln-zero"
            blocks: list[nn.Module] = [
                DiTBlock(d, config.num_heads, config.mlp_ratio, gated=gated) for _ in range(config.depth)
            ]
        elif kind == "cross-attention":
            blocks = [CrossAttentionBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        else:
            blocks = [PlainBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(d, config.patch_size, self.out_channels, adaptive=kind.startswith("adaln"))
        apply_knobs(self, config)  # RMSNorm, QK-norm, RoPE, SwiGLU where switched on (nothing otherwise)
        if not self.pos_embed.is_meta:  # built on the meta device, it takes a file's tensors (build_checked)
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers."""

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        pos = sincos_2d(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.r_embedder is not None:
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.r_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            if isinstance(block, DiTBlock):
                # Zero modulation: adaLN-Zero blocks start as the identity (gate 0); adaLN blocks start
                # with scale 0 and shift 0, i.e. a plain (non-affine) LayerNorm.
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer.adaptive:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def choose_attention(self, rows: int, dtype: torch.dtype, device: torch.device, training: bool) -> str:
        """Measure the attention backends once for `rows` sequences of this model's tokens in `dtype` (cached on
        disk, see `kernels.attention`) and let every block use the fastest; returns its name.

        The code that runs the model calls this before its first batch (the training step, the sampling
        pipeline), never `forward`: a forward neither times, writes nor prints. CPU tensors and adaLN models
        prepared without the fused path keep PyTorch's own choice ("default")."""
        if device.type != "cuda" or not self.fused or self.config.conditioning not in (
                "adaln-zero", "adaln"):
            return "default"
        heads, d = self.num_heads, self.config.hidden_size
        choice = select_backend(rows, heads, self.config.num_patches, d // heads, dtype, device, backward=training)
        for block in self.blocks:
            block.attn.backend = choice
        return choice

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ε (and the variance values) for noisy input x at timesteps t with labels y.

        In training mode labels are dropped to the null label at random (`class_dropout_prob`), unless
        `force_drop_ids` (N, 1 = drop) fixes the choice, as the training loop does to stay reproducible.
        `r` (N): the interval's start for a MeanFlow model (`config.interval_time`), which sees t and t − r.
        """
        tokens = self.x_embedder(x) + self.pos_embed
        t_emb = self._time_embedding(t, r)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)
        kind = self.config.conditioning
        if kind in ("adaln-zero", "adaln"):
            c = t_emb + y_emb
            path = getattr(self, "training_path", None)  # REPA's tap / TREAD's routing (models/routing.py)
            if path is not None and self.training:
                tokens = path.run(self, tokens, c)
            else:
                for block in self.blocks:
                    tokens = self._run_block(block, tokens, c)
            out = self.final_layer(tokens, c)
        elif kind == "cross-attention":
            context = torch.stack([t_emb, y_emb], dim=1)
            for block in self.blocks:
                tokens = self._run_block(block, tokens, context)
            out = self.final_layer(tokens)
        else:
            tokens = torch.cat([t_emb.unsqueeze(1), y_emb.unsqueeze(1), tokens], dim=1)
            for block in self.blocks:
                tokens = self._run_block(block, tokens)
            out = self.final_layer(tokens[:, 2:])  # the two conditioning tokens are dropped before decoding
        return self.unpatchify(out)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_channels: int | str = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance as the authors define it: one forward over [cond; uncond].

        x, t and y hold the conditional half first and the unconditional half (labels = num_classes) second;
        only the first half of x is used, duplicated. ε ← ε_u + s·(ε_c − ε_u) is applied to the first
        `guide_channels` output channels: 3 reproduces the official code (and its FID 2.27 for DiT-XL/2),
        "all" guides every ε channel (the paper's appendix variant). The remaining channels (and the
        variance values) pass through from each half unchanged, as in the official code.
        """
        if guide_channels == "all":
            guide_channels = self.in_channels
        if not isinstance(guide_channels, int) or guide_channels < 1:
            raise ValueError(f"guide_channels must be a positive int or 'all', got {guide_channels!r}")
        half = x[: len(x) // 2]
        return cfg_halves(self.forward(torch.cat([half, half], dim=0), t, y), cfg_scale, guide_channels)
