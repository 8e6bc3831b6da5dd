"""A small random-weight stand-in for the FID Inception network (for `ditkit evaluate` without downloads)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyInception(nn.Module):
    """The FID Inception's interface: uint8 N×3×H×W in; pool, spatial NHWC[:7], bias-free logits out."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(12, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24, 10, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.fingerprint = f"tiny-{seed}"
        self.images_seen = 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.images_seen += images.shape[0]
        x = F.interpolate(images.float(), size=(8, 8), mode="bilinear", align_corners=False) / 128 - 1
        h = F.relu(self.conv1(x))  # 4×4×12: a small sFID dimension (112) keeps sqrtm cheap
        spatial = h[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
        pool = F.relu(self.conv2(h)).mean((2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}
