"""tuning.workers: every RUNNING trial names its worker; stale trials of dead workers are recovered."""
import datetime
import socket
import sqlite3
import subprocess
import sys
import warnings

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from tuning import workers
from tuning.objective import _budget_reached
from tuning.search import SearchConfig, run_search
from tuning.workers import (
    CLAIM_PREFIX,
    WORKER_ATTR,
    is_stale,
    open_storage,
    trial_workers,
    worker_id,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running(user_attrs=None, system_attrs=None, age_s=0.0):
    start = datetime.datetime.now() - datetime.timedelta(seconds=age_s)
    return FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=start,
                       datetime_complete=None, params={}, distributions={}, user_attrs=user_attrs or {},
                       system_attrs=system_attrs or {}, intermediate_values={}, trial_id=0)


def test_is_stale_needs_every_worker_of_this_host_dead(dead_pid):
    me, dead = worker_id(), f"{HOST}:{dead_pid}"
    assert is_stale(_running({WORKER_ATTR: dead})) and not is_stale(_running({WORKER_ATTR: me}))
    # a popped trial: its worker is among its standing claims; a withdrawn claim does not count
    assert is_stale(_running(system_attrs={CLAIM_PREFIX + dead: True, CLAIM_PREFIX + me: False}))
    assert not is_stale(_running(system_attrs={CLAIM_PREFIX + dead: True, CLAIM_PREFIX + me: True}))
    # another host, or no worker known: only by age
    for attrs in ({WORKER_ATTR: "elsewhere:1"}, {}):
        assert not is_stale(_running(attrs, age_s=3600))
        assert is_stale(_running(attrs, age_s=3600), stale_after_s=60)
        assert not is_stale(_running(attrs, age_s=1), stale_after_s=60)


@pytest.mark.parametrize("kind", ["sqlite", "journal", "memory"])
def test_a_trial_names_its_worker_from_creation_and_from_its_pop(tmp_path, kind):
    url = {"sqlite": f"sqlite:///{tmp_path}/s.db", "journal": f"journal:{tmp_path}/j.log", "memory": None}[kind]
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="s")
    fresh = study.ask()
    assert study._storage.get_trial(fresh._trial_id).user_attrs[WORKER_ATTR] == worker_id()
    study.enqueue_trial({"x": 1})
    popped = study.ask()
    t = study._storage.get_trial(popped._trial_id)
    assert t.system_attrs[CLAIM_PREFIX + worker_id()] is True and t.user_attrs[WORKER_ATTR] == worker_id()
    assert trial_workers(t) == [worker_id()]


def test_the_loser_of_a_pop_withdraws_its_claim(tmp_path, monkeypatch, dead_pid):
    storage = open_storage(f"journal:{tmp_path}/j.log")
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 1})
    trial = study.ask()  # this process wins the pop
    monkeypatch.setattr(workers, "worker_id", lambda: f"{HOST}:{dead_pid}")  # a second worker tries too
    assert not storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
    t = storage.get_trial(trial._trial_id)
    assert t.system_attrs[f"{CLAIM_PREFIX}{HOST}:{dead_pid}"] is False
    monkeypatch.undo()
    assert trial_workers(t) == [worker_id()] and not is_stale(t)


def test_a_dead_running_trial_never_counts_toward_the_budget(tmp_path, dead_pid):
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path}/j.log"), study_name="s")
    for value in (0.1, 0.2):
        study.tell(study.ask(), value)
    dead = study.ask()
    dead.suggest_int("dba_n", 0, 10)
    dead.set_user_attr(WORKER_ATTR, f"{HOST}:{dead_pid}")
    mine = study.ask()
    assert not _budget_reached(mine, 3)  # 2 complete; the dead trial ahead is recovered, not counted
    assert study.trials[dead.number].state == TrialState.FAIL
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 1 and retry[0].user_attrs["retry_of"] == dead.number
    study.tell(mine, 0.3)
    assert _budget_reached(study.ask(), 3)


def test_heartbeat_recovers_a_silent_trial_of_another_host(tuning_heldout, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    config = SearchConfig(n_trials=2, heartbeat_s=1)
    run_search(tuning_heldout, config, storage=url, study_name="s")
    storage = open_storage(url, heartbeat_s=1)
    study = optuna.load_study(study_name="s", storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are meant for Study.optimize
        trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, "elsewhere:1")  # no pid to check on another host
    storage.record_heartbeat(trial._trial_id)
    with sqlite3.connect(tmp_path / "s.db") as db:  # its last heartbeat an hour ago
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    assert not is_stale(study.trials[trial.number], stale_after_s=3600)  # not stale by pid or age ...
    r = run_search(tuning_heldout, SearchConfig(n_trials=4, heartbeat_s=1), storage=url, study_name="s")
    assert r.study.trials[trial.number].state == TrialState.FAIL  # ... but by its heartbeat
    retried = [t for t in r.study.trials if t.user_attrs.get("retry_of") == trial.number]
    assert len(retried) == 1 and r.n_complete == 4 and TrialState.RUNNING not in [t.state for t in r.study.trials]


def test_heartbeat_needs_an_rdb_storage(tmp_path):
    from competition.cli import UserError
    with pytest.raises(UserError, match="--heartbeat needs an RDB storage"):
        open_storage(f"journal:{tmp_path}/j.log", heartbeat_s=10)


def test_the_optuna_internals_the_kit_relies_on_still_hold(tmp_path):
    """If this fails, Optuna changed an internal that tuning/optuna_hooks.py relies on: update that module."""
    from tuning.optuna_hooks import CHECKED_WITH, enqueued_params
    why = f"optuna {optuna.__version__} (tuning/optuna_hooks.py was checked with {CHECKED_WITH})"
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"), study_name="s")
    fresh = study.ask()
    assert study.trials[fresh.number].user_attrs.get(WORKER_ATTR) == worker_id(), (
        f"{why}: _CachedStorage no longer creates RDB trials through RDBStorage._create_new_trial")
    study.enqueue_trial({"x": 1}, user_attrs={"a": 1})
    [waiting] = study.get_trials(states=(TrialState.WAITING,))
    assert enqueued_params(waiting) == {"x": 1}, (
        f"{why}: Study.enqueue_trial no longer keeps the parameters in the 'fixed_params' system attribute")


def test_only_the_hooks_module_touches_optuna_internals():
    import re
    from pathlib import Path
    internal = re.compile(r"\._storage\b|\._trial_id\b|\._study_id\b|_create_new_trial|_CachedStorage|fixed_params")
    root = Path(__file__).resolve().parents[1] / "tuning"
    found = [f"{f.name}:{n}" for f in sorted(root.glob("*.py")) if f.name != "optuna_hooks.py"
             for n, line in enumerate(f.read_text().splitlines(), 1) if internal.search(line)]
    assert found == []


def test_a_trial_names_its_worker_in_one_write(tmp_path, tuning_heldout, monkeypatch):
    """A fresh trial is created naming its worker; a popped one gets one write; the objective writes none."""
    writes = []
    real = workers.MarkedJournalStorage.set_trial_user_attr

    def counting(self, trial_id, key, value):
        if key == WORKER_ATTR:
            writes.append(trial_id)
        real(self, trial_id, key, value)
    monkeypatch.setattr(workers.MarkedJournalStorage, "set_trial_user_attr", counting)
    r = run_search(tuning_heldout, SearchConfig(n_trials=5), storage=f"journal:{tmp_path}/j.log", study_name="s")
    assert len(writes) == 3  # the three enqueued trials (defaults, textbook k-reciprocal and diffusion), at their pop
    assert all(t.user_attrs[WORKER_ATTR] == worker_id() for t in r.study.trials)


def test_open_storage_refuses_a_storage_whose_trials_name_no_worker():
    with pytest.raises(TypeError, match="InMemoryStorage: pass a storage URL or a tuning.workers Marked"):
        open_storage(optuna.storages.InMemoryStorage())
    marked = workers.MarkedInMemoryStorage()
    assert open_storage(marked) is marked


def test_the_budget_counts_live_running_trials_only_and_stops_a_full_study(tmp_path, dead_pid):
    from tuning.budget import TrialBudget
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path}/j.log"), study_name="s")
    study.tell(study.ask(), 0.1)
    dead = study.ask()
    dead.set_user_attr(WORKER_ATTR, f"{HOST}:{dead_pid}")
    live = study.ask()  # another worker's trial (this process: alive)
    budget = TrialBudget(3)
    assert budget.left(study) == 1 and budget.left(study, before=live.number) == 2  # the dead one never counts
    study.optimize(lambda trial: 0.5, n_trials=None, callbacks=[budget])  # stops once the study is full
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING,
                                               TrialState.COMPLETE]  # counting recovered nothing
    assert budget.start(study) == 0 and study.trials[dead.number].state == TrialState.FAIL  # start recovers
