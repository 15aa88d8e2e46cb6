"""The final choice of a study: the best few trials re-scored on the whole split, chosen by a stated rule.

A study's best trial is the maximum of a noisy objective over hundreds of tries, so it is biased
upwards and may owe its rank to luck. Instead, the ``top`` best distinct trials (``candidates``) are
re-scored on the whole held-out split (every fold, unsampled, and the check classes the study never
scored) and the one with the highest

    robust score = mean over folds of mAP@k  -  spread_weight * standard deviation over folds

is chosen (``spread_weight`` 0: the fold mean). The check classes never take part in the choice: they
report how it generalises. A runner-up is *indistinguishable* from the chosen trial when their paired
per-query AP difference over the fold queries is within two standard errors of zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from ensemble.postprocess import PostProcessing
from tuning.folds import FoldScores

__all__ = ["Candidate", "FinalChoice", "candidates", "choose", "paired_difference"]


@dataclass
class Candidate:
    """A trial re-scored on the whole split."""

    trial: int
    params: dict[str, Any]
    post: PostProcessing
    study_value: float       # its value in the study
    scores: FoldScores       # re-scored on the whole split

    def robust(self, spread_weight: float) -> float:
        return self.scores.value - spread_weight * self.scores.spread


@dataclass
class FinalChoice:
    """The chosen candidate, every candidate ranked by the rule, and the statistical ties."""

    chosen: Candidate
    ranked: list[Candidate]
    spread_weight: float
    indistinguishable: list[int] = field(default_factory=list)   # trial numbers tied with the chosen
    differences: dict[int, tuple[float, float]] = field(default_factory=dict)  # trial -> (mean, se) vs chosen

    def rule(self) -> str:
        if self.spread_weight == 0:
            return "the highest mean over folds of mAP@k on the whole split"
        return f"the highest mean over folds minus {self.spread_weight:g} x their standard deviation"

    def summary(self) -> str:
        """One plain sentence on how sure the choice is."""
        n = len(self.ranked)
        if n == 1:
            return "one candidate: nothing to compare"
        tied = len(self.indistinguishable)
        if tied == n - 1:
            return (f"the {n} best trials are indistinguishable on the whole split (every paired difference "
                    "within two standard errors): the choice among them is a coin toss, any of them will do")
        if tied:
            return (f"{tied} of the {n - 1} runner-ups are indistinguishable from the chosen trial "
                    "(paired differences within two standard errors)")
        return f"the chosen trial beats each of the {n - 1} runner-ups by more than two standard errors"


def candidates(study: optuna.Study, top: int, decode: Callable[[dict], PostProcessing]) -> list[tuple]:
    """(trial number, params, post, value) of the ``top`` best completed trials with distinct post-processing,
    best first (ties: lower trial number first)."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    out, seen = [], []
    for t in done:
        post = decode(t.params)
        if post in seen:
            continue
        seen.append(post)
        out.append((t.number, dict(t.params), post, float(t.value)))
        if len(out) == top:
            break
    return out


def paired_difference(a_ap: np.ndarray, b_ap: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of the per-query AP difference a - b (same queries, same order)."""
    diff = np.asarray(a_ap, np.float64) - np.asarray(b_ap, np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def choose(scored: list[Candidate], spread_weight: float = 0.0, fold_queries: np.ndarray | None = None) -> FinalChoice:
    """Choose among ``scored`` by the robust score (ties: the better study value, then the lower trial
    number); ``fold_queries`` (bool mask over ``scores.ap``) selects the queries the paired test uses
    (default: all)."""
    if not scored:
        raise ValueError("no candidate to choose from")
    ranked = sorted(scored, key=lambda c: (-c.robust(spread_weight), -c.study_value, c.trial))
    chosen = ranked[0]
    mask = np.ones(len(chosen.scores.ap), bool) if fold_queries is None else fold_queries
    choice = FinalChoice(chosen, ranked, spread_weight)
    for c in ranked[1:]:
        mean, se = paired_difference(chosen.scores.ap[mask], c.scores.ap[mask])
        choice.differences[c.trial] = (mean, se)
        if abs(mean) <= 2 * se:
            choice.indistinguishable.append(c.trial)
    return choice
