"""tuning.search: short studies, resume after a killed worker, two workers on one storage, the CLI."""
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from _tuning_data import make_heldout, save_heldout
from optuna.trial import TrialState

from tuning.objective import DEFAULTS_ATTR, WORKER_ATTR, default_params
from tuning.search import (
    MIN_SEARCH_QUERIES,
    SearchConfig,
    main,
    open_storage,
    recover_stale_trials,
    run_search,
    split_halves,
    split_warnings,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

# A worker process: loads the held-out .npz, optionally slows each evaluation down, waits for a
# "go" file (so several workers start together), then runs run_search on the shared storage.
# kill "created:N" dies (os._exit) the instant the N-th trial of this worker exists, before the
# objective runs; "marked:N" dies as the N-th write of the worker attribute begins.
WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import optuna
    import tuning.objective as obj
    from _tuning_data import load_heldout
    from tuning.search import SearchConfig, run_search
    npz, storage, n_trials, seed, delay, go, kill = sys.argv[1:8]
    h = load_heldout(npz)
    slow = obj.rank
    def rank(*a, **k):
        time.sleep(float(delay))
        return slow(*a, **k)
    obj.rank = rank
    point, _, at = kill.partition(":")
    calls = [0]
    def count():
        calls[0] += 1
        if calls[0] == int(at):
            os._exit(9)
    if point == "created":
        init = optuna.trial.Trial.__init__
        def created(self, *a, **k):
            init(self, *a, **k)
            count()
        optuna.trial.Trial.__init__ = created
    for cls in (optuna.storages.RDBStorage, optuna.storages.JournalStorage):
        def marked(self, trial_id, key, value, _set=cls.set_trial_user_attr):
            if point == "marked" and key == obj.WORKER_ATTR:
                count()
            _set(self, trial_id, key, value)
        cls.set_trial_user_attr = marked
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("ready", flush=True)
    while go != "-" and not Path(go).exists():
        time.sleep(0.05)
    run_search(h, SearchConfig(n_trials=int(n_trials), seed=int(seed)), storage=storage, study_name="s")
""")


def _worker(tmp_path, heldout, storage, n_trials, seed, delay=0.0, go="-", kill="-:0"):
    npz = tmp_path / "heldout.npz"
    if not npz.exists():
        save_heldout(heldout, npz)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.Popen([sys.executable, str(script), str(npz), storage, str(n_trials), str(seed),
                             str(delay), str(go), kill], env=env, stdout=subprocess.PIPE, text=True)


def _states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_short_study_starts_with_defaults_and_never_ends_below_them(tuning_heldout, tmp_path):
    r = run_search(tuning_heldout, SearchConfig(n_trials=10, seed=0), storage=f"sqlite:///{tmp_path}/s.db")
    first = r.study.trials[0]
    assert first.user_attrs[DEFAULTS_ATTR] and first.params == default_params(["a", "b"], SearchConfig().space)
    assert first.value == pytest.approx(r.defaults_value)
    assert r.n_complete == 10 and r.best_value >= r.defaults_value
    assert r.best_value > r.defaults_value  # on this fixture some post-processing helps
    assert "recall_at_1" in r.study.best_trial.user_attrs
    assert set(r.check_best) == {"map_at_k", "recall_at_1"} and set(r.check_defaults) == set(r.check_best)
    assert not set(r.search_classes) & set(r.check_classes)
    # resuming a finished study runs nothing and enqueues no second defaults trial
    again = run_search(tuning_heldout, SearchConfig(n_trials=10, seed=0), storage=f"sqlite:///{tmp_path}/s.db")
    assert len(again.study.trials) == 10 and again.best_value == r.best_value
    more = run_search(tuning_heldout, SearchConfig(n_trials=13, seed=1), storage=f"sqlite:///{tmp_path}/s.db")
    assert more.n_complete == 13 and sum(bool(t.user_attrs.get(DEFAULTS_ATTR)) for t in more.study.trials) == 1


def test_stale_running_trial_of_a_dead_worker_is_failed_and_requeued(tuning_heldout, tmp_path):
    storage = f"journal:{tmp_path}/journal.log"
    run_search(tuning_heldout, SearchConfig(n_trials=3), storage=storage, study_name="s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    trial = study.ask()
    trial.suggest_int("dba_n", 0, 10)
    trial.set_user_attr(WORKER_ATTR, f"{os.uname().nodename}:{dead.pid}")
    alive = study.ask()  # a live worker's trial (this process) is left alone
    alive.set_user_attr(WORKER_ATTR, f"{os.uname().nodename}:{os.getpid()}")
    assert recover_stale_trials(study) == [trial.number]
    assert study.trials[trial.number].state == TrialState.FAIL
    study.tell(alive, 0.0)
    r = run_search(tuning_heldout, SearchConfig(n_trials=6), storage=storage, study_name="s")
    retry = [t for t in r.study.trials if t.user_attrs.get("retry_of") == trial.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["dba_n"] == trial.params["dba_n"]
    assert r.n_complete == 6 and TrialState.RUNNING not in _states(r.study)


def test_killed_worker_process_resumes_with_no_trial_lost(tuning_heldout, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    proc = _worker(tmp_path, tuning_heldout, storage, n_trials=100, seed=0, delay=1.0)
    study, deadline = None, time.time() + 60
    while time.time() < deadline:  # wait until the worker is inside a trial, after 2 completed ones
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name="s", storage=storage)
        except KeyError:
            continue
        trials = study.get_trials()
        running = [t for t in trials if t.state == TrialState.RUNNING]
        # a trial that started moments ago is still in its 1 s delay: the kill lands inside it
        if (sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and running
                and (datetime.datetime.now() - running[0].datetime_start).total_seconds() < 0.4):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trials = study.get_trials()
    killed = [t for t in trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    budget = sum(t.state == TrialState.COMPLETE for t in trials) + 3   # however many a loaded machine let finish
    r = run_search(tuning_heldout, SearchConfig(n_trials=budget, seed=1), storage=storage, study_name="s")
    assert r.n_complete == budget and TrialState.RUNNING not in _states(r.study)
    assert r.study.trials[killed[0].number].state == TrialState.FAIL
    retried = [t for t in r.study.trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    # the killed trial may have died between two suggestions: what it had is re-run as it was
    assert killed[0].params.items() <= retried[0].params.items()


@pytest.mark.parametrize("storage,kill,killed_number", [
    ("sqlite", "created:4", 3),   # a fresh trial, killed before its objective starts
    ("journal", "marked:1", 0),   # the queued defaults trial, RUNNING but its worker not yet written
])
def test_worker_killed_as_a_trial_starts_resumes_with_exactly_n_complete(tuning_heldout, tmp_path, storage,
                                                                         kill, killed_number):
    url = f"sqlite:///{tmp_path}/study.db" if storage == "sqlite" else f"journal:{tmp_path}/journal.log"
    proc = _worker(tmp_path, tuning_heldout, url, n_trials=6, seed=0, kill=kill)
    assert proc.wait(timeout=120) == 9
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert [t.number for t in running] == [killed_number] and not running[0].params
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == killed_number
    r = run_search(tuning_heldout, SearchConfig(n_trials=6, seed=1), storage=url, study_name="s")
    assert r.n_complete == 6 and TrialState.RUNNING not in _states(r.study)
    assert r.study.trials[killed_number].state == TrialState.FAIL
    retried = [t for t in r.study.trials if t.user_attrs.get("retry_of") == killed_number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    if killed_number == 0:  # the defaults trial is re-run with the defaults, still marked as such
        assert retried[0].params == default_params(["a", "b"], SearchConfig().space)
        assert retried[0].user_attrs[DEFAULTS_ATTR] and r.defaults_value == retried[0].value


def test_two_worker_processes_share_one_journal_and_complete_n_trials(tuning_heldout, tmp_path):
    storage, go, n = f"journal:{tmp_path}/journal.log", tmp_path / "go", 12
    procs = [_worker(tmp_path, tuning_heldout, storage, n, seed, delay=0.3, go=go) for seed in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n
    assert len({t.user_attrs[WORKER_ATTR] for t in complete}) == 2  # both workers contributed
    assert sum(bool(t.user_attrs.get(DEFAULTS_ATTR)) for t in study.trials) == 1
    assert TrialState.RUNNING not in _states(study)


class FakeBundle:
    """Stands in for ensemble.bundle.Bundle: a folder and set_postprocessing."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def load(cls, path):
        return cls(path)

    def set_postprocessing(self, post):
        (self.path / "postprocessing.json").write_text(json.dumps(post.to_dict()))


def test_cli_writes_best_parameters_into_the_bundle_and_a_report(tuning_heldout, tmp_path, monkeypatch, capsys):
    import types

    import ensemble.postprocess as pp
    import tuning.search as search_mod
    monkeypatch.setattr(search_mod, "heldout_set", lambda bundle: tuning_heldout)
    monkeypatch.setitem(sys.modules, "ensemble.bundle", types.SimpleNamespace(Bundle=FakeBundle))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert main(["--bundle", str(bundle), "--trials", "8", "--seed", "3", "--no-kreciprocal"]) == 0
    assert "best trial" in capsys.readouterr().out
    saved = pp.PostProcessing.from_dict(json.loads((bundle / "postprocessing.json").read_text()))
    report = json.loads((tmp_path / "bundle.tuning" / "report.json").read_text())
    from tuning.report import tidy
    assert tidy(saved.to_dict()) == report["best_post"] and not saved.rerank.use_kreciprocal  # rounded for people
    assert (tmp_path / "bundle.tuning" / "study.db").exists() and report["n_complete"] == 8
    for name in ("report.md", "report.html", "optimization_history.png", "slice.png"):
        assert (tmp_path / "bundle.tuning" / name).stat().st_size > 0
    assert "defaults" in (tmp_path / "bundle.tuning" / "report.md").read_text()


def test_cli_on_a_real_bundle(ens_env):
    """End to end with ensemble.bundle: the rewritten bundle loads and carries the best parameters."""
    from ensemble.build import BuildOptions, build_bundle
    from ensemble.bundle import Bundle
    from ensemble.members import open_member

    members = [open_member(ens_env.make_run(n, dim=8, seed=s), extractor=ens_env.extractor,
                           cache_dir=ens_env.root / "cache") for n, s in (("a", 1), ("b", 2))]
    path = ens_env.root / "B"
    build_bundle(members, ens_env.data, ens_env.split, path, BuildOptions(progress=False))
    assert main(["--bundle", str(path), "--trials", "6", "--no-report", "--final-top", "1"]) == 0  # the best trial
    report_dir = ens_env.root / "B.tuning"
    study = optuna.load_study(study_name="postprocessing", storage=f"sqlite:///{report_dir}/study.db")
    best = Bundle.load(path).post
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 6
    from tuning.objective import SearchSpace, post_from_params
    assert best == post_from_params(study.best_trial.params, ["a", "b"], SearchSpace())


def test_a_study_on_three_heldout_classes_completes_and_writes_its_result(tmp_path, monkeypatch, capsys):
    """3 classes, each half its own problem: the search half has 2 queries + 4 references, the check
    half 1 + 2. The forced trial's k1 = 5 fits the search half only: the check half clamps it."""
    import types

    import tuning.search as search_mod
    tiny = make_heldout(n_classes=3, nq_per=1, nr_per=2)
    monkeypatch.setattr(search_mod, "heldout_set", lambda bundle: tiny)
    monkeypatch.setitem(sys.modules, "ensemble.bundle", types.SimpleNamespace(Bundle=FakeBundle))
    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.enqueue_trial({"weight_a": 1.0, "weight_b": 1.0, "whiten": False, "dba_n": 0, "aqe_n": 0,
                         "kreciprocal": True, "k1": 5, "k2": 5, "lambda_value": 0.3})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.warns(UserWarning, match=r"k1 5 -> 2, k2 5 -> 2 for 1 queries \+ 2 references"):
        assert main(["--bundle", str(bundle), "--trials", "1", "--storage", url, "--study", "s", "--no-report",
                     "--objective", "halves"]) == 0
    assert "warning(s) above" in capsys.readouterr().out
    saved = json.loads((bundle / "postprocessing.json").read_text())["rerank"]
    assert saved["use_kreciprocal"] and (saved["k1"], saved["k2"]) == (5, 5)
    with pytest.warns(UserWarning, match="k1 5 -> 2"):  # the finished study, resumed: nothing runs
        r = run_search(tiny, SearchConfig(n_trials=1, objective="halves"), storage=url, study_name="s")
    summary = json.loads(json.dumps(r.summary()))
    assert summary["n_complete"] == 1 and summary["warnings"] == r.warnings
    assert "only 2 held-out queries" in r.warnings[0] and "--heldout-fraction 0.4" in r.warnings[0]


def test_split_warnings_say_when_the_search_half_cannot_inform(tuning_heldout):
    small = split_halves(tuning_heldout)[0]  # 6 classes x 3 queries
    assert len(small.query_labels) < MIN_SEARCH_QUERIES
    [few] = split_warnings(small, [0.5, 0.7])
    assert f"only {len(small.query_labels)} held-out queries" in few and "--heldout-fraction 0.4" in few
    large = split_halves(make_heldout(n_classes=14))[0]  # 7 classes x 3 queries
    assert len(large.query_labels) >= MIN_SEARCH_QUERIES and split_warnings(large, [0.5, 0.9]) == []
    [perfect] = split_warnings(large, [1.0, 1.0, 1.0], k=100)
    assert "every one of the 3 completed trials scored mAP@100 1.0" in perfect
    assert "hold out a larger share of the train classes" in perfect


def test_the_study_also_starts_from_the_textbook_post_processing(tuning_heldout):
    from tuning.objective import max_whiten_dim, standard_params
    from tuning.search import search_space, tuning_problems

    config = SearchConfig(n_trials=4, seed=0)
    r = run_search(tuning_heldout, config)
    search, *_ = tuning_problems(tuning_heldout, config)
    space = search_space(tuning_heldout, config, search)
    second, third = r.study.trials[1:3]
    assert second.params == standard_params(["a", "b"], space, max_whiten_dim(tuning_heldout))
    assert second.params["kreciprocal"] and second.params["whiten"]
    assert third.params == standard_params(["a", "b"], space, max_whiten_dim(tuning_heldout), "diffusion")
    assert third.params["diffusion"] and not third.params["kreciprocal"]
    assert r.best_value >= max(second.value, third.value)   # never below the textbook ones
