"""Diffusion re-ranking (Iscen et al., "Efficient diffusion on region manifolds", CVPR 2017).

Definition, over all ``N = nq + nr`` unit descriptors ``x_i`` (queries are nodes too):

* the k nearest other rows of ``i``: its k nearest rows by inner product, itself excluded;
* affinity ``a_ij = max(x_i . x_j, 0)^gamma`` when ``i`` and ``j`` are *mutual* k nearest
  (each among the other's k nearest other rows), else 0: ``A`` symmetric, zero diagonal;
* ``W = D^-1/2 A D^-1/2`` with ``D`` the row sums of ``A`` (an isolated node keeps a zero row);
* the diffusion of query ``q``: ``f_q = (I - alpha W)^-1 e_q``, ``0 <= alpha < 1``;
* truncation (``truncate=M``): ``S_q`` = ``q`` and its M nearest other rows; ``f_q`` solves
  ``(I - alpha W[S_q, S_q]) f = e_q`` on ``S_q`` (W restricted, its normalisation ``D``
  kept from the whole graph) and is 0 outside ``S_q``. ``truncate=None`` (or M >= N - 1)
  is the whole graph;
* values of ``f_q`` below ``1e-8 / (1 - alpha)`` (the solver's accuracy) count as 0;
* references are ranked by ``f_q`` on their nodes, descending; ties, among them the
  references ``f_q`` does not reach (``f = 0``), by the plain inner product with ``q``,
  descending (so an isolated query, or ``alpha = 0``, gets its plain search ranking).

Solvers: the truncated systems of a block of queries form one block-diagonal sparse system,
solved by conjugate gradient (``I - alpha W`` is symmetric positive definite, its
eigenvalues in ``[1 - alpha, 1 + alpha]``) to a residual of 1e-8, so ``f`` is within
``1e-8 / (1 - alpha)`` of the exact solution; the whole graph is factorised once (sparse
LU) and solved exactly, which is affordable on small sets only. Never an N x N matrix. The kNN graph runs
on ``device`` (:mod:`rerank.graph`); the solves run on the CPU.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ._checks import check_count, check_stacked, clamp_top_k, progress_enabled
from ._parallel import blas_threads, run_blocks
from .graph import NeighbourGraph, build_graph, dot_pairs
from .search import faiss_device

__all__ = ["DEFAULT_TRUNCATE", "check_diffusion_params", "diffusion", "diffusion_depths", "diffusion_unit"]

DEFAULT_TRUNCATE = 1000
"""Rows of each query's subgraph (besides the query); see bench/results_rerank.md."""

_TOL = 1e-8                 # CG: relative residual at which a query's system is solved
_SYSTEM_ENTRIES = 1 << 18   # subgraph nodes per block-diagonal system (sizes the query blocks)
_TABLE_ENTRIES = 1 << 24    # (query, row) slots of a block's position table (64 MB)


def diffusion_depths(k: int, truncate: int | None, n: int) -> tuple[int, int]:
    """``(depth, query_depth)`` a :class:`NeighbourGraph` needs for ``diffusion`` over ``n``
    rows: ``k + 1`` neighbours per row, ``truncate + 1`` per query (1 when not truncated)."""
    return min(k + 1, n), (1 if truncate is None or truncate >= n - 1 else truncate + 1)


def diffusion(query_desc: np.ndarray, ref_desc: np.ndarray, k: int = 50, alpha: float = 0.99,
              gamma: float = 3.0, top_k: int = 1000, truncate: int | None = DEFAULT_TRUNCATE,
              device: str = "cpu", progress: bool | None = None,
              graph: NeighbourGraph | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of references for every query (definition: module docstring).

    Returns ``(scores, indices)``: ``scores`` float32 ``(nq, top_k)`` the diffusion values
    ``f_q``, higher is better (0 for references it does not reach, ranked by inner
    product); ``indices`` int64 ``(nq, top_k)`` into ``ref_desc``, best first.

    ``k`` in ``[1, N - 1]``, ``alpha`` in ``[0, 1)``, ``gamma`` > 0, ``truncate`` a
    positive int or None (whole graph), else ``ValueError``; ``k`` and ``truncate`` above
    ``N - 1`` are the whole set: ``k`` is refused, ``truncate`` means the whole graph.
    ``top_k`` larger than the number of references is clamped. ``graph``: a
    :class:`NeighbourGraph` of the same ``query_desc``/``ref_desc`` with ``depth >= k + 1``,
    ``query_depth >= truncate + 1`` and ``ref_depth >= top_k`` (else ``ValueError``), to
    skip the kNN pass; the result is the same as without it.
    """
    X, nq = check_stacked(query_desc, ref_desc)
    k, alpha, gamma, truncate = check_diffusion_params(k, alpha, gamma, truncate, X.shape[0])
    top_k = clamp_top_k(top_k, X.shape[0] - nq)
    return diffusion_unit(X, nq, k, alpha, gamma, top_k, truncate, faiss_device(device), progress_enabled(progress),
                          graph)


def diffusion_unit(X: np.ndarray, nq: int, k: int, alpha: float, gamma: float, top_k: int, truncate: int | None,
                   dev: str = "cpu", show: bool = False,
                   graph: NeighbourGraph | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`diffusion` of stacked unit rows ``X`` (nq queries first; see
    :func:`rerank._checks.check_stacked`) on checked parameters and a resolved device."""
    depth, query_depth = diffusion_depths(k, truncate, X.shape[0])
    if graph is None:
        graph = build_graph(X, nq, depth, query_depth, top_k, dev, show)
    else:
        graph.check(X, nq, "diffusion", depth=depth, query_depth=query_depth, ref_depth=top_k)
    return diffusion_graph(graph, k, alpha, gamma, top_k, truncate, show)


def check_diffusion_params(k: object, alpha: object, gamma: object, truncate: object,
                           n: int | None = None) -> tuple[int, float, float, int | None]:
    """Validated ``(k, alpha, gamma, truncate)`` for ``n`` rows (``n`` None: any number);
    ``truncate`` None where it is the whole graph."""
    k = check_count(k, "k", 1, None if n is None else n - 1)
    alpha = float(alpha)  # type: ignore[arg-type]
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    gamma = float(gamma)  # type: ignore[arg-type]
    if not (np.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if truncate is not None:
        truncate = check_count(truncate, "truncate", 1)
        if n is not None and truncate >= n - 1:
            truncate = None
    return k, alpha, gamma, truncate


def diffusion_graph(graph: NeighbourGraph, k: int, alpha: float, gamma: float, top_k: int,
                    truncate: int | None, show: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`diffusion` from a graph deep enough for it (``graph.check``), on checked parameters."""
    nq = graph.n_query
    W_upper = _affinity(graph, k, gamma)
    if truncate is None:               # one factorisation, solved block after block
        solve, block, workers = _whole_graph_solver(graph, W_upper, alpha), _SYSTEM_ENTRIES // W_upper.shape[0], 1
    else:
        solve, block = _subgraph_solver(graph, W_upper, alpha, truncate), _SYSTEM_ENTRIES // (truncate + 1)
        workers = blas_threads()
    block = max(1, min(block, _TABLE_ENTRIES // W_upper.shape[0]))
    floor = _TOL / (1.0 - alpha)
    scores = np.empty((nq, top_k), dtype=np.float32)
    indices = np.empty((nq, top_k), dtype=np.int64)

    def rank(span: tuple[int, int]) -> None:
        nodes, f = solve(*span)
        f = np.where(f < floor, 0.0, f)
        scores[span[0]:span[1]], indices[span[0]:span[1]] = _rank_block(graph, span[0], nodes, f, top_k)

    spans = [(s, min(s + block, nq)) for s in range(0, nq, block)]
    for _ in run_blocks(rank, spans, workers, "diffusion", show):
        pass
    return scores, indices


Solver = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def _subgraph_solver(graph: NeighbourGraph, W_upper: sp.csr_matrix, alpha: float, truncate: int) -> Solver:
    """``solve(s, e) -> (nodes (b, m), f (b, m))`` for queries s..e on their truncated subgraphs."""
    sets = _truncated_sets(graph, truncate)

    def solve(s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        return sets[s:e], _solve_subgraphs(W_upper, sets[s:e], alpha)
    return solve


def _whole_graph_solver(graph: NeighbourGraph, W_upper: sp.csr_matrix, alpha: float) -> Solver:
    """``solve(s, e) -> (nodes (b, N), f (b, N))`` for queries s..e on the whole graph (all
    rows, nearest first): one sparse LU factorisation of ``I - alpha W``, then a solve per
    block of queries."""
    n = W_upper.shape[0]
    lu = spla.splu((sp.identity(n, format="csc") - alpha * (W_upper + W_upper.T)).tocsc())

    def solve(s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        rhs = np.zeros((n, e - s))
        rhs[np.arange(s, e), np.arange(e - s)] = 1.0
        f = lu.solve(rhs).T
        by_ip = np.argsort(-(graph.desc[s:e] @ graph.desc.T), axis=1)
        nodes = np.concatenate([np.arange(s, e)[:, None], _nearest_others(by_ip, n - 1, s)], axis=1)
        return nodes, np.take_along_axis(f, nodes, axis=1)
    return solve


def _affinity(graph: NeighbourGraph, k: int, gamma: float) -> sp.csr_matrix:
    """The upper triangle (N, N) CSR float64 of ``W = D^-1/2 A D^-1/2`` of the mutual
    k-nearest-neighbour graph (``W`` is it plus its transpose: symmetric to the last bit)."""
    n = graph.desc.shape[0]
    others = _nearest_others(graph.neighbours(k + 1, [k + 1]), k)
    knn = sp.csr_matrix((np.ones(n * k, dtype=np.int8), others.ravel(), np.arange(0, n * k + 1, k)),
                        shape=(n, n))
    mutual = sp.triu(knn.multiply(knn.T), k=1).tocoo()      # each mutual pair once, i < j
    i, j = mutual.row.astype(np.int64), mutual.col.astype(np.int64)
    a = np.maximum(dot_pairs(graph.desc, i, j), 0.0) ** gamma
    degree = np.bincount(i, weights=a, minlength=n) + np.bincount(j, weights=a, minlength=n)
    scale = np.zeros(n)
    scale[degree > 0] = 1.0 / np.sqrt(degree[degree > 0])
    return sp.csr_matrix((a * scale[i] * scale[j], (i, j)), shape=(n, n))


def _nearest_others(lists: np.ndarray, k: int, first: int = 0) -> np.ndarray:
    """(n, k): the first k entries of each row's list (of rows ``first``, ``first + 1``, ..;
    at least k + 1 long) other than the row itself."""
    n = lists.shape[0]
    lists = lists[:, :k + 1]
    is_self = lists == np.arange(first, first + n)[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), k] = False          # the row is not in its list: drop the last
    return lists[keep].reshape(n, k)


def _truncated_sets(graph: NeighbourGraph, truncate: int) -> np.ndarray:
    """(nq, truncate + 1) int64: each query row, then its ``truncate`` nearest other rows."""
    nq = graph.n_query
    nearest = _nearest_others(graph.query_neighbours(truncate + 1, truncate + 1), truncate)
    return np.concatenate([np.arange(nq)[:, None], nearest], axis=1)


def _solve_subgraphs(W_upper: sp.csr_matrix, nodes: np.ndarray, alpha: float) -> np.ndarray:
    """(b, m) float64: ``f`` on each query's subgraph ``nodes[i]`` (query first), from one
    block-diagonal system ``(I - alpha W_b) f = e`` solved by conjugate gradient (per block
    step sizes; a block stops when its residual is below _TOL)."""
    b, m = nodes.shape
    upper = _block_upper(W_upper, nodes)
    W_b = (upper + upper.T).tocsr()                  # one CSR product per step beats two halves
    x = np.zeros((b, m))
    resid = np.zeros((b, m))
    resid[:, 0] = 1.0
    direction = resid.copy()
    rr = np.ones(b)
    active = np.ones(b, dtype=bool)
    for _ in range(10 * m):                         # CG needs at most m steps in exact arithmetic
        flat = direction.ravel()
        Ap = (W_b @ flat).reshape(b, m)
        Ap *= -alpha
        Ap += direction
        step = np.divide(rr, np.einsum("ij,ij->i", direction, Ap), out=np.zeros(b), where=active)[:, None]
        x += step * direction
        resid -= step * Ap
        rr_next = np.einsum("ij,ij->i", resid, resid)
        active &= rr_next > _TOL * _TOL
        if not active.any():
            break
        direction *= np.divide(rr_next, rr, out=np.zeros(b), where=active)[:, None]
        direction += resid
        rr = rr_next
    return x


def _block_upper(W_upper: sp.csr_matrix, nodes: np.ndarray) -> sp.csr_matrix:
    """(b m, b m) CSR: the upper triangle of ``W`` restricted to each row of ``nodes`` (b, m),
    one block per row (local ids in the order of ``nodes``), from ``W_upper`` (each edge
    looked up once, from its smaller id)."""
    b, m = nodes.shape
    rows = W_upper[nodes.ravel()]                    # every node's edges to larger ids
    position = np.zeros(W_upper.shape[0], dtype=np.int64)   # local position + 1; 0: outside
    inside, cols = [], []
    for i in range(b):                               # one subgraph at a time: the table stays in cache
        lo, hi = rows.indptr[i * m], rows.indptr[(i + 1) * m]
        position[nodes[i]] = np.arange(1, m + 1)
        local = position[rows.indices[lo:hi]]
        hit = np.flatnonzero(local)
        inside.append(hit + lo)
        cols.append(local[hit] + (i * m - 1))
        position[nodes[i]] = 0
    kept = np.concatenate(inside)
    return sp.csr_matrix((rows.data[kept], np.concatenate(cols), np.searchsorted(kept, rows.indptr)),
                         shape=(b * m, b * m))


def _rank_block(graph: NeighbourGraph, s: int, nodes: np.ndarray, f: np.ndarray,
                top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``top_k`` references of queries ``s .. s + b`` by f descending, then inner product.

    ``nodes`` (b, m): each query's rows nearest first (the query itself first), ``f`` (b, m)
    on them. Candidates: the references among ``nodes``, and the query's ``top_k``
    references by inner product from the graph (f = 0 where not among ``nodes``): every
    reference f reaches is a node, and the best unreached ones by inner product are among
    the listed. One sort key: ``-f`` where f > 0, else the rank by inner product (a node's
    place in ``nodes``; listed references past all nodes, by their inner product).
    Returns (scores (b, top_k) float32, indices (b, top_k) int64).
    """
    nq = graph.n_query
    b, m = nodes.shape
    is_ref = nodes >= nq
    node_ref = np.where(is_ref, nodes - nq, -1)
    node_key = np.where(f > 0, -f, np.arange(m, dtype=np.float64))
    node_key[~is_ref] = np.inf
    listed = graph.ref_idx[s:s + b].astype(np.int64)
    in_nodes = np.zeros((b, graph.n_ref), dtype=bool)
    in_nodes[np.nonzero(is_ref)[0], node_ref[is_ref]] = True
    listed_key = np.where(in_nodes[np.arange(b)[:, None], listed], np.inf,
                          m + 2.0 - graph.ref_ip[s:s + b].astype(np.float64))
    key = np.concatenate([node_key, listed_key], axis=1)
    cand_ref = np.concatenate([node_ref, listed], axis=1)
    best = np.argpartition(key, top_k - 1, axis=1)[:, :top_k] if key.shape[1] > top_k else np.arange(top_k)[None]
    best = np.take_along_axis(best, np.argsort(np.take_along_axis(key, best, axis=1), axis=1), axis=1)
    best_key = np.take_along_axis(key, best, axis=1)
    return np.where(best_key < 0, -best_key, 0.0).astype(np.float32), np.take_along_axis(cand_ref, best, axis=1)
