"""The ensemble checkpoint ("bundle"): one self-contained, relocatable directory.

    BUNDLE/manifest.json               format version, package versions, created time,
                                       sha256 of every other file (relative paths)
    BUNDLE/ensemble.json               member specs (name, kind, folder, dim, fingerprint,
                                       split_hash, train_classes, TTA)
    BUNDLE/postprocessing.json         PostProcessing.to_dict() (member weights included)
    BUNDLE/whitening.safetensors       Whitening.to_arrays() (only when whitening is on)
    BUNDLE/split.json                  the held-out split it was tuned on
    BUNDLE/descriptors/ids.json        image ids "<class>/<file>" of query/reference/train rows
    BUNDLE/descriptors/<folder>.safetensors   float16 query/reference/train rows per member
    BUNDLE/members/<folder>/...        weights + config (run), or descriptor files (file)

Saving writes BUNDLE.tmp-XXXX and renames it into place (an existing bundle is
swapped out by rename and then deleted). Loading verifies every sha256 and raises
``BundleError`` naming each corrupt or missing file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from competition.cli import UserError
from competition.fileio import atomic_path, atomic_write_json, sha256_file
from competition.split import HeldoutSplit
from ensemble.combine import l2_normalize
from ensemble.members import Member, member_from_spec
from ensemble.model import Ensemble
from ensemble.postprocess import PostProcessing, fit_whitening_for
from ensemble.whitening import Whitening

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETS = ("query", "reference", "train")


class BundleError(UserError, ValueError):
    """A bundle that cannot be loaded: missing or corrupt files (named), or a bad format."""


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a bundle directory (manifest.json + ensemble.json); not verified."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / "ensemble.json").is_file()


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a bundle's numbers depend on (None when not installed)."""
    out: dict[str, str | None] = {}
    for key, dists in {"torch": ["torch"], "timm": ["timm"], "numpy": ["numpy"],
                       "faiss": ["faiss-cpu", "faiss-gpu", "faiss"]}.items():
        out[key] = None
        for d in dists:
            try:
                out[key] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _folder_name(i: int, name: str) -> str:
    return f"{i:02d}_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "member")


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v if v.flags.c_contiguous else np.ascontiguousarray(v)  # (keeps 0-d arrays 0-d)
                   for k, v in ((k, np.asarray(v)) for k, v in arrays.items())}, str(tmp))


@dataclass
class Bundle:
    """An ensemble checkpoint in memory; ``path`` is where it was loaded from or saved to.

    ``descriptors[m][s]`` is member m's float16 (n_s, d_m) array for set s in
    ("query", "reference", "train"); ``ids[s]`` names its rows.
    """

    member_specs: list[dict]
    member_sources: list[dict[str, Path]]   # {file name in member folder: where it lives now}
    split: HeldoutSplit
    ids: dict[str, list[str]]
    descriptors: list[dict[str, np.ndarray]]
    post: PostProcessing = field(default_factory=PostProcessing)
    whitening: Whitening | None = None
    path: Path | None = None
    created: str | None = None

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_members(cls, members: Sequence[Member], split: HeldoutSplit, ids: dict[str, Sequence[str]],
                     descriptors: Sequence[dict[str, np.ndarray]], post: PostProcessing | None = None) -> "Bundle":
        """Assemble a bundle from members and their per-set descriptors (stored as float16)."""
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        specs = [{**m.spec(), "folder": _folder_name(i, m.name)} for i, m in enumerate(members)]
        descs = [{s: np.asarray(d[s], dtype=np.float16) for s in SETS} for d in descriptors]
        bundle = cls(specs, [dict(m.files()) for m in members], split,
                     {s: [str(i) for i in ids[s]] for s in SETS}, descs, post or PostProcessing())
        bundle._check()
        return bundle

    def _check(self) -> None:
        if not (len(self.member_specs) == len(self.member_sources) == len(self.descriptors)) or not self.member_specs:
            raise BundleError("bundle: member specs, files and descriptors disagree in number")
        for spec, d in zip(self.member_specs, self.descriptors):
            for s in SETS:
                if d[s].ndim != 2 or len(d[s]) != len(self.ids[s]):
                    raise BundleError(f"bundle member {spec['name']}: {s} descriptors {d[s].shape} "
                                      f"but {len(self.ids[s])} ids")
        w = self.post.weights
        if w is not None and len(w) != len(self.member_specs):
            raise BundleError(f"bundle: {len(self.member_specs)} members but {len(w)} weights")

    @property
    def member_names(self) -> list[str]:
        return [s["name"] for s in self.member_specs]

    # -- saving -----------------------------------------------------------------
    def _write_into(self, root: Path) -> None:
        for spec, sources, descs in zip(self.member_specs, self.member_sources, self.descriptors):
            folder = root / "members" / spec["folder"]
            folder.mkdir(parents=True, exist_ok=True)
            for fname, src in sources.items():
                shutil.copyfile(src, folder / fname)
            _save_arrays(root / "descriptors" / f"{spec['folder']}.safetensors", descs)
        atomic_write_json(root / "descriptors" / "ids.json", self.ids)
        atomic_write_json(root / "ensemble.json", {"format_version": FORMAT_VERSION, "members": self.member_specs})
        atomic_write_json(root / "postprocessing.json", self.post.to_dict())
        self.split.save(root / "split.json")
        if self.whitening is not None:
            _save_arrays(root / "whitening.safetensors", self.whitening.to_arrays())
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(root / MANIFEST, {
            "format_version": FORMAT_VERSION, "created": self.created, "packages": package_versions(),
            "members": self.member_names, "split_hash": self.split.hash,
            "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in files}})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to ``path`` atomically (replacing one there); return the path.

        A bundle without a path (new) or saved onto its own path is (re)attached to it;
        saving a loaded bundle elsewhere writes a copy and leaves ``self.path`` as it was.
        """
        path = Path(os.path.abspath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check()
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
        try:
            self._write_into(tmp)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
                os.rename(path, old / "b")
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.path is None or self.path == path:  # else a copy (NSML save): stay attached to self.path
            self.path = path
            self.member_sources = [{f: path / "members" / s["folder"] / f for f in src}
                                   for s, src in zip(self.member_specs, self.member_sources)]
        return path

    # -- loading ----------------------------------------------------------------
    @staticmethod
    def verify(path: str | os.PathLike) -> dict:
        """Check every file's sha256 against the manifest; return the manifest or raise ``BundleError``."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"{path}: bundle directory not found")
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise BundleError(f"{path}: missing file {MANIFEST} (not an ensemble bundle?)") from None
        except json.JSONDecodeError as exc:
            raise BundleError(f"{path}: corrupt file {MANIFEST} ({exc})") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {manifest.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
        problems = []
        for rel, digest in manifest.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                problems.append(f"missing file {rel}")
            elif sha256_file(f) != digest:
                problems.append(f"corrupt file {rel} (sha256 does not match the manifest)")
        if problems:
            raise BundleError(f"{path}: " + "; ".join(problems))
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Bundle":
        """Load and verify a bundle; raises ``BundleError`` naming any corrupt or missing file."""
        path = Path(os.path.abspath(path))
        manifest = cls.verify(path)
        listed = set(manifest.get("files", {}))
        for rel in ("ensemble.json", "postprocessing.json", "split.json", "descriptors/ids.json"):
            if rel not in listed:
                raise BundleError(f"{path}: missing file {rel} (not listed in {MANIFEST})")
        try:
            specs = json.loads((path / "ensemble.json").read_text())["members"]
            post = PostProcessing.from_dict(json.loads((path / "postprocessing.json").read_text()))
            split = HeldoutSplit.load(path / "split.json")
            ids = json.loads((path / "descriptors" / "ids.json").read_text())
            descs = []
            for spec in specs:
                rel = f"descriptors/{spec['folder']}.safetensors"
                if rel not in listed:
                    raise BundleError(f"{path}: missing file {rel} (not listed in {MANIFEST})")
                arrays = load_file(str(path / "descriptors" / f"{spec['folder']}.safetensors"))
                descs.append({s: arrays[s] for s in SETS})
            wpath = path / "whitening.safetensors"
            whitening = Whitening.from_arrays(load_file(str(wpath))) if "whitening.safetensors" in listed else None
        except BundleError:
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise BundleError(f"{path}: malformed bundle ({type(exc).__name__}: {exc})") from exc
        prefix = "members/"
        sources = []
        for spec in specs:
            folder = f"{prefix}{spec['folder']}/"
            sources.append({rel[len(folder):]: path / rel for rel in sorted(listed) if rel.startswith(folder)})
        bundle = cls(specs, sources, split, ids, descs, post, whitening, path, manifest.get("created"))
        bundle._check()
        return bundle

    # -- use --------------------------------------------------------------------
    def set_descriptors(self, set_name: str) -> list[np.ndarray]:
        """Per member (n, d_m) float32 unit rows of one cached set ("query", "reference" or "train")."""
        return [l2_normalize(d[set_name]) for d in self.descriptors]

    def train_descriptors(self) -> list[np.ndarray]:
        """Per member (n_train, d_m) float32 unit rows of the train-class images."""
        return self.set_descriptors("train")

    def set_postprocessing(self, post: PostProcessing, save: bool = True) -> None:
        """Adopt ``post``, refit whitening on the cached train-class descriptors, and rewrite
        the bundle atomically (when it has a path and ``save``)."""
        if post.weights is not None and len(post.weights) != len(self.member_specs):
            raise ValueError(f"{len(self.member_specs)} members but {len(post.weights)} weights")
        self.whitening = fit_whitening_for(self.train_descriptors(), post)
        self.post = post
        if save and self.path is not None:
            self.save(self.path)

    def ensemble(self, device: str = "cpu", **member_kw) -> Ensemble:
        """Return the ``Ensemble`` this bundle describes (members read from the bundle folder).

        ``member_kw`` go to the run members (e.g. ``cache_dir``, ``batch_size``, ``extractor``).
        """
        if self.path is None:
            raise BundleError("bundle has not been saved: members live in the bundle folder")
        if device != "auto":
            member_kw.setdefault("device", device)
        members = [member_from_spec(spec, self.path / "members" / spec["folder"], **member_kw)
                   for spec in self.member_specs]
        return Ensemble(members, post=self.post, whitening=self.whitening, device=device)
