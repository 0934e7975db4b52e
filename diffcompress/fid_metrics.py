"""The ADM metric math on feature arrays: Frechet distance (FID/sFID), Inception Score, k-NN precision/recall.

Definitions follow the ADM evaluator (guided-diffusion's ``evaluations/evaluator.py``) so numbers compare with
the papers' tables:

- FID: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``, with ``np.cov`` (N - 1) covariances. The trace of
  the matrix square root is the sum of square roots of the eigenvalues of ``F^T S2 F`` for a factor ``S1 = F F^T``
  (symmetric and PSD), which equals ``tr sqrtm(S1 S2)``, takes a few seconds at 2048-d where ``scipy.linalg.sqrtm``
  takes tens, and stays real and finite when there are fewer samples than dimensions, where sqrtm returns
  complex noise.
- Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` on splits of 5000, averaged over splits.
- Precision/recall (Kynkaanniemi et al.): a point is inside a set's manifold if it lies within the squared
  distance from some point of that set to that point's k-th nearest neighbour (k = 3, the point itself not
  counted). Precision: share of samples inside the reference manifold; recall: share of references inside the
  sample manifold.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import xlogy


def activation_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N - 1)-normalised covariance of ``[N, D]`` features, in float64."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {acts.shape}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _psd_eigen_sqrt(w: np.ndarray) -> np.ndarray:
    """Square roots of a PSD matrix's computed eigenvalues, those within rounding of zero set to zero (as a rank
    threshold does): with fewer samples than dimensions most eigenvalues are zero, and the square roots of their
    rounding noise would otherwise add up to a visible bias."""
    tol = max(w.max(initial=0.0), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.sqrt(np.where(w > tol, w, 0.0))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * _psd_eigen_sqrt(w)) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    # eig(S1 S2) = eig(F^T S2 F) for any S1 = F F^T: a Cholesky factor when S1 is positive definite (more samples
    # than dimensions, the usual case; cheap), else the PSD square root (one more eigendecomposition)
    # (the trace is symmetric in S1, S2, so either may be factored)
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):
        try:
            factor, other = np.linalg.cholesky(a), b
            break
        except np.linalg.LinAlgError:
            continue
    else:
        factor, other = _sqrt_psd(sigma1), sigma2
    m = factor.T @ other @ factor
    tr_covmean = _psd_eigen_sqrt(np.linalg.eigvalsh((m + m.T) / 2)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of class probabilities ``[N, K]`` (rows sum to 1), averaged over splits of ``split_size``."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (the norm expansion ADM uses, clamped at 0)."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def _as_tensor(x: np.ndarray | torch.Tensor, device: str) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x.to(device, torch.float32)


def manifold_radii(
    feats: np.ndarray | torch.Tensor, k: int = 3, block: int = 10000, device: str = "cpu"
) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point (the point itself is index 0)."""
    x = _as_tensor(feats, device)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points for manifold radii, got {len(x)}")
    radii = torch.empty(len(x), device=device)
    for i in range(0, len(x), block):
        d = _sq_distances(x[i : i + block], x)
        radii[i : i + block] = d.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(
    ref: np.ndarray, sample: np.ndarray, k: int = 3, block: int = 10000, device: str = "cpu"
) -> tuple[float, float]:
    """(precision, recall) of ``sample`` features against ``ref`` features."""
    r, s = _as_tensor(ref, device), _as_tensor(sample, device)
    r_radii, s_radii = manifold_radii(r, k, block, device), manifold_radii(s, k, block, device)
    s_inside = torch.zeros(len(s), dtype=torch.bool, device=device)  # sample within some reference's ball
    r_inside = torch.zeros(len(r), dtype=torch.bool, device=device)  # reference within some sample's ball
    for i in range(0, len(r), block):
        for j in range(0, len(s), block):
            d = _sq_distances(r[i : i + block], s[j : j + block])
            s_inside[j : j + block] |= (d <= r_radii[i : i + block, None]).any(0)
            r_inside[i : i + block] |= (d <= s_radii[None, j : j + block]).any(1)
    return s_inside.sum().item() / len(s), r_inside.sum().item() / len(r)
