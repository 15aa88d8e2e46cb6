"""Where work runs: one device contract for the whole kit.

``resolve_device`` takes ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` and returns
``"cpu"`` or ``"cuda:N"``. ``"auto"`` picks the first GPU when one is visible. A CUDA
device asked for where no GPU is visible gives a ``RuntimeWarning`` and ``"cpu"``: the
code path is the same on both, only the device differs. torch callers wrap the result
in ``torch.device``; faiss callers additionally need faiss built with GPU support
(``faiss_gpu_count``), else they run their index on the CPU (with a warning).
"""

from __future__ import annotations

import warnings

import faiss

__all__ = ["faiss_gpu_count", "resolve_device"]


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for a CPU-only faiss build)."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


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
