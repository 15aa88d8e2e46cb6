"""Running top-k of many rows of scores fed tile by tile, by threshold filtering.

A tile of scores (from one GEMM) is reduced to the few entries that can still enter a
row's top k: those ``>=`` the row's current k-th largest score (``kth``), found by one
vectorised compare. A row that has no k-th score yet gets a lower bound from the tile
itself: split its entries into at least ``4k`` groups; the k-th largest group maximum
is a score that k distinct entries reach, so nothing below it can be in the top k (for
scores in no particular order about ``1.2 k`` entries pass).

Survivors go to their rows at once: each row keeps ``k + spare`` slots, and survivors
fill its spare slots until they run out; only then is the row cut back to its top k
(``argpartition``) and its ``kth`` raised. So a selection over ``k + spare`` entries is
paid once per ``spare`` survivors, not once per tile.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["TopK", "kth_bound"]

_MERGE_ENTRIES = 1 << 22   # (row, slot) entries per merge buffer (~50 MB)


def kth_bound(scores: np.ndarray, k: int, axis: int = 1) -> np.ndarray:
    """Lower bound on the k-th largest score of every row (``axis=1``) or column (``axis=0``)
    of a 2-D ``scores``: the k-th largest maximum of >= 4k strided groups of entries (a
    reduction across rows of a reshaped view: one fast pass). ``-inf`` where the axis holds
    fewer than ``k`` entries. Returns float32, shape ``(scores.shape[1 - axis],)``."""
    length = scores.shape[axis]
    if length < k:
        return np.full(scores.shape[1 - axis], -np.inf, dtype=np.float32)
    per_group = max(1, length // (4 * k))
    n_groups = length // per_group
    body = per_group * n_groups
    if axis == 1:
        maxima = scores[:, :body].reshape(scores.shape[0], per_group, n_groups).max(axis=1)
    else:
        maxima = scores[:body].reshape(per_group, n_groups, scores.shape[1]).max(axis=0).T
    return np.partition(maxima, n_groups - k, axis=1)[:, n_groups - k]


class TopK:
    """The ``k`` largest scores seen so far of each of ``n_rows`` rows, with their ids.

    ``bound_every_tile``: filter :meth:`add_rows` tiles by their own bound on the k-th
    score too (one more fast pass; worth it for deep lists fed a few large tiles).
    ``spare`` extra slots per row make merges cheap where rows get few survivors at a
    time (memory: ``n_rows * (k + spare) * 8`` bytes; ids are int32). Tiles may be offered
    from several threads. Call :meth:`sorted` (or :meth:`unordered`) at the end: (n_rows,
    k) scores (``-inf`` / id ``-1`` where a row saw fewer than k). Scores equal at the
    k-th place are kept in no guaranteed order.
    """

    def __init__(self, n_rows: int, k: int, spare: int = 0, bound_every_tile: bool = False) -> None:
        self.k = k
        self.bound_every_tile = bound_every_tile
        self.val = np.full((n_rows, k + spare), -np.inf, dtype=np.float32)
        self.ids = np.full((n_rows, k + spare), -1, dtype=np.int32)
        self.fill = np.zeros(n_rows, dtype=np.int64)        # slots in use
        self.kth = np.full(n_rows, -np.inf, dtype=np.float32)
        self._lock = threading.Lock()   # merges from several threads (reads of kth need none)

    def add_rows(self, row0: int, scores: np.ndarray, id0: int) -> None:
        """Offer ``scores`` (b, m): entry (i, j) is a candidate of row ``row0 + i`` with id ``id0 + j``."""
        b, m = scores.shape
        thr = self.kth[row0:row0 + b]
        if self.bound_every_tile or np.isneginf(thr).any():
            thr = np.maximum(thr, kth_bound(scores, self.k, axis=1))
        flat = np.flatnonzero(scores >= thr[:, None])
        if flat.size:
            self._merge(row0 + flat // m, id0 + flat % m, scores.ravel()[flat])

    def add_columns(self, row0: int, scores: np.ndarray, id0: int) -> None:
        """Offer ``scores`` (b, m) by column: entry (i, j) is a candidate of row ``row0 + j`` with
        id ``id0 + i`` (the mirrored half of a symmetric score matrix, without a transpose)."""
        b, m = scores.shape
        thr = self.kth[row0:row0 + m]
        if np.isneginf(thr).any():
            thr = np.maximum(thr, kth_bound(scores, self.k, axis=0))
        flat = np.flatnonzero(scores >= thr[None, :])
        if flat.size:
            col = flat % m
            # group by column; a radix sort where the columns fit 16 bits
            by_col = np.argsort(col.astype(np.uint16), kind="stable") if m <= 1 << 16 else np.argsort(col)
            flat = flat[by_col]
            self._merge(row0 + col[by_col], id0 + flat // m, scores.ravel()[flat])

    def _merge(self, rows: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> None:
        """Give the candidates (``rows`` ascending) to their rows: into free slots where they
        fit (rows then full are cut back to their top k), else through a wide merge."""
        with self._lock:
            self._merge_locked(rows, ids, vals)

    def _merge_locked(self, rows: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> None:
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        counts = np.diff(np.r_[starts, rows.size])
        uniq = rows[starts]
        fits = self.fill[uniq] + counts <= self.val.shape[1]
        if not fits.all():
            self._merge_wide(uniq[~fits], starts[~fits], counts[~fits], ids, vals)
            keep = np.repeat(fits, counts)
            rows, ids, vals = rows[keep], ids[keep], vals[keep]
            uniq, counts = uniq[fits], counts[fits]
        slot = self.fill[rows] + _ranks(counts)
        self.val[rows, slot] = vals
        self.ids[rows, slot] = ids
        self.fill[uniq] += counts
        full = uniq[(self.fill[uniq] == self.val.shape[1]) | (np.isneginf(self.kth[uniq])
                                                                 & (self.fill[uniq] >= self.k))]
        if full.size:
            self._cut(full)

    def _cut(self, rows: np.ndarray) -> None:
        """Cut ``rows`` back to their top k, in slots 0..k-1; their ``kth`` rises to the k-th."""
        k = self.k
        for s in range(0, rows.size, max(1, _MERGE_ENTRIES // self.val.shape[1])):
            part = rows[s:s + max(1, _MERGE_ENTRIES // self.val.shape[1])]
            val, ids = self.val[part], self.ids[part]
            keep = np.argpartition(val, val.shape[1] - k, axis=1)[:, val.shape[1] - k:]
            self._store(part, np.take_along_axis(val, keep, axis=1), np.take_along_axis(ids, keep, axis=1))

    def _store(self, rows: np.ndarray, val: np.ndarray, ids: np.ndarray) -> None:
        """Rows := their top k ``val``/``ids`` (r, k); spare slots emptied."""
        k = self.k
        self.val[rows, :k], self.ids[rows, :k] = val, ids
        self.val[rows, k:], self.ids[rows, k:] = -np.inf, -1
        self.fill[rows] = k
        self.kth[rows] = val.min(axis=1)

    def _merge_wide(self, uniq: np.ndarray, starts: np.ndarray, counts: np.ndarray, ids: np.ndarray,
                    vals: np.ndarray) -> None:
        """Merge rows with more survivors than free slots: kept slots and survivors in one
        buffer per group of rows of similar count (a buffer is as wide as its widest row)."""
        cap = self.val.shape[1]
        by_count = np.argsort(counts)
        group = 0
        while group < by_count.size:
            width = cap + counts[by_count[group:]]
            n_rows = max(1, int(np.searchsorted(np.arange(1, width.size + 1) * width, _MERGE_ENTRIES)))
            members = by_count[group:group + n_rows]
            size = counts[members]
            take = np.repeat(starts[members], size) + _ranks(size)
            rows = uniq[members]
            kept = cap if self.fill[rows].any() else 0   # rows holding nothing yet: survivors only
            buf_v = np.full((rows.size, max(self.k, kept + int(size.max()))), -np.inf, dtype=np.float32)
            buf_i = np.full(buf_v.shape, -1, dtype=np.int32)
            if kept:
                buf_v[:, :cap], buf_i[:, :cap] = self.val[rows], self.ids[rows]
            owner = np.repeat(np.arange(rows.size), size)
            buf_v[owner, kept + _ranks(size)] = vals[take]
            buf_i[owner, kept + _ranks(size)] = ids[take]
            keep = np.argpartition(buf_v, buf_v.shape[1] - self.k, axis=1)[:, buf_v.shape[1] - self.k:]
            self._store(rows, np.take_along_axis(buf_v, keep, axis=1), np.take_along_axis(buf_i, keep, axis=1))
            group += n_rows

    def unordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores (n_rows, k) float32, ids (n_rows, k) int32), in no particular order."""
        over = np.flatnonzero(self.fill > self.k)
        if over.size:
            self._cut(over)
        return self.val[:, :self.k], self.ids[:, :self.k]

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores (n_rows, k) float32 descending, ids (n_rows, k) int32)."""
        val, ids = self.unordered()
        order = np.argsort(-val, axis=1)
        return np.take_along_axis(val, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, .., counts[0] - 1, 0, 1, .., counts[1] - 1, ...: each entry's place in its run."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
