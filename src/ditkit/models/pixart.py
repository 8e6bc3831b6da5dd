"""The text-conditional DiT of PixArt-α (Chen et al., 2023): DiT's geometry, cross-attention to caption tokens.

Each block is self-attention, cross-attention from the image tokens to the caption tokens, and an MLP. The
timestep conditions every block through "adaLN-single": ONE shared regression `t_block` maps the timestep
embedding to 6·D values, and each block adds its own learned 6×D `scale_shift_table` to get its shift, scale
and gate for attention and MLP (instead of DiT's per-block 6·D×D regressions: about a quarter fewer weights).
Captions arrive as N×L×C features of a frozen text encoder (T5-XXL: C = 4096, L ≤ 120) with an N×L mask
(True / 1 = a real token); a caption MLP `y_embedder.y_proj` projects them to the width D.

Classifier-free guidance: in training a caption is replaced, with probability `class_dropout_prob`, by the null
caption `y_embedder.y_embedding` (max_tokens×C), under the caption's own mask, as PixArt-α does; the sampler
does the same for the unconditional half (`force_drop_ids`). ditkit learns the null caption; PixArt-α keeps
it as a fixed random buffer. Both store it under the same name.

Module and parameter names are PixArt-α's, so its released state_dicts load with `strict=True`:
`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `t_block.1`, `y_embedder.{y_proj.fc1,y_proj.fc2,y_embedding}`,
`blocks.i.{scale_shift_table,attn.qkv,attn.proj,cross_attn.q_linear,cross_attn.kv_linear,cross_attn.proj,
mlp.fc1,mlp.fc2}`, `final_layer.{scale_shift_table,linear}`, `pos_embed`.
"""

from __future__ import annotations

import torch
from torch import nn

from ditkit.models.config import DiTConfig
from ditkit.models.dit import LN_EPS, Attention, Mlp, TokenGrid, cross_attend
from ditkit.models.embeddings import sincos_2d
from ditkit.models.guidance import cfg_halves


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(1 + scale) + shift with shift and scale already N×1×D (adaLN-single's layout)."""
    return torch.addcmul(shift, x, 1 + scale)


def attention_mask(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    """An N×L caption mask (bool or 0/1) as the N×1×1×L boolean mask `scaled_dot_product_attention` takes."""
    if mask is None:
        return None
    mask = mask.to(device=device).reshape(mask.shape[0], -1)
    if mask.shape != (batch, length):
        raise ValueError(f"caption mask has shape {tuple(mask.shape)}, expected {(batch, length)}")
    return mask.bool()[:, None, None, :]


class CaptionEmbedder(nn.Module):
    """Caption features (N×L×C) → the width D by an MLP (C → D → D, tanh GELU); dropout to the null caption."""

    def __init__(self, caption_channels: int, hidden_size: int, dropout_prob: float, max_tokens: int):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)  # C → D → D (timm's Mlp, as PixArt-α)
        # PixArt-α's initial null caption: N(0, 1/C) entries, the size of a T5 feature.
        self.y_embedding = nn.Parameter(torch.randn(max_tokens, caption_channels) / caption_channels**0.5)

    def null_caption(self, batch: int, length: int) -> torch.Tensor:
        """The first `length` tokens of the null caption, for `batch` rows (N×L×C)."""
        if length > self.y_embedding.shape[0]:
            raise ValueError(f"captions of {length} tokens; this model reads at most {self.y_embedding.shape[0]}")
        return self.y_embedding[:length].unsqueeze(0).expand(batch, -1, -1)

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped captions by the null caption; `force_drop_ids == 1` marks rows to drop explicitly."""
        n = caption.shape[0]
        if force_drop_ids is None:
            drop = torch.rand(n, device=caption.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(caption.device) == 1
        null = self.null_caption(n, caption.shape[1]).to(caption.dtype)
        return torch.where(drop[:, None, None], null, caption)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption.to(self.y_proj.fc1.weight.dtype))


class MultiHeadCrossAttention(nn.Module):
    """Attention from the image tokens (queries) to the projected caption tokens; masked tokens are ignored."""

    backend = "default"  # SDPA; "math" inside `forward_mode.plain` (see `cross_attend`)

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim, bias=True)
        self.kv_linear = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: N×T×D, cond: N×L×D, mask: N×1×1×L boolean (True = attend) or None (every token)."""
        return cross_attend(self.q_linear, self.kv_linear, self.proj, self.num_heads, x, cond, mask,
                            backend=self.backend)


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (no norm, no gate, as PixArt-α), MLP; modulated by adaLN-single.

    t0 (N×6D, the shared `t_block` output) plus this block's `scale_shift_table` (6×D) give shift, scale and
    gate for the self-attention and the MLP.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mod = self.scale_shift_table[None] + t0.reshape(x.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))


class T2IFinalLayer(nn.Module):
    """Final norm modulated by the timestep embedding plus a learned 2×D table, then the linear decoder."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class PixArtDiT(TokenGrid, nn.Module):
    """Text-to-image DiT (PixArt-α). Build with `ditkit.create_model(name, conditioning="text", ...)`.

    `model(x, t, y, mask)`: x N×C×H×W latents, t N timesteps, y N×L×caption_channels caption features (or
    PixArt's N×1×L×C), mask N×L (1 = real token; None = all real). Returns N×C_out×H×W like `DiT`.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.conditioning != "text":
            raise ValueError(f"PixArtDiT builds text models; got conditioning {config.conditioning!r}")
        self._init_grid(config)
        d = config.hidden_size
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))
        self.y_embedder = CaptionEmbedder(config.caption_channels, d, config.class_dropout_prob, config.max_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            [PixArtBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = T2IFinalLayer(d, config.patch_size, self.out_channels)
        if not self.pos_embed.is_meta:  # built on the meta device, it takes a file's tensors (build_checked)
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-α's initialisation, plus zero gates: every block starts as the identity, the output at zero.

        As PixArt-α: Xavier linears, N(0, 0.02) timestep and caption MLPs, zero cross-attention output and
        decoder. Unlike it (which starts `t_block` at N(0, 0.02) and every table entry at N(0, 1/D)), the
        shared regression `t_block` and the gate rows of each table start at zero, as adaLN-Zero does for DiT,
        so the block's residual branches are closed at the start; shift and scale rows keep N(0, 1/D).
        """

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        cfg = self.config
        pos = sincos_2d(cfg.hidden_size, cfg.grid_size, cfg.interpolation_scale)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.y_proj.fc1,
                       self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        if self.r_embedder is not None:  # MeanFlow's interval embedder, initialised as the timestep's
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.r_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            with torch.no_grad():
                block.scale_shift_table[2].zero_()  # gate of the self-attention
                block.scale_shift_table[5].zero_()  # gate of the MLP
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def null_caption(self, batch: int, length: int | None = None) -> torch.Tensor:
        """The null caption (N×L×C) that guidance uses for the unconditional half."""
        return self.y_embedder.null_caption(batch, length or self.config.max_tokens)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ε (and the variance values) for noisy x at timesteps t given caption features y (and the
        interval's start r for a MeanFlow model, see `DiT.forward`).

        In training mode captions are dropped to the null caption at random (`class_dropout_prob`), unless
        `force_drop_ids` (N, 1 = drop) fixes the choice; a dropped caption keeps its mask (as PixArt-α).
        """
        if y.ndim == 4:  # PixArt-α's N×1×L×C layout
            y = y.squeeze(1)
        n = x.shape[0]
        if y.ndim != 3 or y.shape[0] != n or y.shape[2] != self.config.caption_channels:
            raise ValueError(
                f"captions must be N×L×{self.config.caption_channels} for N={n}, got {tuple(y.shape)}"
            )
        tokens = self.x_embedder(x) + self.pos_embed
        t_emb = self._time_embedding(t, r)
        t0 = self.t_block(t_emb)
        context = self.y_embedder(y, self.training, force_drop_ids)
        attn_mask = attention_mask(mask, n, y.shape[1], x.device)
        for block in self.blocks:
            tokens = self._run_block(block, tokens, context, t0, attn_mask)
        return self.unpatchify(self.final_layer(tokens, t_emb))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        mask: torch.Tensor | None = None,
        guide_channels: int | str = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance over [cond; uncond] halves, as `DiT.forward_with_cfg` (and PixArt-α's).

        The caller gives the unconditional half's captions in the second half of y (`null_caption`, or a
        negative prompt's features); only the first half of x is used, duplicated.
        """
        if guide_channels == "all":
            guide_channels = self.in_channels
        half = x[: len(x) // 2]
        return cfg_halves(self.forward(torch.cat([half, half], dim=0), t, y, mask), cfg_scale, guide_channels)
