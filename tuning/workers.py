"""Which worker runs which trial, and what becomes of the trials of a dead worker.

A worker killed at any instant may leave a trial RUNNING forever. To recover it,
every RUNNING trial must name its worker (``host:pid``) from the instant it is
RUNNING; the storages ``open_storage`` returns see to it:

* a fresh trial is created with its ``worker`` user attribute in the same write
  (one SQL transaction, one journal line);
* a queued (WAITING) trial is claimed before it is switched to RUNNING: the worker
  writes a ``claim:host:pid`` system attribute, tries the switch (one worker wins),
  then withdraws its claim if it lost or writes ``worker`` if it won. The trial's
  worker is among its standing claims.

A RUNNING trial is stale (``is_stale``) when all its workers run on this host and
none is alive: seen at once, no grace period. Trials of other hosts are stale only
after ``stale_after_s`` seconds, or, on an RDB storage opened with a heartbeat, when
Optuna's heartbeat of the trial stops (optuna 5.0: ``RDBStorage`` only; its
``JournalStorage`` has no heartbeat, and a trial killed before its first heartbeat
is never heartbeat-stale). ``recover_stale_trials`` marks stale trials FAIL and
re-enqueues their parameters.

Only public Optuna APIs, except the two internals ``tuning.optuna_hooks`` keeps.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from competition.cli import UserError, one_line
from tuning.optuna_hooks import RDBCreationHook, enqueued_params

log = logging.getLogger(__name__)

WORKER_ATTR = "worker"          # user attribute: "host:pid" of the process running a trial
DEFAULTS_ATTR = "defaults"      # user attribute of the enqueued untuned trial (kept by a retry)
CLAIM_PREFIX = "claim:"         # system attribute "claim:host:pid": True while a worker claims a queued trial


def worker_id() -> str:
    """``host:pid`` of this process, as stored on the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _WorkerMarks:
    """Storage mixin: a trial names its worker from the instant it is RUNNING (see the module doc)."""

    def creation_template(self, template_trial: FrozenTrial | None) -> FrozenTrial:
        """``template_trial``, or for a fresh trial a RUNNING one that names this worker."""
        if template_trial is not None:
            return template_trial
        return FrozenTrial(number=-1, state=TrialState.RUNNING, value=None,
                           datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
                           distributions={}, user_attrs={WORKER_ATTR: worker_id()}, system_attrs={},
                           intermediate_values={}, trial_id=-1)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return super().create_new_trial(study_id, self.creation_template(template_trial))

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        if state != TrialState.RUNNING:  # RUNNING is only ever set when a queued trial is popped
            return super().set_trial_state_values(trial_id, state, values)
        claim = CLAIM_PREFIX + worker_id()
        self.set_trial_system_attr(trial_id, claim, True)
        won = super().set_trial_state_values(trial_id, state, values)
        try:
            if won:
                self.set_trial_user_attr(trial_id, WORKER_ATTR, worker_id())
            else:
                self.set_trial_system_attr(trial_id, claim, False)
        except UpdateFinishedTrialError:
            pass  # the winner already finished it
        return won


class MarkedRDBStorage(_WorkerMarks, RDBCreationHook):
    """``RDBStorage`` whose trials name their worker."""


class MarkedJournalStorage(_WorkerMarks, JournalStorage):
    """``JournalStorage`` whose trials name their worker."""


class MarkedInMemoryStorage(_WorkerMarks, InMemoryStorage):
    """``InMemoryStorage`` whose trials name their worker (threads of one process)."""


STORAGE_FORMS = "sqlite:///PATH, an SQLAlchemy database URL (postgresql://USER@HOST/DB) or journal:PATH"


def check_storage_url(storage: str | BaseStorage | None) -> None:
    """Raise ``UserError`` when ``storage`` is not a URL Optuna can open or its database driver
    does not import; creates nothing (no file, no connection)."""
    if not isinstance(storage, str) or storage.startswith("journal:"):
        if isinstance(storage, str) and not storage[len("journal:"):]:
            raise UserError(f"storage {storage!r}: journal: needs a file path")
        return
    import sqlalchemy
    try:
        sqlalchemy.create_engine(storage).dispose()   # parses the URL, imports the driver, does not connect
    except ImportError as exc:
        raise UserError(f"storage {storage}: its database driver is not installed ({exc}); pip install it") from exc
    except sqlalchemy.exc.ArgumentError as exc:
        raise UserError(f"storage {storage!r}: not a storage URL ({one_line(exc)}); use {STORAGE_FORMS}") from exc


def open_storage(storage: str | BaseStorage | None, heartbeat_s: int | None = None) -> BaseStorage:
    """Turn ``None`` / ``journal:PATH`` / an RDB URL into an open storage whose trials name their worker.

    ``heartbeat_s`` (RDB URLs only): every running trial records a heartbeat that often;
    a trial silent for 4 heartbeats is failed and its parameters re-enqueued (for workers
    on several hosts). A bad URL, a missing driver or a storage that does not open is a
    ``UserError`` naming the URL. A storage object is returned as it is: one of the
    ``Marked*Storage`` classes above, since the trials of any other never name their worker
    (``TypeError``).
    """
    if isinstance(storage, _WorkerMarks):
        return storage
    if isinstance(storage, BaseStorage):
        raise TypeError(f"{type(storage).__name__}: pass a storage URL or a tuning.workers Marked*Storage "
                        "(the trials of another storage never name their worker, so a dead worker's stay RUNNING)")
    if storage is None:
        return MarkedInMemoryStorage()
    check_storage_url(storage)
    if storage.startswith("journal:"):
        if heartbeat_s is not None:
            raise UserError(f"--heartbeat needs an RDB storage: optuna's JournalStorage ({storage}) has none; "
                            "use --stale-after for workers on several hosts")
        path = storage[len("journal:"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return MarkedJournalStorage(optuna.storages.journal.JournalFileBackend(path))
    kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several processes on one file: wait for the lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat_s is not None:
        kwargs.update(heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s,
                      heartbeat_stale_trial_callback=requeue)
    import sqlalchemy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is experimental
            return MarkedRDBStorage(storage, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as exc:  # RuntimeError: a schema of another optuna
        raise UserError(f"storage {storage}: cannot open it ({one_line(exc)})") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trial_workers(trial: FrozenTrial) -> list[str]:
    """``host:pid`` of the workers that may be running ``trial``: its standing claims, else its
    ``worker`` attribute ([] for a trial created by an unmarked storage before its objective began)."""
    claims = [k[len(CLAIM_PREFIX):] for k, v in trial.system_attrs.items() if k.startswith(CLAIM_PREFIX) and v]
    if claims:
        return claims
    worker = trial.user_attrs.get(WORKER_ATTR)
    return [str(worker)] if worker else []


def is_stale(trial: FrozenTrial, stale_after_s: float | None = None) -> bool:
    """True for a RUNNING trial whose workers are all dead on this host, or that is older than
    ``stale_after_s`` seconds while a worker of it runs elsewhere (or none is known)."""
    if trial.state != TrialState.RUNNING:
        return False
    here = socket.gethostname()
    workers = [w.rpartition(":") for w in trial_workers(trial)]
    if workers and all(host == here and pid.isdigit() for host, _, pid in workers):
        return not any(_pid_alive(int(pid)) for _, _, pid in workers)
    if stale_after_s is not None and trial.datetime_start is not None:
        return time.time() - trial.datetime_start.timestamp() > stale_after_s
    return False


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue the failed ``trial`` again (``retry_of`` its number) with the parameters it had
    (those it was enqueued with included, when it died before suggesting them); also the
    heartbeat's stale-trial callback."""
    attrs: dict[str, Any] = {"retry_of": trial.number}
    if trial.user_attrs.get(DEFAULTS_ATTR):
        attrs[DEFAULTS_ATTR] = True
    study.enqueue_trial({**enqueued_params(trial), **trial.params}, user_attrs=attrs)
    log.warning("trial %d was left RUNNING by a dead worker: marked FAIL, parameters re-enqueued", trial.number)


def recover_stale_trials(study: optuna.Study, stale_after_s: float | None = None) -> list[int]:
    """Mark stale RUNNING trials FAIL and re-enqueue their parameters; return the numbers of
    those found by ``is_stale`` (heartbeat-stale ones, on a storage with a heartbeat, are
    failed and re-enqueued by Optuna's ``fail_stale_trials`` and ``requeue``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)   # does nothing without a heartbeat
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, stale_after_s):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):
            continue  # another worker finished or recovered it meanwhile
        requeue(study, t)
        recovered.append(t.number)
    return recovered
