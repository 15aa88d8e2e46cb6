"""Every command answers a user error with one line ``error: ...`` and status 2; --help helps."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backbones.config import ConfigError, TrainConfig, build_parser, parse_args
from competition.cli import run_command

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KIT_DEBUG"}
    env.update(PYTHONPATH=str(REPO), **(extra_env or {}))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name,args,needle", [
    ("train: wrong --data", ["-m", "backbones.train", "--data", "nowhere", "--out", "run"], "nowhere/train/train_data"),
    ("train: --epochs 0", ["-m", "backbones.train", "--data", "d", "--out", "run", "--epochs", "0"], "--epochs"),
    ("train: --epochs -1", ["-m", "backbones.train", "--data", "d", "--out", "run", "--epochs", "-1"], "--epochs"),
    ("train: --lr abc", ["-m", "backbones.train", "--data", "d", "--out", "run", "--lr", "abc"], "--lr"),
    ("extract: missing run", ["-m", "backbones.extract", "--run", "norun", "--images", ".", "--out", "x.npy"],
     "norun"),
    ("build: not a member", ["-m", "ensemble.build", "--members", "nomember", "--data", ".", "--out", "B"],
     "nomember"),
    ("search: missing bundle", ["-m", "tuning.search", "--bundle", "nobundle"], "nobundle"),
    ("search: --trials 0", ["-m", "tuning.search", "--bundle", "nobundle", "--trials", "0"], "--trials"),
    ("main: missing checkpoint", [str(REPO / "main.py"), "--mode", "test", "--data", ".", "--checkpoint", "nock"],
     "nock"),
    ("main: no --data", [str(REPO / "main.py"), "--mode", "test"], "--data"),
])
def test_a_user_error_is_one_line_and_status_2(name, args, needle, tmp_path):
    res = _run(args, tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "RuntimeWarning" not in ln]
    assert res.returncode == 2, (name, res.stdout[-500:], res.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, res.stderr)
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "B").exists()  # nothing created on the way


def test_debug_shows_the_traceback(tmp_path):
    args = ["-m", "backbones.train", "--data", "nowhere", "--out", "run"]
    assert "Traceback" in _run(args + ["--debug"], tmp_path).stderr
    assert "Traceback" in _run(args, tmp_path, {"KIT_DEBUG": "1"}).stderr


def test_run_command_joins_a_multi_line_message(capsys):
    def boom(argv):
        raise ConfigError("first problem\nsecond problem")
    assert run_command(boom, []) == 2
    assert capsys.readouterr().err == "error: first problem; second problem\n"


def test_train_help_groups_options_and_shows_defaults():
    text = build_parser().format_help()
    for title in ("data and augmentation", "model", "optimisation", "loss", "validation and runtime"):
        assert f"\n{title}:" in text
    for default in ("(default: 224)", "(default: 10)", "(default: 0.001)", "(default: arcface)"):
        assert default in text
    assert "--img-size" in text and "--classes-per-batch" in text and "--images-per-class" in text
    cfg = parse_args(["--data", "d", "--out", "o", "--img-size", "96", "--batch-size", "12",
                      "--images-per-class", "3"])
    assert (cfg.image_size, cfg.classes_per_batch, cfg.images_per_class) == (96, 4, 3)


def test_train_config_check_names_every_bad_option():
    with pytest.raises(ConfigError, match="--epochs.*got -1.*--lr.*got -1") as info:
        TrainConfig(data="d", out="o", epochs=-1, lr=-1.0).check()
    assert "--head" in str(pytest.raises(ConfigError, TrainConfig(data="d", out="o", head="nope").check).value)
    with pytest.raises(ConfigError, match="unknown training option.*colour"):
        TrainConfig.from_dict({"data": "d", "out": "o", "colour": 1}, where="recipe.toml")
    assert str(info.value).count(";") == 1


@pytest.mark.parametrize("module", ["backbones.config", "backbones.extract", "ensemble.build", "tuning.search",
                                    "tuning.recipe", "competition.synth", "main", "bench.grocery",
                                    "bench.objective_fidelity"])
def test_every_command_prints_its_help(module, capsys):
    """argparse formats help lazily: a stray ``%`` in one option's text breaks --help alone."""
    import importlib
    mod = importlib.import_module(module)
    entry = mod.parse_args if module == "backbones.config" else mod.main
    with pytest.raises(SystemExit) as info:
        entry(["--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_main_names_the_checkpoint_the_user_gave_not_its_private_copy(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    (tmp_path / "ck" / "ensemble.json").write_text("{}")
    res = _run([str(REPO / "main.py"), "--mode", "test", "--data", ".", "--checkpoint", "ck"], tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr[-2000:]
    assert "ck" in res.stderr and "kit-session" not in res.stderr
