"""A study in two stages, so that a trial's costly work is done once per candidate, not once per trial.

On a large split most of a trial is work that depends only on the descriptors a re-ranker sees:
DBA over the gallery and the neighbour graph, O(N^2 d) each. A joint study draws new descriptors
in nearly every trial (measured: 198 distinct descriptor settings in 200 trials), so nothing can be
reused. The staged study splits the parameters:

1. ``descriptors`` (``descriptor_share`` of the trials): member weights, PCA-whitening, DBA and aQE,
   each trial ranked by plain search;
2. ``reranking`` (the rest): one of the candidate descriptor sets -- the ``beam`` best distinct
   settings of stage 1, the untuned defaults and the textbook expansion -- and the re-ranker (none,
   k-reciprocal or diffusion) with its parameters. A candidate's expanded descriptors and its
   neighbour graph, deep enough for every re-ranker of the space, are computed once per problem
   (``ExpandedSets``); a stage-2 trial is one re-ranking on a prepared graph, the same ranking
   ``tuning.objective.rank`` gives for the whole post-processing.

The two stages are two Optuna studies in the same storage (``NAME:descriptors``,
``NAME:reranking``); stage 2 starts once every stage-1 trial of every worker is finished and records
its candidate sets in its study (``descriptor_sets``), so that all workers and resumes share them.
The final choice (``tuning.choice``) is made among stage-2 trials.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from ensemble.postprocess import PostProcessing, ensemble_descriptors
from rerank.diffusion import DEFAULT_TRUNCATE, diffusion_depths
from rerank.graph import NeighbourGraph, neighbour_graph
from rerank.kreciprocal import kreciprocal_depth
from rerank.pipeline import RerankParams, expand, rerank
from tuning.choice import candidates
from tuning.heldout import HeldoutSet
from tuning.objective import WhiteningCache
from tuning.space import RERANKER_KEYS, SearchSpace, post_from_params, suggest_reranker

__all__ = ["SETS_ATTR", "ExpandedSets", "StagePlan", "candidate_sets", "descriptor_space", "reranking_ranker",
           "shared_sets", "stage_budgets", "wait_for_stage"]

SETS_ATTR = "descriptor_sets"   # user attribute of the stage-2 study: the candidate settings, as JSON


@dataclass
class StagePlan:
    """Stage 2's candidates: ``sets[i]`` the stage-1 parameters of descriptor set i."""

    sets: list[dict[str, Any]]
    member_names: list[str]
    space: SearchSpace

    def decode(self, params: dict[str, Any]) -> PostProcessing:
        """The whole post-processing of a stage-2 trial: its descriptor set's parameters and its re-ranker's."""
        chosen = self.sets[int(params["descriptors"])]
        return post_from_params({**chosen, **{k: v for k, v in params.items() if k in RERANKER_KEYS}},
                                self.member_names, self.space)

    def descriptor_post(self, i: int) -> PostProcessing:
        """Descriptor set i's post-processing without a re-ranker."""
        return post_from_params(self.sets[i], self.member_names, self.space)


def descriptor_space(space: SearchSpace) -> SearchSpace:
    """Stage 1's space: ``space`` without re-rankers."""
    return replace(space, kreciprocal=False, diffusion=False)


def stage_budgets(n_trials: int, descriptor_share: float) -> tuple[int, int]:
    """Completed trials wanted in stage 1 and stage 2 (at least one each when ``n_trials`` >= 2)."""
    first = min(max(1, round(n_trials * descriptor_share)), max(1, n_trials - 1))
    return first, n_trials - first


def wait_for_stage(study: optuna.Study, recover: Callable[[optuna.Study], object], poll_s: float = 2.0) -> None:
    """Return once ``study`` has no RUNNING trial (other workers' stage-1 trials finish first; dead
    workers' trials are recovered by ``recover``)."""
    while True:
        recover(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(poll_s)


def candidate_sets(stage1: optuna.Study, beam: int, decode: Callable[[dict], PostProcessing],
                   always: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage 2's descriptor sets: ``always`` (the defaults, the textbook expansion) then the ``beam`` best
    distinct settings of stage 1, duplicates (same post-processing) dropped."""
    out, seen = [], []
    for params in [*always, *(p for _, p, _, _ in candidates(stage1, beam, decode))]:
        post = decode(params)
        if post not in seen:
            seen.append(post)
            out.append(dict(params))
    return out


def shared_sets(stage2: optuna.Study, compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The candidate sets recorded in ``stage2`` (computed and recorded by the first worker to get there;
    every worker computes the same ones from the same finished stage 1)."""
    recorded = stage2.user_attrs.get(SETS_ATTR)
    if recorded is None:
        recorded = json.dumps(compute(), sort_keys=True)
        stage2.set_user_attr(SETS_ATTR, recorded)
    return json.loads(recorded)


@dataclass
class _Expanded:
    query: np.ndarray
    reference: np.ndarray
    graph: NeighbourGraph | None


class ExpandedSets:
    """Per descriptor set of a ``StagePlan``, on one problem: the expanded query and reference descriptors
    and their neighbour graph (deep enough for every re-ranker of ``plan.space``), computed on first use;
    an LRU of ``maxsize`` sets, thread-safe."""

    def __init__(self, data: HeldoutSet, plan: StagePlan, whitening: WhiteningCache, k: int = 1000,
                 device: str = "cpu", maxsize: int = 8) -> None:
        self.data, self.plan, self.whitening = data, plan, whitening
        self.k, self.device, self.maxsize = k, device, maxsize
        self._sets: OrderedDict[int, _Expanded] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0

    def _depths(self, n: int) -> tuple[int, int]:
        space = self.plan.space
        depth, query_depth = 1, 1
        if space.kreciprocal:
            depth = kreciprocal_depth(space.k1_range[1], space.k2_range[1])
        if space.diffusion:
            d, qd = diffusion_depths(space.diffusion_k_range[1], DEFAULT_TRUNCATE, n)
            depth, query_depth = max(depth, d), max(query_depth, qd)
        return min(depth, n), min(query_depth, n)

    def _build(self, i: int) -> _Expanded:
        post = self.plan.descriptor_post(i)
        fit = self.whitening.get(post)
        query = ensemble_descriptors(self.data.query, post, fit)
        reference = ensemble_descriptors(self.data.reference, post, fit)
        query, reference = expand(query, reference, post.rerank, self.device)
        graph = None
        if self.plan.space.kreciprocal or self.plan.space.diffusion:
            depth, query_depth = self._depths(len(query) + len(reference))
            graph = neighbour_graph(query, reference, depth, self.device, query_depth=query_depth,
                                    ref_depth=min(self.k, len(reference)), progress=False)
        return _Expanded(query, reference, graph)

    def get(self, i: int) -> _Expanded:
        with self._lock:
            if i in self._sets:
                self._sets.move_to_end(i)
                return self._sets[i]
        built = self._build(i)   # outside the lock: threads may build different sets at once
        with self._lock:
            self.built += 1
            self._sets[i] = built
            while len(self._sets) > self.maxsize:
                self._sets.popitem(last=False)
        return built

    def rank(self, i: int, reranker: RerankParams) -> np.ndarray:
        """Rankings (nq, min(k, nr)) of the problem under descriptor set i and ``reranker`` (its DBA and aQE
        ignored: the set's own apply)."""
        s = self.get(i)
        params = replace(reranker, dba_n=0, aqe_n=0)
        use_graph = params.use_kreciprocal or params.use_diffusion
        _, indices = rerank(s.query, s.reference, params, top_k=min(self.k, len(s.reference)),
                            device=self.device, graph=s.graph if use_graph else None)
        return indices


def reranking_ranker(plan: StagePlan, sets: ExpandedSets, space: SearchSpace) -> Callable[[optuna.Trial], np.ndarray]:
    """Stage 2's ``ranker`` for ``tuning.objective.build_objective``: a descriptor set and a re-ranker."""
    def rank_trial(trial: optuna.Trial) -> np.ndarray:
        i = int(trial.suggest_categorical("descriptors", [str(j) for j in range(len(plan.sets))]))
        suggest_reranker(trial, space)
        return sets.rank(i, plan.decode(trial.params).rerank)

    return rank_trial
