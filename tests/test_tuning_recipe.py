"""The whole recipe from a file: members in parallel, a refit on every class, a local submission,
and re-runs that skip what is current and re-run exactly what changed."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from competition.cli import run_command
from tuning.recipe import main, recipe_console, say
from tuning.steps import StepRecord

REPO = Path(__file__).resolve().parents[1]

TINY = """
heldout = 0.4
trials = 4
refit = true
parallel = 2
[synth]
train_classes = 10
images_per_class = 6
test_classes = 3
queries_per_class = 2
references_per_class = 3
[defaults]
image_size = 32
epochs = 1
embedding_dim = 16
batch_size = 8
images_per_class = 2
[[members]]
name = "a"
arch = "mobilenetv3_small_050"
[[members]]
name = "b"
arch = "resnet10t"
head = "cosface"
"""


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    (root / "tiny.toml").write_text(TINY)
    out = root / "out"
    assert main(["--config", str(root / "tiny.toml"), "--out", str(out)]) == 0
    return root, out


def _weights_mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.glob("*members/*/model.safetensors")}


def test_a_recipe_file_runs_end_to_end_with_a_refit(recipe_run):
    root, out = recipe_run
    results = json.loads((out / "results.json").read_text())
    rows = [r["row"] for r in results["table"]]
    assert rows[:2] == ["a alone", "b alone"] and rows[-2:] == ["tuned", "refit on all classes"]
    refit_row = results["table"][-1]
    assert refit_row["heldout"] is None and 0.0 <= refit_row["test"]["mAP@1000"] <= 1.0
    assert results["submission"]["mAP@1000"] == pytest.approx(refit_row["test"]["mAP@1000"])
    assert results["members"]["b"]["head"] == "cosface" and results["members"]["a"]["epochs"] == 1
    assert (out / "recipe.toml").is_file() and (out / "members" / "a" / "train.log").is_file()   # parallel logs
    refit = json.loads((out / "refit" / "ensemble.json").read_text())["provenance"]
    tuned_split = json.loads((out / "split.json").read_text())
    assert refit["refit"] is True and refit["tuned_on"]["split"] == tuned_split["hash"]
    member_split = json.loads((out / "refit-members" / "a" / "split.json").read_text())
    assert member_split["heldout_classes"] == [] and set(member_split["train_classes"]) >= set(
        tuned_split["heldout_classes"])


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.glob(pattern)}


def test_a_copied_run_folder_re_trains_and_re_tunes_nothing(recipe_run, tmp_path, capsys):
    """(Runs before the test below changes the run.)"""
    root, out = recipe_run
    moved = tmp_path / "elsewhere" / "out"
    shutil.copytree(out, moved, symlinks=True)   # copy2: the files keep their times
    before = {**_mtimes(moved, "steps/*.json"), **_weights_mtimes(moved), **_mtimes(moved, "*/manifest.json")}
    capsys.readouterr()
    assert run_command(main, ["--config", str(root / "tiny.toml"), "--out", str(moved)]) == 0   # lines shown
    said = capsys.readouterr().out
    assert "[recipe] training" not in said and "changed" not in said and "tuned," not in said, said
    after = {**_mtimes(moved, "steps/*.json"), **_weights_mtimes(moved), **_mtimes(moved, "*/manifest.json")}
    assert after == before and len(before) > 8
    assert not (moved / "run.lock").exists() and not (out / "run.lock").exists()


def test_a_members_flip_reaches_its_bundle_spec(recipe_run, tmp_path):
    """Needs ensemble.build's BuildConfig.flip as one bool per member (the inference branch)."""
    from ensemble.bundle import Bundle
    root, out = recipe_run
    moved = tmp_path / "flip"
    shutil.copytree(out, moved, symlinks=True)
    assert main(["--config", str(root / "tiny.toml"), "--out", str(moved), "--set", "members.a.flip=true",
                 "--trials", "0", "--no-refit"]) == 0
    specs = Bundle.load(moved / "bundle").member_specs
    assert [(s["name"], s["tta"]["flip"]) for s in specs] == [("a", True), ("b", False)]


def test_a_re_run_skips_what_is_current_and_re_runs_what_changed(recipe_run, capsys):
    root, out = recipe_run
    before = _weights_mtimes(out)
    capsys.readouterr()
    assert run_command(main, ["--config", str(root / "tiny.toml"), "--out", str(out)]) == 0   # lines shown
    assert _weights_mtimes(out) == before and "[recipe] training" not in capsys.readouterr().out
    # the changed run goes through a pipe, as into a log file: no progress-bar fragments, no line per trial
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tuning.recipe", "--config", str(root / "tiny.toml"), "--out",
                           str(out), "--set", "members.b.epochs=2", "--set", "parallel=1"],
                          cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    said = proc.stdout
    assert proc.returncode == 0, said[-3000:]
    assert "\r" not in said and "it/s" not in said and "Trial 1 finished" not in said
    assert len(said.splitlines()) < 60, said
    after = _weights_mtimes(out)
    assert "member b: configuration changed" in said and "epochs 1 -> 2" in said
    assert after["members/a/model.safetensors"] == before["members/a/model.safetensors"]
    assert after["members/b/model.safetensors"] != before["members/b/model.safetensors"]
    assert StepRecord.of(out, "members-b").info()["options"]["epochs"] == 2   # results record what ran
    assert json.loads((out / "results.json").read_text())["members"]["b"]["epochs"] == 2


def test_quiet_shows_the_stage_lines_and_warnings_only(capsys):
    for quiet, shown in ((False, "[recipe] split 1a2b\nepoch 1: loss 0.5\n"), (True, "[recipe] split 1a2b\n")):
        with recipe_console(quiet):
            say("split 1a2b")
            logging.getLogger("backbones.run_state").info("epoch 1: loss 0.5")   # a member trained in process
            logging.getLogger("backbones.sampler").warning("P=8 > 3 classes; using P=3")
        assert capsys.readouterr() == (shown, "warning: P=8 > 3 classes; using P=3\n")
