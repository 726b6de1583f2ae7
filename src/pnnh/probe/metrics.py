"""Per-layer measures of how much of the input a representation keeps.

Everything here works on a batch: the input ``x`` flattened to (n, p) and a layer's features
flattened to (n, q). Similarities are computed in float64 from n x n Gram matrices, which
costs n^2 (p + q) and never needs a p x q matrix, so a 12k-wide conv feature map at batch 256
is cheap. One uncentered Gram per layer serves both linear CKA and ridge recoverability.
"""
from __future__ import annotations

import math

import torch

# Gram matrices are accumulated over column chunks so the float64 copy of a wide feature
# map never exists at once.
_GRAM_CHUNK = 8192


def flatten(z: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, prod(...)): every element of an example is one feature."""
    return z.reshape(z.shape[0], -1)


def gram(z: torch.Tensor) -> torch.Tensor:
    """Uncentered float64 Gram matrix z z^T of the flattened rows of ``z``."""
    z = flatten(z)
    g = torch.zeros(z.shape[0], z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[1], _GRAM_CHUNK):
        chunk = z[:, start:start + _GRAM_CHUNK].to(torch.float64)
        g += chunk @ chunk.T
    return g


def center_gram(g: torch.Tensor) -> torch.Tensor:
    """H g H with H = I - 11^T/n: the Gram matrix of column-centered features."""
    g = g - g.mean(dim=0, keepdim=True)
    return g - g.mean(dim=1, keepdim=True)


def cka_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    """Linear CKA from two uncentered Gram matrices of the same n examples.

    CKA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F). A representation constant over the batch has a
    zero centered Gram and is, by convention, at similarity 0 to anything.
    """
    kx, ky = center_gram(kx), center_gram(ky)
    denom = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    if denom == 0:
        return 0.0
    return float((kx * ky).sum() / denom)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two batches of n examples, in float64.

    Rows are examples, every other dimension is flattened into features. Uses the Gram form
    (cost n^2 (p+q)) or the feature form ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) (cost
    n (pq + p^2 + q^2)), whichever is cheaper. Invariant to orthogonal transforms and
    isotropic scaling of either side; CKA(X, X) = 1.
    """
    x, y = flatten(x), flatten(y)
    n, p = x.shape
    if y.shape[0] != n:
        raise ValueError(f"linear_cka needs the same number of examples, got {n} and {y.shape[0]}")
    if n < 2:
        raise ValueError(f"linear_cka needs at least 2 examples, got {n}")
    q = y.shape[1]
    if n * (p + q) <= p * q + p * p + q * q:
        return cka_from_grams(gram(x), gram(y))
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if denom == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denom)


def count_sketch(z: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Random projection of the flattened rows of ``z`` to ``dim`` features, in O(n q).

    Each feature is added, with a random sign, into one of ``dim`` buckets. Inner products are
    preserved in expectation (E[<Sa, Sb>] = <a, b>), so Gram matrices, and with them CKA and
    kernel ridge, are approximated with relative error ~ 1/sqrt(dim). A dense Gaussian
    projection would need a q x dim matrix: too large for a full-resolution feature map.
    """
    z = flatten(z)
    q = z.shape[1]
    bucket = torch.randint(0, dim, (q,), generator=generator).to(z.device)
    sign = (torch.randint(0, 2, (q,), generator=generator) * 2 - 1).to(z.device, z.dtype)
    out = torch.zeros(z.shape[0], dim, dtype=z.dtype, device=z.device)
    return out.index_add_(1, bucket, z * sign)


def _eigh_one_thread(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a small matrix on one thread: LAPACK's threads gain nothing at n ~ 128 and,
    on a busy machine, spin against each other (measured 0.4 s instead of 3 ms on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


# Relative ridge penalties tried by leave-one-out selection.
RIDGE_GRID = tuple(10.0**k for k in range(-6, 4))


def ridge_recoverability(g: torch.Tensor, targets: torch.Tensor, train: torch.Tensor,
                         test: torch.Tensor, ridge: float | None = None) -> float:
    """Held-out R^2 of ridge regression of ``targets`` from features with uncentered Gram ``g``.

    Linear ridge with an unpenalised intercept, in its dual (kernel) form: features and
    targets are centered with the training-half means, alpha = (K_tr + lam I)^-1 T_tr,
    prediction = K_te,tr alpha. All features enter, so the fit is exact for any width.
    The penalty lam = ridge * trace(K_tr) / n_tr is relative to the feature scale, so the score
    is invariant to isotropic scaling and orthogonal transforms of the features (like CKA).
    ``ridge=None`` picks it from RIDGE_GRID (1e-6 ... 1e3) by the exact leave-one-out error
    on the training half (closed form via one eigendecomposition of K_tr); a fixed small
    penalty overfits features that carry nothing and scores them R^2 << 0.
    R^2 = 1 - SSE / SST pooled over all target elements (variance-weighted), SST around the
    held-out mean: 1 is perfect recovery, 0 is no better than predicting the mean.
    """
    t = flatten(targets).to(torch.float64)
    # center the kernel with the training-half feature mean m: (f_i - m).(f_j - m)
    row_mean = g[:, train].mean(dim=1, keepdim=True)
    k = g - row_mean - row_mean.T + g[train][:, train].mean()
    k_tr, k_te = k[train][:, train], k[test][:, train]
    t_mean = t[train].mean(dim=0)
    eigval, eigvec = _eigh_one_thread(k_tr)
    eigval = eigval.clamp_min(0)
    proj = eigvec.T @ (t[train] - t_mean)
    scale = float(eigval.sum()) / len(train) or 1.0  # trace / n; a constant layer has 0
    grid = torch.tensor(RIDGE_GRID if ridge is None else (ridge,), dtype=k.dtype, device=k.device)
    shrink = eigval / (eigval + grid[:, None] * scale)  # (grid, n_tr)
    # leave-one-out residuals of ridge with intercept, hat matrix 11^T/n + U diag(shrink) U^T
    hat_diag = 1 / len(train) + shrink @ (eigvec**2).T  # (grid, n_tr)
    # squared norms of the fit residuals U diag(1 - shrink) proj, per example, through the
    # targets' Gram so no (grid, n_tr, targets) tensor is built for wide inputs
    a = eigvec[None] * (1 - shrink)[:, None, :]  # (grid, n_tr, n_tr)
    fit_sq = ((a @ (proj @ proj.T)) * a).sum(dim=2)  # (grid, n_tr)
    loo_err = (fit_sq / (1 - hat_diag) ** 2).sum(dim=1)
    # a leverage-1 point has no LOO estimate (inf/nan): such penalties are never chosen
    loo_err = torch.nan_to_num(loo_err, nan=math.inf)
    lam = float(grid[int(torch.argmin(loo_err))]) * scale
    alpha = eigvec @ (proj / (eigval + lam)[:, None])
    residual = t[test] - (k_te @ alpha + t_mean)
    sst = ((t[test] - t[test].mean(dim=0)) ** 2).sum()
    if sst == 0:
        raise ValueError("the held-out targets are constant: R^2 is undefined")
    return float(1 - (residual**2).sum() / sst)


def channel_matrix(f: torch.Tensor) -> torch.Tensor:
    """Features as (positions, channels): CNN (B, C, H, W) -> channels C; token sequences
    (B, T, D) -> channels D; vectors (B, W) -> channels W."""
    if f.ndim == 4:
        return f.transpose(1, 3).reshape(-1, f.shape[1])
    if f.ndim in (2, 3):
        return f.reshape(-1, f.shape[-1])
    raise ValueError(f"features of shape {tuple(f.shape)} are not supported: expected (B, C, H, W), "
                     "(B, tokens, dim) or (B, width)")


def activation_stats(f: torch.Tensor) -> dict[str, float]:
    """Survival, dead units and signal-propagation statistics of one layer's features.

    - survival: fraction of feature elements > 0. For sign-preserving activations with
      act(0) = 0 (ReLU, leaky ReLU, GELU, SiLU, tanh, and identity/coder channels),
      act(z) > 0 exactly when z > 0, so this is the fraction of surviving pre-activations
      (Thm 3.3's quantity) without needing a second hook before the activation.
    - dead: fraction of units (feature elements of one example: C*H*W, T*D or W) that are
      not > 0 for any example of the batch.
    - sq_channel_mean: average over channels of the squared channel mean (mean over batch and
      positions); channel_var: average over channels of the channel variance.
    """
    f = f.detach()
    c = channel_matrix(f).to(torch.float64)
    positive = flatten(f) > 0
    return {
        "survival": float(positive.to(torch.float64).mean()),
        "dead": float((~positive.any(dim=0)).to(torch.float64).mean()),
        "sq_channel_mean": float((c.mean(dim=0) ** 2).mean()),
        "channel_var": float(c.var(dim=0, unbiased=False).mean()),
    }
