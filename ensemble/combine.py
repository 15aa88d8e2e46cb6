"""Weighted concatenation of member descriptors.

Each member's descriptors (unit rows, as members return them) are multiplied by
sqrt(w_m / sum(w)), then concatenated. The cosine similarity of two concatenations is then the weighted
mean of the members' cosine similarities, sum_m w_m cos_m / sum_m w_m, and the
concatenation is already unit length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12, *, copy: bool = True) -> np.ndarray:
    """Return float32 rows scaled to unit length (zero rows stay zero); the one place where
    stored (float16) or foreign descriptors become the unit rows the kit works on.

    ``copy=False`` scales a float32 ``x`` in place (other dtypes are converted first either way).
    """
    x = np.array(x, dtype=np.float32) if copy else np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no (n, d) temporary, unlike np.linalg.norm
    x /= np.maximum(norms, eps)[:, None]
    return x


def normalize_weights(weights: Sequence[float] | None, n_members: int) -> np.ndarray:
    """Return non-negative weights summing to 1 (equal when ``weights`` is None)."""
    if weights is None:
        return np.full(n_members, 1.0 / n_members)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_members,):
        raise ValueError(f"{n_members} members but {w.size} weights")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(w)}")
    return w / w.sum()


def concatenate(member_desc: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Return the (n, sum d_m) float32 weighted concatenation of the members' (n, d_m) unit rows,
    written straight into one new array (float16 members are widened on the way)."""
    if not member_desc:
        raise ValueError("no member descriptors to combine")
    member_desc = [np.asarray(d) for d in member_desc]
    n = {len(d) for d in member_desc}
    if len(n) != 1:
        raise ValueError(f"members describe different numbers of images: {[len(d) for d in member_desc]}")
    w = normalize_weights(weights, len(member_desc))
    dims = [d.shape[1] for d in member_desc]
    out = np.empty((n.pop(), sum(dims)), dtype=np.float32)
    start = 0
    for d, wm, dm in zip(member_desc, w, dims):
        np.multiply(d, np.float32(np.sqrt(wm)), out=out[:, start:start + dm], casting="unsafe")
        start += dm
    return out
