"""The Fréchet distance between two Gaussians fitted to features (FID, sFID, the digits Fréchet distance).

d² = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½). The square root follows the reference implementations
(pytorch-fid and ADM's evaluator): `scipy.linalg.sqrtm` of the product; if the result is not finite, ε·I is
added to both covariances; a small imaginary part from round-off is dropped, a large one is an error. All in
float64, as the references compute it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ditkit.runtime.errors import UserError

EPS = 1e-6  # the offset pytorch-fid and ADM add when the product's square root is singular
IMAG_TOL = 1e-3  # largest imaginary diagonal component tolerated as round-off (pytorch-fid's bound)


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of N×D features in float64; the covariance is unbiased (N−1), as `np.cov`."""
    feats = _as_float64(features)
    if feats.ndim != 2:
        raise UserError(f"features must be a 2-D array N×D, got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise UserError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    mu = feats.mean(axis=0)
    centered = feats - mu
    sigma = centered.T @ centered / (feats.shape[0] - 1)
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = EPS
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (a squared distance, as FID reports it)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape:
        raise UserError(
            f"feature means differ in size ({mu1.shape[0]} vs {mu2.shape[0]}); were both sets "
            "computed with the same network?"
        )
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise UserError(
            f"covariance shapes {sigma1.shape} and {sigma2.shape} do not fit means of size {mu1.shape[0]}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on (near-)singular products; the finiteness check below handles that case.
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if isinstance(covmean, tuple):  # older scipy returned (sqrtm, errest) for disp=False
        covmean = covmean[0]
    if not np.isfinite(covmean).all():
        # A singular product (e.g. fewer samples than dimensions): shift both covariances by eps·I.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if isinstance(covmean, tuple):
            covmean = covmean[0]
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_TOL):
            raise ValueError(
                f"Fréchet distance: imaginary component {largest:.3g} in the covariance square root"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two N×D feature sets."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
