"""Inner-product kNN search over L2-normalised descriptors (faiss).

``search`` is exact by default (``IndexFlatIP``).  For galleries in the
millions an approximate index can be chosen with ``index="hnsw"`` or
``index="ivf"``.  The device is a parameter: ``device="cuda"`` moves the
index to a GPU when faiss was built with GPU support and a GPU is visible
(``"cuda:N"`` picks GPU N), otherwise it falls back to the CPU with a
``RuntimeWarning`` -- the rest of the code path is identical.  faiss GPU
indexes refuse ``k`` (and IVF ``nprobe``) above ``rerank.device.FAISS_GPU_MAX_K``
(2048); deeper searches, e.g. a full ranking, run on shards of at most that
many references whose sorted lists are merged into the exact top-k.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm.auto import tqdm

from ._checks import check_count, check_pair, clamp_top_k, progress_enabled
from .device import faiss_gpu_count, faiss_gpu_resources, faiss_max_k, resolve_device

__all__ = ["faiss_device", "search"]

_INDEX_KINDS = ("flat", "hnsw", "ivf")
_MERGE_ENTRIES = 1 << 25   # (query, candidate) pairs per merge of sharded results (~0.6 GB)


def faiss_device(device: str) -> str:
    """Resolve ``device`` (see :func:`rerank.device.resolve_device`) for a faiss index:
    ``"cpu"`` or ``"cuda:N"``; a GPU device without faiss-gpu warns and gives ``"cpu"``."""
    dev = resolve_device(device)
    if dev != "cpu" and faiss_gpu_count() < 1:
        warnings.warn(
            f"device {device!r} requested but this faiss has no GPU support "
            "(install faiss-gpu); searching on the CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return "cpu"
    return dev


@dataclass
class ShardedIndex:
    """faiss indexes over consecutive slices of the references (one slice unless
    a search deeper than the device's limit needs more; see :func:`build_index`).

    ``search`` merges the per-shard sorted lists into the exact top-k of the
    whole set, the way one index over all references would answer.
    """

    shards: list[faiss.Index]
    starts: list[int]   # id of each shard's first reference

    @property
    def ntotal(self) -> int:
        return self.starts[-1] + self.shards[-1].ntotal

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores (nq, k) float32 descending, ids (nq, k) int64; -1 = none)."""
        if len(self.shards) == 1 and k <= self.ntotal:
            return self.shards[0].search(query, k)
        width = max(k, sum(min(k, shard.ntotal) for shard in self.shards))
        rows = max(1, _MERGE_ENTRIES // width)   # bounds the merge's scratch memory
        scores = np.empty((query.shape[0], k), dtype=np.float32)
        ids = np.empty((query.shape[0], k), dtype=np.int64)
        for s in range(0, query.shape[0], rows):
            scores[s:s + rows], ids[s:s + rows] = self._merged(query[s:s + rows], k)
        return scores, ids

    def _merged(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [shard.search(query, min(k, shard.ntotal)) for shard in self.shards]
        scores = np.concatenate([d for d, _ in parts], axis=1)
        ids = np.concatenate([np.where(i < 0, -1, i + s) for (_, i), s in zip(parts, self.starts)],
                             axis=1)
        scores[ids < 0] = -np.inf               # unfilled slots sort last
        if scores.shape[1] < k:                 # k above ntotal: pad as faiss does
            pad = ((0, 0), (0, k - scores.shape[1]))
            scores = np.pad(scores, pad, constant_values=-np.inf)
            ids = np.pad(ids, pad, constant_values=-1)
        # the shards' lists are sorted runs, which the stable sort (timsort) merges
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _to_device(index: faiss.Index, device: str) -> faiss.Index:
    if device == "cpu":
        return index
    return faiss.index_cpu_to_gpu(faiss_gpu_resources(), int(device.split(":")[1]), index)


def build_index(base: np.ndarray, device: str = "cpu", index: str = "flat", k: int = 1,
                hnsw_m: int = 32, ef_search: int = 128, nlist: int | None = None,
                nprobe: int = 16, seed: int = 0) -> ShardedIndex:
    """Build an inner-product index over float32 unit rows ``base`` (n, d) for
    searches of depth up to ``k``.

    ``device`` must already be resolved (see :func:`faiss_device`).  Where ``k``
    exceeds the device's selection limit (:func:`rerank.device.faiss_max_k`,
    2048 on a GPU) the references are split into shards of at most the limit,
    each searched in full and merged, so the result is still exact.  An IVF
    ``nprobe`` above the limit cannot be split: that index stays on the CPU
    (with a warning).  HNSW has no faiss GPU version and always stays on the CPU.
    """
    n, d = base.shape
    limit = faiss_max_k(device)
    if index == "flat":
        template = faiss.IndexFlatIP(d)
    elif index == "hnsw":
        template = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        template.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
        template.hnsw.efSearch = int(ef_search)
        device, limit = "cpu", None
    elif index == "ivf":
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        nlist = check_count(nlist, "nlist", 1, n)
        template = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = base if n <= 256 * nlist else base[rng.choice(n, 256 * nlist, replace=False)]
        template.train(np.ascontiguousarray(train))
        template.nprobe = min(int(nprobe), nlist)
        if limit is not None and template.nprobe > limit:
            warnings.warn(f"IVF nprobe {template.nprobe} exceeds the faiss GPU limit {limit}; "
                          "searching on the CPU", RuntimeWarning, stacklevel=3)
            device, limit = "cpu", None
    else:
        raise ValueError(f"index must be one of {_INDEX_KINDS}, got {index!r}")
    shard_rows = limit if limit is not None and k > limit else n
    starts = list(range(0, n, shard_rows))
    shards = []
    for s in starts:
        shard = faiss.clone_index(template) if len(starts) > 1 else template
        shard.add(base[s:s + shard_rows])
        shards.append(_to_device(shard, device))
    return ShardedIndex(shards, starts)


def search_index(idx: ShardedIndex, query: np.ndarray, k: int, batch_size: int = 4096,
                 progress: bool = False, desc: str = "search") -> tuple[np.ndarray, np.ndarray]:
    """Batched ``idx.search``; returns (scores (nq, k) float32, indices (nq, k) int64)."""
    nq = query.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    indices = np.empty((nq, k), dtype=np.int64)
    starts = range(0, nq, batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        e = min(s + batch_size, nq)
        d_, i_ = idx.search(query[s:e], k)
        scores[s:e] = d_
        indices[s:e] = i_
    return scores, indices


def search(query_desc: np.ndarray, ref_desc: np.ndarray, k: int, device: str = "cpu",
           batch_size: int = 4096, index: str = "flat", *, hnsw_m: int = 32,
           ef_search: int = 128, nlist: int | None = None, nprobe: int = 16,
           progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` references for every query by inner product (= cosine).

    Returns ``(scores, indices)``: ``scores`` float32 ``(nq, k)`` inner
    products, descending; ``indices`` int64 ``(nq, k)`` into ``ref_desc``,
    best first.  ``k`` larger than the number of references is clamped to it.
    Queries are searched ``batch_size`` at a time, so the extra memory is
    ``O(batch_size * k)`` on top of the index.  ``device="cuda"`` gives the
    same result (up to float rounding and the order of exact ties) for any
    ``k``: above faiss' GPU limit the references are searched in shards and
    merged (see :func:`build_index`).

    ``index``:

    * ``"flat"`` (default) -- exact ``IndexFlatIP``; cost O(nq * nr * d).
    * ``"hnsw"`` -- ``IndexHNSWFlat`` graph (``hnsw_m`` links per node,
      ``ef_search`` beam, raised to at least ``k``).  CPU only.  Build is
      O(nr log nr) and dominates for one-off use; recall rises with
      ``ef_search`` at the cost of speed.  Memory ~ nr * (4d + 8 * hnsw_m)
      bytes.
    * ``"ivf"`` -- ``IndexIVFFlat`` with ``nlist`` k-means cells (default
      ~4 sqrt(nr)) of which ``nprobe`` are scanned; recall grows with
      ``nprobe / nlist`` (exact at ``nprobe == nlist``), speed-up is roughly
      ``nlist / nprobe``.  Works on GPU too.

    Recall is data dependent: on the benchmark's synthetic phase-2 set
    (36,748 refs, d=512, ~15 images per cluster, so most of a top-100 is
    near-random far neighbours -- a hard case) recall@10 / recall@100 was
    0.98 / 0.68 (hnsw, ef 128), 0.997 / 0.92 (hnsw, ef 512) and 0.90 / 0.23,
    0.93 / 0.40 (ivf, nprobe 8, 32 of 766 cells); see
    ``bench/results_rerank.md``.  Deep lists (k-reciprocal, mAP@1000) need
    a large ``ef_search`` / ``nprobe``; measure before trusting them.
    Approximate indices may miss true neighbours (returned rows may then hold
    index ``-1`` and score ``-inf`` when fewer than ``k`` candidates were
    visited); use them only where an exact scan is too slow.
    """
    q, r = check_pair(query_desc, ref_desc)
    k = clamp_top_k(k, r.shape[0], "k")
    batch_size = check_count(batch_size, "batch_size", 1)
    idx = build_index(r, faiss_device(device), index, k, hnsw_m=hnsw_m, ef_search=max(ef_search, k),
                      nlist=nlist, nprobe=nprobe)
    scores, indices = search_index(idx, q, k, batch_size, progress_enabled(progress))
    if index != "flat":
        missing = indices < 0
        if missing.any():
            scores[missing] = -np.inf
    return scores, indices
