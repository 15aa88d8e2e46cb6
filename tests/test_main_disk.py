"""Writes that fail say where, and leave no mix: ``competition.fileio``'s errors, and ``main.py --mode test``
with a full disk on each of its output files in turn (``--out`` holds the previous complete result or the
new one, never a mix), or under ``ulimit -f``."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _image_data import make_dataset

import main
from competition.cli import run_command
from competition.data import QUERY_DIR, REFERENCE_DIR, image_name, list_images, scan_train
from competition.fileio import WriteError, atomic_write_text, copy_file, human_bytes
from competition.split import make_split

REPO = Path(__file__).resolve().parents[1]
LINUX_FDS = Path("/proc/self/fd").is_dir()


def _full_disk_on(monkeypatch, name: str) -> None:
    """``os.fsync`` of a temp file of ``name`` (``.NAME.*.tmp``, what ``atomic_path`` writes) fails with ENOSPC."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not LINUX_FDS, reason="names file descriptors through /proc")
def test_a_failed_atomic_write_names_the_file_the_operation_and_the_space_left(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old")
    _full_disk_on(monkeypatch, "a.txt")
    with pytest.raises(WriteError) as info:
        atomic_write_text(tmp_path / "a.txt", "new")
    text = str(info.value)
    assert text.startswith(f"cannot flush {tmp_path / 'a.txt'}: No space left on device (")
    assert text.endswith(" left on that file system)") and info.value.errno == errno.ENOSPC
    assert (tmp_path / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_copy_names_the_unreadable_source_or_the_unwritable_target(tmp_path):
    with pytest.raises(FileNotFoundError) as info:          # a source that is not there: its own error
        copy_file(tmp_path / "missing", tmp_path / "b")
    assert not isinstance(info.value, WriteError) and info.value.filename == str(tmp_path / "missing")
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(WriteError, match=f"cannot copy {tmp_path / 'src'} to {tmp_path / 'no' / 'b'}: No such file"):
        copy_file(tmp_path / "src", tmp_path / "no" / "b")
    assert [human_bytes(n) for n in (0, 999, 1000, 12_345, 3.4e9)] == ["0 B", "999 B", "1.0 KB", "12 KB", "3.4 GB"]


@pytest.fixture
def world(tmp_path):
    """A generated dataset with labels, and a bundle of two descriptor-file members that describe every image."""
    data = make_dataset(tmp_path / "data")
    split = make_split(scan_train(data), heldout=3, query_fraction=0.5, seed=0)
    split.save(tmp_path / "split.json")
    names = list(scan_train(data).ids) + [image_name(p) for d in (QUERY_DIR, REFERENCE_DIR)
                                          for p in list_images(data / d)]
    rng = np.random.default_rng(0)
    members = []
    for m in ("a", "b"):
        np.save(tmp_path / f"{m}.npy", rng.normal(size=(len(names), 8)).astype(np.float32))
        (tmp_path / f"{m}.txt").write_text("\n".join(names) + "\n")
        (tmp_path / f"{m}.meta.json").write_text(json.dumps({"split_hash": split.hash,
                                                             "train_classes": list(split.train_classes)}))
        members.append(str(tmp_path / f"{m}.npy"))
    from ensemble.build import BuildConfig, build_from_paths
    build_from_paths(members, data, tmp_path / "bundle", BuildConfig(split=tmp_path / "split.json", progress=False))
    return SimpleNamespace(root=tmp_path, data=data, bundle=tmp_path / "bundle", out=tmp_path / "out")


def _submit(world, k: int) -> int:
    return run_command(main.main, ["--mode", "test", "--pause", "1", "--data", str(world.data), "--checkpoint",
                                   str(world.bundle), "--out", str(world.out), "--device", "cpu", "--k", str(k)])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _staged(world) -> list[str]:
    return [p.name for p in world.root.iterdir() if p.name.startswith(("out.tmp-", "out.old-"))]


@pytest.mark.skipif(not LINUX_FDS, reason="names file descriptors through /proc")
@pytest.mark.parametrize("victim", main.OUTPUT_FILES)
def test_a_full_disk_on_any_output_is_one_line_and_leaves_the_previous_result(world, victim, monkeypatch, capsys):
    assert _submit(world, k=5) == 0
    before = _files(world.out)
    assert set(before) == set(main.OUTPUT_FILES)
    with monkeypatch.context() as patched:
        _full_disk_on(patched, victim)
        capsys.readouterr()
        assert _submit(world, k=3) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: cannot flush {world.out / victim}: No space left on device (")
    assert _files(world.out) == before and not _staged(world)   # the previous run's files, all of them
    assert _submit(world, k=3) == 0
    after = _files(world.out)
    assert set(after) == set(main.OUTPUT_FILES)
    assert all(after[n] != before[n] for n in ("submission.json", "scores.json"))
    assert len(next(iter(json.loads(after["submission.json"]).values()))) == 3 and not _staged(world)


def test_a_file_size_limit_is_one_line_naming_the_file_and_the_limit(world):
    resource = pytest.importorskip("resource")
    limit = 100   # below scores.json, the first file written
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--mode", "test", "--pause", "1", "--data",
                           str(world.data), "--checkpoint", str(world.bundle), "--out", str(world.out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: cannot write {world.out / 'scores.json'}: File too large "
                                   f"(the file size limit, ulimit -f, is {limit} B)")
    assert not world.out.exists() and not _staged(world)
