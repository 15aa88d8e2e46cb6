"""Inner-product kNN search over L2-normalised descriptors (faiss).

``search`` is exact by default (``IndexFlatIP``).  For galleries in the
millions an approximate index can be chosen with ``index="hnsw"`` or
``index="ivf"``.  The device is a parameter: ``device="cuda"`` moves the
index to a GPU when faiss was built with GPU support and a GPU is visible
(``"cuda:N"`` picks GPU N), otherwise it falls back to the CPU with a
``RuntimeWarning`` -- the rest of the code path is identical.
"""

from __future__ import annotations

import math
import warnings

import faiss
import numpy as np
from tqdm.auto import tqdm

from ._checks import check_count, check_pair, clamp_top_k, progress_enabled
from .device import faiss_gpu_count, resolve_device

__all__ = ["faiss_device", "search"]

_INDEX_KINDS = ("flat", "hnsw", "ivf")


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


_GPU_RES = None


def _to_device(index: "faiss.Index", device: str) -> "faiss.Index":
    global _GPU_RES
    if device == "cpu":
        return index
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RES, int(device.split(":")[1]), index)


def build_index(base: np.ndarray, device: str = "cpu", index: str = "flat",
                hnsw_m: int = 32, ef_search: int = 128, nlist: int | None = None,
                nprobe: int = 16, seed: int = 0) -> "faiss.Index":
    """Build an inner-product faiss index over float32 unit rows ``base`` (n, d).

    ``device`` must already be resolved (see :func:`faiss_device`).  HNSW
    has no faiss GPU version and always stays on the CPU.
    """
    n, d = base.shape
    if index == "flat":
        idx = _to_device(faiss.IndexFlatIP(d), device)
        idx.add(base)
        return idx
    if index == "hnsw":
        idx = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
        idx.hnsw.efSearch = int(ef_search)
        idx.add(base)
        return idx
    if index == "ivf":
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        nlist = check_count(nlist, "nlist", 1, n)
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = base if n <= 256 * nlist else base[rng.choice(n, 256 * nlist, replace=False)]
        idx.train(np.ascontiguousarray(train))
        idx.add(base)
        idx.nprobe = min(int(nprobe), nlist)
        return _to_device(idx, device)
    raise ValueError(f"index must be one of {_INDEX_KINDS}, got {index!r}")


def search_index(idx: "faiss.Index", query: np.ndarray, k: int, batch_size: int = 4096,
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
    ``O(batch_size * k)`` on top of the index.

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
    dev = faiss_device(device)
    idx = build_index(r, dev, index, hnsw_m=hnsw_m, ef_search=max(ef_search, k),
                      nlist=nlist, nprobe=nprobe)
    scores, indices = search_index(idx, q, k, batch_size, progress_enabled(progress))
    if index != "flat":
        missing = indices < 0
        if missing.any():
            scores[missing] = -np.inf
    return scores, indices
