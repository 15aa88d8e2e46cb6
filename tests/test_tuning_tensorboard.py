"""--tensorboard DIR: each completed trial's value and the best so far, then the chosen parameters, read back."""
import json
import sys
import types

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from competition.cli import run_command
from tuning.search import main, tuning_dir
from tuning.tensorboard import choice_table, flat_parameters

optuna.logging.set_verbosity(optuna.logging.WARNING)


class FakeBundle:
    """Stands in for ensemble.bundle.Bundle: a folder, member names and set_postprocessing."""

    member_names = ["a", "b"]

    def __init__(self, path):
        self.path = path

    @classmethod
    def load(cls, path):
        return cls(path)

    def set_postprocessing(self, post):
        with open(f"{self.path}/postprocessing.json", "w") as f:
            json.dump(post.to_dict(), f)


@pytest.fixture
def bundle(tmp_path, monkeypatch, tuning_heldout):
    import tuning.search as search_mod
    monkeypatch.setattr(search_mod, "heldout_set", lambda b: tuning_heldout)
    monkeypatch.setitem(sys.modules, "ensemble.bundle", types.SimpleNamespace(Bundle=FakeBundle))
    path = tmp_path / "bundle"
    path.mkdir()
    return path


def test_a_study_logs_every_trial_and_its_choice_to_tensorboard(bundle, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    logdir = tmp_path / "tb"
    assert main(["--bundle", str(bundle), "--trials", "5", "--no-report", "--no-kreciprocal",
                 "--tensorboard", str(logdir)]) == 0
    study = optuna.load_study(study_name="postprocessing", storage=f"sqlite:///{tuning_dir(bundle)}/study.db")
    done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    events = EventAccumulator(str(logdir))
    events.Reload()
    values, best = events.Scalars("trial/mAP@1000"), events.Scalars("trial/best_mAP@1000")
    assert [e.step for e in values] == [t.number for t in done] == [e.step for e in best]
    assert [e.value for e in values] == pytest.approx([t.value for t in done])
    assert [e.value for e in best] == pytest.approx(np.maximum.accumulate([t.value for t in done]))

    [text] = events.Tensors("chosen/parameters/text_summary")
    chosen = flat_parameters(json.loads((bundle / "postprocessing.json").read_text()), FakeBundle.member_names)
    assert text.tensor_proto.string_val[0].decode().endswith(choice_table(chosen))
    [session] = [HParamsPluginData.FromString(content).session_start_info
                 for content in events.PluginTagToContent("hparams").values()
                 if HParamsPluginData.FromString(content).HasField("session_start_info")]
    assert session.hparams["weight_a"].number_value == pytest.approx(chosen["weight_a"])
    assert session.hparams["rerank.dba_n"].number_value == chosen["rerank.dba_n"]
    assert events.Scalars("chosen/search_mAP@1000")[0].value == pytest.approx(study.best_value)


def test_a_missing_tensorboard_package_is_one_line_before_anything(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    status = run_command(main, ["--bundle", str(bundle), "--trials", "2", "--tensorboard", str(tmp_path / "tb")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: --tensorboard needs the tensorboard package")
    assert "pip install tensorboard" in err[0]
    assert not (tmp_path / "tb").exists() and not tuning_dir(bundle).exists()


def test_flat_parameters_name_members_and_round_floats():
    post = {"weights": [0.123456, 1.0], "whiten": True, "whiten_dim": None, "rerank": {"k1": 20, "lambda_value": 0.3}}
    assert flat_parameters(post, ["a", "b"]) == {"weight_a": 0.1235, "weight_b": 1.0, "whiten": True,
                                                 "whiten_dim": None, "rerank.k1": 20, "rerank.lambda_value": 0.3}
    assert list(flat_parameters(post, ["only-one"]))[:2] == ["weight_0", "weight_1"]
