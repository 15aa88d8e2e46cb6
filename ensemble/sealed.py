"""A sealed folder: names confined to it, no links, and a crash-safe replace.

What the ensemble checkpoint (``ensemble.bundle``, whose docstring states the rules) needs
from the file system, kept apart from what it stores:

* ``bad_key(rel)``: why a manifest name is not a relative POSIX path inside the folder.
* ``scan(root)``: its regular files, and the links and special files it refuses (never followed).
* ``replace_dir(path, write)``: fill PATH.tmp-X, swap it in by renames, under a lock;
  ``recover(path, is_complete)`` finishes or undoes a replace that was killed.
* ``locked(path)``: the lock, an flock on the parent folder (no lock file, so a read-only folder
  locks too). Where the platform or file system cannot lock, it refuses (``LockError``) rather
  than run unlocked: a save racing a load could otherwise swap the folder under the reader.
* ``file_digest(path)``: a file's sha256, computed once per process while the file stays as it
  was (same size, mtime_ns, ctime_ns, inode and device); a changed file is hashed again.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

from competition.cli import UserError
from competition.fileio import WriteError, sha256_file

_BAD_CHARS = re.compile(r"[\\:\x00-\x1f\x7f]")


class RecoveryWarning(UserWarning):
    """A killed save was finished or undone, or its leftovers removed (the message names them)."""


class LockError(UserError):
    """The folder cannot be locked (the message names it and why)."""


# absolute path -> (size, mtime_ns, ctime_ns, inode, device) when hashed, sha256
_DIGESTS: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def file_digest(path: Path) -> str:
    """Return the hex sha256 of ``path``, from the memo when the file has not changed since it was
    hashed in this process (its size, mtime_ns, ctime_ns, inode and device all equal)."""
    key = os.path.abspath(path)
    before = _identity(os.stat(path))
    known = _DIGESTS.get(key)
    if known is not None and known[0] == before:
        return known[1]
    digest = sha256_file(path)
    if _identity(os.stat(path)) == before:  # unchanged while it was read: the digest is of that file
        _DIGESTS[key] = (before, digest)
    return digest


def bad_key(rel: object) -> str | None:
    """Why ``rel`` is not a relative POSIX path confined to a folder; None when it is one."""
    if not isinstance(rel, str) or not rel:
        return "not a file name"
    if rel.startswith("/"):
        return "an absolute path"
    if _BAD_CHARS.search(rel):
        return "a backslash, colon or control character"
    parts = rel.split("/")
    if "" in parts:
        return "an empty path segment"
    if "." in parts or ".." in parts:
        return "a '.' or '..' segment"
    return None


def scan(root: Path) -> tuple[set[str], dict[str, str]]:
    """Return (relative POSIX paths of the regular files under ``root``, {path: why refused} of
    its links and special files). Links are never followed."""
    files: set[str] = set()
    refused: dict[str, str] = {}
    folders = [""]
    while folders:
        prefix = folders.pop()
        with os.scandir(root / prefix if prefix else root) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    refused[rel] = f"symlink {rel} (a bundle holds no links)"
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(rel + "/")
                elif entry.is_file(follow_symlinks=False):
                    files.add(rel)
                else:
                    refused[rel] = f"special file {rel} (not a regular file)"
    return files, refused


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path, files: set[str]) -> None:
    """Flush the entries of ``root`` and of every folder holding one of ``files`` (relative paths)."""
    for folder in sorted({str(p) for rel in files for p in Path(rel).parents}, reverse=True):
        fsync(root / folder)


def _remove(path: Path) -> None:
    """Delete a folder tree, file or link (best effort; a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on ``path``'s parent folder; ``LockError`` naming the
    folder where the platform or file system cannot lock it (never runs unlocked)."""
    try:
        import fcntl
    except ImportError:
        raise LockError(f"{path.parent}: cannot lock the folder (no fcntl.flock on this platform); "
                        "saving and loading a bundle need a lock") from None
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError as exc:
        raise LockError(f"{path.parent}: cannot open the folder to lock it ({exc.strerror})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise LockError(f"{path.parent}: cannot lock the folder ({exc.strerror}); saving and loading a "
                            "bundle need a file system with flock (e.g. a local disk)") from exc
        yield
    finally:
        os.close(fd)  # releases the lock


def recover(path: Path, is_complete: Callable[[Path], bool]) -> None:
    """Finish or undo a killed ``replace_dir`` of ``path`` (call under ``locked(path)``).

    When ``path`` is missing, the newest ``path.tmp-*`` for which ``is_complete`` holds, else
    the newest such ``path.old-*``, is renamed to ``path``; every other leftover is deleted.
    Warns (``RecoveryWarning``) naming what moved or went.
    """
    tmps, olds = ([path.parent / p for p in sorted(glob.glob(glob.escape(path.name) + kind, root_dir=path.parent))]
                  for kind in (".tmp-*", ".old-*"))
    if not tmps and not olds:
        return
    notes = []
    if not os.path.lexists(path):
        def newest(ps: list[Path]) -> list[Path]:
            return sorted(ps, key=lambda p: p.lstat().st_mtime_ns, reverse=True)
        for cand in newest(tmps) + newest(olds):
            if is_complete(cand):
                os.rename(cand, path)
                fsync(path.parent)
                notes.append(f"recovered {path.name} from {cand.name} (the {'new' if cand in tmps else 'previous'} "
                             "version; a save was interrupted)")
                break
    left = [p for p in tmps + olds if os.path.lexists(p)]
    for p in left:
        _remove(p)
    gone = [p for p in left if not os.path.lexists(p)]
    if gone:
        notes.append("removed leftovers of an interrupted save: " + ", ".join(p.name for p in gone))
    if notes:
        warnings.warn(f"{path}: " + "; ".join(notes), RecoveryWarning, stacklevel=3)


def replace_dir(path: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Replace the folder ``path`` crash-safely by one that ``write(tmp)`` fills.

    Under ``locked(path)``: ``recover``; ``write`` into a new PATH.tmp-X (it must flush its
    files and write the file that makes ``is_complete`` true last); rename PATH to PATH.old-X;
    rename PATH.tmp-X to PATH; delete PATH.old-X. A process killed at any step leaves PATH, or
    leftovers from which the next ``recover`` restores it.
    """
    with locked(path):
        recover(path, is_complete)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
        except OSError as exc:
            raise WriteError(path, "create a temporary folder beside", exc) from exc
        try:
            write(tmp)
        except WriteError as exc:  # name the file meant, not its staging copy
            shutil.rmtree(tmp, ignore_errors=True)
            raise exc.moved(tmp, path) from exc.cause
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = path.parent / (path.name + ".old-" + tmp.name[len(path.name) + len(".tmp-"):])
        try:
            if os.path.lexists(path):
                os.rename(path, old)
                fsync(path.parent)
            os.rename(tmp, path)
            fsync(path.parent)
        except Exception as exc:
            recover(path, is_complete)
            if isinstance(exc, OSError) and not isinstance(exc, WriteError):
                raise WriteError(path, "swap in the new version of", exc) from exc
            raise
        _remove(old)
