"""The ensemble checkpoint ("bundle"): one self-contained, relocatable directory.

    BUNDLE/manifest.json               format version, package versions, created time,
                                       sha256 of every other file (relative paths)
    BUNDLE/ensemble.json               member specs (name, kind, folder, dim, fingerprint,
                                       split_hash, train_classes, TTA) and the provenance:
                                       {"refit": false}, or for a final refit {"refit": true,
                                       "tuned_on": {"split", "members", "post"}}: the post-
                                       processing was tuned on split S with members M, then
                                       the members were retrained on every class
    BUNDLE/postprocessing.json         PostProcessing.to_dict() (member weights included)
    BUNDLE/whitening.safetensors       Whitening.to_arrays() (only when whitening is on)
    BUNDLE/split.json                  the held-out split it was tuned on
    BUNDLE/descriptors/ids.json        image ids "<class>/<file>" of query/reference/train rows
    BUNDLE/descriptors/<folder>.safetensors   float16 query/reference/train rows per member
    BUNDLE/members/<folder>/...        weights + config (run), or descriptor files (file)

A sealed box: ``load`` trusts nothing in it. Manifest keys are relative POSIX paths inside
the bundle (no absolute path, no ``.``/``..``/empty segment, no backslash, colon or control
character); every regular file is listed and its sha256 matches; the bundle holds no link
and no special file; member folders are plain names; the listed files are those of the
format above; every array file (.safetensors, .npy) parses, so a pickle is refused, never
run. Any breach is a ``BundleError`` naming the bundle and each offending file. Loading
reads nothing outside BUNDLE; saving writes only BUNDLE and its siblings BUNDLE.tmp-X and
BUNDLE.old-X (the file-system side lives in ``ensemble.sealed``).

Loading reads the bundle in place, never copying it, and hashes each file once per process
(``ensemble.sealed.file_digest``: an unchanged file is not hashed again, a changed one is). The
cached tuning descriptors (only tuning and the recipe's table use them) are parsed at load
(header only) and read on first use of ``Bundle.descriptors``, checked against the manifest then.

Saving, under an advisory lock (flock) on the parent folder that ``load`` takes too:
  1. write BUNDLE.tmp-X, every file fsynced, the manifest last (so a tmp that verifies
     is complete);
  2. rename BUNDLE to BUNDLE.old-X (when there is one);  3. rename BUNDLE.tmp-X to BUNDLE;
  4. delete BUNDLE.old-X.
Recovery rule, applied by every ``load`` and ``save`` first (under the lock, leftover
BUNDLE.tmp-*/.old-* siblings are a killed save's): when BUNDLE is missing (killed between
2 and 3), the newest complete tmp, else the newest old that verifies, is renamed to
BUNDLE; every other leftover is deleted. A ``BundleRecoveryWarning`` names what moved or
went. So at every instant BUNDLE holds the old or the new bundle, or the next load or
save puts one back.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from competition.cli import UserError
from competition.fileio import atomic_write_bytes, atomic_write_json, copy_file, make_dirs, sha256_file
from competition.split import HeldoutSplit
from ensemble.combine import l2_normalize
from ensemble.members import Member, member_from_spec
from ensemble.model import Ensemble
from ensemble.postprocess import PostProcessing, fit_whitening_for
from ensemble.sealed import RecoveryWarning, bad_key, file_digest, fsync, fsync_tree, locked, recover, replace_dir, scan
from ensemble.whitening import Whitening

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETS = ("query", "reference", "train")
TOP_FILES = ("ensemble.json", "postprocessing.json", "split.json", "descriptors/ids.json")
_FOLDER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")   # a member folder: one plain name


class BundleError(UserError, ValueError):
    """A bundle that cannot be loaded: missing, corrupt, unlisted or unsafe files (named), or a bad format."""


BundleRecoveryWarning = RecoveryWarning


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
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[key] = metadata.version(d)
                break
    return out


def _folder_name(i: int, name: str) -> str:
    return f"{i:02d}_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "member")


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a .safetensors file (serialised in memory, then written atomically)."""
    atomic_write_bytes(path, save({k: v if v.flags.c_contiguous else np.ascontiguousarray(v)  # (keeps 0-d arrays 0-d)
                                   for k, v in ((k, np.asarray(v)) for k, v in arrays.items())}))


def _read_arrays(root: Path, rel: str, full: bool = True) -> dict[str, np.ndarray]:
    """Return the arrays of the array file ``root/rel`` (with ``full=False`` only check that it
    parses: header of a .safetensors, header of a .npy); ``BundleError`` naming it when not."""
    try:
        if rel.endswith(".npy"):
            np.load(root / rel, mmap_mode="r", allow_pickle=False)
            return {}
        if full:
            return load_file(str(root / rel))
        with safe_open(str(root / rel), framework="numpy") as fh:
            fh.keys()
        return {}
    except (SafetensorError, ValueError, EOFError, OSError) as exc:
        raise BundleError(f"{root}: {rel} is not a valid {Path(rel).suffix} file "
                          f"({type(exc).__name__}: {exc})") from None


@dataclass
class Bundle:
    """An ensemble checkpoint in memory; ``path`` is where it was loaded from or saved to.

    ``descriptors[m][s]`` is member m's float16 (n_s, d_m) array for set s in
    ("query", "reference", "train"); ``ids[s]`` names its rows. A loaded bundle reads them on
    first use (see the module docstring).
    """

    member_specs: list[dict]
    member_sources: list[dict[str, Path]]   # {file name in member folder: where it lives now}
    split: HeldoutSplit
    ids: dict[str, list[str]]
    _descriptors: list[dict[str, np.ndarray]] | None   # None: not read yet (``descriptors``)
    post: PostProcessing = field(default_factory=PostProcessing)
    whitening: Whitening | None = None
    path: Path | None = None
    created: str | None = None
    provenance: dict = field(default_factory=lambda: {"refit": False})
    _digests: dict[str, str] = field(default_factory=dict, repr=False)  # the manifest's, for the late read

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_members(cls, members: Sequence[Member], split: HeldoutSplit, ids: dict[str, Sequence[str]],
                     descriptors: Sequence[dict[str, np.ndarray]], post: PostProcessing | None = None,
                     provenance: dict | None = None) -> "Bundle":
        """Assemble a bundle from members and their per-set descriptors (stored as float16)."""
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        specs = [{**m.spec(), "folder": _folder_name(i, m.name)} for i, m in enumerate(members)]
        descs = [{s: np.asarray(d[s], dtype=np.float16) for s in SETS} for d in descriptors]
        bundle = cls(specs, [dict(m.files()) for m in members], split,
                     {s: [str(i) for i in ids[s]] for s in SETS}, descs, post or PostProcessing(),
                     provenance=dict(provenance or {"refit": False}))
        bundle._check()
        return bundle

    def _check(self, where: Path | None = None) -> None:
        """Raise ``BundleError`` when the parts disagree, or a member folder or file name would
        leave the bundle folder (``where`` names the bundle in messages)."""
        at = f"{where}: " if where is not None else "bundle: "
        counts = {len(self.member_specs), len(self.member_sources)}
        if self._descriptors is not None:
            counts.add(len(self._descriptors))
        if len(counts) > 1 or not self.member_specs:
            raise BundleError(f"{at}member specs, files and descriptors disagree in number")
        for spec in self.member_specs:
            if not {"name", "kind", "folder"} <= set(spec):
                raise BundleError(f"{at}a member in ensemble.json lacks a name, kind or folder")
        folders = [spec["folder"] for spec in self.member_specs]
        for folder, sources in zip(folders, self.member_sources):
            if not isinstance(folder, str) or not _FOLDER.fullmatch(folder) or folders.count(folder) > 1:
                raise BundleError(f"{at}bad member folder {folder!r} in ensemble.json (a unique plain name)")
            for fname in sources:
                if bad_key(fname):
                    raise BundleError(f"{at}bad file name members/{folder}/{fname} ({bad_key(fname)})")
        for spec, d in zip(self.member_specs, self._descriptors or []):
            self._check_descriptors(at, spec, d)
        w = self.post.weights
        if w is not None and len(w) != len(self.member_specs):
            raise BundleError(f"{at}{len(self.member_specs)} members but {len(w)} weights")

    def _check_descriptors(self, at: str, spec: dict, d: dict[str, np.ndarray]) -> None:
        for s in SETS:
            if d[s].ndim != 2 or len(d[s]) != len(self.ids[s]):
                raise BundleError(f"{at}member {spec['name']}: {s} descriptors {d[s].shape} "
                                  f"but {len(self.ids[s])} ids")

    @property
    def descriptors(self) -> list[dict[str, np.ndarray]]:
        """Per member {set: float16 (n_s, d_m) array} (read from the bundle folder on first use)."""
        if self._descriptors is None:
            self._descriptors = [self._read_descriptors(spec) for spec in self.member_specs]
        return self._descriptors

    def _read_descriptors(self, spec: dict) -> dict[str, np.ndarray]:
        """One member's cached descriptors from the loaded bundle, checked against its manifest again."""
        rel = f"descriptors/{spec['folder']}.safetensors"
        file = self.path / rel
        try:
            same = stat.S_ISREG(os.lstat(file).st_mode) and file_digest(file) == self._digests[rel]
        except OSError as exc:
            raise BundleError(f"{self.path}: cannot read {rel} ({exc.strerror}; deleted after loading?)") from exc
        arrays = _read_arrays(self.path, rel) if same else {}
        if not same or not set(SETS) <= set(arrays):
            raise BundleError(f"{self.path}: corrupt file {rel} (changed since the bundle was loaded)")
        d = {s: arrays[s] for s in SETS}
        self._check_descriptors(f"{self.path}: ", spec, d)
        return d

    @property
    def is_refit(self) -> bool:
        """True for a final refit: its members learnt the held-out classes (no honest held-out score)."""
        return bool(self.provenance.get("refit"))

    @property
    def member_names(self) -> list[str]:
        return [s["name"] for s in self.member_specs]

    # -- saving -----------------------------------------------------------------
    def _write_into(self, root: Path) -> None:
        """Write every file into the empty folder ``root``, fsynced, the manifest last."""
        for spec, sources, descs in zip(self.member_specs, self.member_sources, self.descriptors):
            folder = root / "members" / spec["folder"]
            for fname, src in sources.items():
                make_dirs((folder / fname).parent)
                copy_file(src, folder / fname)  # flushed, as atomic_path flushes the files below
            _save_arrays(root / "descriptors" / f"{spec['folder']}.safetensors", descs)
        atomic_write_json(root / "descriptors" / "ids.json", self.ids)
        atomic_write_json(root / "ensemble.json", {"format_version": FORMAT_VERSION, "members": self.member_specs,
                                                   "provenance": self.provenance})
        atomic_write_json(root / "postprocessing.json", self.post.to_dict())
        self.split.save(root / "split.json")
        if self.whitening is not None:
            _save_arrays(root / "whitening.safetensors", self.whitening.to_arrays())
        files, _ = scan(root)
        fsync_tree(root, files)
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(root / MANIFEST, {
            "format_version": FORMAT_VERSION, "created": self.created, "packages": package_versions(),
            "members": self.member_names, "split_hash": self.split.hash,
            "files": {rel: sha256_file(root / rel) for rel in sorted(files)}})
        fsync(root)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to ``path`` crash-safely (replacing one there; see the module
        docstring); return the path.

        A bundle without a path (new) or saved onto its own path is (re)attached to it;
        saving a loaded bundle elsewhere writes a copy and leaves ``self.path`` as it was.
        """
        path = Path(os.path.abspath(path))
        make_dirs(path.parent)
        self._check(path)
        replace_dir(path, self._write_into, _is_complete)
        if self.path is None or self.path == path:  # else a copy (NSML save): stay attached to self.path
            self.path = path
            self.member_sources = [{f: path / "members" / s["folder"] / f for f in src}
                                   for s, src in zip(self.member_specs, self.member_sources)]
        return path

    # -- loading ----------------------------------------------------------------
    @staticmethod
    def verify(path: str | os.PathLike) -> dict:
        """Check the files against the manifest (keys confined to the bundle, every regular file
        listed, sha256 equal, no links); return the manifest or raise ``BundleError`` naming
        every offending file. Reads nothing outside ``path``."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: bundle directory not found")
        files, refused = scan(path)
        if MANIFEST not in files:
            raise BundleError(f"{path}: " + (refused.get(MANIFEST) or
                                             f"missing file {MANIFEST} (not an ensemble bundle?)"))
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"{path}: corrupt file {MANIFEST} ({exc})") from exc
        listed = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(listed, dict):
            raise BundleError(f"{path}: corrupt file {MANIFEST} (no 'files' mapping)")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {manifest.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
        problems = list(refused.values())
        for rel, digest in listed.items():
            why = bad_key(rel) or ("the manifest itself" if rel == MANIFEST else None)
            if why:
                problems.append(f"bad file name {rel!r} in {MANIFEST} ({why})")
            elif rel in refused:
                continue
            elif rel not in files:
                problems.append(f"missing file {rel}")
            elif file_digest(path / rel) != digest:
                problems.append(f"corrupt file {rel} (sha256 does not match the manifest)")
        problems += [f"unlisted file {rel} (not in {MANIFEST})" for rel in sorted(files - set(listed) - {MANIFEST})]
        if problems:
            raise BundleError(f"{path}: " + "; ".join(problems))
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Bundle":
        """Load and verify a bundle (finishing a killed save first, see the module docstring);
        raises ``BundleError`` naming any corrupt, missing, unlisted or unsafe file."""
        path = Path(os.path.abspath(path))
        if not path.parent.is_dir():
            raise BundleError(f"{path}: bundle directory not found")
        with locked(path):
            recover(path, _is_complete)
            return cls._read(path)

    @classmethod
    def _read(cls, path: Path) -> "Bundle":
        manifest = cls.verify(path)
        listed = set(manifest["files"])
        for rel in TOP_FILES:
            if rel not in listed:
                raise BundleError(f"{path}: missing file {rel} (not listed in {MANIFEST})")
        try:
            ensemble = json.loads((path / "ensemble.json").read_text())
            specs, provenance = ensemble["members"], dict(ensemble.get("provenance") or {"refit": False})
            post = PostProcessing.from_dict(json.loads((path / "postprocessing.json").read_text()))
            split = HeldoutSplit.load(path / "split.json")
            ids = json.loads((path / "descriptors" / "ids.json").read_text())
            folders = [spec["folder"] for spec in specs]  # checked by _check below; until then only
            # listed keys (confined to the bundle) are opened
            allowed = {*TOP_FILES, "whitening.safetensors", *(f"descriptors/{f}.safetensors" for f in folders)}
            unexpected = sorted(rel for rel in listed - allowed if rel.split("/")[:2] not in
                                [["members", f] for f in folders] or rel.count("/") < 2)
            if unexpected:
                raise BundleError(f"{path}: unexpected file {', '.join(unexpected)} (not part of the bundle format)")
            for rel in sorted(listed):
                if rel.endswith((".safetensors", ".npy")):
                    _read_arrays(path, rel, full=False)
            for f in folders:
                if f"descriptors/{f}.safetensors" not in listed:
                    raise BundleError(f"{path}: missing file descriptors/{f}.safetensors (not listed in {MANIFEST})")
            whitening = (Whitening.from_arrays(_read_arrays(path, "whitening.safetensors"))
                         if "whitening.safetensors" in listed else None)
            sources = [{rel[len(f"members/{f}/"):]: path / rel for rel in sorted(listed)
                        if rel.startswith(f"members/{f}/")} for f in folders]
            bundle = cls(specs, sources, split, ids, None, post, whitening, path, manifest.get("created"),
                         provenance, dict(manifest["files"]))
            bundle._check(path)
        except BundleError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError, OSError, RecursionError) as exc:
            raise BundleError(f"{path}: malformed bundle ({type(exc).__name__}: {exc})") from exc
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


def _is_complete(tmp: Path) -> bool:
    """True when ``tmp`` (a save's leftover) holds a bundle that verifies."""
    try:
        Bundle.verify(tmp)
        return True
    except (BundleError, OSError):
        return False
