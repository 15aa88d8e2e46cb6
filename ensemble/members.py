"""Ensemble members: anything that yields descriptors for a list of image paths.

* ``RunMember``: a backbone run directory (``model.safetensors`` + ``config.json``),
  described with ``backbones.extract.extract_descriptors`` (injectable, for tests),
  optionally through the on-disk descriptor cache (keyed on the TTA, the device type
  and the AMP dtype the extraction computes in).
* ``FileMember``: precomputed descriptors made elsewhere: a ``.npy`` (n, d) plus a
  names file (``.txt`` one name per line, or ``.json`` list / ``{"names": [...]}``),
  looked up by image id ``<class>/<file>``, file name or name (file name without
  extension). An optional sidecar ``<stem>.meta.json`` may declare
  ``split_hash``, ``train_classes`` and ``name`` for the leakage checks.

Every member has ``name``, ``dim``, ``fingerprint`` (sha256 of its weights / files),
``split_hash`` and ``train_classes`` (None when unknown),
``describe(paths) -> (desc (n_ok, d) float32 unit rows in input order, ok (n,) bool)``, and
``preload()``, which reads into memory what ``describe`` needs from the member's files (a run's
network; a descriptor file is memory-mapped when opened), so that they may be deleted afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from competition.cli import UserError
from competition.data import image_name
from competition.fileio import sha256_file
from ensemble.cache import cached_describe
from ensemble.combine import l2_normalize

# extract(model_or_run_dir, paths, **kw) -> (desc (n_ok, d), ok (n,)); the signature of
# backbones.extract.extract_descriptors.
Extractor = Callable[..., tuple[np.ndarray, np.ndarray]]
_READ_ROWS = 8192  # rows of a descriptor file read at a time (bounds the temporary copy)


class MemberError(UserError, ValueError):
    """A member that cannot be used as given (missing files, bad names file, ...)."""


@dataclass
class TTA:
    """Test-time augmentation a run member extracts with (part of its cache key)."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict:
        return {"flip": bool(self.flip), "scales": [float(s) for s in self.scales]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TTA":
        d = d or {}
        return cls(flip=bool(d.get("flip", False)), scales=tuple(float(s) for s in d.get("scales", (1.0,))))


@dataclass
class Member:
    """Base class: identity and leakage metadata shared by all members."""

    name: str
    dim: int | None
    fingerprint: str
    split_hash: str | None = None
    train_classes: tuple[str, ...] | None = None

    kind = "base"

    def describe(self, paths: Sequence[str | os.PathLike], **kw) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def preload(self) -> None:
        """Read what ``describe`` needs into memory (nothing to do for most members)."""

    def files(self) -> dict[str, Path]:
        """Return {file name inside the member's bundle folder: source path}."""
        raise NotImplementedError

    def spec(self) -> dict:
        """Return the JSON description a bundle stores (files are named relative to the member folder)."""
        return {"kind": self.kind, "name": self.name, "dim": self.dim, "fingerprint": self.fingerprint,
                "split_hash": self.split_hash,
                "train_classes": None if self.train_classes is None else list(self.train_classes)}


@dataclass
class RunMember(Member):
    """A backbone run directory; see the module docstring."""

    run_dir: Path = Path(".")
    config: dict = field(default_factory=dict)
    tta: TTA = field(default_factory=TTA)
    extractor: Extractor | None = None
    cache_dir: Path | None = None
    batch_size: int = 64
    device: str = "auto"
    amp: str = "auto"                # see backbones.extract.autocast_dtype
    workers: int | None = None       # None: backbones.extract.default_workers of the device
    _model: object = field(default=None, repr=False)

    kind = "run"

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike, *, name: str | None = None, tta: TTA | None = None,
                 extractor: Extractor | None = None, cache_dir: str | os.PathLike | None = None,
                 fingerprint: str | None = None, **kw) -> "RunMember":
        """Open a run directory; ``fingerprint`` skips re-hashing weights already verified."""
        from backbones import checkpoint
        run_dir = Path(run_dir)
        try:
            config = checkpoint.read_config(run_dir)
        except (OSError, ValueError) as exc:
            raise MemberError(str(exc)) from exc
        dim = config.get("embedding_dim", config.get("model", {}).get("embedding_dim"))
        classes = config.get("train_classes", config.get("classes"))  # backbones.train writes train_classes
        return cls(name=name or config.get("name") or run_dir.name,
                   dim=None if dim is None else int(dim),
                   fingerprint=fingerprint or sha256_file(checkpoint.run_files(run_dir)[checkpoint.WEIGHTS_FILE]),
                   split_hash=config.get("split_hash"),
                   train_classes=None if classes is None else tuple(classes),
                   run_dir=run_dir, config=config, tta=tta or TTA(), extractor=extractor,
                   cache_dir=None if cache_dir is None else Path(cache_dir), **kw)

    @classmethod
    def from_spec(cls, spec: dict, run_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  **kw) -> "RunMember":
        """A run stored in a bundle: identity from ``spec`` (what the bundle verified), nothing read
        from ``run_dir`` until the network is loaded (its config.json with it, once)."""
        classes = spec.get("train_classes")
        return cls(name=spec["name"], dim=None if spec.get("dim") is None else int(spec["dim"]),
                   fingerprint=spec["fingerprint"], split_hash=spec.get("split_hash"),
                   train_classes=None if classes is None else tuple(classes), run_dir=Path(run_dir),
                   tta=TTA.from_dict(spec.get("tta")), cache_dir=None if cache_dir is None else Path(cache_dir), **kw)

    def files(self) -> dict[str, Path]:
        from backbones.checkpoint import run_files
        return run_files(self.run_dir)

    def spec(self) -> dict:
        return {**super().spec(), "tta": self.tta.to_dict()}

    def preload(self) -> None:
        """Load the network (and its config) once; an injected ``extractor`` loads its own."""
        if self.extractor is None and self._model is None:
            from backbones.checkpoint import load_run
            self._model, self.config = load_run(self.run_dir, self.device)

    def _extract(self, paths: Sequence[Path], progress: bool) -> tuple[np.ndarray, np.ndarray]:
        kw = dict(batch_size=self.batch_size, device=self.device, flip=self.tta.flip,
                  scales=tuple(self.tta.scales), workers=self.workers, amp=self.amp, progress=progress)
        if self.extractor is not None:
            return self.extractor(self.run_dir, list(paths), **kw)
        from backbones.extract import extract_descriptors
        self.preload()  # once, reused for every image set
        return extract_descriptors(self._model, list(paths), config=self.config, **kw)

    def describe(self, paths: Sequence[str | os.PathLike], *, set_name: str = "images", root: str | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Return (desc (n_ok, d) float32 unit rows in input order, ok (n,) bool).

        With ``cache_dir`` set, descriptors come from ``cache_dir/<name>-<fp>/<set_name>``
        and only new or changed images are extracted; descriptors cached with other TTA,
        on another device type or in another precision are extracted again.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            return np.zeros((0, self.dim or 0), np.float32), np.zeros(0, bool)
        if self.cache_dir is None:
            desc, ok = self._extract(paths, progress)
            return np.asarray(desc, np.float32), np.asarray(ok, bool)
        from backbones.extract import extraction_precision
        folder = self.cache_dir / f"{self.name}-{self.fingerprint[:12]}" / set_name
        settings = {**self.tta.to_dict(), **extraction_precision(self.device, self.amp)}
        res = cached_describe(folder, paths, lambda ps: self._extract(ps, progress),
                              fingerprint=self.fingerprint, settings=settings, root=root, progress=False)
        return res.desc, res.ok


def _read_names(path: Path) -> list[str]:
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            names = data["names"] if isinstance(data, dict) else data
            if not isinstance(names, list):
                raise TypeError("expected a list of names")
            return [str(n) for n in names]
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MemberError(f"{path}: cannot read image names ({exc})") from exc


def _lookup_keys(path: str) -> tuple[str, str, str, str]:
    """Keys a precomputed file may use for an image, most specific first: ``<folder>/<file>``,
    ``<folder>/<name>``, ``<file>``, ``<name>`` (string operations: this runs once per image)."""
    head, file = os.path.split(path)
    folder, name = os.path.basename(head), image_name(file)
    return f"{folder}/{file}", f"{folder}/{name}", file, name


@dataclass
class FileMember(Member):
    """Precomputed descriptors looked up by image id or name; see the module docstring."""

    npy_path: Path = Path(".")
    names_path: Path = Path(".")
    meta_path: Path | None = None
    names: list[str] = field(default_factory=list)
    _desc: np.ndarray | None = field(default=None, repr=False)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    kind = "file"

    @classmethod
    def from_file(cls, npy_path: str | os.PathLike, names_path: str | os.PathLike | None = None, *,
                  name: str | None = None, split_hash: str | None = None,
                  train_classes: Sequence[str] | None = None, fingerprint: str | None = None) -> "FileMember":
        """Open ``X.npy`` with names in ``names_path`` (default ``X.txt`` or ``X.json``) and
        the optional sidecar ``X.meta.json``; explicit arguments override the sidecar."""
        npy_path = Path(npy_path)
        if not npy_path.is_file():
            raise MemberError(f"{npy_path}: descriptor file not found")
        if names_path is None:
            candidates = [npy_path.with_suffix(".txt"), npy_path.with_suffix(".json")]
            names_path = next((c for c in candidates if c.is_file()), None)
            if names_path is None:
                raise MemberError(f"{npy_path}: no names file ({candidates[0].name} or {candidates[1].name})")
        names_path = Path(names_path)
        meta_path = npy_path.with_suffix(".meta.json")
        meta = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as exc:
                raise MemberError(f"{meta_path}: not valid JSON ({exc})") from exc
        else:
            meta_path = None
        desc = np.load(npy_path, mmap_mode="r")
        names = _read_names(names_path)
        if desc.ndim != 2 or len(desc) != len(names):
            raise MemberError(f"{npy_path}: {desc.shape} descriptors but {len(names)} names in {names_path.name}")
        index: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in index:
                raise MemberError(f"{names_path}: name {n!r} listed twice")
            index[n] = i
        if fingerprint is None:
            h = hashlib.sha256()
            for p in (npy_path, names_path):
                h.update(sha256_file(p).encode())
            fingerprint = h.hexdigest()
        classes = train_classes if train_classes is not None else meta.get("train_classes")
        return cls(name=name or meta.get("name") or npy_path.stem, dim=int(desc.shape[1]),
                   fingerprint=fingerprint, split_hash=split_hash or meta.get("split_hash"),
                   train_classes=None if classes is None else tuple(classes), npy_path=npy_path,
                   names_path=names_path, meta_path=meta_path, names=names, _desc=desc, _index=index)

    def files(self) -> dict[str, Path]:
        out = {"descriptors.npy": self.npy_path, "names" + self.names_path.suffix: self.names_path}
        if self.meta_path is not None:
            out["descriptors.meta.json"] = self.meta_path
        return out

    def _row(self, path: str) -> int:
        index = self._index
        return next((index[k] for k in _lookup_keys(path) if k in index), -1)

    def describe(self, paths: Sequence[str | os.PathLike], **_ignored) -> tuple[np.ndarray, np.ndarray]:
        """Return (desc (n_ok, d) float32 unit rows in input order, ok (n,) bool); ok is False
        for images the file does not list (warned once with a count). The file's rows are read
        in file order, a block at a time (memory-map friendly), straight into the result."""
        all_rows = np.fromiter((self._row(os.fspath(p)) for p in paths), dtype=np.int64, count=len(paths))
        ok = all_rows >= 0
        if not ok.all():
            missing = [str(p) for p, good in zip(paths, ok) if not good]
            warnings.warn(f"member {self.name}: {len(missing)} images not in {self.npy_path.name}, "
                          f"e.g. {missing[:3]}", stacklevel=2)
        rows = all_rows[ok]
        desc = np.empty((len(rows), self._desc.shape[1]), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        for start in range(0, len(rows), _READ_ROWS):
            part = order[start:start + _READ_ROWS]
            desc[part] = self._desc[rows[part]]
        return l2_normalize(desc, copy=False), ok


def describe_all(members: Sequence[Member], paths: Sequence[str | os.PathLike], *, set_name: str = "images",
                 root: str | None = None, progress: bool = False,
                 on_member: Callable[[], None] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Return ([per member (n_ok, d_m) float32 unit rows], ok (n,) bool): the images every member describes.

    A member's rows are copied only when another member missed some of its images.
    ``on_member`` is called after each member (a progress hook).
    """
    described, ok = [], np.ones(len(paths), dtype=bool)
    for m in members:
        desc, m_ok = m.describe(paths, set_name=set_name, root=root, progress=progress)
        m_ok = np.asarray(m_ok, bool)
        described.append((desc, m_ok))
        ok &= m_ok
        if on_member is not None:
            on_member()
    kept = []
    for desc, m_ok in described:  # desc's rows are m_ok's images; keep those every member described
        keep = ok[m_ok]
        kept.append(desc if keep.all() else desc[keep])
    return kept, ok


def open_member(path: str | os.PathLike, **kw) -> Member:
    """Open a run directory (``RunMember``) or a ``.npy`` descriptor file (``FileMember``)."""
    path = Path(path)
    if path.is_dir():
        return RunMember.from_dir(path, **kw)
    if path.suffix == ".npy":
        file_kw = {k: v for k, v in kw.items() if k in ("name", "split_hash", "train_classes", "fingerprint")}
        return FileMember.from_file(path, **file_kw)
    raise MemberError(f"{path}: not a run directory or a .npy descriptor file")


def member_from_spec(spec: dict, folder: str | os.PathLike, **kw) -> Member:
    """Rebuild a member stored in a bundle's member ``folder`` from its ``spec`` (no re-hashing)."""
    folder = Path(folder)
    if spec["kind"] == "run":
        return RunMember.from_spec(spec, folder, **kw)
    if spec["kind"] == "file":
        names = next((p for p in (folder / "names.txt", folder / "names.json") if p.is_file()), None)
        return FileMember.from_file(folder / "descriptors.npy", names, split_hash=spec.get("split_hash"),
                                    train_classes=spec.get("train_classes"), name=spec["name"],
                                    fingerprint=spec["fingerprint"])
    raise MemberError(f"{folder}: unknown member kind {spec['kind']!r}")
