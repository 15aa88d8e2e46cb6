"""On-disk descriptor cache for one member and one image set.

A cache folder holds float16 chunk files (``chunk_<n>.npy``, at most ``chunk_rows``
rows each) and a ``manifest.json`` that records the member's fingerprint, the
extraction settings (TTA, device type, AMP dtype: any change re-extracts), and for
every image its key (path), size, mtime and where its row lives (or that it was
unreadable). ``cached_describe`` reuses every entry whose file is
unchanged, extracts only new or modified images (in chunk-sized batches, each
written as its own chunk), drops entries of images no longer asked for, and
returns float32 descriptors in the order asked. Unreadable images are recorded and
not retried until their size or mtime changes (each is still named in a warning). All writes are atomic.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from competition.cli import show_progress
from competition.fileio import atomic_path, atomic_write_json, make_dirs
from ensemble.combine import l2_normalize

CACHE_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_CHUNK_ROWS = 8192

# extract(paths) -> (descriptors (n_ok, d) float32 in input order, ok (n,) bool)
ExtractFn = Callable[[Sequence[Path]], tuple[np.ndarray, np.ndarray]]


@dataclass
class CacheResult:
    """Descriptors ``desc`` (n_ok, d) float32 unit rows in the order asked, ``ok`` (n,) bool,
    and what the call did: counts of extracted/reused/dropped entries and unreadable paths."""

    desc: np.ndarray
    ok: np.ndarray
    extracted: int = 0
    reused: int = 0
    dropped: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.ok)} images: {self.reused} cached, {self.extracted} extracted, "
                f"{self.dropped} dropped, {len(self.unreadable)} unreadable")


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _key(path: Path, root: Path | None) -> str:
    path = Path(os.path.abspath(path))
    if root is not None:
        try:
            return path.relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            pass
    return path.as_posix()


class DescriptorCache:
    """The cache folder of one (member, image set); see the module docstring."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, settings: dict | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.settings = json.loads(json.dumps(settings or {}))  # normalise tuples -> lists
        self.chunk_rows = chunk_rows
        self.manifest = self._read_manifest()

    # -- manifest ---------------------------------------------------------------
    def _empty(self) -> dict:
        return {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "settings": self.settings,
                "dim": None, "next_chunk": 0, "chunks": {}, "entries": {}}

    def _read_manifest(self) -> dict:
        path = self.folder / MANIFEST
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return self._empty()
        if (m.get("version") != CACHE_VERSION or m.get("fingerprint") != self.fingerprint
                or m.get("settings") != self.settings):
            return self._empty()  # other weights, TTA, device or precision: nothing is reusable
        for name in m["chunks"]:
            if not (self.folder / name).is_file():  # a chunk was lost: forget its rows
                m["entries"] = {k: e for k, e in m["entries"].items() if e.get("chunk") != name}
        m["chunks"] = {n: r for n, r in m["chunks"].items() if (self.folder / n).is_file()}
        return m

    def _write_manifest(self) -> None:
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    def _collect_garbage(self) -> None:
        """Delete chunk files that no manifest entry refers to (after the manifest is written)."""
        live = {e["chunk"] for e in self.manifest["entries"].values() if "chunk" in e}
        for name in list(self.manifest["chunks"]):
            if name not in live:
                del self.manifest["chunks"][name]
        self._write_manifest()
        for f in self.folder.glob("chunk_*.npy"):
            if f.name not in self.manifest["chunks"]:
                f.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------
    def _new_chunk(self, rows: np.ndarray) -> str:
        name = f"chunk_{self.manifest['next_chunk']:06d}.npy"
        self.manifest["next_chunk"] += 1
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(rows, dtype=np.float16))
        self.manifest["chunks"][name] = int(len(rows))
        return name

    def _extract_batch(self, items: list[tuple[str, Path, tuple[int, int]]], extract: ExtractFn) -> list[str]:
        """Extract one batch, store its rows as a chunk, record entries; return unreadable keys."""
        desc, ok = extract([p for _, p, _ in items])
        ok = np.asarray(ok, dtype=bool)
        desc = np.asarray(desc)
        if ok.shape != (len(items),) or len(desc) != int(ok.sum()):
            raise ValueError(f"extractor returned {len(desc)} rows and an ok mask of shape {ok.shape} "
                             f"for {len(items)} images")
        if len(desc):
            dim = int(desc.shape[1])
            if self.manifest["dim"] not in (None, dim):
                raise ValueError(f"extractor returned d={dim}, the cache holds d={self.manifest['dim']}")
            self.manifest["dim"] = dim
            chunk = self._new_chunk(desc)
        bad, row = [], 0
        for (key, _path, (size, mtime)), good in zip(items, ok):
            if good:
                self.manifest["entries"][key] = {"size": size, "mtime": mtime, "chunk": chunk, "row": row}
                row += 1
            else:
                self.manifest["entries"][key] = {"size": size, "mtime": mtime, "unreadable": True}
                bad.append(key)
        self._write_manifest()  # progress survives an interruption
        return bad

    def compact(self) -> None:
        """Rewrite the live rows into full chunks when dead rows outnumber live ones."""
        live = [(k, e) for k, e in self.manifest["entries"].items() if "chunk" in e]
        total = sum(self.manifest["chunks"].values())
        if total <= 2 * len(live) or not live:
            return
        live.sort(key=lambda ke: (ke[1]["chunk"], ke[1]["row"]))
        for start in range(0, len(live), self.chunk_rows):
            part = live[start:start + self.chunk_rows]
            rows = self._gather([(e["chunk"], e["row"]) for _, e in part], dtype=np.float16)
            name = self._new_chunk(rows)
            for i, (_k, e) in enumerate(part):
                e["chunk"], e["row"] = name, i
        self._collect_garbage()

    # -- reading ----------------------------------------------------------------
    def _gather(self, where: list[tuple[str, int]], dtype=np.float32) -> np.ndarray:
        """Return the rows at ``where`` [(chunk, row), ...] as an (n, d) array (float32: unit rows),
        reading one chunk at a time."""
        out = np.empty((len(where), self.manifest["dim"] or 0), dtype=dtype)
        by_chunk: dict[str, list[tuple[int, int]]] = {}
        for i, (chunk, row) in enumerate(where):
            by_chunk.setdefault(chunk, []).append((i, row))
        for chunk, pairs in by_chunk.items():
            data = np.load(self.folder / chunk, mmap_mode="r")
            dst = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
            src = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
            out[dst] = data[src]
            del data
        if out.dtype == np.float32:  # unit rows again after float16 storage, block by block
            for start in range(0, len(out), self.chunk_rows):
                out[start:start + self.chunk_rows] = l2_normalize(out[start:start + self.chunk_rows])
        return out

    def get(self, paths: Sequence[str | os.PathLike], extract: ExtractFn, *, root: str | os.PathLike | None = None,
            keep_others: bool = False, progress: bool = False) -> CacheResult:
        """Return a ``CacheResult`` for ``paths``, extracting only new or changed images.

        Entries for images not in ``paths`` are dropped unless ``keep_others``.
        ``root`` makes keys relative to it (a moved dataset then stays cached).
        """
        make_dirs(self.folder)
        root_p = Path(root) if root is not None else None
        paths = [Path(p) for p in paths]
        keys = [_key(p, root_p) for p in paths]
        if len(set(keys)) != len(keys):
            raise ValueError("the same image is asked for twice")
        entries = self.manifest["entries"]
        todo: list[tuple[str, Path, tuple[int, int]]] = []
        missing: list[str] = []
        known_bad: list[Path] = []   # unreadable at their last extraction and unchanged: not retried
        reused = 0
        for key, path in zip(keys, paths):
            st = _stat(path)
            if st is None:
                missing.append(key)
                continue
            e = entries.get(key)
            if e is not None and (e["size"], e["mtime"]) == st:
                reused += 1
                if e.get("unreadable"):
                    known_bad.append(path)
            else:
                todo.append((key, path, st))
        dropped = 0
        if not keep_others:
            wanted = set(keys)
            gone = [k for k in entries if k not in wanted]
            for k in gone:
                del entries[k]
            dropped = len(gone)
        for key in missing:  # a vanished file is unreadable now, but not remembered as such
            entries.pop(key, None)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc=f"extract {self.folder.name}", unit="img", disable=not show_progress())
        for start in range(0, len(todo), self.chunk_rows):
            batch = todo[start:start + self.chunk_rows]
            self._extract_batch(batch, extract)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self._collect_garbage()
        self.compact()
        where, ok = [], np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            e = entries.get(key)
            if e is not None and "chunk" in e:
                where.append((e["chunk"], e["row"]))
                ok[i] = True
        desc = self._gather(where) if where else np.zeros((0, self.manifest["dim"] or 0), np.float32)
        unreadable = [str(p) for p, good in zip(paths, ok) if not good]
        for path in known_bad:   # the extractor named the others; these it did not see this time
            warnings.warn(f"skipping unreadable image {path} (unreadable when last extracted, unchanged since)",
                          stacklevel=2)
        if unreadable:
            warnings.warn(f"{self.folder}: {len(unreadable)} unreadable or missing images, e.g. "
                          f"{unreadable[:3]}", stacklevel=2)
        return CacheResult(desc, ok, extracted=len(todo), reused=reused, dropped=dropped, unreadable=unreadable)


def cached_describe(folder: str | os.PathLike, paths: Sequence[str | os.PathLike], extract: ExtractFn, *,
                    fingerprint: str, settings: dict | None = None, root: str | os.PathLike | None = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False) -> CacheResult:
    """Describe ``paths`` through the cache in ``folder``; see ``DescriptorCache.get``."""
    cache = DescriptorCache(folder, fingerprint, settings, chunk_rows)
    return cache.get(paths, extract, root=root, progress=progress)
