"""Composition of the re-ranking steps: DBA -> alpha-QE -> k-reciprocal, diffusion or plain search.

``rerank`` validates the descriptors and parameters once, at this boundary; the steps
after it run on the internal functions that trust their input (unit float32 rows in,
unit float32 rows out).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from ._checks import check_count, check_nonneg, check_stacked, check_unit_interval, clamp_top_k, progress_enabled
from .diffusion import DEFAULT_TRUNCATE, check_diffusion_params, diffusion_unit
from .expansion import augment_references, expand_queries
from .graph import NeighbourGraph
from .kreciprocal import k_reciprocal_unit
from .search import build_index, faiss_device, search_index

__all__ = ["RerankParams", "expand", "fit_params_to_set", "rerank"]


@dataclass
class RerankParams:
    """Re-ranking recipe.  ``*_n = 0`` disables DBA / alpha-QE; at most one of
    ``use_kreciprocal`` and ``use_diffusion`` (diffusion truncates each query's
    subgraph to ``rerank.diffusion.DEFAULT_TRUNCATE`` rows)."""

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
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` (missing ones take
        their defaults, so recipes saved before a key existed still load)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown RerankParams keys: {sorted(unknown)}")
        return cls(**data)


def fit_params_to_set(params: RerankParams, n_query: int, n_ref: int) -> tuple[RerankParams, list[str]]:
    """Clamp the size-bound parameters to what ``n_query`` queries and ``n_ref`` references allow.

    k-reciprocal (when ``use_kreciprocal``) and diffusion (when ``use_diffusion``) rank
    among all ``N = n_query + n_ref`` images: ``k1, k2, diffusion_k <= N - 1``; DBA and
    alpha-QE take neighbours among the references: ``dba_n, aqe_n <= n_ref``. Returns
    ``(params, notes)``: the fitted copy and one note per clamped value, e.g.
    ``"k1 33 -> 5"`` ([] when none was).
    """
    bounds = {"dba_n": n_ref, "aqe_n": n_ref}
    if params.use_kreciprocal:
        bounds.update(k1=n_query + n_ref - 1, k2=n_query + n_ref - 1)
    if params.use_diffusion:
        bounds.update(diffusion_k=n_query + n_ref - 1)
    clamped = {name: bound for name, bound in bounds.items() if getattr(params, name) > bound}
    notes = [f"{name} {getattr(params, name)} -> {bound}" for name, bound in clamped.items()]
    return replace(params, **clamped), notes


def _check_params(p: RerankParams) -> None:
    """``ValueError`` naming the first parameter out of its range (before fitting to the set)."""
    check_count(p.dba_n, "dba_n", 0)
    check_count(p.aqe_n, "aqe_n", 0)
    check_nonneg(p.dba_alpha, "dba_alpha")
    check_nonneg(p.aqe_alpha, "aqe_alpha")
    check_unit_interval(p.lambda_value, "lambda_value")
    if p.use_kreciprocal and p.use_diffusion:
        raise ValueError("use_kreciprocal and use_diffusion are both set: choose one re-ranker")
    if p.use_kreciprocal:
        check_count(p.k1, "k1", 1)
        check_count(p.k2, "k2", 1)
    if p.use_diffusion:
        check_diffusion_params(p.diffusion_k, p.diffusion_alpha, p.diffusion_gamma, None)


def _expand(q: np.ndarray, r: np.ndarray, p: RerankParams, dev: str) -> tuple[np.ndarray, np.ndarray]:
    """DBA of the references, then alpha-QE of the queries against them (unit rows, fitted parameters)."""
    if p.dba_n > 0:
        r = augment_references(r, p.dba_n, p.dba_alpha, dev)
    if p.aqe_n > 0:
        q = expand_queries(q, r, p.aqe_n, p.aqe_alpha, dev)
    return q, r


def expand(query_desc: np.ndarray, ref_desc: np.ndarray, params: RerankParams,
           device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The descriptors ``rerank`` hands its re-ranker: DBA and alpha-QE of ``params`` applied.

    Returns ``(query, reference)`` float32 unit rows, (nq, d) and (nr, d): ``rerank(query,
    reference, params without DBA/alpha-QE)`` ranks as ``rerank(query_desc, ref_desc, params)``
    does (tuning computes them once for many re-rankers).
    """
    X, nq = check_stacked(query_desc, ref_desc)
    _check_params(params)
    p, _ = fit_params_to_set(params, nq, X.shape[0] - nq)
    return _expand(X[:nq], X[nq:], p, faiss_device(device))


def rerank(query_desc: np.ndarray, ref_desc: np.ndarray, params: RerankParams | None = None,
           top_k: int = 1000, device: str = "cpu", progress: bool | None = None,
           graph: NeighbourGraph | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``params`` and rank the references for every query.

    Order: DBA on the references, then alpha-QE of the queries against the
    augmented references, then k-reciprocal re-ranking (``use_kreciprocal``),
    diffusion (``use_diffusion``) or a plain exact inner-product search.

    Returns ``(scores, indices)``, both ``(nq, top_k)``: ``indices`` int64 into
    ``ref_desc``, best first; ``scores`` float32 where **higher is better** --
    the inner product for plain search, the *negated* k-reciprocal final
    distance, or the diffusion value.  ``top_k`` is clamped to the number of
    references; parameters too large for the set (k1, k2, ``diffusion_k``,
    ``dba_n``, ``aqe_n``; see :func:`fit_params_to_set`) are clamped with one
    ``UserWarning`` naming them.  ``graph``: a prepared :class:`rerank.NeighbourGraph`
    of the descriptors the re-ranker sees (after DBA and alpha-QE), deep enough for
    it, to skip its kNN pass (else ``ValueError``).
    """
    p = params if params is not None else RerankParams()
    X, nq = check_stacked(query_desc, ref_desc)
    nr = X.shape[0] - nq
    top_k = clamp_top_k(top_k, nr)
    _check_params(p)
    p, notes = fit_params_to_set(p, nq, nr)
    if notes:
        warnings.warn(f"re-ranking parameters clamped to the set size: {', '.join(notes)} "
                      f"for {nq} queries + {nr} references", UserWarning, stacklevel=2)
    dev, show = faiss_device(device), progress_enabled(progress)
    q, r = _expand(X[:nq], X[nq:], p, dev)
    if not (p.use_kreciprocal or p.use_diffusion):
        return search_index(build_index(r, dev, k=top_k), q, top_k, progress=show)
    if q.base is not X or r.base is not X:          # DBA or alpha-QE made new rows
        X = np.concatenate([q, r])
    if p.use_kreciprocal:
        dist, idx = k_reciprocal_unit(X, nq, p.k1, p.k2, p.lambda_value, top_k, dev, show, graph)
        return -dist, idx
    k, alpha, gamma, truncate = check_diffusion_params(p.diffusion_k, p.diffusion_alpha, p.diffusion_gamma,
                                                       DEFAULT_TRUNCATE, X.shape[0])
    return diffusion_unit(X, nq, k, alpha, gamma, top_k, truncate, dev, show, graph)
