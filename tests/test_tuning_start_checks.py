"""tuning.search checks what it can before any trial, a refused bundle leaves nothing, a warning speaks the
caller's terms."""
import json
import sys
import types

import optuna
import pytest
from _tuning_data import make_heldout

from competition.cli import UserError, run_command
from tuning.search import SearchConfig, main, run_search, split_halves, split_warnings, tune_bundle, tuning_dir

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Bundle:
    """Stands in for ensemble.bundle.Bundle; ``loads`` counts the loads, ``refit`` makes a refit."""

    loads = 0
    refit = False

    def __init__(self, path):
        self.path, self.is_refit, self.member_names = path, Bundle.refit, ["a", "b"]

    @classmethod
    def load(cls, path):
        cls.loads += 1
        return cls(path)

    def set_postprocessing(self, post):
        (self.path / "postprocessing.json").write_text(json.dumps(post.to_dict()))


@pytest.fixture
def bundle(tmp_path, monkeypatch, tuning_heldout):
    import tuning.search as search_mod
    monkeypatch.setattr(search_mod, "heldout_set", lambda b: tuning_heldout)
    monkeypatch.setitem(sys.modules, "ensemble.bundle", types.SimpleNamespace(Bundle=Bundle))
    monkeypatch.setattr(Bundle, "loads", 0)
    path = tmp_path / "bundle"
    path.mkdir()
    return path


def _cli(capsys, *argv):
    """(exit status, stderr lines) of ``python -m tuning.search ARGV``."""
    status = run_command(main, [str(a) for a in argv])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("url,says", [
    ("study.db", "storage 'study.db': not a storage URL"),
    ("nosuch://host/db", "storage 'nosuch://host/db': not a storage URL"),
    ("postgresql://u@localhost/db", "storage postgresql://u@localhost/db: its database driver is not installed"),
])
def test_a_bad_storage_url_is_one_line_before_the_bundle_loads(bundle, capsys, monkeypatch, url, says):
    for driver in ("psycopg", "psycopg2"):   # whatever this machine has, the driver is missing here
        monkeypatch.setitem(sys.modules, driver, None)
    status, err = _cli(capsys, "--bundle", bundle, "--trials", 2, "--storage", url)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {says}")
    assert Bundle.loads == 0 and not tuning_dir(bundle).exists()


def test_a_storage_that_does_not_open_is_one_line_before_any_trial(bundle, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "garbage.db").write_text("not a database " * 100)
    for url, says in ((f"sqlite:///{tmp_path}/a-file/s.db", "a-file"),
                      (f"sqlite:///{tmp_path}/garbage.db", "garbage.db: cannot open it")):
        status, err = _cli(capsys, "--bundle", bundle, "--trials", 2, "--storage", url)
        assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0]
    assert not tuning_dir(bundle).exists() and not any(bundle.iterdir())


def test_a_refused_refit_bundle_leaves_nothing_behind(bundle, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(Bundle, "refit", True)
    for storage in (None, f"sqlite:///{tmp_path}/elsewhere/study.db", f"journal:{tmp_path}/elsewhere/j.log"):
        with pytest.raises(UserError, match="a refit bundle"):
            tune_bundle(bundle, SearchConfig(n_trials=2), storage=storage)
    status, err = _cli(capsys, "--bundle", bundle, "--trials", 2)
    assert status == 2 and "cannot be tuned honestly" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and not any(bundle.iterdir())


def test_the_small_split_warning_names_the_remedy_in_the_callers_terms(tuning_heldout):
    small = split_halves(tuning_heldout)[0]
    [cli] = split_warnings(small, [0.5, 0.7])
    [recipe] = split_warnings(small, [0.5, 0.7], remedy="heldout = 0.4 in the recipe")
    assert "--heldout-fraction 0.4" in cli and "heldout = 0.4 in the recipe" in recipe and "--" not in recipe
    few = make_heldout(n_classes=6)   # the study's folds hold 4 classes x 3 queries: too few
    r = run_search(few, SearchConfig(n_trials=2, heldout_remedy="heldout = 0.4 in the recipe"))
    assert r.warnings and all("--heldout-fraction" not in w for w in r.warnings)
    assert any("heldout = 0.4 in the recipe" in w for w in r.warnings)


def test_a_large_split_gives_no_remedy_to_name():
    large = split_halves(make_heldout(n_classes=14))[0]
    assert split_warnings(large, [0.5, 0.9], remedy="heldout = 0.4 in the recipe") == []
