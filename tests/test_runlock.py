"""One run per folder: a second run is refused naming the holder, a lock its dead holder left is taken
over with a warning, and the recipe and backbones.train both take the lock of their run folder."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from competition.cli import run_command
from competition.runlock import LOCK_FILE, RunLock, RunLocked

REPO = Path(__file__).resolve().parents[1]
HOLDER = "import sys, time\nfrom competition.runlock import RunLock\nRunLock(sys.argv[1]).acquire()\n" \
         "print('held', flush=True)\ntime.sleep(120)\n"


def _holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        with pytest.raises(RunLocked, match=rf"run: another run is using this folder: pid {proc.pid} on "
                                            rf"{socket.gethostname()} since 20\d\d-.*"
                                            rf"\(python\S* -c import sys, time from"):
            RunLock(folder).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == proc.pid   # left behind by the killed run
    with caplog.at_level(logging.WARNING, logger="competition.runlock"), RunLock(folder):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    [taken] = [r for r in caplog.records if r.name == "competition.runlock"]
    assert taken.levelno == logging.WARNING
    assert re.search(rf"taking over the lock left by pid {proc.pid} on .*which has ended", taken.getMessage())
    assert not (folder / LOCK_FILE).exists() and folder.is_dir()   # the folder was there before: it stays


def test_a_lock_in_the_same_process_is_refused_and_an_empty_folder_it_made_goes(tmp_path):
    folder = tmp_path / "new" / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a fresh lock warns of nothing
        with RunLock(folder):
            with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
                RunLock(folder).acquire()
    assert not folder.exists()
    with RunLock(folder):
        (folder / "weights").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["weights"]


TINY = """
trials = 0
[synth]
train_classes = 4
images_per_class = 3
test_classes = 2
queries_per_class = 1
references_per_class = 2
[[members]]
name = "a"
arch = "resnet10t"
"""


def test_the_recipe_and_training_refuse_a_folder_in_use(tmp_path, image_dataset, capsys):
    from backbones.train import main as train_main
    from tuning.recipe import main as recipe_main
    (tmp_path / "r.toml").write_text(TINY)
    for command, argv in ((recipe_main, ["--config", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")]),
                          (train_main, ["--data", str(image_dataset), "--out", str(tmp_path / "out"),
                                        "--arch", "resnet10t", "--epochs", "1"])):
        with RunLock(tmp_path / "out"):
            assert run_command(command, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another run is using this folder: pid {os.getpid()}" in err, err
        assert not (tmp_path / "out").exists()   # nothing written into it, and the holder made it
