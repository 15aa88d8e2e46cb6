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
