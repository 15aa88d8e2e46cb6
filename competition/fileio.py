"""Atomic file writes: a temp file in the same folder, fsync, then rename; copies; write errors.

A reader never sees half a file, and an interrupted write leaves the old file.
The written file gets the mode a plain ``open(path, "w")`` would give it,
0o666 minus the process umask (the kernel applies the umask when the temp file is
created, so the umask is never read or changed here).

A write that fails (a full disk, a quota, ``ulimit -f``, a read-only folder) raises
``WriteError``, a ``UserError``: one line naming the file and the operation, and for a full
disk the space left on that file system, e.g.
``cannot write runs/sub/submission.json: No space left on device (12 KB left on that file system)``.
Every write of the kit goes through ``atomic_path`` or ``copy_file``, so this is said once, here.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from competition.cli import UserError


class WriteError(UserError, OSError):
    """A file that could not be written: ``path`` (the file meant, never a temp name), ``operation``,
    and ``errno`` of the failure."""

    def __init__(self, path: str | os.PathLike, operation: str, cause: OSError) -> None:
        super().__init__(f"cannot {operation} {path}: {cause.strerror or cause}{_detail(path, cause.errno)}")
        self.errno = cause.errno
        self.path = Path(path)
        self.operation = operation
        self.cause = cause

    def moved(self, staging: Path, final: Path) -> "WriteError":
        """The same error naming ``final/REL`` where it named ``staging/REL`` (a file written into a
        staging folder that was to become ``final``); itself when it named no file there."""
        try:
            rel = self.path.relative_to(staging)
        except ValueError:
            return self
        return WriteError(final / rel, self.operation, self.cause)


def human_bytes(n: float) -> str:
    """``n`` bytes as people read it: '0 B', '812 B', '12 KB', '3.4 GB' (two significant digits)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _detail(path: str | os.PathLike, code: int | None) -> str:
    """What helps with a failed write: the free space (full disk, quota) or the size limit (EFBIG)."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        folder = Path(os.path.abspath(path)).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return f" ({human_bytes(shutil.disk_usage(folder).free)} left on that file system)"
        except OSError:
            return ""
    if code == errno.EFBIG:
        try:
            import resource
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        except (ImportError, OSError, ValueError):
            return ""
        if limit != resource.RLIM_INFINITY:
            return f" (the file size limit, ulimit -f, is {human_bytes(limit)})"
    return ""


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, operation: str, *own: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` of writing ``path`` into a ``WriteError`` naming it and ``operation``.

    Only errors about the file being written are turned: with no file name, or naming ``path`` or
    one of ``own`` (its temp name) as either file; an error naming only another file (a source that
    cannot be read) passes through unchanged, and so do errors that carry no errno (an unreadable image).
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        mine = {str(p) for p in (path, *own)}
        named = {str(f) for f in (exc.filename, exc.filename2) if f is not None}
        if exc.errno is None or (named and not named & mine):
            raise
        raise WriteError(path, operation, exc) from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``.

    A failed write raises ``WriteError`` (see the module docstring) and leaves no temp file.
    """
    path = Path(path)
    make_dirs(path.parent)
    with write_errors(path, "create a temporary file beside"):
        tmp_path, mode = _new_temp_file(path)
    try:
        with write_errors(path, "write", tmp_path):
            yield tmp_path
        with write_errors(path, "flush", tmp_path):
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, mode)
        with write_errors(path, "rename into place", tmp_path):
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_temp_file(path: Path, attempts: int = 100) -> tuple[Path, int]:
    """Create an empty, uniquely named ``.NAME.*.tmp`` beside ``path``; return (its path, final mode).

    The final mode is what the kernel gave a file created with 0o666: 0o666 & ~umask
    (unlike ``tempfile.mkstemp``, always 0o600). The temp file stays writable by its
    owner until ``atomic_path`` sets that mode, just before the rename.
    """
    for _ in range(attempts):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o777
            os.fchmod(fd, mode | 0o600)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name} after {attempts} tries")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; a ``WriteError`` naming it when that fails. Returns it as a Path."""
    folder = Path(folder)
    with write_errors(folder, "create the folder"):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src``'s bytes to ``dst`` and flush them to disk (not atomic: for files inside a folder
    that is swapped in whole); a failed write is a ``WriteError`` naming ``dst``, an unreadable
    ``src`` an ``OSError`` naming it."""
    with write_errors(dst, f"copy {src} to"):
        shutil.copyfile(src, dst)
    with write_errors(dst, "flush"):
        with open(dst, "rb+") as fh:
            os.fsync(fh.fileno())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
