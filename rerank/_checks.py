"""Input validation shared by every public function of :mod:`rerank`.

One small helper, :func:`check_descriptors`, turns whatever the caller passed
into a C-contiguous float32 ``(n, d)`` array of unit rows, or raises a
``ValueError`` that names the argument:

* empty input (0 rows or 0 columns), or not 2-D -> ``ValueError``;
* non-numeric / complex dtype -> ``TypeError``;
* float16 / float64 / integer input -> converted to float32;
* NaN or inf (also values that overflow float32) -> ``ValueError`` naming the
  argument and how many rows are affected;
* all-zero rows -> ``ValueError`` (they cannot be normalised);
* rows whose L2 norm is not 1 (tolerance 1e-3, 1e-2 for float16 input) ->
  normalised, with a ``UserWarning``.  Rows within tolerance are silently
  re-normalised too (a no-op up to rounding).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

__all__ = [
    "check_descriptors",
    "check_pair",
    "check_stacked",
    "check_count",
    "clamp_top_k",
    "progress_enabled",
]


def _as_matrix(x: object, name: str) -> np.ndarray:
    """``x`` as a real, non-empty 2-D array (not yet converted), or ``TypeError``/``ValueError``."""
    arr = np.asarray(x)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def _normalise_into(arr: np.ndarray, out: np.ndarray, name: str) -> None:
    """Write ``arr`` into the float32 ``out`` as unit rows (see the module docstring)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out[...] = arr
    bad = ~np.isfinite(out).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(
            f"{name} contains NaN or inf (after float32 conversion) in {n_bad} "
            f"of {out.shape[0]} rows"
        )
    norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float64))
    zero = norms <= np.finfo(np.float32).tiny
    n_zero = int(zero.sum())
    if n_zero:
        raise ValueError(f"{name} has {n_zero} all-zero rows (cannot be L2-normalised)")
    tol = 1e-2 if arr.dtype == np.float16 else 1e-3
    off = np.abs(norms - 1.0) > tol
    n_off = int(off.sum())
    if n_off:
        warnings.warn(
            f"{name}: {n_off} of {out.shape[0]} rows are not unit length; "
            "L2-normalising them",
            UserWarning,
            stacklevel=4,
        )
    out /= norms[:, None].astype(np.float32)


def check_descriptors(x: object, name: str) -> np.ndarray:
    """Validate ``x`` and return it as C-contiguous float32 ``(n, d)`` unit rows."""
    arr = _as_matrix(x, name)
    out = np.empty(arr.shape, dtype=np.float32)
    _normalise_into(arr, out, name)
    return out


def check_pair(query: object, ref: object,
               qname: str = "query_desc", rname: str = "ref_desc") -> tuple[np.ndarray, np.ndarray]:
    """Validate a query/reference pair; also checks both have the same ``d``."""
    X, nq = check_stacked(query, ref, qname, rname)
    return X[:nq], X[nq:]


def check_stacked(query: object, ref: object, qname: str = "query_desc",
                  rname: str = "ref_desc") -> tuple[np.ndarray, int]:
    """Validate a query/reference pair into one array: returns ``(X, nq)``, ``X`` float32
    ``(nq + nr, d)`` unit rows, queries first (``check_pair`` gives its two halves)."""
    q, r = _as_matrix(query, qname), _as_matrix(ref, rname)
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"dimension mismatch: {qname} has d={q.shape[1]}, {rname} has d={r.shape[1]}"
        )
    X = np.empty((q.shape[0] + r.shape[0], q.shape[1]), dtype=np.float32)
    _normalise_into(q, X[:q.shape[0]], qname)
    _normalise_into(r, X[q.shape[0]:], rname)
    return X, q.shape[0]


def check_count(value: object, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` as an int in ``[minimum, maximum]`` or raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    return v


def clamp_top_k(top_k: object, n_ref: int, name: str = "top_k") -> int:
    """Positive int ``top_k`` clamped to ``n_ref`` (documented behaviour, no warning)."""
    return min(check_count(top_k, name, minimum=1), n_ref)


def check_unit_interval(value: object, name: str) -> float:
    v = float(value)  # type: ignore[arg-type]
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_nonneg(value: object, name: str) -> float:
    v = float(value)  # type: ignore[arg-type]
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means: show a bar only when stderr is a terminal."""
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)
