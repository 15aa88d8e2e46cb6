"""Where work runs: one device contract for the whole kit.

``resolve_device`` takes ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` and returns
``"cpu"`` or ``"cuda:N"``. ``"auto"`` picks the first GPU when one is visible. A CUDA
device asked for where no GPU is visible gives a ``RuntimeWarning`` and ``"cpu"``: the
code path is the same on both, only the device differs. torch callers wrap the result
in ``torch.device``; faiss callers additionally need faiss built with GPU support
(``faiss_gpu_count``), else they run their index on the CPU (with a warning).

faiss GPU specifics live here too: ``FAISS_GPU_MAX_K``, the largest ``k`` (and IVF
``nprobe``) one faiss GPU search accepts, and ``faiss_gpu_resources``, one
``StandardGpuResources`` per thread (faiss' resources are not thread-safe).
"""

from __future__ import annotations

import threading
import warnings

import faiss

__all__ = ["FAISS_GPU_MAX_K", "faiss_gpu_count", "faiss_gpu_resources", "faiss_max_k",
           "resolve_device"]

FAISS_GPU_MAX_K = 2048
"""Largest ``k`` / IVF ``nprobe`` of one faiss GPU search: faiss' ``GPU_MAX_SELECTION_K``
(2048; 16384 in cuVS builds, where raising this makes deep searches use fewer shards).
Read at every call, so assigning ``rerank.device.FAISS_GPU_MAX_K`` overrides it."""

_THREAD = threading.local()


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for a CPU-only faiss build)."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def faiss_max_k(device: str) -> int | None:
    """Largest ``k`` / ``nprobe`` one faiss search on the resolved ``device`` accepts
    (``None``: no limit, the CPU)."""
    return None if device == "cpu" else int(FAISS_GPU_MAX_K)


def faiss_gpu_resources() -> faiss.StandardGpuResources:
    """This thread's faiss GPU resources, created on the thread's first GPU index.

    ``StandardGpuResources`` is not thread-safe (Optuna runs trials in threads), so
    every thread gets its own; each reserves faiss' default GPU scratch memory.
    """
    res = getattr(_THREAD, "gpu_res", None)
    if res is None:
        res = _THREAD.gpu_res = faiss.StandardGpuResources()
    return res


def _visible_gpus() -> int:
    try:
        import torch
    except ImportError:  # rerank alone needs no torch: ask faiss
        return faiss_gpu_count()
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str = "auto") -> str:
    """Return ``"cpu"`` or ``"cuda:N"`` for ``device`` in auto | cpu | cuda | cuda:N.

    Raises ``ValueError`` for any other name; warns and returns ``"cpu"`` when CUDA
    is asked for and no GPU is visible.
    """
    dev = str(device).strip().lower()
    if dev == "cpu":
        return "cpu"
    if dev == "auto":
        return "cuda:0" if _visible_gpus() > 0 else "cpu"
    index = dev[len("cuda:"):] if dev.startswith("cuda:") else ("0" if dev == "cuda" else None)
    if index is None or not index.isdigit():
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    n = _visible_gpus()
    if n < 1:
        warnings.warn(f"device {device!r} requested but no CUDA GPU is visible; running on the CPU",
                      RuntimeWarning, stacklevel=2)
        return "cpu"
    if int(index) >= n:
        raise ValueError(f"device {device!r}: only {n} GPU(s) visible")
    return f"cuda:{index}"
