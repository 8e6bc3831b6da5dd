"""Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's evaluator computes them.

Each feature set defines a manifold: the union of balls around its points, each ball reaching to the point's
k-th nearest neighbour in the same set (k = 3). Precision is the fraction of samples inside the reference
manifold (are samples realistic?); recall is the fraction of reference points inside the sample manifold (is
the reference's variety covered?). Distances are squared Euclidean, compared with `<=`, as in the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from ditkit.runtime.errors import UserError

K_NEAREST = 3
ROW_BATCH = 10_000  # rows of the distance matrix held at once (memory vs speed), as ADM's evaluator


def _as_tensor(x: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise UserError(f"precision/recall: features must be N×D, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i − b_j|² for all pairs, by the norm expansion (one matmul), clamped at 0 against round-off."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(
    features: np.ndarray | torch.Tensor, k: int = K_NEAREST, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point in the same set (shape N)."""
    feats = _as_tensor(features, device)
    if not 1 <= k < feats.shape[0]:
        raise UserError(
            f"precision/recall: need more than k={k} feature vectors per set, got {feats.shape[0]}"
        )
    radii = []
    for start in range(0, feats.shape[0], ROW_BATCH):
        d = _squared_distances(feats[start : start + ROW_BATCH], feats)
        # The point itself is the smallest entry (distance 0), so the k-th neighbour is the (k+1)-th smallest.
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` within the squared radius of at least one centre."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for start in range(0, points.shape[0], ROW_BATCH):
        d = _squared_distances(points[start : start + ROW_BATCH], centres)
        inside[start : start + ROW_BATCH] = (d <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(
    reference: np.ndarray | torch.Tensor,
    samples: np.ndarray | torch.Tensor,
    k: int = K_NEAREST,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of sample features against reference features, both N×D."""
    ref, smp = _as_tensor(reference, device), _as_tensor(samples, device)
    if ref.shape[1] != smp.shape[1]:
        raise UserError(f"precision/recall: feature sizes differ ({ref.shape[1]} vs {smp.shape[1]})")
    precision = _inside_fraction(smp, ref, manifold_radii(ref, k, device))
    recall = _inside_fraction(ref, smp, manifold_radii(smp, k, device))
    return precision, recall
