"""The trial budget of a study: ``n_trials`` COMPLETE trials, all workers together, never more.

One rule: the trials left = n_trials - COMPLETE - RUNNING, where a RUNNING trial counts only
while its worker lives (``tuning.workers.is_stale``), and the trial asking counts only the
RUNNING trials numbered below it. Trial numbers are unique and ordered, so of several
workers asking at once exactly the first ``left`` go ahead: the study completes exactly
n_trials, and a dead worker's trial never takes a place (it is recovered, FAIL and
re-enqueued, by ``recover_stale_trials``).

The rule is asked three times, each for its own reason:

* ``start`` before a worker's first trial: recovers the trials of dead workers (a resumed
  study re-runs its killed trial before any new one, where the uninterrupted study ran it),
  and a finished study starts nothing;
* ``reached`` as each trial starts: recovers what died meanwhile, and is exact across workers;
* the callback after each trial: stops this worker once the study is full, so a lone worker
  never creates a trial past the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuning.workers import is_stale, recover_stale_trials


@dataclass
class TrialBudget:
    """``n_trials`` COMPLETE trials in the study; ``stale_after_s``: see ``tuning.workers.is_stale``."""

    n_trials: int
    stale_after_s: float | None = None

    def left(self, study: optuna.Study, before: int | None = None) -> int:
        """Trials still to start: n_trials - COMPLETE - live RUNNING (those numbered below ``before``)."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        taken = [t for t in trials if t.state == TrialState.COMPLETE
                 or ((before is None or t.number < before) and not is_stale(t, self.stale_after_s))]
        return self.n_trials - len(taken)

    def start(self, study: optuna.Study) -> int:
        """Before this worker's first trial: recover dead workers' trials; return ``left``."""
        recover_stale_trials(study, self.stale_after_s)
        return self.left(study)

    def reached(self, trial: optuna.Trial) -> bool:
        """As ``trial`` starts: recover dead workers' trials; True when it would exceed the budget."""
        recover_stale_trials(trial.study, self.stale_after_s)
        return self.left(trial.study, before=trial.number) <= 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback: stop this worker when the study is full, or when its trial failed (an
        objective that returns no number would otherwise run trials forever)."""
        if trial.state == TrialState.FAIL or self.left(study) <= 0:
            study.stop()
