"""Composition of the re-ranking steps: DBA -> alpha-QE -> k-reciprocal or plain search."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from ._checks import check_count, check_nonneg, check_pair, check_unit_interval, clamp_top_k
from .expansion import alpha_query_expansion, database_augmentation
from .kreciprocal import k_reciprocal
from .search import search

__all__ = ["RerankParams", "fit_params_to_set", "rerank"]


@dataclass
class RerankParams:
    """Re-ranking recipe.  ``*_n = 0`` disables DBA / alpha-QE."""

    dba_n: int = 0
    dba_alpha: float = 3.0
    aqe_n: int = 0
    aqe_alpha: float = 3.0
    use_kreciprocal: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    use_diffusion: bool = False
    diffusion_k: int = 50
    diffusion_alpha: float = 0.99
    diffusion_gamma: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RerankParams":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown RerankParams keys: {sorted(unknown)}")
        return cls(**data)


def fit_params_to_set(params: RerankParams, n_query: int, n_ref: int) -> tuple[RerankParams, list[str]]:
    """Clamp the size-bound parameters to what ``n_query`` queries and ``n_ref`` references allow.

    k-reciprocal (when ``use_kreciprocal``) ranks among all ``N = n_query + n_ref``
    images: ``k1, k2 <= N - 1``; DBA and alpha-QE take neighbours among the
    references: ``dba_n, aqe_n <= n_ref``.  Returns ``(params, notes)``: the fitted
    copy and one note per clamped value, e.g. ``"k1 33 -> 5"`` ([] when none was).
    """
    bounds = {"dba_n": n_ref, "aqe_n": n_ref}
    if params.use_kreciprocal:
        bounds.update(k1=n_query + n_ref - 1, k2=n_query + n_ref - 1)
    clamped = {name: bound for name, bound in bounds.items() if getattr(params, name) > bound}
    notes = [f"{name} {getattr(params, name)} -> {bound}" for name, bound in clamped.items()]
    return replace(params, **clamped), notes


def rerank(query_desc: np.ndarray, ref_desc: np.ndarray, params: RerankParams | None = None,
           top_k: int = 1000, device: str = "cpu",
           progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``params`` and rank the references for every query.

    Order: DBA on the references, then alpha-QE of the queries against the
    augmented references, then k-reciprocal re-ranking (``use_kreciprocal``)
    or a plain exact inner-product search.

    Returns ``(scores, indices)``, both ``(nq, top_k)``: ``indices`` int64 into
    ``ref_desc``, best first; ``scores`` float32 where **higher is better** --
    the inner product for plain search, the *negated* k-reciprocal final
    distance otherwise.  ``top_k`` is clamped to the number of references;
    parameters too large for the set (k1, k2, ``dba_n``, ``aqe_n``; see
    :func:`fit_params_to_set`) are clamped with one ``UserWarning`` naming them.
    """
    p = params if params is not None else RerankParams()
    q, r = check_pair(query_desc, ref_desc)
    top_k = clamp_top_k(top_k, r.shape[0])
    check_count(p.dba_n, "dba_n", 0)
    check_count(p.aqe_n, "aqe_n", 0)
    check_nonneg(p.dba_alpha, "dba_alpha")
    check_nonneg(p.aqe_alpha, "aqe_alpha")
    check_unit_interval(p.lambda_value, "lambda_value")
    if p.use_kreciprocal:
        check_count(p.k1, "k1", 1)
        check_count(p.k2, "k2", 1)
    p, notes = fit_params_to_set(p, q.shape[0], r.shape[0])
    if notes:
        warnings.warn(f"re-ranking parameters clamped to the set size: {', '.join(notes)} "
                      f"for {q.shape[0]} queries + {r.shape[0]} references", UserWarning, stacklevel=2)
    if p.dba_n > 0:
        r = database_augmentation(r, p.dba_n, p.dba_alpha, device=device)
    if p.aqe_n > 0:
        q = alpha_query_expansion(q, r, p.aqe_n, p.aqe_alpha, device=device)
    if p.use_kreciprocal:
        dist, idx = k_reciprocal(q, r, p.k1, p.k2, p.lambda_value, top_k=top_k,
                                 device=device, progress=progress)
        return -dist, idx
    return search(q, r, top_k, device=device, progress=progress)
