"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without an (N, N) matrix.

Computes exactly what the paper's reference code (``re_ranking`` in
zhunzhong07/person-re-ranking, layumi/Person_reID_baseline) computes over all
``N = nq + nr`` images, but from sparse structures, in four phases:

1. Neighbours (:mod:`rerank.graph`): ``original_dist[i, j] = ||x_i - x_j||^2 /
   max_j' ||x_i - x_j'||^2``; the kNN lists over all N images and the row maxima (the
   farthest image) come from one pass over the Gram matrix. Rows whose float32 ranks
   are within 1e-4 of a set boundary (k2, round(k1/2) + 1, k1 + 1) are re-sorted with
   float64 distances; row maxima are float64.
2. V (:func:`_build_v`): k1-reciprocal sets, their expansion by the round(k1/2)-reciprocal
   sets of their members that overlap them by more than 2/3, Gaussian weights
   ``exp(-original_dist)`` normalised to sum 1 -> sparse ``V`` (CSR, ~N * 30 entries).
3. Local query expansion (:func:`_local_query_expansion`): row i of V := mean of the V
   rows of its k2 nearest images (skipped for k2 == 1, as in the reference code).
4. Jaccard distance and the exact top_k (:func:`_rank_block`, per block of queries):
   ``jaccard = 1 - m / (2 - m)`` with ``m = sum_c min(V_qc, V_rc)``, accumulated through
   the inverted index ``V_refs^T``; ``final = (1 - lambda) * jaccard + lambda *
   original``. A reference sharing no support with the query has Jaccard distance
   exactly 1, so the exact top_k lies in {references with shared support} U {top_k
   references by original distance (from the graph)}; supported references outside the
   latter are pruned with the lower bound ``(1 - lambda) * jaccard + lambda * (top_k-th
   original distance)`` and the survivors ranked exactly.

Memory is O(N * k1 * k2 + nq * top_k + block * N), never O(N^2).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._checks import check_count, check_stacked, check_unit_interval, clamp_top_k, progress_enabled
from ._parallel import blas_threads, run_blocks
from .graph import NeighbourGraph, build_graph, d2_pairs
from .search import faiss_device

__all__ = ["k_reciprocal", "k_reciprocal_unit", "kreciprocal_depth"]

_ROW_BLOCK = 4096
_TRIPLE_BUDGET = 2_000_000   # (query entry, reference) pairs per Jaccard block


def kreciprocal_depth(k1: int, k2: int) -> int:
    """Neighbours per row (itself included) k-reciprocal reads: ``max(k1 + 1, k2)``."""
    return max(k1 + 1, k2)


def k_reciprocal(query_desc: np.ndarray, ref_desc: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, top_k: int = 1000, device: str = "cpu",
                 batch_size: int = 4096, query_block: int | None = None,
                 progress: bool | None = None, fused: bool = True,
                 gemm_block: int = 1024, graph: NeighbourGraph | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking of references for every query.

    Returns ``(distances, indices)``: ``distances`` float32 ``(nq, top_k)``
    final distances ``(1 - lambda) * jaccard + lambda * original``, ascending
    (smaller is better); ``indices`` int64 ``(nq, top_k)`` into ``ref_desc``,
    best first.  Identical (up to float rounding and the order of exact ties)
    to the dense reference implementation restricted to its top_k.

    ``k1``, ``k2`` must be in ``[1, N - 1]`` (``N = nq + nr``), else
    ``ValueError``; ``lambda_value`` in ``[0, 1]``; ``top_k`` larger than the
    number of references is clamped to it.  ``graph``: a :class:`NeighbourGraph`
    of the same ``query_desc``/``ref_desc`` with ``depth >= max(k1 + 1, k2)`` and
    ``ref_depth >= top_k`` (else ``ValueError``), to skip the kNN pass; the result
    is the same as without it.

    Tuning knobs (results do not depend on them): ``query_block`` queries are
    processed at a time in the Jaccard step (default: ~64 MB of scratch);
    ``gemm_block`` rows per GEMM in the CPU kNN pass; ``fused=False`` uses faiss
    index searches on the CPU too (slower; the GPU path); ``batch_size`` is the
    faiss query batch there.  ``progress=None`` shows tqdm bars only when stderr
    is a terminal.
    """
    X, nq = check_stacked(query_desc, ref_desc)
    n = X.shape[0]
    k1 = check_count(k1, "k1", 1, n - 1)
    k2 = check_count(k2, "k2", 1, n - 1)
    lam = check_unit_interval(lambda_value, "lambda_value")
    top_k = clamp_top_k(top_k, n - nq)
    if query_block is not None:
        query_block = check_count(query_block, "query_block", 1)
    return k_reciprocal_unit(X, nq, k1, k2, lam, top_k, faiss_device(device), progress_enabled(progress), graph,
                             query_block=query_block, fused=fused,
                             gemm_block=check_count(gemm_block, "gemm_block", 1),
                             batch_size=check_count(batch_size, "batch_size", 1))


def k_reciprocal_unit(X: np.ndarray, nq: int, k1: int, k2: int, lam: float, top_k: int, dev: str = "cpu",
                      show: bool = False, graph: NeighbourGraph | None = None, *, query_block: int | None = None,
                      fused: bool = True, gemm_block: int = 1024,
                      batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """:func:`k_reciprocal` of stacked unit rows ``X`` (nq queries first; see
    :func:`rerank._checks.check_stacked`) on checked parameters and a resolved device."""
    if graph is None:
        graph = build_graph(X, nq, kreciprocal_depth(k1, k2), kreciprocal_depth(k1, k2), top_k, dev, show,
                            fused=fused, gemm_block=gemm_block, batch_size=batch_size)
    else:
        graph.check(X, nq, "k_reciprocal", depth=kreciprocal_depth(k1, k2), ref_depth=top_k)
    return k_reciprocal_graph(graph, k1, k2, lam, top_k, show, query_block)


def k_reciprocal_graph(graph: NeighbourGraph, k1: int, k2: int, lam: float, top_k: int, show: bool = False,
                       query_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`k_reciprocal` from a graph deep enough for it (``graph.check``), on checked
    parameters."""
    half = int(np.around(k1 / 2.0)) + 1
    nbr = graph.neighbours(kreciprocal_depth(k1, k2), [k2, half, k1 + 1])
    V = _local_query_expansion(_build_v(graph, nbr, k1), nbr, k2)
    del nbr
    return _jaccard_top_k(V, graph, lam, top_k, query_block, show)


def _reciprocal_mask(lists: np.ndarray) -> np.ndarray:
    """mask[i, t]: row ``lists[i, t]`` has ``i`` in its own list ``lists[lists[i, t]]``."""
    n = lists.shape[0]
    mask = np.empty(lists.shape, dtype=bool)
    for s in range(0, n, _ROW_BLOCK):
        e = min(s + _ROW_BLOCK, n)
        mask[s:e] = (lists[lists[s:e]] == np.arange(s, e)[:, None, None]).any(axis=-1)
    return mask


def _build_v(graph: NeighbourGraph, nbr: np.ndarray, k1: int) -> sp.csr_matrix:
    """Sparse V (N, N): Gaussian weights over the expanded k-reciprocal set of every row."""
    n = nbr.shape[0]
    half = int(np.around(k1 / 2.0)) + 1
    forward = nbr[:, :k1 + 1]                      # R(i, k1) candidates: i's k1 + 1 nearest
    forward_half = nbr[:, :half]
    reciprocal = _reciprocal_mask(forward)
    reciprocal_half = _reciprocal_mask(forward_half)
    half_size = reciprocal_half.sum(axis=1)        # |R(c, k1/2)| of every row c
    rows_parts, cols_parts = [], []
    for s in range(0, n, _ROW_BLOCK):
        e = min(s + _ROW_BLOCK, n)
        cand = forward[s:e]                                       # (b, k1+1)
        rec_set = np.where(reciprocal[s:e], cand, -1)             # R(i, k1), -1 padded
        cand_half = forward_half[cand]                            # (b, k1+1, half)
        cand_half_rec = reciprocal_half[cand]                     # ... members of R(c, k1/2)
        in_rec_set = np.zeros(cand_half.shape, dtype=bool)
        for t in range(rec_set.shape[1]):
            in_rec_set |= cand_half == rec_set[:, t, None, None]
        overlap = (in_rec_set & cand_half_rec).sum(axis=-1)
        accept = reciprocal[s:e] & (overlap > 2.0 / 3.0 * half_size[cand])
        members = np.concatenate(
            [np.where(reciprocal[s:e], cand, n),
             np.where(accept[:, :, None] & cand_half_rec, cand_half, n).reshape(e - s, -1)], axis=1)
        members.sort(axis=1)                                      # n pads sort last
        keep = members < n
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]          # each member once
        rows_parts.append(np.repeat(np.arange(s, e), keep.sum(axis=1)))
        cols_parts.append(members[keep])
    rows = np.concatenate(rows_parts)
    cols = np.concatenate(cols_parts)
    weight = np.exp(-d2_pairs(graph.desc, graph.sq, rows, cols) / graph.rowmax[rows])
    weight /= np.bincount(rows, weights=weight, minlength=n)[rows]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((weight, cols, indptr), shape=(n, n))


def _local_query_expansion(V: sp.csr_matrix, nbr: np.ndarray, k2: int) -> sp.csr_matrix:
    """Row i := mean of V rows nbr[i, :k2] (the reference code skips this for k2 == 1)."""
    if k2 == 1:
        return V
    n = V.shape[0]
    mean_of = sp.csr_matrix((np.full(n * k2, 1.0 / k2), nbr[:, :k2].ravel(),
                             np.arange(0, n * k2 + 1, k2)), shape=(n, n))
    out = (mean_of @ V).tocsr()
    out.sum_duplicates()
    return out


def _min_sums(Vq: sp.csr_matrix, VrT: sp.csr_matrix, nr: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums, support), both (b, nr): sum_c min(Vq[i, c], Vr[j, c]) (float64) via the
    inverted index VrT, and whether query i and reference j share any column (bool)."""
    b = Vq.shape[0]
    cols = Vq.indices
    starts = VrT.indptr[cols]
    lens = VrT.indptr[cols + 1] - starts
    total = int(lens.sum())
    support = np.zeros(b * nr, dtype=bool)
    if total == 0:
        return np.zeros((b, nr)), support.reshape(b, nr)
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
    query_row = np.repeat(np.arange(b) * nr, np.diff(Vq.indptr))
    key = np.repeat(query_row, lens) + VrT.indices[pos]
    support[key] = True
    sums = np.bincount(key, weights=np.minimum(np.repeat(Vq.data, lens), VrT.data[pos]), minlength=b * nr)
    return sums.reshape(b, nr), support.reshape(b, nr)


def _query_blocks(Vq: sp.csr_matrix, VrT: sp.csr_matrix, query_block: int,
                  budget: int) -> list[tuple[int, int]]:
    """Spans of at most ``query_block`` queries and ~``budget`` (query entry, reference) pairs
    in the min-sum step, so that scratch memory stays bounded."""
    nq = Vq.shape[0]
    col_nnz = np.diff(VrT.indptr)
    per_query = np.bincount(np.repeat(np.arange(nq), np.diff(Vq.indptr)),
                            weights=col_nnz[Vq.indices], minlength=nq)
    bounds = [0]
    csum = np.concatenate([[0.0], np.cumsum(per_query)])
    while bounds[-1] < nq:
        s = bounds[-1]
        e = int(np.searchsorted(csum, csum[s] + budget, side="right")) - 1
        bounds.append(min(max(e, s + 1), s + query_block, nq))
    return list(zip(bounds[:-1], bounds[1:]))


def _jaccard_top_k(V: sp.csr_matrix, graph: NeighbourGraph, lam: float, top_k: int,
                   query_block: int | None, show: bool) -> tuple[np.ndarray, np.ndarray]:
    """(distances (nq, top_k) float32 ascending, indices (nq, top_k) int64) of every query."""
    nq, nr = graph.n_query, graph.n_ref
    Vq = V[:nq]
    VrT = V[nq:].T.tocsr()
    del V
    listed_ip, listed = graph.ref_ip, graph.ref_idx
    if listed.shape[1] > top_k:                    # a deeper graph: its top_k references
        part = np.argpartition(-listed_ip, top_k - 1, axis=1)[:, :top_k]
        listed_ip, listed = np.take_along_axis(listed_ip, part, axis=1), np.take_along_axis(listed, part, axis=1)
    workers = blas_threads()
    if query_block is None:          # ~64 MB of dense scratch per block, shared by the workers
        query_block = int(max(1, min(1024, 8_000_000 // (nr * workers))))
    out_d = np.empty((nq, top_k), dtype=np.float32)
    out_i = np.empty((nq, top_k), dtype=np.int64)

    def query_block_top_k(span: tuple[int, int]) -> None:
        s, e = span
        min_sums, support = _min_sums(Vq[s:e], VrT, nr)
        out_d[s:e], out_i[s:e] = _rank_block(graph, s, min_sums, support, listed_ip[s:e], listed[s:e], lam,
                                             top_k)

    spans = _query_blocks(Vq, VrT, query_block, _TRIPLE_BUDGET // workers)
    for _ in run_blocks(query_block_top_k, spans, workers, "k-recip: jaccard", show):
        pass
    return out_d, out_i


def _rank_block(graph: NeighbourGraph, s: int, min_sums: np.ndarray, support: np.ndarray,
                listed_ip: np.ndarray, listed: np.ndarray, lam: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top_k of queries ``s .. s + b``: their ``listed`` (b, top_k) references by original
    distance, plus the references with shared ``support`` (b, nr) that the lower bound cannot
    rule out. Returns (final distances (b, top_k) float64 ascending, indices (b, top_k) int64)."""
    nq = graph.n_query
    b, nr = min_sums.shape
    rowmax = graph.rowmax[s:s + b]
    block_rows = np.arange(b)[:, None]
    original = graph.sq[s:s + b, None] + graph.sq[nq + listed] - 2.0 * listed_ip.astype(np.float64)
    original = np.maximum(original, 0.0) / rowmax[:, None]
    m = min_sums[block_rows, listed]
    final = (1.0 - lam) * (1.0 - m / (2.0 - m)) + lam * original
    support[block_rows, listed] = False
    # Supported references outside the listed ones, pruned by a lower bound.
    flat = np.flatnonzero(support)
    m = min_sums.ravel()[flat]
    jaccard = 1.0 - m / (2.0 - m)
    extra_q = flat // nr
    keep = (1.0 - lam) * jaccard + lam * original.max(axis=1)[extra_q] < final.max(axis=1)[extra_q]
    flat, extra_q, jaccard = flat[keep], extra_q[keep], jaccard[keep]
    if not flat.size:
        return _sorted_top_k(final, listed, top_k)
    extra_r = flat % nr
    d2 = d2_pairs(graph.desc, graph.sq, s + extra_q, nq + extra_r)
    n_extra = np.bincount(extra_q, minlength=b)
    cand_d = np.full((b, top_k + int(n_extra.max())), np.inf)
    cand_i = np.full(cand_d.shape, -1, dtype=np.int64)
    cand_d[:, :top_k], cand_i[:, :top_k] = final, listed
    slot = top_k + np.arange(flat.size) - np.repeat(np.cumsum(n_extra) - n_extra, n_extra)
    cand_d[extra_q, slot] = (1.0 - lam) * jaccard + lam * d2 / rowmax[extra_q]
    cand_i[extra_q, slot] = extra_r
    return _sorted_top_k(cand_d, cand_i, top_k)


def _sorted_top_k(dist: np.ndarray, idx: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` smallest ``dist`` of every row with their ``idx``, ascending."""
    if dist.shape[1] > top_k:
        best = np.argpartition(dist, top_k - 1, axis=1)[:, :top_k]
        dist, idx = np.take_along_axis(dist, best, axis=1), np.take_along_axis(idx, best, axis=1)
    order = np.argsort(dist, axis=1)
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)
