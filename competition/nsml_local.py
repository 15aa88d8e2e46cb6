"""A local stand-in for the ``nsml`` package, with the same functions main.py uses.

On NSML, ``import nsml`` gives the platform's module; elsewhere main.py imports this
one: ``DATASET_PATH`` comes from ``--data``, checkpoints live in a local folder
(``checkpoints/<session>/<checkpoint>``), and ``report`` logs a line (the console's) and
appends JSON lines to ``checkpoints/<session>/report.jsonl``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from competition.fileio import make_dirs, write_errors

IS_ON_NSML = False
DATASET_PATH: str | None = None
CHECKPOINT_ROOT = Path(os.environ.get("KIT_CHECKPOINTS", "checkpoints"))
SESSION = os.environ.get("KIT_SESSION", "local")

_bound: dict[str, Callable] = {}

log = logging.getLogger(__name__)


def bind(save: Callable | None = None, load: Callable | None = None, infer: Callable | None = None, **_) -> None:
    """Register the session's save(dir), load(dir) and infer(queries, _) functions."""
    _bound.update({k: v for k, v in (("save", save), ("load", load), ("infer", infer)) if v is not None})


def checkpoint_dir(checkpoint: str | int, session: str | None = None) -> Path:
    """The local folder that holds ``session``'s checkpoint."""
    return CHECKPOINT_ROOT / (session or SESSION).replace("/", "_") / str(checkpoint)


def save(checkpoint: str | int = "final", session: str | None = None) -> Path:
    """Call the bound save() on this session's checkpoint folder and return it."""
    if "save" not in _bound:
        raise RuntimeError("nsml.save called before nsml.bind(save=...)")
    target = make_dirs(checkpoint_dir(checkpoint, session))
    _bound["save"](str(target))
    return target


def load(checkpoint: str | int = "final", session: str | None = None) -> None:
    """Call the bound load() on a checkpoint folder (of this or another local session)."""
    if "load" not in _bound:
        raise RuntimeError("nsml.load called before nsml.bind(load=...)")
    source = checkpoint_dir(checkpoint, session)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no checkpoint {checkpoint!r} of session {session or SESSION!r}")
    _bound["load"](str(source))


def load_path(path: str | os.PathLike) -> None:
    """Call the bound load() on any folder (a local ensemble checkpoint given by path)."""
    if "load" not in _bound:
        raise RuntimeError("nsml.load called before nsml.bind(load=...)")
    _bound["load"](str(path))


def infer(queries: list[str]):
    """Call the bound infer() as the leaderboard server would."""
    if "infer" not in _bound:
        raise RuntimeError("no infer function bound")
    return _bound["infer"](queries, None)


def paused(scope=None) -> None:
    """On NSML this hands control to the platform (which then calls load and infer);
    locally main.py runs the submission itself, so this returns at once."""


def report(summary: bool = False, scope=None, step: int | None = None, **metrics) -> None:
    """Log the metrics on one line and append them to the session's report log."""
    record = {"time": round(time.time(), 3), "step": step, "summary": summary, **metrics}
    log.info("[report] %s", " ".join(f"{k}={v}" for k, v in record.items() if k != "time" and v is not None))
    report_file = make_dirs(CHECKPOINT_ROOT / SESSION.replace("/", "_")) / "report.jsonl"
    with write_errors(report_file, "append to"), open(report_file, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
