"""A sampler whose every draw is a function of the seed, the trials before it and the parameter.

``TPESampler(seed=S)`` draws from one random stream for the whole study: a study killed
and resumed restarts that stream, so from the kill on it draws other trials than the
uninterrupted study with the same seed. ``ReproducibleSampler`` wraps TPE through the
public ``BaseSampler`` interface and seeds a fresh TPE for each draw with

    SeedSequence([S, n_complete, n_running, crc32(name)])

n_complete: the COMPLETE trials when the trial starts; n_running: the RUNNING trials
numbered below it; name: the parameter, or "" for TPE's joint draw of the parameters
every trial has. TPE is a function of its history and its seed, so a draw no longer
depends on what the process drew before, nor on which parameters a retried trial
already has.

Guarantee: one worker with ``n_jobs = 1`` on a storage that outlives it (sqlite or
another RDB, journal), killed at any instant and resumed with the same seed, completes
the same trials, in the same order, as the uninterrupted study: the killed trial is
failed and re-run first with the parameters it had (``tuning.budget.TrialBudget.start``),
and a parameter it had not drawn yet is drawn as it would have been. Several workers
or threads cannot be reproducible (which trial completes first is a race); their draws
still differ, by seed and by n_running (and by a random salt once Optuna reseeds the
sampler for ``n_jobs > 1``).
"""
from __future__ import annotations

import secrets
import threading
import zlib
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState


def _tpe(seed: int) -> BaseSampler:
    return TPESampler(seed=seed)


class ReproducibleSampler(BaseSampler):
    """TPE (or ``make_sampler(seed)``) seeded per trial and parameter; see the module doc."""

    def __init__(self, seed: int = 0, make_sampler: Callable[[int], BaseSampler] = _tpe) -> None:
        self.seed = seed
        self._make_sampler = make_sampler
        self._positions: dict[int, tuple[int, int]] = {}   # trial number -> (n_complete, n_running)
        self._salt = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:   # pickled or deep-copied with its study: no lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _position(self, study: optuna.Study, trial: FrozenTrial) -> tuple[int, int]:
        with self._lock:
            known = self._positions.get(trial.number)
        if known is not None:
            return known
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        position = (sum(t.state == TrialState.COMPLETE for t in trials),
                    sum(t.state == TrialState.RUNNING and t.number < trial.number for t in trials))
        with self._lock:
            return self._positions.setdefault(trial.number, position)

    def draw_seed(self, study: optuna.Study, trial: FrozenTrial, name: str = "") -> int:
        """The seed of ``trial``'s draw of ``name`` ("" for the joint draw)."""
        n_complete, n_running = self._position(study, trial)
        entropy = [self.seed, n_complete, n_running, zlib.crc32(name.encode()), self._salt]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def _sampler(self, study: optuna.Study, trial: FrozenTrial, name: str = "") -> BaseSampler:
        return self._make_sampler(self.draw_seed(study, trial, name))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._position(study, trial)   # fixed as the trial starts, whatever finishes meanwhile
        self._sampler(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler(study, trial, param_name).sample_independent(study, trial, param_name,
                                                                           param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._sampler(study, trial).after_trial(study, trial, state, values)
        with self._lock:
            self._positions.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Called by Optuna for ``n_jobs > 1``: threads draw apart (not reproducible anyway)."""
        self._salt = secrets.randbits(32)
