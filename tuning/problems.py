"""The retrieval problems a study is built on: what its trials rank, and what its final choice re-scores.

Three objectives (``SearchConfig.objective``), each a ``StudyProblems``:

* ``"folds"`` (default): the held-out classes split into a check set and F class folds
  (``tuning.folds``); trials rank the fold queries against the gallery of every held-out
  reference (plus train-class distractors when asked), sampled by class when the split is large; the final
  choice re-scores on the whole split, check queries included.
* ``"gallery"``: the same with one fold, the search half of the classes, and the other half as the
  check set (the kit's objective before class folds).
* ``"halves"``: two self-contained problems, each half's queries against its own references only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from competition.cli import UserError
from tuning.folds import ClassFolds, FoldProblem, FoldScores, fold_problem, make_folds, scored_classes
from tuning.heldout import HeldoutSet, parse_distractors

if TYPE_CHECKING:
    from tuning.search import SearchConfig

__all__ = ["OBJECTIVES", "StudyProblems", "distractor_count", "split_halves", "study_problems", "tuning_problems"]

OBJECTIVES = ("folds", "gallery", "halves")


def split_halves(heldout: HeldoutSet, seed: int = 0) -> tuple[HeldoutSet, HeldoutSet, list[str], list[str]]:
    """Split the held-out classes into two disjoint, self-contained retrieval problems.

    Returns (search_half, check_half, search_classes, check_classes).
    """
    classes = scored_classes(heldout)
    if len(classes) < 2:
        raise UserError(f"need at least 2 held-out classes with queries and references, got {len(classes)}: "
                        "hold out more classes")
    order = np.random.default_rng(seed).permutation(len(classes))
    half = (len(classes) + 1) // 2
    search, check = np.sort(classes[order[:half]]), np.sort(classes[order[half:]])
    return (heldout.subset_classes(search.tolist()), heldout.subset_classes(check.tolist()),
            [str(c) for c in search], [str(c) for c in check])


def distractor_count(setting: str | int, heldout: HeldoutSet) -> int:
    """How many train-class distractors ``setting`` (a count, "references", "all") means for ``heldout``."""
    setting = parse_distractors(setting)
    if setting == "references":
        return len(heldout.reference_labels)
    return len(heldout.train[0]) if setting == "all" else setting


@dataclass
class StudyProblems:
    """``study``: what every trial ranks; ``final``: what the final choice re-scores (one ranking of the
    fold and check queries, or two self-contained halves); ``folds``: the class folds and check set."""

    study: FoldProblem
    final: list[FoldProblem]
    folds: ClassFolds

    def final_scores(self, scores: list[FoldScores]) -> FoldScores:
        """One ``FoldScores`` from the scores of ``final``'s problems, in their order."""
        if len(scores) == 1:
            return scores[0]
        search, check = scores   # halves: the search half's folds, the check half's check queries
        return FoldScores(search.fold_maps, check.check_map, np.concatenate([search.ap, check.ap]),
                          search.recall_at_1, check.check_recall_at_1)

    def final_fold_queries(self) -> np.ndarray:
        """Mask over the concatenated per-query APs of ``final``: the fold queries (not the check ones)."""
        return np.concatenate([p.query_fold >= 0 for p in self.final])


def study_problems(heldout: HeldoutSet, config: "SearchConfig") -> StudyProblems:
    """The problems of ``config.objective`` on ``heldout`` (see the module docstring)."""
    if config.objective not in OBJECTIVES:
        raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")
    seed = config.split_seed
    if config.objective == "folds":
        folds = make_folds(heldout, config.n_folds, config.check_share, seed)
    else:
        search_half, check_half, search, check = split_halves(heldout, seed)
        folds = ClassFolds((tuple(search),), tuple(check))
        if config.objective == "halves":
            study = FoldProblem(search_half, np.zeros(len(search_half.query_labels), np.int64), 1)
            check_problem = FoldProblem(check_half, np.full(len(check_half.query_labels), -1, np.int64), 1)
            return StudyProblems(study, [study, check_problem], folds)
    n = distractor_count(config.distractors, heldout)
    study = fold_problem(heldout, folds, n, seed, max_images=config.max_study_images)
    return StudyProblems(study, [fold_problem(heldout, folds, n, seed, with_check=True)], folds)


def tuning_problems(heldout: HeldoutSet, config: "SearchConfig") -> tuple[HeldoutSet, HeldoutSet, list[str], list[str]]:
    """The study's problem and the check problem as plain sets: (search, check, search_classes, check_classes).

    ``search`` is what every trial ranks (the fold queries against the gallery); ``check`` the check
    queries against the same gallery (or the check half on its own, for ``"halves"``).
    """
    problems = study_problems(heldout, config)
    last = problems.final[-1]
    check = last.data.select_queries(last.query_fold < 0)
    return (problems.study.data, check, problems.folds.fold_classes, list(problems.folds.check))
