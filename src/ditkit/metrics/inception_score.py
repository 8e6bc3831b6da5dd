"""The Inception Score from classifier logits, as ADM's evaluator computes it.

IS = exp(E_x KL(p(y|x) ‖ p(y))), with p(y) the mean prediction of the split; the samples are cut into splits
of 5,000 (ADM's split size, so 50,000 samples give 10 splits) and the scores of the splits averaged. ADM
feeds the logits without the classifier's bias ("logits_unbiased"), and so does ditkit.
"""

from __future__ import annotations

import numpy as np
import torch

from ditkit.runtime.errors import UserError

SPLIT_SIZE = 5000


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = SPLIT_SIZE) -> float:
    """Inception Score of N×C logits (float64 softmax; mean over splits of `split_size`)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise UserError(f"inception score: logits must be N×C with N ≥ 1, got shape {z.shape}")
    if split_size < 1:
        raise UserError(f"inception score: split size must be positive, got {split_size}")
    # log-softmax in a stable form; p·log p with p = 0 contributes 0 rather than nan.
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = np.sum(p * (part - log_marginal), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))
