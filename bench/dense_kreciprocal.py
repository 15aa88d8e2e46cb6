"""Dense float64 k-reciprocal re-ranking: the paper's reference algorithm, N x N.

The single dense reference used both by ``tests/test_rerank_kreciprocal.py``
(imported via ``sys.path``) and by ``bench/bench_rerank.py``.  It follows the
structure of ``re_ranking`` from the reference code of Zhong et al., CVPR
2017 (zhunzhong07/person-re-ranking), written from the paper's description:
full (N, N) squared-distance matrix, row normalisation by the row maximum,
argsort, per-row k-reciprocal sets and expansion, Gaussian weights, local
query expansion, inverted-index Jaccard.  O(N^2) memory -- for checking only.
"""

from __future__ import annotations

import numpy as np


def dense_k_reciprocal(query: np.ndarray, ref: np.ndarray, k1: int = 20, k2: int = 6,
                       lambda_value: float = 0.3) -> np.ndarray:
    """Final distance matrix (nq, nr) float64 (smaller is better)."""
    X = np.concatenate([np.asarray(query, np.float64), np.asarray(ref, np.float64)])
    nq = query.shape[0]
    N = X.shape[0]
    sq = np.einsum("ij,ij->i", X, X)
    dist = sq[:, None] + sq[None, :] - 2.0 * (X @ X.T)
    np.maximum(dist, 0.0, out=dist)
    dist /= dist.max(axis=1, keepdims=True)        # row i divided by its maximum
    initial_rank = np.argsort(dist, axis=1)
    V = np.zeros((N, N), dtype=np.float64)
    kh = int(np.around(k1 / 2.0))
    for i in range(N):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        k_rec = forward[np.where(backward == i)[0]]
        expansion = k_rec
        for cand in k_rec:
            c_forward = initial_rank[cand, :kh + 1]
            c_backward = initial_rank[c_forward, :kh + 1]
            c_rec = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_rec, k_rec)) > 2.0 / 3.0 * len(c_rec):
                expansion = np.append(expansion, c_rec)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(N):
            V_qe[i] = V[initial_rank[i, :k2]].mean(axis=0)
        V = V_qe
    inv_index = [np.where(V[:, c] != 0)[0] for c in range(N)]
    jaccard = np.zeros((nq, N), dtype=np.float64)
    for i in range(nq):
        temp_min = np.zeros(N, dtype=np.float64)
        nz = np.where(V[i] != 0)[0]
        for c in nz:
            rows = inv_index[c]
            temp_min[rows] += np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1.0 - temp_min / (2.0 - temp_min)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[:nq]
    return final[:, nq:]


def dense_top_k(query: np.ndarray, ref: np.ndarray, top_k: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(distances (nq, top_k), indices (nq, top_k)) from the dense final matrix, ascending."""
    final = dense_k_reciprocal(query, ref, **kw)
    idx = np.argsort(final, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(final, idx, axis=1), idx
