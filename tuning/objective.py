"""What one tuning trial computes: post-processing -> rankings -> mAP@k, fold by fold.

``rank`` and ``evaluate`` are pure functions of a ``HeldoutSet`` and a ``PostProcessing``; they go
through ``ensemble_descriptors`` and ``rerank``, the same code inference runs. ``build_objective``
wraps them for Optuna on a ``tuning.folds.FoldProblem``: a trial's value is the mean of its fold
scores (``FoldScores.value``), the fold scores and their spread are kept as user attributes. It maps
a trial's parameters onto a ``PostProcessing`` (``tuning.space.post_from_params`` is the one decoder)
and keeps the fitted whitenings in a small LRU cache, because the eigendecomposition depends on the
member weights (and shrinkage) only; whitening dim and power are applied from the cached fit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import optuna

from competition.metrics import retrieval_scores
from ensemble.combine import normalize_weights
from ensemble.postprocess import PostProcessing, ensemble_descriptors, fit_whitening_for
from ensemble.whitening import Whitening, train_moments, whitening_from_moments
from rerank.pipeline import rerank
from tuning.budget import TrialBudget
from tuning.folds import FoldProblem
from tuning.heldout import HeldoutSet
from tuning.space import (
    SearchSpace,
    default_params,
    fit_space,
    post_from_params,
    standard_params,
    suggest_postprocessing,
)
from tuning.workers import DEFAULTS_ATTR, WORKER_ATTR

__all__ = ["DEFAULTS_ATTR", "WORKER_ATTR", "SearchSpace", "WhiteningCache", "build_objective", "default_params",
           "evaluate", "fit_space", "max_whiten_dim", "post_from_params", "rank", "standard_params",
           "suggest_postprocessing"]

FOLD_MAPS_ATTR = "fold_maps"    # user attribute: the trial's mAP@k per fold
SPREAD_ATTR = "spread"          # user attribute: standard deviation of those


def rank(data: HeldoutSet, post: PostProcessing, k: int = 1000, whitening: Whitening | None = None,
         device: str = "cpu") -> np.ndarray:
    """Rankings of ``data``'s references for its queries under ``post``: (nq, min(k, nr)) int64.

    ``whitening`` is the fit for ``post`` (fitted on ``data.train`` when None and ``post.whiten``).
    """
    if post.whiten and whitening is None:
        whitening = fit_whitening_for(data.train, post)
    query = ensemble_descriptors(data.query, post, whitening)
    reference = ensemble_descriptors(data.reference, post, whitening)
    _, indices = rerank(query, reference, post.rerank, top_k=min(k, len(reference)), device=device)
    return indices


def evaluate(heldout: HeldoutSet, post: PostProcessing, k: int = 1000,
             whitening: Whitening | None = None, device: str = "cpu") -> dict[str, float]:
    """Score ``post`` on ``heldout``: ``{"map_at_k": mAP@k, "recall_at_1": R@1}`` (see ``rank``)."""
    indices = rank(heldout, post, k, whitening, device)
    return retrieval_scores(indices, heldout.query_labels, heldout.reference_labels, k=k)


class WhiteningCache:
    """Whitening fits for any member weights from one pass over the train descriptors; thread-safe.

    The mean and covariance of the unweighted concatenation of the members' train rows are computed
    once (``ensemble.whitening.train_moments``); the fit for weights w scales them by sqrt(w_m) per
    member block and takes one eigendecomposition (``whitening_from_moments``). Fits are kept in an LRU
    keyed by (normalised weights rounded, shrinkage).
    """

    def __init__(self, train: Sequence[np.ndarray], maxsize: int = 8, decimals: int = 4) -> None:
        self.train = list(train)
        self.maxsize = maxsize
        self.decimals = decimals
        self.hits = 0
        self.misses = 0
        self._fits: OrderedDict[tuple, Whitening] = OrderedDict()
        self._moments: tuple[np.ndarray, np.ndarray, int] | None = None
        self._lock = threading.Lock()

    def key(self, post: PostProcessing) -> tuple:
        w = normalize_weights(post.weights, len(self.train))
        return tuple(np.round(w, self.decimals).tolist()), round(float(post.whiten_shrinkage), 6)

    def moments(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mean, covariance, n) of the unweighted concatenation of the members' train rows (computed once)."""
        with self._lock:
            if self._moments is None:
                self._moments = train_moments(self.train)
            return self._moments

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
        mean, cov, n = self.moments()
        scale = np.concatenate([np.full(t.shape[1], np.sqrt(w)) for t, w in
                                zip(self.train, normalize_weights(post.weights, len(self.train)))])
        fit = whitening_from_moments(mean * scale, cov * np.outer(scale, scale), n,  # outside the lock:
                                     shrinkage=post.whiten_shrinkage)                # threads may fit at once
        with self._lock:
            self._fits[key] = fit
            while len(self._fits) > self.maxsize:
                self._fits.popitem(last=False)
        return fit


def max_whiten_dim(heldout: HeldoutSet) -> int:
    """Largest whitening dim the train set supports: min(n_train - 1, sum d_m)."""
    return min(len(heldout.train[0]) - 1, sum(t.shape[1] for t in heldout.train))


def _budget_reached(trial: optuna.Trial, n_trials: int, stale_after_s: float | None = None) -> bool:
    """True when ``n_trials`` trials are complete or running ahead of this one (any worker);
    trials of dead workers are recovered first and never count (``tuning.budget``)."""
    return TrialBudget(n_trials, stale_after_s).reached(trial)


def build_objective(problem: FoldProblem, space: SearchSpace, k: int = 1000,
                    cache: WhiteningCache | None = None, n_trials: int | None = None,
                    device: str = "cpu", stale_after_s: float | None = None,
                    ranker: Callable[[optuna.Trial], np.ndarray] | None = None) -> Callable[[optuna.Trial], float]:
    """Return the Optuna objective: the mean over folds of the sampled post-processing's mAP@k on ``problem``.

    ``ranker(trial)`` samples the trial's parameters and returns its rankings of ``problem.data``
    (default: a whole ``PostProcessing`` from ``space``, ranked by ``rank``; ``tuning.stages`` passes
    its own). The fold scores, their spread and Recall@1 are kept as user attributes (``fold_maps``,
    ``spread``, ``recall_at_1``). With ``n_trials`` set, a trial that would exceed that many completed
    trials of the whole study (several workers) is pruned and stops its worker, so workers together
    complete exactly N; ``stale_after_s``: see ``tuning.workers.is_stale``.
    """
    data = problem.data
    cache = cache if cache is not None else WhiteningCache(data.train)
    max_dim = max_whiten_dim(data)
    space = fit_space(space, len(data.query_labels), len(data.reference_labels))

    def rank_trial(trial: optuna.Trial) -> np.ndarray:
        post = suggest_postprocessing(trial, data.member_names, max_dim, space)
        return rank(data, post, k, cache.get(post), device)

    ranker = ranker if ranker is not None else rank_trial

    def objective(trial: optuna.Trial) -> float:
        if n_trials is not None and _budget_reached(trial, n_trials, stale_after_s):
            trial.set_user_attr("pruned_reason", "trial budget reached")
            trial.study.stop()
            raise optuna.TrialPruned("trial budget reached")
        scores = problem.score(ranker(trial), k)
        trial.set_user_attr("recall_at_1", scores.recall_at_1)
        trial.set_user_attr(FOLD_MAPS_ATTR, [float(v) for v in scores.fold_maps])
        trial.set_user_attr(SPREAD_ATTR, scores.spread)
        return scores.value

    return objective
