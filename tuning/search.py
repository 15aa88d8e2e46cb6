"""Search the post-processing (weights, whitening, DBA, aQE, a re-ranker) with Optuna.

Library: ``run_search(heldout, SearchConfig(...), storage=..., study_name=...)``.
CLI: ``python -m tuning.search --bundle BUNDLE [--trials N] [--timeout S]
[--storage URL] [--study NAME] [--n-jobs J] [--seed S] [--no-kreciprocal] [--no-diffusion]``
searches on the bundle's held-out descriptors, writes the chosen parameters into
the bundle (atomically) and a report with plots into BUNDLE.tuning/ beside it.

Storage: None (in memory), an Optuna RDB URL (``sqlite:///study.db``,
``postgresql://...``) or ``journal:PATH`` (a journal file several processes can
share). A study is resumed where it stopped: trials run until ``n_trials`` are
COMPLETE, and RUNNING trials left by a dead worker (killed at any instant, see
``tuning.workers``) are marked FAIL and their parameters re-enqueued.

What a trial scores (``tuning.problems``; default ``objective="folds"``): the held-out
classes are split (seeded) into class folds and a check set; a trial ranks the fold
queries against one gallery of every held-out reference (the other folds' classes are the
unseen distractors; train-class distractors only when ``distractors`` asks) and its value
is the mean of the folds' mAP@k (``tuning.folds``). The search space is sized by the
held-out class sizes (``tuning.space.sized_space``). The final choice is not the single
best trial: the best ``final_top`` are re-scored on the whole split and chosen by a
stated rule (``tuning.choice``); the check classes, never scored by the study, report
how the choice generalises. A split too small to inform (few queries, every trial
perfect), and best trials on the edge of a range, are reported in
``SearchResult.warnings``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from competition.cli import ArgumentParser, UserError, number, run_command
from competition.metrics import file_keys
from ensemble.postprocess import PostProcessing
from tuning.choice import Candidate, FinalChoice, candidates, choose
from tuning.folds import FoldScores, class_sizes
from tuning.heldout import HeldoutSet, heldout_set
from tuning.objective import SearchSpace, WhiteningCache, fit_space, rank
from tuning.plans import PLANS, STAGED_FROM, TrialProgress, defaults_trial, run_joint, run_staged, study_plan
from tuning.problems import OBJECTIVES, distractor_count, split_halves, study_problems, tuning_problems
from tuning.space import SIZED_SPACE_RULE, boundary_notes, sized_space
from tuning.tensorboard import require_tensorboard, write_choice
from tuning.workers import check_storage_url, is_stale, open_storage, recover_stale_trials

__all__ = ["SearchConfig", "SearchResult", "distractor_count", "is_stale", "main", "open_storage",
           "recover_stale_trials", "run_search", "search_space", "split_halves", "split_warnings", "study_settings",
           "tune_bundle", "tuning_dir", "tuning_problems"]

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """How a search runs. ``n_trials``: completed trials wanted in the study (all workers)."""

    n_trials: int = 100
    timeout: float | None = None
    n_jobs: int = 1
    seed: int = 0                  # TPE seed; workers sharing a study should use different seeds
    split_seed: int = 0            # seed of the folds / halves of the held-out classes
    k: int = 1000                  # mAP@k
    space: SearchSpace = field(default_factory=SearchSpace)
    stale_after_s: float | None = None  # RUNNING trials of other hosts older than this are stale
    heartbeat_s: int | None = None      # RDB storages: Optuna heartbeat for workers on several hosts
    device: str = "cpu"
    objective: str = "folds"       # "folds", "gallery" or "halves" (``tuning.problems``)
    distractors: str | int = 0     # train-class distractors in the gallery: a count (0: none, the
    #                                default, chosen by bench/objective_fidelity.py), "references" or "all"
    n_folds: int = 3               # class folds of the "folds" objective
    check_share: float = 0.25      # share of the held-out classes the "folds" study never scores
    size_space: bool = True        # size k1, k2, DBA/aQE n and the diffusion k by the held-out class sizes
    max_study_images: int | None = 20_000   # the study ranks a class sample of at most about this many
    #                                          images (queries + gallery); None: the whole split
    final_top: int = 10            # the best trials re-scored on the whole split for the final choice
    spread_weight: float = 0.0     # final choice: mean over folds minus this times their spread
    plan: str = "auto"             # "joint", "staged" or "auto" (by the study problem's size; ``tuning.plans``)
    descriptor_share: float = 0.5  # staged: share of the trials that choose the descriptors
    beam: int = 3                  # staged: the best distinct descriptor settings the re-rankers try
    tensorboard: str | None = None  # a folder: each completed trial's value and the best so far, then the choice
    heldout_remedy: str = "--heldout-fraction 0.4"   # how the caller holds out more classes (split warnings)


def study_settings(config: SearchConfig) -> dict[str, Any]:
    """What a study's trials and choice depend on beyond the bundle, k, seed, storage and distractors: a
    recipe re-runs its tuning step when one of these changes."""
    return {"objective": config.objective, "n_folds": config.n_folds, "check_share": config.check_share,
            "size_space": config.size_space and SIZED_SPACE_RULE, "max_study_images": config.max_study_images,
            "final_top": config.final_top, "spread_weight": config.spread_weight, "split_seed": config.split_seed,
            "plan": config.plan, "descriptor_share": config.descriptor_share, "beam": config.beam,
            "space": asdict(config.space)}


MIN_SEARCH_QUERIES = 20   # fewer held-out queries in the search half: its mAP is too noisy to tune on


@dataclass
class SearchResult:
    """Outcome of ``run_search``. Scores are dicts ``{"map_at_k", "recall_at_1"}``."""

    best_post: PostProcessing      # the final choice (``tuning.choice``)
    best_value: float              # its value in the study (mean over folds of mAP@k)
    best_trial: int
    defaults_value: float          # the untuned defaults' value in the study
    check_best: dict[str, float]   # the final choice on the check classes (never scored by the study)
    check_defaults: dict[str, float]
    search_classes: list[str]      # the classes the study scores (every fold)
    check_classes: list[str]
    n_complete: int
    study: optuna.Study
    k: int = 1000
    warnings: list[str] = field(default_factory=list)  # the split is too small to inform, in plain words
    trials_run: int = 0            # trials this call completed (not earlier runs of the study)
    seconds: float = 0.0           # how long this call took
    final: dict[str, Any] = field(default_factory=dict)   # the final choice: rule, candidates, ties
    space: dict[str, Any] = field(default_factory=dict)   # the ranges searched and the class sizes they follow
    folds: list[list[str]] = field(default_factory=list)  # the classes of each fold
    study_rate: float = 1.0        # share of the split the study's trials ranked (class sample)
    plan: str = "joint"            # how the trials ran (``tuning.plans``)
    stages: list[dict[str, Any]] = field(default_factory=list)   # per stage: name, trials, best value

    def rate_line(self) -> str:
        """``N trials in S s (R trials/min)`` of this call."""
        rate = 60.0 * self.trials_run / self.seconds if self.seconds > 0 else 0.0
        return f"{self.trials_run} trials in {self.seconds:.0f} s ({rate:.0f} trials/min)"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (no study object; scores spelled as files spell them)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("study", "best_post")}
        d["check_best"], d["check_defaults"] = (file_keys(self.check_best, self.k),
                                                file_keys(self.check_defaults, self.k))
        d["best_post"] = self.best_post.to_dict()
        d["study_name"] = self.study.study_name
        return d


SATURATED = 0.98   # a best trial at or above this cannot be told from its neighbours


def split_warnings(search_half: HeldoutSet, values: list[float], k: int = 1000,
                   remedy: str = SearchConfig.heldout_remedy) -> list[str]:
    """Plain sentences on why a search half cannot inform the tuning ([] when it can).

    ``values``: mAP@k of the completed trials on ``search_half``; ``remedy``: how the caller
    holds out more classes, in its own terms (the CLI's option by default).
    """
    fix = f"hold out a larger share of the train classes (e.g. {remedy})"
    out = []
    n_queries, n_classes = len(search_half.query_labels), len(np.unique(search_half.query_labels))
    if n_queries < MIN_SEARCH_QUERIES:
        out.append(f"the search half holds only {n_queries} held-out queries ({n_classes} classes), fewer than "
                   f"{MIN_SEARCH_QUERIES}: its mAP@{k} is too noisy to choose parameters by; {fix}")
    if values and min(values) >= 1.0 - 1e-9:
        out.append(f"every one of the {len(values)} completed trials scored mAP@{k} 1.0 on the search half: "
                   f"the held-out split is too easy to tell parameters apart and the best trial is arbitrary; {fix}")
    elif values and max(values) >= SATURATED:
        out.append(f"the best trials score mAP@{k} {max(values):.3f} on the search half: the objective saturates "
                   f"and cannot tell the best configurations apart; add distractors (--distractors all) or {fix}")
    return out


def run_search(heldout: HeldoutSet, config: SearchConfig | None = None,
               storage: str | optuna.storages.BaseStorage | None = None,
               study_name: str | None = None) -> SearchResult:
    """Search post-processing on the search half of ``heldout``; score best and defaults on the check half.

    Resumes the study ``study_name`` when it exists in ``storage``. Prints no line per trial: a
    progress bar on a terminal, and the result's ``trials_run``/``seconds`` for a summary.
    """
    with quiet_optuna():
        return _run_search(heldout, config, storage, study_name)


def _run_search(heldout: HeldoutSet, config: SearchConfig | None, storage: str | optuna.storages.BaseStorage | None,
                study_name: str | None) -> SearchResult:
    config = config or SearchConfig()
    problems = study_problems(heldout, config)
    data = problems.study.data
    space = search_space(heldout, config, data)
    plan = study_plan(config, problems)
    runner = run_staged if plan == "staged" else run_joint
    cache = WhiteningCache(heldout.train)
    progress = TrialProgress(config.n_trials, 0)
    try:
        run = runner(problems, heldout, config, space, open_storage(storage, config.heartbeat_s),
                     study_name or "postprocessing", progress, cache)
    finally:
        progress.close()
    complete = run.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {run.study.study_name}: no completed trial")
    scored = [Candidate(n, params, post, value, run.score(params))
              for n, params, post, value in candidates(run.study, config.final_top, run.decode)]
    choice = choose(scored, config.spread_weight, problems.final_fold_queries())
    dtrial = defaults_trial(run.study)
    default_scores = run.score(run.defaults)
    defaults_value = float(dtrial.value) if dtrial is not None else problems.study.score(
        rank(data, run.decode(run.defaults), config.k, device=config.device), config.k).value
    values = [float(t.value) for t in complete]
    top = [t.params for t in sorted(complete, key=lambda t: -t.value)[:config.final_top]]
    warnings = split_warnings(data, values, config.k, config.heldout_remedy) + boundary_notes(top, run.space)
    for w in warnings:
        log.warning("%s", w)
    return SearchResult(
        best_post=choice.chosen.post, best_value=choice.chosen.study_value, best_trial=choice.chosen.trial,
        defaults_value=defaults_value, check_best=_check(choice.chosen.scores), check_defaults=_check(default_scores),
        search_classes=problems.folds.fold_classes, check_classes=list(problems.folds.check),
        n_complete=run.n_complete, study=run.study, k=config.k, warnings=warnings, trials_run=progress.ran,
        seconds=round(progress.seconds, 1), final=final_summary(choice), space=_space_summary(space, heldout),
        folds=[list(f) for f in problems.folds.folds], study_rate=problems.study.rate, plan=plan, stages=run.stages)


def search_space(heldout: HeldoutSet, config: SearchConfig, study_data: HeldoutSet) -> SearchSpace:
    """The space a study searches: ``config.space`` sized by the held-out class sizes (unless
    ``size_space`` is off), then fitted to the set its trials rank."""
    space = sized_space(config.space, *class_sizes(heldout)) if config.size_space else config.space
    return fit_space(space, len(study_data.query_labels), len(study_data.reference_labels))


def _check(scores: FoldScores) -> dict[str, float]:
    """The check classes' scores of a re-scored candidate (NaN when the split has no check class)."""
    nan = float("nan")
    return {"map_at_k": nan if scores.check_map is None else scores.check_map,
            "recall_at_1": nan if scores.check_recall_at_1 is None else scores.check_recall_at_1}


def final_summary(choice: FinalChoice) -> dict[str, Any]:
    """The final choice as plain data: rule, verdict, and every candidate with its whole-split scores."""
    rows = []
    for c in choice.ranked:
        mean, se = choice.differences.get(c.trial, (0.0, 0.0))
        rows.append({"trial": c.trial, "study_value": c.study_value,
                     "fold_maps": [float(v) for v in c.scores.fold_maps],
                     "mean": c.scores.value, "spread": c.scores.spread, "robust": c.robust(choice.spread_weight),
                     "check": c.scores.check_map, "difference": mean, "standard_error": se,
                     "chosen": c is choice.chosen, "indistinguishable": c.trial in choice.indistinguishable})
    return {"rule": choice.rule(), "spread_weight": choice.spread_weight, "verdict": choice.summary(),
            "candidates": rows}


def _space_summary(space: SearchSpace, heldout: HeldoutSet) -> dict[str, Any]:
    images, references = class_sizes(heldout)
    return {"images_per_class": images, "references_per_class": references, "k1": list(space.k1_range),
            "k2": list(space.k2_range), "dba_n": [0, space.max_dba_n], "aqe_n": [0, space.max_aqe_n],
            "diffusion_k": list(space.diffusion_k_range), "kreciprocal": space.kreciprocal,
            "diffusion": space.diffusion}


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's INFO lines (one per trial, ~450 characters each) off while the block runs."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def tuning_dir(bundle_path: str | os.PathLike) -> Path:
    """``BUNDLE.tuning`` beside the bundle: a bundle rewrite swaps the whole BUNDLE folder
    (``Bundle.save``), which would delete a study database living inside it."""
    p = Path(os.path.abspath(bundle_path))
    return p.parent / f"{p.name}.tuning"


def tune_bundle(bundle_path: str | os.PathLike, config: SearchConfig, storage: str | None = None,
                study_name: str | None = None, load_bundle: Callable[[str], Any] | None = None,
                write_report: bool = True) -> SearchResult:
    """Search on a bundle's held-out set, write the best post-processing into it, report to ``tuning_dir``.
    Before any trial, a ``UserError`` each: tensorboard missing, a bad storage URL or driver, the bundle, the
    storage not opening; a refused (refit) bundle leaves nothing behind."""
    if config.tensorboard:
        require_tensorboard()
    check_storage_url(storage)
    if load_bundle is None:
        from ensemble.bundle import Bundle
        load_bundle = Bundle.load
    bundle = load_bundle(str(bundle_path))
    if getattr(bundle, "is_refit", False):
        raise UserError(f"{bundle_path}: a refit bundle (its members learnt the held-out classes) cannot be "
                        "tuned honestly: tune the bundle it was refit from")
    out = tuning_dir(bundle_path)
    opened = open_storage(storage or f"sqlite:///{(out / 'study.db').resolve()}", config.heartbeat_s)
    result = run_search(heldout_set(bundle), config, storage=opened, study_name=study_name)
    bundle.set_postprocessing(result.best_post)
    if config.tensorboard:
        write_choice(config.tensorboard, result, getattr(bundle, "member_names", None))
    if write_report:
        from tuning.report import write_report as _write
        out.mkdir(parents=True, exist_ok=True)
        _write(result, out)
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m tuning.search", description=__doc__)
    ap.add_argument("--bundle", required=True, metavar="DIR", help="the ensemble bundle to tune")
    ap.add_argument("--trials", type=number(int, 1), default=100, metavar="N",
                    help="completed trials wanted in the study, all workers together")
    ap.add_argument("--timeout", type=number(float, 0.0), default=None, metavar="S",
                    help="stop this worker after S seconds")
    ap.add_argument("--storage", default=None, metavar="URL",
                    help="Optuna RDB URL or journal:PATH (default: a SQLite file in BUNDLE.tuning/)")
    ap.add_argument("--study", default=None, metavar="NAME", help="study name (default: postprocessing)")
    ap.add_argument("--n-jobs", type=number(int, 1, 64), default=1, metavar="N", help="threads of this worker")
    ap.add_argument("--seed", type=number(int, 0), default=0, metavar="N",
                    help="TPE sampler seed (use a different one per worker)")
    ap.add_argument("--k", type=number(int, 1), default=1000, metavar="N", help="the study maximises mAP@k")
    ap.add_argument("--objective", choices=OBJECTIVES, default="folds",
                    help="folds: the queries of F class folds against every held-out reference plus distractors, "
                         "the mean over folds; gallery: one fold (half the classes); halves: two self-contained "
                         "problems")
    ap.add_argument("--folds", type=number(int, 1, 20), default=3, metavar="F", help="class folds (folds objective)")
    ap.add_argument("--check-share", type=number(float, 0.0, 0.9), default=0.25, metavar="X",
                    help="share of the held-out classes the study never scores, for the report (folds objective)")
    ap.add_argument("--max-study-images", type=number(int, 100), default=20_000, metavar="N",
                    help="trials rank a class sample of at most about N images; the final choice re-scores on all")
    ap.add_argument("--final-top", type=number(int, 1), default=10, metavar="N",
                    help="the best N trials re-scored on the whole split for the final choice")
    ap.add_argument("--plan", choices=PLANS, default="auto",
                    help="joint: every trial draws every parameter; staged: descriptors first, then re-rankers on "
                         "prepared graphs (large splits); auto: staged when the study ranks more than "
                         f"{STAGED_FROM:,} images")
    ap.add_argument("--spread-weight", type=number(float, 0.0), default=0.0, metavar="C",
                    help="final choice: highest mean over folds minus C times their standard deviation")
    ap.add_argument("--fixed-space", action="store_true",
                    help="keep the fixed ranges of k1, k2, DBA/aQE n and diffusion k instead of sizing them by "
                         "the held-out class sizes")
    ap.add_argument("--distractors", default="0", metavar="N|references|all",
                    help="train-class images added to the gallery as distractors (default 0: the fine-tuned "
                         "members learnt those classes, so they predict the test's unseen distractors badly)")
    ap.add_argument("--split-seed", type=number(int, 0), default=0, metavar="N",
                    help="seed of the folds (or halves) of the held-out classes")
    ap.add_argument("--no-kreciprocal", action="store_true", help="leave k-reciprocal re-ranking out of the search")
    ap.add_argument("--no-diffusion", action="store_true", help="leave diffusion re-ranking out of the search")
    ap.add_argument("--stale-after", type=number(float, 0.0), default=None, metavar="S",
                    help="treat RUNNING trials of other hosts older than S seconds as dead")
    ap.add_argument("--heartbeat", type=number(int, 1), default=None, metavar="S",
                    help="RDB storages: running trials record a heartbeat every S seconds; one silent for 4*S "
                         "is failed and re-run (workers on several hosts; same-host dead workers are seen at once)")
    ap.add_argument("--no-report", action="store_true", help="skip the report and plots")
    ap.add_argument("--tensorboard", default=None, metavar="DIR",
                    help="log each completed trial's mAP@k and the best so far (step = trial number), then the "
                         "chosen parameters, to a TensorBoard folder (needs the tensorboard package)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    config = SearchConfig(n_trials=args.trials, timeout=args.timeout, n_jobs=args.n_jobs, seed=args.seed,
                          k=args.k, split_seed=args.split_seed, objective=args.objective,
                          distractors=args.distractors, n_folds=args.folds, check_share=args.check_share,
                          space=SearchSpace(kreciprocal=not args.no_kreciprocal, diffusion=not args.no_diffusion),
                          size_space=not args.fixed_space, max_study_images=args.max_study_images,
                          final_top=args.final_top, spread_weight=args.spread_weight, plan=args.plan,
                          stale_after_s=args.stale_after, heartbeat_s=args.heartbeat, tensorboard=args.tensorboard)
    r = tune_bundle(args.bundle, config, storage=args.storage, study_name=args.study,
                    write_report=not args.no_report)
    print(f"{r.rate_line()}; best trial by the final choice {r.best_trial}: mAP@{config.k} {r.best_value:.4f} "
          f"(defaults {r.defaults_value:.4f}) "
          f"on the study's folds; check classes {r.check_best['map_at_k']:.4f} "
          f"(defaults {r.check_defaults['map_at_k']:.4f}); {r.n_complete} trials complete"
          + (f"; {len(r.warnings)} warning(s) above" if r.warnings else ""))
    print(f"final choice: {r.final['verdict']}")
    print(f"chosen post-processing written to {args.bundle}; report in {tuning_dir(args.bundle)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
