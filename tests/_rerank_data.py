"""Small seeded fixtures shared by the tests/test_rerank_*.py files."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int = 64, n_clusters: int = 60, seed: int = 0,
              noise: float = 0.6) -> np.ndarray:
    """Seeded float32 unit vectors around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_diffusion(query: np.ndarray, ref: np.ndarray, k: int = 50, alpha: float = 0.99, gamma: float = 3.0,
                    truncate: int | None = None) -> np.ndarray:
    """Diffusion values f (nq, nr) float64 of every query at every reference: the definition of
    ``rerank.diffusion`` written out densely (N x N float64, ``np.linalg.solve``; tests only)."""
    X = np.concatenate([query, ref]).astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    nq, n = len(query), len(X)
    sq = np.einsum("ij,ij->i", X, X)
    gram = X @ X.T
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    np.fill_diagonal(d2, np.inf)                       # "other" rows only
    order = np.argsort(d2, axis=1, kind="stable")
    knn = np.zeros((n, n), dtype=bool)
    knn[np.arange(n)[:, None], order[:, :k]] = True
    A = np.where(knn & knn.T, np.maximum(gram, 0.0) ** gamma, 0.0)
    degree = A.sum(axis=1)
    scale = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    W = scale[:, None] * A * scale[None, :]
    f = np.zeros((nq, n))
    if truncate is None or truncate >= n - 1:
        f = np.linalg.solve(np.eye(n) - alpha * W, np.eye(n)[:, :nq]).T
    else:
        for q in range(nq):
            nodes = np.r_[q, order[q, :truncate]]
            e = np.zeros(len(nodes))
            e[0] = 1.0
            f[q, nodes] = np.linalg.solve(np.eye(len(nodes)) - alpha * W[np.ix_(nodes, nodes)], e)
    return np.where(f < 1e-8 / (1.0 - alpha), 0.0, f)[:, nq:]


def dense_diffusion_ranking(query: np.ndarray, ref: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(nq, nr) reference indices by f descending, ties by inner product descending."""
    ip = query.astype(np.float64) @ ref.astype(np.float64).T
    return np.array([np.lexsort((-ip[i], -f[i])) for i in range(len(query))])
