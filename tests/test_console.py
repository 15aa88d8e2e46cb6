"""One channel for notices (``competition.console``): a line for people per record, quiet on request, and
the process left as it was found by every command (``run_command``), whether it returns or raises."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import optuna
import pytest

from competition.cli import UserError, run_command
from competition.console import KIT_LOGGERS, ConsoleHandler, console

REPO = Path(__file__).resolve().parents[1]


def _process_state() -> dict:
    """What a command may change in the process: the root, kit and Optuna loggers, the warning format."""
    root, study_log = logging.getLogger(), logging.getLogger("optuna")
    return {"root": (root.level, list(root.handlers)), "formatwarning": warnings.formatwarning,
            "optuna": (optuna.logging.get_verbosity(), study_log.propagate, list(study_log.handlers)),
            "levels": {name: logging.getLogger(name).level for name in KIT_LOGGERS}}


def test_info_is_the_message_on_stdout_and_a_warning_one_line_on_stderr(capsys):
    log = logging.getLogger("competition.test.notices")
    with console():
        log.info("epoch %d: loss %.2f", 3, 0.25)
        log.warning("taking over the lock left by pid %d", 12)
        log.error("cannot write %s", "x.json")
        log.debug("not shown")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")   # another library's INFO
        logging.getLogger("faiss.loader").warning("faiss: a warning")
    out, err = capsys.readouterr()
    assert out == "epoch 3: loss 0.25\n"
    assert err.splitlines() == ["warning: taking over the lock left by pid 12", "error: cannot write x.json",
                                "warning: faiss: a warning"] and err.endswith("\n")
    log.info("after the block")
    assert capsys.readouterr() == ("", "")   # nothing shows a notice once the console is gone


def test_lines_go_to_the_stream_of_the_moment_they_are_written():
    """A spawned recipe member redirects stdout into its train.log after the console exists."""
    member_log = io.StringIO()
    with console(), contextlib.redirect_stdout(member_log):
        logging.getLogger("backbones.test.member").info("epoch 1")
    assert member_log.getvalue() == "epoch 1\n"


def test_quiet_keeps_warnings_and_the_named_stage_lines(capsys):
    stage, detail = logging.getLogger("tuning.test.stage"), logging.getLogger("backbones.test.detail")
    with console(quiet=True, keep=[stage.name]):
        stage.info("[recipe] split 1a2b")
        detail.info("epoch 1: loss 0.5")
        detail.warning("P clamped")
    assert capsys.readouterr() == ("[recipe] split 1a2b\n", "warning: P clamped\n")


def test_nested_consoles_print_each_line_once(capsys):
    with console():
        with console(quiet=True, keep=["tuning.test.stage"]):
            logging.getLogger("tuning.test.stage").info("stage")
            logging.getLogger("backbones.test.detail").info("hidden while quiet")
        logging.getLogger("backbones.test.detail").info("shown again")
        assert sum(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers) == 1
    assert capsys.readouterr().out == "stage\nshown again\n"
    python_format = warnings.formatwarning
    with console(debug=True), console():   # --debug: Python's warning format, file and line, even nested
        assert warnings.formatwarning is python_format


def test_optunas_log_goes_through_the_console_at_warning(capsys):
    study_log = optuna.logging.get_logger("optuna.study.test")
    with console():
        study_log.info("Trial 0 finished with value: 0.5 and parameters: {...}")
        study_log.warning("Trial 1 failed")
    assert capsys.readouterr() == ("", "warning: Trial 1 failed\n")


def test_run_command_leaves_the_process_as_it_found_it(capsys):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    before = _process_state()
    seen = []

    def command(raises: Exception | None):
        def main(argv):
            seen.append(_process_state())
            logging.getLogger("main.test.command").info("working")
            if raises is not None:
                raise raises
            return 0
        return main

    assert run_command(command(None), []) == 0
    assert _process_state() == before and seen[-1] != before   # it did change them while it ran
    assert run_command(command(UserError("bad --x")), []) == 2
    assert _process_state() == before
    with pytest.raises(ZeroDivisionError):   # a bug: the traceback, and still the state put back
        run_command(command(ZeroDivisionError("bug")), [])
    assert _process_state() == before
    with pytest.raises(UserError):
        run_command(command(UserError("bad --x")), ["--debug"])
    assert _process_state() == before
    out, err = capsys.readouterr()
    assert out == "working\n" * 4 and err == "error: bad --x\n"


def test_a_command_shows_notices_and_warnings_one_line_each(tmp_path):
    """The real streams of a command: pytest records warnings in process, so this runs one in a child."""
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent("""
        import logging, sys, warnings
        from competition.cli import run_command

        def main(argv):
            logging.getLogger("ensemble.demo").info("stage one")
            warnings.warn("skipping unreadable image a.jpg (empty file)")
            logging.getLogger("ensemble.demo").warning("P=8 > 3 classes; using P=3")
            print("result line")
            return 0

        sys.exit(run_command(main))
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KIT_DEBUG", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stage one\nresult line\n"
    assert proc.stderr == "warning: skipping unreadable image a.jpg (empty file)\nwarning: P=8 > 3 classes; using P=3\n"
