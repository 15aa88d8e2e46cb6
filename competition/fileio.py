"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A reader never sees half a file, and an interrupted write leaves the old file.
The written file gets the mode a plain ``open(path, "w")`` would give it,
0o666 minus the process umask (the kernel applies the umask when the temp file is
created, so the umask is never read or changed here).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, mode = _new_temp_file(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
