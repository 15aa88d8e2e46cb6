"""A study killed and resumed is the study it would have been: same trials, same order, same seed."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from _tuning_data import save_heldout
from optuna.trial import TrialState

from tuning.sampling import ReproducibleSampler
from tuning.search import SearchConfig, run_search
from tuning.workers import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

# A worker that SIGKILLs itself at the AT-th call of POINT: "rank" (inside the objective, every
# parameter drawn) or "dba_n" (between a trial's draws: its weights and whitening drawn, the rest not).
KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    import optuna
    import tuning.objective as obj
    from _tuning_data import load_heldout
    from tuning.search import SearchConfig, run_search
    npz, storage, n_trials, seed, point, at = sys.argv[1:7]
    calls = [0]
    def count():
        calls[0] += 1
        if calls[0] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
    if point == "rank":
        rank = obj.rank
        def counted(*a, **k):
            count()
            return rank(*a, **k)
        obj.rank = counted
    else:
        suggest_int = optuna.trial.Trial.suggest_int
        def counted(self, name, *a, **k):
            if name == point:
                count()
            return suggest_int(self, name, *a, **k)
        optuna.trial.Trial.suggest_int = counted
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_search(load_heldout(npz), SearchConfig(n_trials=int(n_trials), seed=int(seed)), storage=storage,
               study_name="s")
""")

N_TRIALS, SEED = 13, 5   # past TPE's 10 random start-up trials: the kill lands in a model-based draw


def _completed(study):
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


@pytest.fixture(scope="module")
def uninterrupted():
    """The study never killed (in memory: the storage does not change what is drawn)."""
    from _tuning_data import make_heldout
    heldout = make_heldout()
    return heldout, run_search(heldout, SearchConfig(n_trials=N_TRIALS, seed=SEED), study_name="s")


@pytest.mark.parametrize("point,storage", [("rank", "sqlite"), ("dba_n", "journal")])
def test_a_study_killed_and_resumed_draws_the_trials_of_the_uninterrupted_one(uninterrupted, tmp_path, point,
                                                                             storage):
    heldout, reference = uninterrupted
    killed_at = 11                                  # trial number 11: 11 complete before it
    npz, script = tmp_path / "heldout.npz", tmp_path / "worker.py"
    url = f"sqlite:///{tmp_path}/study.db" if storage == "sqlite" else f"journal:{tmp_path}/journal.log"
    save_heldout(heldout, npz)
    script.write_text(KILLED_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, str(script), str(npz), url, str(N_TRIALS), str(SEED), point,
                           str(killed_at + 1)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    killed = study.trials[killed_at]
    assert killed.state == TrialState.RUNNING and len(_completed(study)) == killed_at
    assert ("dba_n" not in killed.params and "whiten" in killed.params) if point == "dba_n" else killed.params

    resumed = run_search(heldout, SearchConfig(n_trials=N_TRIALS, seed=SEED), storage=url, study_name="s")
    done, expected = _completed(resumed.study), _completed(reference.study)
    assert [t.params for t in done] == [t.params for t in expected]
    assert [t.value for t in done] == pytest.approx([t.value for t in expected])
    assert resumed.study.trials[killed_at].state == TrialState.FAIL
    assert done[killed_at].user_attrs["retry_of"] == killed_at   # the retry landed where the killed trial was
    assert resumed.best_post == reference.best_post


def test_a_draw_depends_on_the_trials_before_it_not_on_the_draws_before_it():
    """A parameter drawn after another, or alone (as by a retry that already has the other), is one draw."""
    def draw_b(seed, draw_a_first):
        trial = optuna.create_study(sampler=ReproducibleSampler(seed)).ask()
        if draw_a_first:
            trial.suggest_float("a", 0.0, 1.0)
        return trial.suggest_int("b", 0, 10**6)

    assert draw_b(3, True) == draw_b(3, False)
    assert draw_b(3, False) != draw_b(4, False)
