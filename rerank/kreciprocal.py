"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without an (N, N) matrix.

Computes exactly what the paper's reference code (``re_ranking`` in
zhunzhong07/person-re-ranking, layumi/Person_reID_baseline) computes over
all ``N = nq + nr`` images, but from sparse structures:

1. ``original_dist[i, j] = ||x_i - x_j||^2 / max_j' ||x_i - x_j'||^2``.
   The neighbour lists (kNN over all N images) and the row maxima (the
   *farthest* point: for unit vectors d^2 = 2 - 2cos, so it is the nearest
   by inner product to ``-x``) come, on the CPU, from one blocked GEMM over
   the upper triangle of the Gram matrix with faiss' C++ top-k heaps; with
   ``device="cuda"`` (or ``fused=False``) from two faiss index searches.
   Rows whose float32 ranks are within 1e-4 of a set boundary are re-sorted
   with float64 distances; row maxima are recomputed in float64.
2. k1-reciprocal sets, their expansion by round(k1/2)-reciprocal sets that
   overlap by more than 2/3, Gaussian weights ``exp(-d)`` normalised to sum
   1 -> sparse ``V`` (CSR, ~N * 30 entries).
3. Local query expansion ``V := mean of V rows of initial_rank[i, :k2]``
   (a sparse product, skipped for k2 == 1 as in the reference code).
4. Jaccard distance ``1 - m / (2 - m)`` with ``m = sum_c min(V_qc, V_rc)``,
   accumulated per query block through the inverted index ``V_refs^T``
   (column -> reference rows).
5. ``final = (1 - lambda) * jaccard + lambda * original``.  A reference
   sharing no support with the query has Jaccard distance exactly 1, so the
   exact top_k lies in {references with shared support} U {top_k references
   by original distance} (per query block: one GEMM against the references
   and a faiss heap); supported candidates outside the latter are pruned
   with the lower bound ``(1-lambda) * jac + lambda * (top_k-th original
   distance)`` and the survivors ranked exactly.

Memory is O(N * k1 * k2 + nq * top_k + block * N), never O(N^2).
"""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from ._checks import check_count, check_pair, check_unit_interval, clamp_top_k, progress_enabled
from .search import build_index, faiss_device, search_index

__all__ = ["k_reciprocal"]

_TIE_EPS = 1e-4   # float32 kNN ranks closer than this are re-checked in float64
_ROW_BLOCK = 4096
_TRIPLE_BUDGET = 2_000_000   # (query entry, reference) pairs per Jaccard block


def _d2_pairs(X: np.ndarray, sq: np.ndarray, rows: np.ndarray, cols: np.ndarray,
              exact: bool = False, chunk: int = 8192) -> np.ndarray:
    """Squared distances ``||X[rows] - X[cols]||^2`` as float64 (float32 dots unless exact)."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    for s in range(0, rows.shape[0], chunk):
        a, b = X[rows[s:s + chunk]], X[cols[s:s + chunk]]
        if exact:
            dots = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
        else:
            dots = np.einsum("ij,ij->i", a, b).astype(np.float64)
        out[s:s + chunk] = sq[rows[s:s + chunk]] + sq[cols[s:s + chunk]] - 2.0 * dots
    return np.maximum(out, 0.0)


def _heap_topk(val: np.ndarray, ids: np.ndarray, scores: np.ndarray, id0: int) -> None:
    """Merge ``scores`` (b, m) (ids ``id0 + column``) into the max-heaps ``val``/``ids`` (b, k)."""
    h = faiss.float_minheap_array_t()   # min-heap of size k keeps the k largest
    h.k, h.nh = val.shape[1], val.shape[0]
    h.val, h.ids = faiss.swig_ptr(val), faiss.swig_ptr(ids)
    h.addn(scores.shape[1], faiss.swig_ptr(scores), id0, 0, scores.shape[0])


def _graph_fused(X: np.ndarray, Kp: int, block: int,
                 progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One blocked GEMM pass over the upper triangle of X X^T (CPU), O(block * N) scratch.

    Returns ``ip`` (N, Kp) float32 top inner products over all N (best first),
    ``nbr`` (N, Kp) int64 their indices, and ``far`` (N,) int64 the index of
    the minimum inner product (the farthest point).  Does the work of two
    faiss searches (kNN and farthest) with half the GEMM of one, using the
    symmetry of the Gram matrix; the top-Kp selection uses faiss' C++ heaps.
    """
    N = X.shape[0]
    ip = np.full((N, Kp), -np.inf, dtype=np.float32)
    nbr = np.full((N, Kp), -1, dtype=np.int64)
    far = np.zeros(N, dtype=np.int64)
    low = np.full(N, np.inf, dtype=np.float32)

    def update_far(rows0: int, scores: np.ndarray, col0: int) -> None:
        arg = scores.argmin(axis=1)
        val = scores[np.arange(scores.shape[0]), arg]
        sl = slice(rows0, rows0 + scores.shape[0])
        better = val < low[sl]
        low[sl] = np.where(better, val, low[sl])
        far[sl] = np.where(better, arg + col0, far[sl])

    for s in tqdm(range(0, N, block), desc="k-recip: kNN", disable=not progress, leave=False):
        e = min(s + block, N)
        S = X[s:e] @ X[s:].T                          # rows s:e, columns s:N
        _heap_topk(ip[s:e], nbr[s:e], S, s)
        update_far(s, S, s)
        if e < N:                                     # mirrored: rows e:N, columns s:e
            T = np.ascontiguousarray(S[:, e - s:].T)
            _heap_topk(ip[e:], nbr[e:], T, s)
            update_far(e, T, s)
    order = np.argsort(-ip, axis=1, kind="stable")   # heaps -> sorted, best first
    return np.take_along_axis(ip, order, axis=1), np.take_along_axis(nbr, order, axis=1), far


def _graph_searched(X: np.ndarray, Kp: int, dev: str, batch_size: int,
                    progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same outputs as :func:`_graph_fused` from two faiss index searches
    (kNN, and farthest = nearest to ``-x``); used with a GPU index (sharded
    where ``Kp`` exceeds the GPU's k limit, see :func:`rerank.search.build_index`)."""
    index = build_index(X, dev, k=Kp)
    ip, nbr = search_index(index, X, Kp, batch_size, progress, "k-recip: kNN")
    _, far = search_index(index, -X, 1, batch_size, progress, "k-recip: farthest")
    return ip, nbr, far[:, 0]


def _refine_neighbours(X: np.ndarray, sq: np.ndarray, ip: np.ndarray, nbr: np.ndarray, K: int,
                       bounds: list[int]) -> np.ndarray:
    """(N, K) neighbours by squared distance; rows with a near-tie (< 1e-4) at a
    set boundary are re-sorted with float64 distances so that set membership
    matches an exact float64 computation."""
    N, Kp = nbr.shape
    d2 = sq[:, None] + sq[nbr] - 2.0 * ip.astype(np.float64)
    amb = np.zeros(N, dtype=bool)
    for b in bounds:
        if 0 < b < Kp:
            amb |= (d2[:, b] - d2[:, b - 1]) < _TIE_EPS
    rows = np.nonzero(amb)[0]
    if rows.size:
        sub = nbr[rows]
        d2x = _d2_pairs(X, sq, np.repeat(rows, Kp), sub.ravel(), exact=True).reshape(-1, Kp)
        order = np.argsort(d2x, axis=1, kind="stable")
        nbr[rows] = np.take_along_axis(sub, order, axis=1)
    return np.ascontiguousarray(nbr[:, :K])


def _reciprocal_mask(R: np.ndarray) -> np.ndarray:
    """mask[i, t] = R[i, t] has i in its own list R[R[i, t]]."""
    N = R.shape[0]
    mask = np.empty(R.shape, dtype=bool)
    for s in range(0, N, _ROW_BLOCK):
        e = min(s + _ROW_BLOCK, N)
        mask[s:e] = (R[R[s:e]] == np.arange(s, e)[:, None, None]).any(axis=-1)
    return mask


def _build_v(X: np.ndarray, sq: np.ndarray, nbr: np.ndarray, rowmax: np.ndarray,
             k1: int) -> sp.csr_matrix:
    """Sparse V: Gaussian weights over the expanded k-reciprocal set of every row."""
    N = X.shape[0]
    kh = int(np.around(k1 / 2.0)) + 1
    R1 = nbr[:, :k1 + 1]
    Rh = nbr[:, :kh]
    mask1 = _reciprocal_mask(R1)
    maskh = _reciprocal_mask(Rh)
    hsize = maskh.sum(axis=1)
    rows_l, cols_l = [], []
    for s in range(0, N, _ROW_BLOCK):
        e = min(s + _ROW_BLOCK, N)
        b = e - s
        C = R1[s:e]                                   # candidates (b, k1+1)
        Kset = np.where(mask1[s:e], C, -1)            # k1-reciprocal set, -1 padded
        H = Rh[C]                                     # candidates' half lists (b, k1+1, kh)
        Hm = maskh[C]                                 # ... reciprocal members
        inK = np.zeros(H.shape, dtype=bool)
        for t in range(Kset.shape[1]):                # membership of H in Kset
            inK |= H == Kset[:, t, None, None]
        cnt = (inK & Hm).sum(axis=-1)
        accept = mask1[s:e] & (cnt > 2.0 / 3.0 * hsize[C])
        E = np.concatenate(
            [np.where(mask1[s:e], C, N),
             np.where(accept[:, :, None] & Hm, H, N).reshape(b, -1)], axis=1)
        E.sort(axis=1)
        valid = E < N
        valid[:, 1:] &= E[:, 1:] != E[:, :-1]
        rows_l.append(np.repeat(np.arange(s, e), valid.sum(axis=1)))
        cols_l.append(E[valid])
    rows = np.concatenate(rows_l)
    cols = np.concatenate(cols_l)
    dist = _d2_pairs(X, sq, rows, cols) / rowmax[rows]
    w = np.exp(-dist)
    counts = np.bincount(rows, minlength=N)
    w /= np.bincount(rows, weights=w, minlength=N)[rows]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sp.csr_matrix((w, cols, indptr), shape=(N, N))


def _local_qe(V: sp.csr_matrix, nbr: np.ndarray, k2: int) -> sp.csr_matrix:
    """Row i := mean of V rows nbr[i, :k2] (the reference code skips this for k2 == 1)."""
    if k2 == 1:
        return V
    N = V.shape[0]
    M = sp.csr_matrix((np.full(N * k2, 1.0 / k2), nbr[:, :k2].ravel(),
                       np.arange(0, N * k2 + 1, k2)), shape=(N, N))
    out = (M @ V).tocsr()
    out.sum_duplicates()
    return out


def _min_sums(Vq: sp.csr_matrix, VrT: sp.csr_matrix, nr: int) -> np.ndarray:
    """Dense (b, nr) block of sum_c min(Vq[i, c], Vr[j, c]) via the inverted index VrT."""
    b = Vq.shape[0]
    cols = Vq.indices
    a = Vq.data
    qrow = np.repeat(np.arange(b), np.diff(Vq.indptr))
    starts = VrT.indptr[cols]
    lens = VrT.indptr[cols + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros((b, nr))
    offs = np.cumsum(lens) - lens
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - offs, lens)
    m = np.minimum(np.repeat(a, lens), VrT.data[pos])
    key = np.repeat(qrow * nr, lens) + VrT.indices[pos]
    return np.bincount(key, weights=m, minlength=b * nr).reshape(b, nr)


def k_reciprocal(query_desc: np.ndarray, ref_desc: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, top_k: int = 1000, device: str = "cpu",
                 batch_size: int = 4096, query_block: int | None = None,
                 progress: bool | None = None, fused: bool = True,
                 gemm_block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking of references for every query.

    Returns ``(distances, indices)``: ``distances`` float32 ``(nq, top_k)``
    final distances ``(1 - lambda) * jaccard + lambda * original``, ascending
    (smaller is better); ``indices`` int64 ``(nq, top_k)`` into ``ref_desc``,
    best first.  Identical (up to float rounding and the order of exact ties)
    to the dense reference implementation restricted to its top_k.

    ``k1``, ``k2`` must be in ``[1, N - 1]`` (``N = nq + nr``), else
    ``ValueError``; ``lambda_value`` in ``[0, 1]``; ``top_k`` larger than the
    number of references is clamped to it.

    Tuning knobs (results do not depend on them): ``query_block`` queries are
    processed at a time in the Jaccard step (default: ~64 MB of scratch);
    ``gemm_block`` rows per GEMM in the CPU kNN pass (scratch ~8 * gemm_block
    * N bytes); ``fused=False`` uses faiss index searches on the CPU too
    (slower; the GPU path); ``batch_size`` is the faiss query batch there.
    ``progress=None`` shows tqdm bars only when stderr is a terminal.
    """
    q, r = check_pair(query_desc, ref_desc)
    nq, nr = q.shape[0], r.shape[0]
    N = nq + nr
    k1 = check_count(k1, "k1", 1, N - 1)
    k2 = check_count(k2, "k2", 1, N - 1)
    lam = check_unit_interval(lambda_value, "lambda_value")
    top_k = clamp_top_k(top_k, nr)
    batch_size = check_count(batch_size, "batch_size", 1)
    if query_block is None:
        query_block = int(max(1, min(1024, 8_000_000 // nr)))
    query_block = check_count(query_block, "query_block", 1)
    gemm_block = check_count(gemm_block, "gemm_block", 1)
    show = progress_enabled(progress)
    dev = faiss_device(device)

    X = np.concatenate([q, r])
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    K = max(k1 + 1, k2)
    kh = int(np.around(k1 / 2.0)) + 1
    Kp = min(K + 8, N)
    if dev == "cpu" and fused:
        ip, nbr, far = _graph_fused(X, Kp, gemm_block, show)
    else:
        ip, nbr, far = _graph_searched(X, Kp, dev, batch_size, show)
    nbr = _refine_neighbours(X, sq, ip, nbr, K, [k2, kh, k1 + 1])
    rowmax = np.maximum(_d2_pairs(X, sq, np.arange(N), far, exact=True),
                        np.finfo(np.float64).tiny)
    del ip, far

    V = _build_v(X, sq, nbr, rowmax, k1)
    V = _local_qe(V, nbr, k2)
    del nbr
    Vq = V[:nq]
    VrT = V[nq:].T.tocsr()
    del V

    sq_q, sq_r = sq[:nq], sq[nq:]
    R = X[nq:]
    out_d = np.empty((nq, top_k), dtype=np.float32)
    out_i = np.empty((nq, top_k), dtype=np.int64)
    # Query blocks: at most query_block queries and ~_TRIPLE_BUDGET (query, column, ref)
    # triples in the min-sum step, so scratch memory stays bounded.
    col_nnz = np.diff(VrT.indptr)
    per_query = np.bincount(np.repeat(np.arange(nq), np.diff(Vq.indptr)),
                            weights=col_nnz[Vq.indices], minlength=nq)
    bounds = [0]
    csum = np.concatenate([[0.0], np.cumsum(per_query)])
    while bounds[-1] < nq:
        s0 = bounds[-1]
        e0 = int(np.searchsorted(csum, csum[s0] + _TRIPLE_BUDGET, side="right")) - 1
        bounds.append(min(max(e0, s0 + 1), s0 + query_block, nq))
    for s, e in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="k-recip: jaccard",
                     disable=not show, leave=False):
        b = e - s
        rows_b = np.arange(b)[:, None]
        msum = _min_sums(Vq[s:e], VrT, nr)
        # Exact original distances of this block: one GEMM, top_k by faiss heap.
        S = X[s:e] @ R.T
        ip_l = np.full((b, top_k), -np.inf, dtype=np.float32)
        lst = np.full((b, top_k), -1, dtype=np.int64)
        _heap_topk(ip_l, lst, S, 0)
        orig_l = (sq_q[s:e, None] + sq_r[lst] - 2.0 * ip_l.astype(np.float64))
        orig_l = np.maximum(orig_l, 0.0) / rowmax[s:e, None]
        m_l = msum[rows_b, lst]
        final_l = (1.0 - lam) * (1.0 - m_l / (2.0 - m_l)) + lam * orig_l
        msum[rows_b, lst] = 0.0
        # Supported references outside the original top_k, pruned by a lower bound.
        ei, ej = np.nonzero(msum)
        m_e = msum[ei, ej]
        jac_e = 1.0 - m_e / (2.0 - m_e)
        tau = final_l.max(axis=1)
        lb = (1.0 - lam) * jac_e + lam * orig_l.max(axis=1)[ei]
        keep = lb < tau[ei]
        ei, ej, jac_e = ei[keep], ej[keep], jac_e[keep]
        if ei.size:
            d2 = np.maximum(sq_q[ei + s] + sq_r[ej] - 2.0 * S[ei, ej].astype(np.float64), 0.0)
            final_e = (1.0 - lam) * jac_e + lam * d2 / rowmax[ei + s]
            n_e = np.bincount(ei, minlength=b)
            width = top_k + int(n_e.max())
            cand_d = np.full((b, width), np.inf)
            cand_i = np.full((b, width), -1, dtype=np.int64)
            cand_d[:, :top_k] = final_l
            cand_i[:, :top_k] = lst
            slot = top_k + np.arange(ei.size) - np.repeat(np.cumsum(n_e) - n_e, n_e)
            cand_d[ei, slot] = final_e
            cand_i[ei, slot] = ej
        else:
            cand_d, cand_i = final_l, lst
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :top_k]
        out_d[s:e] = np.take_along_axis(cand_d, order, axis=1)
        out_i[s:e] = np.take_along_axis(cand_i, order, axis=1)
    return out_d, out_i
