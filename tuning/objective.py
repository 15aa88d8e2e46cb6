"""What one tuning trial computes: post-processing -> held-out rankings -> mAP@k.

``evaluate`` is a pure function of a ``HeldoutSet`` and a ``PostProcessing``; it
goes through ``ensemble_descriptors`` and ``rerank``, the same code inference
runs. ``build_objective`` wraps it for Optuna: it maps a trial's parameters onto
a ``PostProcessing`` (``post_from_params`` is the one decoder, used for the best
trial too) and keeps the fitted whitenings in a small LRU cache, because the
eigendecomposition depends on the member weights (and shrinkage) only; whitening
dim and power are applied from the cached fit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import optuna

from competition.metrics import retrieval_scores
from ensemble.combine import normalize_weights
from ensemble.postprocess import PostProcessing, ensemble_descriptors, fit_whitening_for
from ensemble.whitening import Whitening
from rerank.pipeline import RerankParams, rerank
from tuning.heldout import HeldoutSet
from tuning.budget import TrialBudget
from tuning.workers import DEFAULTS_ATTR, WORKER_ATTR

__all__ = ["DEFAULTS_ATTR", "WORKER_ATTR", "SearchSpace", "WhiteningCache", "build_objective", "default_params",
           "evaluate", "fit_space", "max_whiten_dim", "post_from_params", "suggest_postprocessing"]


@dataclass
class SearchSpace:
    """Ranges of the searched parameters (see ``suggest_postprocessing``)."""

    weight_low: float = 0.1
    weight_high: float = 1.0
    weight_step: float = 0.05     # weights on a grid: whitening cache hits, exact reproduction
    whiten_dim_min: int = 16
    whiten_shrinkage: float = 0.1
    max_dba_n: int = 10
    max_aqe_n: int = 10
    alpha_low: float = 0.0
    alpha_high: float = 5.0
    kreciprocal: bool = True
    k1_range: tuple[int, int] = (5, 40)
    k2_range: tuple[int, int] = (1, 10)
    lambda_range: tuple[float, float] = (0.05, 0.95)


def evaluate(heldout: HeldoutSet, post: PostProcessing, k: int = 1000,
             whitening: Whitening | None = None, device: str = "cpu") -> dict[str, float]:
    """Score ``post`` on ``heldout``: ``{"map_at_k": mAP@k, "recall_at_1": R@1}``.

    ``whitening`` is the fit for ``post`` (refitted on ``heldout.train`` when None
    and ``post.whiten``).
    """
    if post.whiten and whitening is None:
        whitening = fit_whitening_for(heldout.train, post)
    query = ensemble_descriptors(heldout.query, post, whitening)
    reference = ensemble_descriptors(heldout.reference, post, whitening)
    _, indices = rerank(query, reference, post.rerank, top_k=min(k, len(reference)), device=device)
    return retrieval_scores(indices, heldout.query_labels, heldout.reference_labels, k=k)


class WhiteningCache:
    """LRU cache of whitening fits keyed by (normalised weights rounded, shrinkage); thread-safe."""

    def __init__(self, train: Sequence[np.ndarray], maxsize: int = 8, decimals: int = 4) -> None:
        self.train = list(train)
        self.maxsize = maxsize
        self.decimals = decimals
        self.hits = 0
        self.misses = 0
        self._fits: OrderedDict[tuple, Whitening] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, post: PostProcessing) -> tuple:
        w = normalize_weights(post.weights, len(self.train))
        return tuple(np.round(w, self.decimals).tolist()), round(float(post.whiten_shrinkage), 6)

    def get(self, post: PostProcessing) -> Whitening | None:
        """Return the fit for ``post`` (None when whitening is off)."""
        if not post.whiten:
            return None
        key = self.key(post)
        with self._lock:
            if key in self._fits:
                self.hits += 1
                self._fits.move_to_end(key)
                return self._fits[key]
            self.misses += 1
        fit = fit_whitening_for(self.train, post)  # outside the lock: threads may fit in parallel
        with self._lock:
            self._fits[key] = fit
            while len(self._fits) > self.maxsize:
                self._fits.popitem(last=False)
        return fit


def max_whiten_dim(heldout: HeldoutSet) -> int:
    """Largest whitening dim the train set supports: min(n_train - 1, sum d_m)."""
    return min(len(heldout.train[0]) - 1, sum(t.shape[1] for t in heldout.train))


def weight_name(member: str) -> str:
    return f"weight_{member}"


def suggest_postprocessing(trial: optuna.Trial, member_names: Sequence[str], max_dim: int,
                           space: SearchSpace) -> PostProcessing:
    """Sample one ``PostProcessing`` from ``space`` (conditional params only when switched on)."""
    if len(member_names) > 1:
        for name in member_names:
            trial.suggest_float(weight_name(name), space.weight_low, space.weight_high, step=space.weight_step)
    if max_dim >= 2 and trial.suggest_categorical("whiten", [False, True]):
        trial.suggest_int("whiten_dim", min(space.whiten_dim_min, max_dim), max_dim, log=True)
        trial.suggest_float("whiten_power", 0.0, 1.0)
    if trial.suggest_int("dba_n", 0, space.max_dba_n) > 1:
        trial.suggest_float("dba_alpha", space.alpha_low, space.alpha_high)
    if trial.suggest_int("aqe_n", 0, space.max_aqe_n) > 0:
        trial.suggest_float("aqe_alpha", space.alpha_low, space.alpha_high)
    if space.kreciprocal and trial.suggest_categorical("kreciprocal", [False, True]):
        trial.suggest_int("k1", *space.k1_range)
        trial.suggest_int("k2", *space.k2_range)
        trial.suggest_float("lambda_value", *space.lambda_range)
    return post_from_params(trial.params, member_names, space)


def post_from_params(params: dict[str, Any], member_names: Sequence[str], space: SearchSpace) -> PostProcessing:
    """Decode a trial's parameters into the ``PostProcessing`` they stand for."""
    base = RerankParams()
    weights = None
    if len(member_names) > 1:
        weights = [float(params.get(weight_name(n), 1.0)) for n in member_names]
    whiten = bool(params.get("whiten", False))
    use_kr = bool(params.get("kreciprocal", False))
    rr = RerankParams(
        dba_n=int(params.get("dba_n", 0)),
        dba_alpha=float(params.get("dba_alpha", base.dba_alpha)),
        aqe_n=int(params.get("aqe_n", 0)),
        aqe_alpha=float(params.get("aqe_alpha", base.aqe_alpha)),
        use_kreciprocal=use_kr,
        k1=int(params.get("k1", base.k1)),
        k2=int(params.get("k2", base.k2)),
        lambda_value=float(params.get("lambda_value", base.lambda_value)),
    )
    return PostProcessing(
        weights=weights,
        whiten=whiten,
        whiten_dim=int(params["whiten_dim"]) if whiten and "whiten_dim" in params else None,
        whiten_power=float(params.get("whiten_power", 1.0)),
        whiten_shrinkage=space.whiten_shrinkage,
        rerank=rr,
    )


def default_params(member_names: Sequence[str], space: SearchSpace) -> dict[str, Any]:
    """Trial parameters of the untuned defaults: equal weights, no whitening, no re-ranking."""
    params: dict[str, Any] = {}
    if len(member_names) > 1:
        params.update({weight_name(n): space.weight_high for n in member_names})
    params.update({"whiten": False, "dba_n": 0, "aqe_n": 0})
    if space.kreciprocal:
        params["kreciprocal"] = False
    return params


def standard_params(member_names: Sequence[str], space: SearchSpace, max_dim: int,
                    stage: str = "kreciprocal") -> dict[str, Any]:
    """Trial parameters of the textbook post-processing, cumulative by ``stage``: "whiten" (PCA-whitening
    at power 0.5), "expand" (+ DBA and aQE over 2 neighbours, alpha 3), "kreciprocal" (+ k1 20,
    k2 6, lambda 0.3, clamped to ``space``). A study starts from it as from the untuned defaults, so
    the tuned result is never below the textbook one on the search problem."""
    params = default_params(member_names, space)
    if max_dim >= 2:
        params.update(whiten=True, whiten_dim=max_dim, whiten_power=0.5)
    if stage in ("expand", "kreciprocal"):
        params.update(dba_n=min(2, space.max_dba_n), dba_alpha=3.0, aqe_n=min(2, space.max_aqe_n), aqe_alpha=3.0)
    if stage == "kreciprocal" and space.kreciprocal:
        params.update(kreciprocal=True, k1=min(max(20, space.k1_range[0]), space.k1_range[1]),
                      k2=min(max(6, space.k2_range[0]), space.k2_range[1]), lambda_value=0.3)
    return params


def fit_space(space: SearchSpace, n_queries: int, n_references: int) -> SearchSpace:
    """Narrow the size-bound ranges to a set of ``n_queries`` + ``n_references``: k1/k2 to
    n_queries + n_references - 1, the DBA and aQE neighbour counts to n_references
    (``rerank`` would clamp larger values anyway: trials there would repeat one another)."""
    hi = max(1, n_queries + n_references - 1)
    clamp = lambda r: (min(r[0], hi), min(r[1], hi))  # noqa: E731
    return replace(space, k1_range=clamp(space.k1_range), k2_range=clamp(space.k2_range),
                   max_dba_n=min(space.max_dba_n, n_references), max_aqe_n=min(space.max_aqe_n, n_references))


def _budget_reached(trial: optuna.Trial, n_trials: int, stale_after_s: float | None = None) -> bool:
    """True when ``n_trials`` trials are complete or running ahead of this one (any worker);
    trials of dead workers are recovered first and never count (``tuning.budget``)."""
    return TrialBudget(n_trials, stale_after_s).reached(trial)


def build_objective(heldout: HeldoutSet, space: SearchSpace, k: int = 1000,
                    cache: WhiteningCache | None = None, n_trials: int | None = None,
                    device: str = "cpu", stale_after_s: float | None = None) -> Callable[[optuna.Trial], float]:
    """Return the Optuna objective: mAP@k of the sampled post-processing on ``heldout``.

    Recall@1 is kept as the ``recall_at_1`` user attribute. With ``n_trials`` set, a
    trial that would exceed that many completed trials of the whole study (several
    workers) is pruned and stops its worker, so workers together complete exactly N;
    ``stale_after_s``: see ``tuning.workers.is_stale``.
    """
    cache = cache if cache is not None else WhiteningCache(heldout.train)
    max_dim = max_whiten_dim(heldout)
    space = fit_space(space, len(heldout.query_labels), len(heldout.reference_labels))

    def objective(trial: optuna.Trial) -> float:
        if n_trials is not None and _budget_reached(trial, n_trials, stale_after_s):
            trial.set_user_attr("pruned_reason", "trial budget reached")
            trial.study.stop()
            raise optuna.TrialPruned("trial budget reached")
        post = suggest_postprocessing(trial, heldout.member_names, max_dim, space)
        scores = evaluate(heldout, post, k=k, whitening=cache.get(post), device=device)
        trial.set_user_attr("recall_at_1", scores["recall_at_1"])
        return scores["map_at_k"]

    return objective
