"""How a study runs its trials: jointly, or in two stages (``tuning.stages``), and the mechanics both
share (the study with its reproducible sampler, the trial budget, a progress bar).

Either plan returns a ``StudyRun``: the study the final choice picks from, how its trials decode into a
``PostProcessing``, and how a trial is re-scored on the whole split. ``SearchConfig.plan`` chooses:
"joint" (every parameter drawn in every trial: best on small splits, where a trial is cheap), "staged"
(descriptors first, then re-rankers on prepared graphs: for large splits), or "auto" (staged when the
study's problem has more than ``STAGED_FROM`` images).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import TrialState

from competition.cli import UserError, show_progress
from ensemble.postprocess import PostProcessing
from tuning.budget import TrialBudget
from tuning.folds import FoldScores
from tuning.heldout import HeldoutSet
from tuning.objective import WhiteningCache, build_objective, default_params, max_whiten_dim, rank, standard_params
from tuning.problems import StudyProblems
from tuning.sampling import ReproducibleSampler
from tuning.space import RERANKER_KEYS, SearchSpace, post_from_params
from tuning.stages import (
    ExpandedSets,
    StagePlan,
    candidate_sets,
    descriptor_space,
    reranking_ranker,
    shared_sets,
    stage_budgets,
    wait_for_stage,
)
from tuning.tensorboard import StudyBoard
from tuning.workers import DEFAULTS_ATTR, recover_stale_trials

if TYPE_CHECKING:
    from tuning.search import SearchConfig

__all__ = ["PLANS", "STAGED_FROM", "StudyRun", "TrialProgress", "create_or_load", "defaults_trial", "n_complete",
           "optimize", "run_joint", "run_staged", "study_plan"]

log = logging.getLogger(__name__)

PLANS = ("auto", "joint", "staged")
STAGED_FROM = 6_000   # "auto": a study problem of more images (queries + gallery) runs staged


def defaults_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(DEFAULTS_ATTR)]
    return min(done, key=lambda t: t.number) if done else None


def n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class TrialProgress:
    """An Optuna callback: one progress bar (on a terminal) with the best value so far, instead of
    Optuna's line per trial; ``ran`` and ``seconds`` give the trials/min of the summary."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm.auto import tqdm
        self.ran, self.t0 = 0, time.monotonic()
        self.bar = tqdm(total=total, initial=done, desc="tuning", unit="trial", disable=not show_progress())

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            self.ran += 1
            self.bar.update(1)
            try:
                self.bar.set_postfix(best=f"{study.best_value:.4f}")
            except ValueError:
                pass

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def close(self) -> None:
        self.bar.close()


def optimize(study: optuna.Study, objective: Callable[[optuna.trial.Trial], float], config: "SearchConfig",
              progress: TrialProgress | None = None) -> None:
    """Run trials until ``config.n_trials`` are COMPLETE in the study, all workers together, or until the
    timeout (``tuning.budget``: dead workers' trials are recovered first, so a resumed study re-runs its
    killed trial before any new one); each completed trial goes to ``config.tensorboard`` when set."""
    budget = TrialBudget(config.n_trials, config.stale_after_s)
    if (left := budget.start(study)) <= 0:
        return
    log.info("study %s: %d of %d trials complete or running, running up to %d more",
             study.study_name, config.n_trials - left, config.n_trials, left)
    with StudyBoard.open(config.tensorboard, config.k) as board:   # None without a folder
        study.optimize(objective, n_trials=None, timeout=config.timeout, n_jobs=config.n_jobs,
                       callbacks=[c for c in (budget, progress, board) if c is not None])


def create_or_load(name: str, storage: optuna.storages.BaseStorage | None, seed: int) -> tuple[optuna.Study, bool]:
    """Return (study, created): created is True only for the process that created it (sampler: ``tuning.sampling``)."""
    sampler = ReproducibleSampler(seed)
    try:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


@dataclass
class StudyRun:
    """What a plan leaves for the final choice."""

    study: optuna.Study                              # the trials the final choice picks from
    decode: Callable[[dict], PostProcessing]          # a trial's params -> its post-processing
    score: Callable[[dict], FoldScores]               # a trial's params -> its scores on the whole split
    defaults: dict[str, Any]                          # the untuned defaults, as params of ``study``
    space: SearchSpace                                # the space ``study`` draws from
    n_complete: int                                   # completed trials, every stage
    stages: list[dict[str, Any]] = field(default_factory=list)   # per stage: name, trials, best value


def study_plan(config: "SearchConfig", problems: StudyProblems) -> str:
    """"joint" or "staged": ``config.plan``, with "auto" resolved by the size of the study's problem."""
    if config.plan not in PLANS:
        raise UserError(f"plan must be one of {', '.join(PLANS)}, got {config.plan!r}")
    if config.plan != "auto":
        return config.plan
    data = problems.study.data
    return "staged" if len(data.query_labels) + len(data.reference_labels) > STAGED_FROM else "joint"


def _stage_summary(name: str, study: optuna.Study) -> dict[str, Any]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return {"stage": name, "trials": len(done), "best": max((t.value for t in done), default=None)}


def run_joint(problems: StudyProblems, heldout: HeldoutSet, config: "SearchConfig", space: SearchSpace,
              storage: optuna.storages.BaseStorage, name: str, progress: TrialProgress,
              cache: WhiteningCache) -> StudyRun:
    """Every trial draws the whole post-processing and ranks through ``tuning.objective.rank``."""
    study, created = create_or_load(name, storage, config.seed)
    study.set_user_attr("search_classes", problems.folds.fold_classes)
    names, max_dim = heldout.member_names, max_whiten_dim(heldout)
    defaults = default_params(names, space)
    if created:  # only the worker that created the study enqueues them: no duplicate with several workers
        study.enqueue_trial(defaults, user_attrs={DEFAULTS_ATTR: True}, skip_if_exists=True)
        for stage in ("kreciprocal", "diffusion"):
            study.enqueue_trial(standard_params(names, space, max_dim, stage), skip_if_exists=True)
    objective = build_objective(problems.study, space, k=config.k, cache=cache, n_trials=config.n_trials,
                                device=config.device, stale_after_s=config.stale_after_s)
    optimize(study, objective, config, progress)

    def decode(params: dict) -> PostProcessing:
        return post_from_params(params, names, space)

    def score(params: dict) -> FoldScores:
        post = decode(params)
        return problems.final_scores([p.score(rank(p.data, post, config.k, cache.get(post), config.device), config.k)
                                      for p in problems.final])

    return StudyRun(study, decode, score, defaults, space, n_complete(study), [_stage_summary("joint", study)])


def _stage_config(config: "SearchConfig", n_trials: int, stage: str, deadline: float | None) -> "SearchConfig":
    board = str(Path(config.tensorboard) / stage) if config.tensorboard else None
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    return replace(config, n_trials=n_trials, tensorboard=board, timeout=left)


def run_staged(problems: StudyProblems, heldout: HeldoutSet, config: "SearchConfig", space: SearchSpace,
               storage: optuna.storages.BaseStorage, name: str, progress: TrialProgress,
               cache: WhiteningCache) -> StudyRun:
    """Descriptors first (plain search), then re-rankers on the best descriptor sets' prepared graphs."""
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    names, max_dim = heldout.member_names, max_whiten_dim(heldout)
    first_space, (n_first, n_second) = descriptor_space(space), stage_budgets(config.n_trials, config.descriptor_share)
    first, created = create_or_load(f"{name}:descriptors", storage, config.seed)
    first.set_user_attr("search_classes", problems.folds.fold_classes)
    defaults = default_params(names, first_space)
    textbook = standard_params(names, first_space, max_dim, "expand")
    if created:
        first.enqueue_trial(defaults, user_attrs={DEFAULTS_ATTR: True}, skip_if_exists=True)
        first.enqueue_trial(textbook, skip_if_exists=True)
    objective = build_objective(problems.study, first_space, k=config.k, cache=cache, n_trials=n_first,
                                device=config.device, stale_after_s=config.stale_after_s)
    optimize(first, objective, _stage_config(config, n_first, "descriptors", deadline), progress)
    wait_for_stage(first, lambda s: recover_stale_trials(s, config.stale_after_s))

    def decode_first(params: dict) -> PostProcessing:
        return post_from_params(params, names, first_space)

    second, created = create_or_load(f"{name}:reranking", storage, config.seed)
    plan = StagePlan(shared_sets(second, lambda: candidate_sets(first, config.beam, decode_first,
                                                                [defaults, textbook])), names, space)
    if created:
        second.enqueue_trial({"descriptors": "0", **_no_reranker(space)}, user_attrs={DEFAULTS_ATTR: True},
                             skip_if_exists=True)
        textbook_set = next(i for i in range(len(plan.sets)) if plan.descriptor_post(i) == decode_first(textbook))
        for stage in ("kreciprocal", "diffusion"):
            reranker = {k: v for k, v in standard_params(names, space, max_dim, stage).items() if k in RERANKER_KEYS}
            second.enqueue_trial({"descriptors": str(textbook_set), **reranker}, skip_if_exists=True)
    study_sets = ExpandedSets(problems.study.data, plan, cache, config.k, config.device)
    objective = build_objective(problems.study, space, k=config.k, cache=cache, n_trials=n_second,
                                device=config.device, stale_after_s=config.stale_after_s,
                                ranker=reranking_ranker(plan, study_sets, space))
    optimize(second, objective, _stage_config(config, n_second, "reranking", deadline), progress)
    del objective, study_sets   # the study problem's graphs: the final choice works on the whole split
    final_sets = [ExpandedSets(p.data, plan, cache, config.k, config.device, maxsize=len(plan.sets))
                  for p in problems.final]

    def score(params: dict) -> FoldScores:
        i, reranker = int(params["descriptors"]), plan.decode(params).rerank
        return problems.final_scores([p.score(sets.rank(i, reranker), config.k)
                                      for p, sets in zip(problems.final, final_sets)])

    return StudyRun(second, plan.decode, score, {"descriptors": "0", **_no_reranker(space)}, space,
                    n_complete(first) + n_complete(second),
                    [_stage_summary("descriptors", first), _stage_summary("reranking", second)])


def _no_reranker(space: SearchSpace) -> dict[str, Any]:
    """Re-ranker params of "no re-ranker" in ``space`` (what ``default_params`` says of it)."""
    return {k: v for k, v in (("kreciprocal", False), ("diffusion", False)) if getattr(space, k)}
