"""The exact neighbour graph of queries and references, computed once, reused by re-rankers.

Rows are all ``N = nq + nr`` descriptors, queries first (row ``nq + j`` is reference
``j``). For every row the graph holds:

* its nearest rows (itself included, normally first) by inner product, best first, up
  to ``depth`` (query rows up to ``query_depth``), plus 8 more as slack for the float64
  check of near-ties (:meth:`NeighbourGraph.neighbours`);
* its farthest row (minimum inner product) and ``rowmax = ||x_i - x_far||^2`` in float64
  (k-reciprocal's row normalisation);
* for query rows, the ``ref_depth`` nearest references (a plain search), unordered.

On the CPU one blocked float32 GEMM over the upper triangle of the Gram matrix
``X X^T`` feeds every list at once (:func:`_graph_fused`; row blocks on as many threads
as BLAS has), each product used for both of its rows, and each tile reduced to the few
scores that can still enter a list (:mod:`rerank._topk`); on a GPU, faiss index
searches (:func:`_graph_searched`). Memory is O(N * depth + nq * (query_depth +
ref_depth) + threads * tile), never O(N^2).

:func:`neighbour_graph` validates its input; :func:`build_graph` and the methods trust
theirs: float32 C-contiguous unit rows (see :func:`rerank._checks.check_stacked`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

from ._checks import check_count, check_stacked, progress_enabled
from ._parallel import blas_threads, run_blocks
from ._topk import TopK
from .search import build_index, faiss_device, search_index

__all__ = ["NeighbourGraph", "neighbour_graph"]

SLACK = 8          # extra neighbours kept beyond the asked depth, for the float64 re-check
_TIE_EPS = 1e-4    # float32 squared distances closer than this at a set boundary are re-checked
_FAR_CHUNK = 512   # the farthest row is located to a chunk of ids in the pass, then exactly
_SAMPLE_ROWS = 64  # rows compared by the identity check
_TILE_ENTRIES = 1 << 23   # scores per GEMM tile (32 MB)
_SPARE_MAX = 256          # spare slots per kNN list row (see rerank._topk)
_DEEP = 256               # query lists at least this deep: whole query rows, a bound per tile


@dataclass(frozen=True, eq=False)
class NeighbourGraph:
    """kNN lists of all query and reference rows; build it with :func:`neighbour_graph`.

    ``ip``/``nbr`` (N, width) float32 / int32: each row's nearest rows, inner product
    descending (``width = min(depth + 8, N)``); ``query_ip``/``query_nbr`` (nq,
    query_width) the same for query rows, deeper; ``ref_ip``/``ref_idx`` (nq,
    min(ref_depth, nr)) float32 / int32: each query's nearest references (indices into
    the references), unordered; ``far`` (N,) int64 the farthest row; ``sq`` (N,) float64
    squared norms; ``rowmax`` (N,) float64 ``||x_i - x_far||^2``; ``desc`` (N, d) float32
    the rows themselves (queries first).
    """

    n_query: int
    depth: int
    query_depth: int
    ref_depth: int
    desc: np.ndarray
    sq: np.ndarray
    ip: np.ndarray
    nbr: np.ndarray
    query_ip: np.ndarray
    query_nbr: np.ndarray
    ref_ip: np.ndarray
    ref_idx: np.ndarray
    far: np.ndarray
    rowmax: np.ndarray

    @property
    def n_ref(self) -> int:
        return self.desc.shape[0] - self.n_query

    def neighbours(self, k: int, bounds: list[int]) -> np.ndarray:
        """(N, k) int64 nearest rows of every row, best first; where float32 squared distances
        are within 1e-4 at a position in ``bounds`` (the sizes of sets a caller takes), the
        row is re-sorted by float64 distance, so those sets match an exact computation."""
        return _refine_neighbours(self.desc, self.sq, self.ip, self.nbr, k, bounds)

    def query_neighbours(self, k: int, bound: int) -> np.ndarray:
        """(nq, k) int64 nearest rows of every query row (see :meth:`neighbours`); only the
        entries around position ``bound`` are re-checked in float64, where needed."""
        return _refine_window(self.desc, self.sq, self.query_ip, self.query_nbr, k, bound)

    def check(self, X: np.ndarray, nq: int, who: str, depth: int = 0, query_depth: int = 0,
              ref_depth: int = 0) -> None:
        """``ValueError`` unless this graph was built from the stacked rows ``X`` (nq queries
        first; shapes and a sample of rows compared) and is as deep as ``who`` needs."""
        n, nr = X.shape[0], X.shape[0] - nq
        if X.shape != self.desc.shape or nq != self.n_query:
            raise ValueError(f"{who}: graph was built for {self.n_query} queries + {self.n_ref} references "
                             f"of d={self.desc.shape[1]}, got {nq} + {nr} of d={X.shape[1]}")
        rows = np.unique(np.linspace(0, n - 1, min(_SAMPLE_ROWS, n)).astype(np.int64))
        if not np.array_equal(X[rows], self.desc[rows]):
            raise ValueError(f"{who}: graph was built from other descriptors than the ones given "
                             "(build it from the same query_desc/ref_desc)")
        for have, need, name in [(self.depth, min(depth, n), "depth"),
                                 (self.query_depth, min(query_depth, n), "query_depth"),
                                 (self.ref_depth, min(ref_depth, nr), "ref_depth")]:
            if have < need:
                raise ValueError(f"{who} needs a graph with {name} >= {need}, this one has {have}")


def neighbour_graph(query_desc: np.ndarray, ref_desc: np.ndarray, depth: int, device: str = "cpu", *,
                    query_depth: int | None = None, ref_depth: int = 1000, progress: bool | None = None,
                    fused: bool = True, gemm_block: int = 1024, batch_size: int = 4096,
                    workers: int | None = None) -> NeighbourGraph:
    """Build the :class:`NeighbourGraph` of ``query_desc`` (nq, d) and ``ref_desc`` (nr, d).

    ``depth`` nearest rows per row (all N rows; a row counts as its own nearest),
    ``query_depth`` (default ``depth``) per query row, ``ref_depth`` nearest references
    per query; each is clamped to what the set holds. What the re-rankers read:
    ``k_reciprocal`` ``depth >= max(k1 + 1, k2)``, ``ref_depth >= top_k``;
    ``diffusion`` ``depth >= k + 1``, ``query_depth >= truncate + 1``, ``ref_depth >=
    top_k``. ``device`` runs the search (faiss GPU indexes where ``"cuda"``);
    ``fused=False`` uses faiss index searches on the CPU too; ``gemm_block`` rows per
    GEMM of the CPU pass (score tiles are 32 MB); ``batch_size`` the faiss query batch;
    ``workers`` threads of the CPU pass (default: as many as BLAS uses). Results do not
    depend on them.
    """
    X, nq = check_stacked(query_desc, ref_desc)
    n = X.shape[0]
    depth = check_count(depth, "depth", 1)
    query_depth = depth if query_depth is None else check_count(query_depth, "query_depth", 1)
    ref_depth = check_count(ref_depth, "ref_depth", 1)
    return build_graph(X, nq, min(depth, n), min(max(query_depth, depth), n), min(ref_depth, n - nq),
                       faiss_device(device), progress_enabled(progress), fused=fused,
                       gemm_block=check_count(gemm_block, "gemm_block", 1),
                       batch_size=check_count(batch_size, "batch_size", 1),
                       workers=blas_threads() if workers is None else check_count(workers, "workers", 1))


def build_graph(X: np.ndarray, nq: int, depth: int, query_depth: int, ref_depth: int, dev: str,
                show: bool = False, fused: bool = True, gemm_block: int = 1024, batch_size: int = 4096,
                workers: int | None = None) -> NeighbourGraph:
    """:func:`neighbour_graph` of stacked, validated unit rows ``X`` (queries first, kept by
    the graph, not copied), a resolved device and valid depths."""
    n = X.shape[0]
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    width, query_width = min(depth + SLACK, n), min(query_depth + SLACK, n)
    if dev == "cpu" and fused:
        lists = _graph_fused(X, nq, width, query_width, ref_depth, gemm_block, show,
                             blas_threads() if workers is None else workers)
    else:
        lists = _graph_searched(X, nq, width, query_width, ref_depth, dev, batch_size, show)
    ip, nbr, query_ip, query_nbr, ref_ip, ref_idx, far = lists
    rowmax = np.maximum(d2_pairs(X, sq, np.arange(n), far, exact=True), np.finfo(np.float64).tiny)
    return NeighbourGraph(nq, depth, query_depth, ref_depth, X, sq, ip, nbr, query_ip, query_nbr,
                          ref_ip, ref_idx, far, rowmax)


def dot_pairs(X: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n,) float64 inner products ``X[rows] . X[cols]`` from float32 dot products (faiss;
    the pairs are taken in order of ``cols``, so that rows are reused from cache)."""
    by_col = np.argsort(cols)
    a = np.ascontiguousarray(rows[by_col], dtype=np.int64)
    b = np.ascontiguousarray(cols[by_col], dtype=np.int64)
    ordered = np.empty(a.shape[0], dtype=np.float32)
    faiss.pairwise_indexed_inner_product(X.shape[1], a.shape[0], faiss.swig_ptr(X), faiss.swig_ptr(a),
                                         faiss.swig_ptr(X), faiss.swig_ptr(b), faiss.swig_ptr(ordered))
    dots = np.empty(a.shape[0], dtype=np.float64)
    dots[by_col] = ordered
    return dots


def d2_pairs(X: np.ndarray, sq: np.ndarray, rows: np.ndarray, cols: np.ndarray,
             exact: bool = False, chunk: int = 8192) -> np.ndarray:
    """Squared distances ``||X[rows] - X[cols]||^2`` (n,) float64: from float32 dot products
    (:func:`dot_pairs`), or from float64 dot products where ``exact``."""
    if exact:
        dots = np.empty(rows.shape[0], dtype=np.float64)
        for s in range(0, rows.shape[0], chunk):
            dots[s:s + chunk] = np.einsum("ij,ij->i", X[rows[s:s + chunk]].astype(np.float64),
                                          X[cols[s:s + chunk]].astype(np.float64))
    else:
        dots = dot_pairs(X, rows, cols)
    return np.maximum(sq[rows] + sq[cols] - 2.0 * dots, 0.0)


def _spans(start: int, stop: int, step: int, cut: int) -> list[tuple[int, int]]:
    """[start, stop) in pieces of at most ``step``, none straddling ``cut`` (empty if stop <= start)."""
    if stop <= start:
        return []
    edges = sorted({*range(start, min(stop, cut), step), *range(max(start, cut), stop, step), stop})
    return list(zip(edges[:-1], edges[1:]))


class _Farthest:
    """Running minimum inner product of every row: exact where a tile meets the row along
    its rows, located to a run of ``_FAR_CHUNK`` ids where mirrored (argmin across rows is
    slow; a min is not); :meth:`rows` finds those exactly."""

    def __init__(self, n: int) -> None:
        self.low = np.full(n, np.inf, dtype=np.float32)
        self.chunk = np.zeros(n, dtype=np.int64)   # the minimum's id, or its chunk's first id
        self.exact = np.zeros(n, dtype=bool)       # chunk holds the id itself
        self._lock = threading.Lock()

    def add_rows(self, row0: int, scores: np.ndarray, id0: int) -> None:
        """Rows ``row0 + i`` meet ids ``id0 + j``: their minimum, exactly (argmin is fast along rows)."""
        self._update(row0, scores, id0, 1, True)

    def add_columns(self, row0: int, scores: np.ndarray, id0: int) -> None:
        """Rows ``row0 + j`` meet ids ``id0 + i``: the minimum of each run of _FAR_CHUNK ids."""
        b = scores.shape[0]
        body = b - b % _FAR_CHUNK
        parts = [scores[:body].reshape(-1, _FAR_CHUNK, scores.shape[1]).min(axis=1)] if body else []
        if body < b:
            parts.append(scores[body:].min(axis=0, keepdims=True))
        self._update(row0, (np.concatenate(parts) if len(parts) > 1 else parts[0]).T, id0, _FAR_CHUNK, False)

    def _update(self, row0: int, minima: np.ndarray, id0: int, step: int, exact: bool) -> None:
        """Rows ``row0 + i`` take ``minima[i].min()`` where lower, at id ``id0 + step * argmin``."""
        rows = slice(row0, row0 + minima.shape[0])
        best = minima.argmin(axis=1)
        val = minima[np.arange(minima.shape[0]), best]
        with self._lock:
            better = val < self.low[rows]
            self.low[rows] = np.where(better, val, self.low[rows])
            self.chunk[rows] = np.where(better, id0 + step * best, self.chunk[rows])
            self.exact[rows] = np.where(better, exact, self.exact[rows])

    def rows(self, X: np.ndarray) -> np.ndarray:
        """(N,) int64 the farthest row of every row (one small GEMM per chunk)."""
        far = self.chunk.copy()
        inexact = np.flatnonzero(~self.exact)
        order = inexact[np.argsort(self.chunk[inexact], kind="stable")]
        cuts = np.flatnonzero(np.diff(self.chunk[order])) + 1
        for group in np.split(order, cuts) if order.size else []:
            c0 = int(self.chunk[group[0]])
            far[group] = c0 + (X[group] @ X[c0:c0 + _FAR_CHUNK].T).argmin(axis=1)
        return far


def _graph_fused(X: np.ndarray, nq: int, width: int, query_width: int, ref_width: int, block: int,
                 progress: bool, workers: int) -> tuple[np.ndarray, ...]:
    """The lists of :class:`NeighbourGraph` from one blocked GEMM over the upper triangle of
    X X^T (CPU), row blocks on ``workers`` threads. Each score tile (rows s:e, columns
    t0:t1 >= s) is offered to the rows' lists directly and, past the diagonal block, to
    the columns' lists as mirrored candidates (:meth:`TopK.add_columns`): half the GEMM
    of a search, no transposes. A query block meets all references in one tile (its
    reference list sees them at once). Where query lists are deep (diffusion's
    truncation), query blocks compute their whole rows instead of mirroring among
    queries: a deep list filters its candidates well only in large tiles.

    Returns ``(ip, nbr, query_ip, query_nbr, ref_ip, ref_idx, far)`` (see the class).
    """
    n = X.shape[0]
    query_k = max(width, query_width)
    deep = query_k >= _DEEP
    query_lists = TopK(nq, query_k, spare=min(2 * query_k, _SPARE_MAX), bound_every_tile=deep)
    ref_row_lists = TopK(n - nq, width, spare=min(2 * width, _SPARE_MAX))
    ref_lists = TopK(nq, ref_width)
    farthest = _Farthest(n)

    def lists_of(row: int) -> tuple[TopK, int]:   # the lists holding ``row``, and their first row
        return (query_lists, 0) if row < nq else (ref_row_lists, nq)

    def row_block(span: tuple[int, int]) -> None:
        s, e = span
        rows_lists, base = lists_of(s)
        tile = max(1, _TILE_ENTRIES // (e - s))
        if s < nq:
            spans = _spans(0 if deep else s, nq, tile, nq) + [(nq, n)]
        else:
            spans = _spans(s, n, tile, nq)
        for t0, t1 in spans:
            scores = X[s:e] @ X[t0:t1].T
            rows_lists.add_rows(s - base, scores, t0)
            farthest.add_rows(s, scores, t0)
            if s < nq <= t0:
                ref_lists.add_rows(s, scores, t0 - nq)
            m0 = max(t0, e) - t0                      # mirrored part: columns at or past e
            if m0 < t1 - t0 and not (deep and t0 < nq):
                cols_lists, cbase = lists_of(t0)
                cols_lists.add_columns(t0 + m0 - cbase, scores[:, m0:], s)
                farthest.add_columns(t0 + m0, scores[:, m0:], s)

    query_block = max(1, min(block, _TILE_ENTRIES // (n - nq)))
    spans = _spans(0, nq, query_block, nq) + _spans(nq, n, block, nq)
    for _ in run_blocks(row_block, spans, workers, "graph: kNN", progress):
        pass
    query_ip, query_nbr = query_lists.sorted()
    ref_rows_ip, ref_rows_nbr = ref_row_lists.sorted()
    ip = np.concatenate([query_ip[:, :width], ref_rows_ip])
    nbr = np.concatenate([query_nbr[:, :width], ref_rows_nbr])
    ref_ip, ref_idx = ref_lists.unordered()
    return (ip, nbr, query_ip[:, :query_width], query_nbr[:, :query_width], ref_ip, ref_idx,
            farthest.rows(X))


def _graph_searched(X: np.ndarray, nq: int, width: int, query_width: int, ref_width: int, dev: str,
                    batch_size: int, progress: bool) -> tuple[np.ndarray, ...]:
    """Same outputs as :func:`_graph_fused` from faiss index searches (kNN of every row,
    deeper for query rows; farthest = nearest to ``-x``; queries against the references),
    sharded on a GPU where a depth exceeds its k limit (see :func:`rerank.search.build_index`)."""
    index = build_index(X, dev, k=max(width, query_width))
    query_ip, query_nbr = search_index(index, X[:nq], max(width, query_width), batch_size, progress,
                                       "graph: kNN")
    ref_rows_ip, ref_rows_nbr = search_index(index, X[nq:], width, batch_size, progress, "graph: kNN")
    _, far = search_index(index, -X, 1, batch_size, progress, "graph: farthest")
    del index
    ref_ip, ref_idx = search_index(build_index(X[nq:], dev, k=ref_width), X[:nq], ref_width, batch_size,
                                   progress, "graph: references")
    ip = np.concatenate([query_ip[:, :width], ref_rows_ip])
    nbr = np.concatenate([query_nbr[:, :width], ref_rows_nbr]).astype(np.int32)
    return (ip, nbr, query_ip[:, :query_width], query_nbr[:, :query_width].astype(np.int32), ref_ip,
            ref_idx.astype(np.int32), far[:, 0])


def _refine_neighbours(X: np.ndarray, sq: np.ndarray, ip: np.ndarray, nbr: np.ndarray, k: int,
                       bounds: list[int]) -> np.ndarray:
    """(N, k) neighbours by squared distance; rows with a near-tie (< 1e-4) at a set boundary
    are re-sorted with float64 distances so that set membership matches an exact float64
    computation."""
    n, width = nbr.shape
    d2 = sq[:, None] + sq[nbr] - 2.0 * ip.astype(np.float64)
    ambiguous = np.zeros(n, dtype=bool)
    for b in bounds:
        if 0 < b < width:
            ambiguous |= (d2[:, b] - d2[:, b - 1]) < _TIE_EPS
    rows = np.nonzero(ambiguous)[0]
    out = nbr[:, :k].astype(np.int64)
    if rows.size:
        sub = nbr[rows]
        exact = d2_pairs(X, sq, np.repeat(rows, width), sub.ravel(), exact=True).reshape(-1, width)
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        out[rows] = np.take_along_axis(sub, order, axis=1)
    return out


def _refine_window(X: np.ndarray, sq: np.ndarray, ip: np.ndarray, nbr: np.ndarray, k: int, bound: int,
                   half: int = SLACK) -> np.ndarray:
    """(n, k) neighbours where the entries ``bound - half .. bound + half`` of rows with a
    near-tie at ``bound`` are re-sorted by float64 distance (deep lists: a full re-sort of
    every near-tied row would cost a float64 product per entry)."""
    n, width = nbr.shape
    out = nbr[:, :k].astype(np.int64)
    if not 0 < bound < width:
        return out
    lo, hi = max(0, bound - half), min(width, bound + half)
    d2 = sq[:n, None] + sq[nbr[:, lo:hi]] - 2.0 * ip[:, lo:hi].astype(np.float64)
    rows = np.flatnonzero(d2[:, bound - lo] - d2[:, bound - lo - 1] < _TIE_EPS)
    if rows.size:
        sub = nbr[rows, lo:hi]
        exact = d2_pairs(X, sq, np.repeat(rows, hi - lo), sub.ravel(), exact=True).reshape(-1, hi - lo)
        window = np.take_along_axis(sub, np.argsort(exact, axis=1, kind="stable"), axis=1)
        if lo < k:
            out[rows, lo:min(hi, k)] = window[:, :min(hi, k) - lo]
    return out
