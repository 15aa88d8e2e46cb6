"""Search the post-processing (weights, whitening, DBA, aQE, k-reciprocal) with Optuna.

Library: ``run_search(heldout, SearchConfig(...), storage=..., study_name=...)``.
CLI: ``python -m tuning.search --bundle BUNDLE [--trials N] [--timeout S]
[--storage URL] [--study NAME] [--n-jobs J] [--seed S] [--no-kreciprocal]``
searches on the bundle's held-out descriptors, writes the best parameters into
the bundle (atomically) and a report with plots into BUNDLE.tuning/ beside it.

Storage: None (in memory), an Optuna RDB URL (``sqlite:///study.db``,
``postgresql://...``) or ``journal:PATH`` (a journal file several processes can
share). A study is resumed where it stopped: only the trials missing from
``n_trials`` completed ones are run, and RUNNING trials left by a dead worker are
marked FAIL and their parameters re-enqueued.

Over-fitting guard: the held-out classes are split (seeded) into a search half,
which the study optimises, and a check half, on which the best trial and the
defaults are scored for the report.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from competition.cli import ArgumentParser, UserError, number, run_command
from competition.metrics import file_keys
from ensemble.postprocess import PostProcessing
from tuning.heldout import HeldoutSet, heldout_set
from tuning.objective import (
    DEFAULTS_ATTR,
    WORKER_ATTR,
    SearchSpace,
    WhiteningCache,
    build_objective,
    default_params,
    evaluate,
    post_from_params,
)

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """How a search runs. ``n_trials``: completed trials wanted in the study (all workers)."""

    n_trials: int = 100
    timeout: float | None = None
    n_jobs: int = 1
    seed: int = 0                  # TPE seed; workers sharing a study should use different seeds
    split_seed: int = 0            # seed of the search/check split of the held-out classes
    k: int = 1000                  # mAP@k
    space: SearchSpace = field(default_factory=SearchSpace)
    stale_after_s: float | None = None  # RUNNING trials of other hosts older than this are stale
    device: str = "cpu"


@dataclass
class SearchResult:
    """Outcome of ``run_search``. Scores are dicts ``{"map_at_k", "recall_at_1"}``."""

    best_post: PostProcessing
    best_value: float              # mAP@k of the best trial on the search half
    best_trial: int
    defaults_value: float          # mAP@k of the untuned defaults on the search half
    check_best: dict[str, float]   # best trial on the check half
    check_defaults: dict[str, float]
    search_classes: list[str]
    check_classes: list[str]
    n_complete: int
    study: optuna.Study
    k: int = 1000

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (no study object; scores spelled as files spell them)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("study", "best_post")}
        d["check_best"], d["check_defaults"] = (file_keys(self.check_best, self.k),
                                                file_keys(self.check_defaults, self.k))
        d["best_post"] = self.best_post.to_dict()
        d["study_name"] = self.study.study_name
        return d


def split_halves(heldout: HeldoutSet, seed: int = 0) -> tuple[HeldoutSet, HeldoutSet, list[str], list[str]]:
    """Split the held-out classes into two disjoint, self-contained retrieval problems.

    Returns (search_half, check_half, search_classes, check_classes).
    """
    classes = np.intersect1d(np.unique(heldout.query_labels), np.unique(heldout.reference_labels))
    if len(classes) < 2:
        raise UserError(f"need at least 2 held-out classes with queries and references, got {len(classes)}: "
                        "hold out more classes")
    order = np.random.default_rng(seed).permutation(len(classes))
    half = (len(classes) + 1) // 2
    search, check = np.sort(classes[order[:half]]), np.sort(classes[order[half:]])
    return (heldout.subset_classes(search.tolist()), heldout.subset_classes(check.tolist()),
            [str(c) for c in search], [str(c) for c in check])


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage | None:
    """Turn ``None`` / ``journal:PATH`` / an RDB URL into an Optuna storage."""
    if storage is None or not isinstance(storage, str):
        return storage
    if storage.startswith("journal:"):
        path = storage[len("journal:"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several processes on one file: wait for the lock instead of failing at once
        return optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(storage)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial: optuna.trial.FrozenTrial, stale_after_s: float | None = None) -> bool:
    """True for a RUNNING trial whose worker is dead (same host) or too old (other hosts)."""
    if trial.state != TrialState.RUNNING:
        return False
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not _pid_alive(int(pid))
    if stale_after_s is not None and trial.datetime_start is not None:
        age = time.time() - trial.datetime_start.timestamp()
        return age > stale_after_s
    return False


def recover_stale_trials(study: optuna.Study, stale_after_s: float | None = None) -> list[int]:
    """Mark stale RUNNING trials FAIL and re-enqueue their parameters; return their numbers."""
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, stale_after_s):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker finished or recovered it meanwhile
        attrs = {"retry_of": t.number}
        if t.user_attrs.get(DEFAULTS_ATTR):
            attrs[DEFAULTS_ATTR] = True
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        recovered.append(t.number)
        log.warning("trial %d was left RUNNING by a dead worker: marked FAIL, parameters re-enqueued", t.number)
    return recovered


def _defaults_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get(DEFAULTS_ATTR)]
    return min(done, key=lambda t: t.number) if done else None


def _create_or_load(name: str, storage: optuna.storages.BaseStorage | None, seed: int) -> tuple[optuna.Study, bool]:
    """Return (study, created): created is True only for the one process that created it."""
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def run_search(heldout: HeldoutSet, config: SearchConfig | None = None,
               storage: str | optuna.storages.BaseStorage | None = None,
               study_name: str | None = None) -> SearchResult:
    """Search post-processing on the search half of ``heldout``; score best and defaults on the check half.

    Resumes the study ``study_name`` when it exists in ``storage``.
    """
    config = config or SearchConfig()
    space = config.space
    search_half, check_half, search_classes, check_classes = split_halves(heldout, config.split_seed)
    study, created = _create_or_load(study_name or "postprocessing", open_storage(storage), config.seed)
    study.set_user_attr("search_classes", search_classes)
    recover_stale_trials(study, config.stale_after_s)
    defaults = default_params(heldout.member_names, space)
    if created:  # only the worker that created the study enqueues them: no duplicate with several workers
        study.enqueue_trial(defaults, user_attrs={DEFAULTS_ATTR: True}, skip_if_exists=True)
    n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = config.n_trials - n_done
    cache = WhiteningCache(heldout.train)
    if remaining > 0:
        log.info("study %s: %d of %d trials complete, running up to %d more",
                 study.study_name, n_done, config.n_trials, remaining)
        objective = build_objective(search_half, space, k=config.k, cache=cache, n_trials=config.n_trials,
                                    device=config.device)
        study.optimize(objective, n_trials=remaining, timeout=config.timeout, n_jobs=config.n_jobs,
                       callbacks=[optuna.study.MaxTrialsCallback(config.n_trials, states=(TrialState.COMPLETE,))])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {study.study_name}: no completed trial")
    best = study.best_trial
    best_post = post_from_params(best.params, heldout.member_names, space)
    default_post = post_from_params(defaults, heldout.member_names, space)
    dtrial = _defaults_trial(study)
    defaults_value = (float(dtrial.value) if dtrial is not None
                      else evaluate(search_half, default_post, config.k, device=config.device)["map_at_k"])
    return SearchResult(
        best_post=best_post, best_value=float(best.value), best_trial=best.number, defaults_value=defaults_value,
        check_best=evaluate(check_half, best_post, config.k, cache.get(best_post), config.device),
        check_defaults=evaluate(check_half, default_post, config.k, device=config.device),
        search_classes=search_classes, check_classes=check_classes, n_complete=len(complete), study=study,
        k=config.k)


def tuning_dir(bundle_path: str | os.PathLike) -> Path:
    """``BUNDLE.tuning`` beside the bundle: a bundle rewrite swaps the whole BUNDLE folder
    (``Bundle.save``), which would delete a study database living inside it."""
    p = Path(os.path.abspath(bundle_path))
    return p.parent / f"{p.name}.tuning"


def tune_bundle(bundle_path: str | os.PathLike, config: SearchConfig, storage: str | None = None,
                study_name: str | None = None, load_bundle: Callable[[str], Any] | None = None,
                write_report: bool = True) -> SearchResult:
    """Search on a bundle's held-out set, write the best post-processing into it, report to ``tuning_dir``."""
    if load_bundle is None:
        from ensemble.bundle import Bundle
        load_bundle = Bundle.load
    bundle = load_bundle(str(bundle_path))
    if getattr(bundle, "is_refit", False):
        raise UserError(f"{bundle_path}: a refit bundle (its members learnt the held-out classes) cannot be "
                        "tuned honestly: tune the bundle it was refit from")
    out = tuning_dir(bundle_path)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    result = run_search(heldout_set(bundle), config, storage=storage, study_name=study_name)
    bundle.set_postprocessing(result.best_post)
    if write_report:
        from tuning.report import write_report as _write
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
    ap.add_argument("--split-seed", type=number(int, 0), default=0, metavar="N",
                    help="seed of the search/check split of the held-out classes")
    ap.add_argument("--no-kreciprocal", action="store_true", help="leave k-reciprocal re-ranking out of the search")
    ap.add_argument("--stale-after", type=number(float, 0.0), default=None, metavar="S",
                    help="treat RUNNING trials of other hosts older than S seconds as dead")
    ap.add_argument("--no-report", action="store_true", help="skip the report and plots")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SearchConfig(n_trials=args.trials, timeout=args.timeout, n_jobs=args.n_jobs, seed=args.seed,
                          split_seed=args.split_seed, space=SearchSpace(kreciprocal=not args.no_kreciprocal),
                          stale_after_s=args.stale_after)
    r = tune_bundle(args.bundle, config, storage=args.storage, study_name=args.study,
                    write_report=not args.no_report)
    print(f"best trial {r.best_trial}: mAP@{config.k} {r.best_value:.4f} (defaults {r.defaults_value:.4f}) "
          f"on the search half; check half {r.check_best['map_at_k']:.4f} "
          f"(defaults {r.check_defaults['map_at_k']:.4f}); {r.n_complete} trials complete")
    print(f"best post-processing written to {args.bundle}; report in {tuning_dir(args.bundle)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
