"""Alpha query expansion (alpha-QE) and database-side augmentation (DBA).

Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018:  ``q' = L2norm(q + sum_{i<n} max(s_i, 0)^alpha r_i)``
where ``r_0 .. r_{n-1}`` are the ``n`` references most similar to ``q`` and
``s_i = q . r_i``.

The public functions validate their input; ``expand_queries`` and ``augment_references``
trust it (unit float32 rows in, unit float32 rows out), for :func:`rerank.rerank`.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_count, check_descriptors, check_nonneg, check_pair
from .search import build_index, faiss_device, search_index

__all__ = ["alpha_query_expansion", "augment_references", "database_augmentation", "expand_queries"]


def _weighted_sum(base: np.ndarray, ref: np.ndarray, sims: np.ndarray, idx: np.ndarray,
                  alpha: float, include_base: bool, batch_size: int) -> np.ndarray:
    """``L2norm([base +] sum_j max(sims_j, 0)^alpha * ref[idx_j])`` in row batches."""
    out = np.empty_like(base)
    for s in range(0, base.shape[0], batch_size):
        e = min(s + batch_size, base.shape[0])
        w = np.maximum(sims[s:e].astype(np.float64), 0.0) ** alpha  # (b, n)
        w[idx[s:e] < 0] = 0.0
        acc = np.einsum("bn,bnd->bd", w, ref[np.maximum(idx[s:e], 0)].astype(np.float64))
        if include_base:
            acc += base[s:e]
        norms = np.linalg.norm(acc, axis=1, keepdims=True)
        # A row can only vanish if it had no positive-weight neighbour and no base term.
        norms[norms == 0] = 1.0
        out[s:e] = (acc / norms).astype(np.float32)
    return out


def alpha_query_expansion(query_desc: np.ndarray, ref_desc: np.ndarray, n: int,
                          alpha: float = 3.0, device: str = "cpu",
                          batch_size: int = 4096) -> np.ndarray:
    """alpha-QE of every query against ``ref_desc``.

    ``q' = L2norm(q + sum over the top-n references r of max(q.r, 0)^alpha * r)``.
    ``n = 0`` returns the (validated, normalised) queries unchanged; ``n`` larger
    than the number of references is clamped to it.  Returns float32 ``(nq, d)``.
    """
    q, r = check_pair(query_desc, ref_desc)
    n = min(check_count(n, "n", minimum=0), r.shape[0])
    return expand_queries(q, r, n, check_nonneg(alpha, "alpha"), faiss_device(device), batch_size)


def expand_queries(q: np.ndarray, r: np.ndarray, n: int, alpha: float, dev: str = "cpu",
                   batch_size: int = 4096) -> np.ndarray:
    """:func:`alpha_query_expansion` of unit rows, ``0 <= n <= nr``, a resolved device."""
    if n == 0:
        return q
    idx = build_index(r, dev, k=n)
    sims, nbr = search_index(idx, q, n, batch_size)
    return _weighted_sum(q, r, sims, nbr, alpha, True, batch_size)


def database_augmentation(ref_desc: np.ndarray, n: int, alpha: float = 3.0,
                          device: str = "cpu", batch_size: int = 4096) -> np.ndarray:
    """DBA: replace every reference by the alpha-weighted mean of its top-n references.

    Self-inclusion: the neighbour list of a reference is its top-``n`` among
    *all* references, which includes the reference itself as its own top-1
    (similarity 1, weight 1).  So ``r' = L2norm(r + sum over its n-1 nearest
    other references of max(s, 0)^alpha * r_j)``, the usual DBA.  ``n = 0`` and
    ``n = 1`` are the identity (up to normalisation); ``n`` larger than the
    number of references is clamped.  (If exact duplicates exist, a duplicate
    may take self's slot; the vector and its weight are identical, so the
    result is the same.)  Returns float32 ``(nr, d)``.
    """
    r = check_descriptors(ref_desc, "ref_desc")
    n = min(check_count(n, "n", minimum=0), r.shape[0])
    return augment_references(r, n, check_nonneg(alpha, "alpha"), faiss_device(device), batch_size)


def augment_references(r: np.ndarray, n: int, alpha: float, dev: str = "cpu",
                       batch_size: int = 4096) -> np.ndarray:
    """:func:`database_augmentation` of unit rows, ``0 <= n <= nr``, a resolved device."""
    if n <= 1:
        return r
    idx = build_index(r, dev, k=n)
    sims, nbr = search_index(idx, r, n, batch_size)
    return _weighted_sum(r, r, sims, nbr, alpha, False, batch_size)
