"""One run per folder: a lock file held for the whole run.

    FOLDER/run.lock    {"host": ..., "pid": ..., "since": "2026-01-02T03:04:05", "command": "..."}

``RunLock(folder)`` (a context manager) creates the folder when needed and holds an exclusive
``flock`` on ``run.lock`` while the run lasts; the file names the holder. A second run on the same
folder is refused with ``RunLocked``, one line naming the holder (host, pid, since when). The
operating system drops a ``flock`` when its process dies however it dies, so a lock file left by a
dead run is free: the next run takes it over, logging a warning that names the run that left it. Leaving
removes the file, and the folder too when the lock created it and nothing else was written there.
A lock is not inherited across ``exec`` (a spawned member process takes its own, in its own folder).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from competition.cli import UserError

LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


class RunLocked(UserError, RuntimeError):
    """The folder is in use by another run; the message names it."""


def holder_line(info: dict) -> str:
    """``pid P on HOST since TIME (COMMAND)`` of a lock file's contents."""
    command = f" ({info['command']})" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}{command}"


class RunLock:
    """An exclusive lock on a run folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._made_folder = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise RunLocked naming its holder; a lock its dead holder left is taken over."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                self._forget_folder()
                raise RunLocked(f"{self.folder}: another run is using this folder: {holder_line(info)}; "
                                "wait for it to end or stop it, or choose another folder") from None
            except OSError as exc:   # a file system without flock: run unguarded rather than not at all
                warnings.warn(f"{self.folder}: cannot lock {LOCK_FILE} ({exc.strerror}); a second run in this "
                              "folder would not be refused", RuntimeWarning, stacklevel=2)
                break
            if _same_file(fd, self.path):   # not a file a leaving run unlinked while we opened it
                break
            os.close(fd)
        left = _read(fd)
        if left.get("pid") is not None:
            log.warning("%s: taking over the lock left by %s, which has ended", self.folder, holder_line(left))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]).split()}
        info["command"] = " ".join(info["command"])[:200]   # one line, whatever the arguments hold
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the folder, when it made it and it is empty)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        self._forget_folder()

    def _forget_folder(self) -> None:
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()   # only when empty
            self._made_folder = False


def _read(fd: int) -> dict:
    """The holder a lock file names ({} when empty or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
