"""Input embeddings of DiT: image patches, 2D sin-cos positions, diffusion timesteps and class labels.

Module and parameter names follow the official DiT code so its checkpoints load unchanged
(`x_embedder.proj.*`, `t_embedder.mlp.{0,2}.*`, `y_embedder.embedding_table.weight`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Split a C×H×W map into non-overlapping p×p patches and project each to `hidden_size`.

    Input N×C×H×W, output N×T×D with T = (H/p)·(W/p) tokens in row-major order.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        # A strided convolution is a per-patch linear layer; the official files store it as `proj` (timm).
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """1D sin-cos embedding (M×D) of `positions` (any shape, M values): [sin(pos·ω), cos(pos·ω)]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """Fixed 2D sin-cos position table, (grid_size²)×D, tokens in row-major order.

    As in the official code (and MAE), the first half of the channels encodes a token's column and the second
    half its row; the exact order matters because released checkpoints store this table as `pos_embed`.
    Positions are 0, 1, ... divided by `interpolation_scale` (PixArt-α at 1024 pixels uses 2).
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    axis = np.arange(grid_size, dtype=np.float64) / interpolation_scale
    rows, cols = np.meshgrid(axis, axis, indexing="ij")
    return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N×dim) of possibly fractional timesteps t (N): [cos(t·f), sin(t·f)].

    Frequencies f_i = max_period^(-i/half), i < half = dim // 2 (the guided-diffusion convention, cos first).
    """
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # float64 kept for exact derivative checks
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep → frequency embedding (256) → MLP → hidden vector."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label → hidden vector, with an extra "null" row (index `num_classes`) for classifier-free guidance.

    During training each label is replaced by the null label with probability `dropout_prob`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        has_null = dropout_prob > 0
        rows = num_classes + int(has_null)
        if torch.get_default_device().type == "meta":
            # Built on meta to take a checkpoint's tensors: skip nn.Embedding's N(0, 1) init, whose meta kernel
            # imports torch._dynamo (seconds of start-up for `ditkit sample`); other builds draw it as always.
            self.embedding_table = nn.Embedding(rows, hidden_size, _weight=torch.empty(rows, hidden_size))
        else:
            self.embedding_table = nn.Embedding(rows, hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null label; `force_drop_ids == 1` marks labels to drop explicitly."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
