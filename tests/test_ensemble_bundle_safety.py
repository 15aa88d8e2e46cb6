"""A bundle from a stranger is a sealed box: crafted manifests, links, unlisted files and pickles
are refused by name and never touch a file outside the bundle; a save killed at any step
leaves a bundle that loads (old or new), recovered by the next load or save."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from _ensemble_data import make_fake_run

from competition.split import HeldoutSplit
from ensemble.bundle import Bundle, BundleError
from ensemble.members import Member, open_member
from ensemble.postprocess import PostProcessing

VICTIM_BYTES = b"precious, not to be overwritten\n"
KILLED = 77


@dataclass
class _RunFiles(Member):
    """A run member reduced to its files (the bundle never opens them on load)."""

    sources: dict = field(default_factory=dict)
    kind = "run"

    def files(self) -> dict[str, Path]:
        return dict(self.sources)


def _make_bundle(root: Path, name: str = "B") -> Path:
    """Save a two-member bundle (a run: model.safetensors + config.json; a .npy file member) to root/name."""
    run = make_fake_run(root / "runs" / "run", dim=4, seed=1)
    run_member = _RunFiles(name="run", dim=4, fingerprint="f" * 64,
                           sources={"model.safetensors": run / "model.safetensors", "config.json": run / "config.json"})
    np.save(root / "desc.npy", np.eye(3, dtype=np.float32))
    (root / "desc.txt").write_text("c2/a.jpg\nc2/b.jpg\nc0/x.jpg\n")
    split = HeldoutSplit(("c0", "c1"), ("c2",), ("c2/a.jpg",), ("c2/b.jpg",), seed=0)
    ids = {"query": ["c2/a.jpg"], "reference": ["c2/b.jpg"], "train": ["c0/x.jpg", "c1/y.jpg"]}
    rng = np.random.default_rng(0)
    descs = [{s: rng.normal(size=(len(ids[s]), d)) for s in ids} for d in (4, 3)]
    bundle = Bundle.from_members([run_member, open_member(root / "desc.npy")], split, ids, descs)
    return bundle.save(root / name)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_manifest(bundle: Path, edit) -> None:
    """Let ``edit(files)`` change the manifest's {key: sha256} mapping in place."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest["files"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _reseal(bundle: Path, *rels: str) -> None:
    """Update the manifest's sha256 of ``rels`` to their current bytes (a forger's move)."""
    _edit_manifest(bundle, lambda files: files.update({r: _sha(bundle / r) for r in rels}))


def _attempt(bundle: Path, victim: Path) -> BundleError:
    """Load ``bundle`` and, when that works, save it as tuning and NSML would (in place and as a
    copy); return the ``BundleError`` it raised, after checking the victim's bytes each time."""
    with pytest.raises(BundleError) as info:
        try:
            loaded = Bundle.load(bundle)
        finally:
            assert victim.read_bytes() == VICTIM_BYTES
        try:
            loaded.save(bundle.parent / "copy")
            loaded.save(bundle)
        finally:
            assert victim.read_bytes() == VICTIM_BYTES
    assert victim.read_bytes() == VICTIM_BYTES
    assert str(bundle) in str(info.value)
    return info.value


@pytest.fixture
def crafted(tmp_path):
    """(bundle path, victim file outside it)."""
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(VICTIM_BYTES)
    return _make_bundle(tmp_path), victim


def test_a_clean_bundle_loads_with_every_source_inside_it(crafted):
    bundle, _ = crafted
    loaded = Bundle.load(bundle)
    sources = [p for member in loaded.member_sources for p in member.values()]
    assert len(sources) == 4 and all(p.resolve().is_relative_to(bundle.resolve()) for p in sources)


def test_absolute_key_is_refused(crafted):
    bundle, victim = crafted
    _edit_manifest(bundle, lambda files: files.update({str(victim): _sha(victim)}))
    err = _attempt(bundle, victim)
    assert str(victim) in str(err) and "absolute" in str(err)


@pytest.mark.parametrize("key", ["members/00_run/../../../outside/victim.txt", "../outside/victim.txt"])
def test_dotdot_key_is_refused(crafted, key):
    bundle, victim = crafted
    assert (bundle / key).resolve() == victim.resolve()
    _edit_manifest(bundle, lambda files: files.update({key: _sha(victim)}))
    assert key in str(_attempt(bundle, victim))


def test_empty_segment_key_cannot_aim_a_save_at_an_absolute_path(crafted):
    """The reported exploit: members/<folder>//ABSOLUTE/PATH lands on /ABSOLUTE/PATH when saved."""
    bundle, victim = crafted
    key = f"members/00_run/{victim}"  # victim is absolute: "members/00_run//.../victim.txt"
    planted = bundle / "members" / "00_run" / str(victim).lstrip("/")
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"attacker's bytes\n")
    _edit_manifest(bundle, lambda files: files.update({key: _sha(planted)}))
    assert key in str(_attempt(bundle, victim))


def test_backslash_key_is_refused(crafted):
    bundle, victim = crafted
    key = "members\\..\\..\\outside\\victim.txt"
    (bundle / key).write_bytes(b"x")  # a legal POSIX name, but not a portable bundle key
    _reseal(bundle, key)
    assert repr(key) in str(_attempt(bundle, victim))


@pytest.mark.parametrize("case", ["file_outside", "file_inside", "folder_outside"])
def test_symlinks_are_refused_wherever_they_point(crafted, case):
    bundle, victim = crafted
    if case == "folder_outside":
        link, key = bundle / "members" / "00_run" / "sub", "members/00_run/sub/victim.txt"
        link.symlink_to(victim.parent, target_is_directory=True)
    else:
        link, key = bundle / "members" / "00_run" / "config.json", "members/00_run/config.json"
        link.unlink()
        link.symlink_to(victim if case == "file_outside" else Path("..") / ".." / "split.json")
    _reseal(bundle, key)
    err = _attempt(bundle, victim)
    assert f"symlink {link.relative_to(bundle).as_posix()}" in str(err)


def test_symlinks_are_refused_by_mains_load_which_reads_in_place(crafted):
    import main
    bundle, victim = crafted
    (bundle / "members" / "00_run" / "config.json").unlink()
    (bundle / "members" / "00_run" / "config.json").symlink_to(victim)
    _reseal(bundle, "members/00_run/config.json")
    state = main.SessionState(None, top_k=10, device="cpu")
    main.bind_model(state)
    from competition import nsml_local
    with pytest.raises(BundleError, match=f"{bundle}: symlink members/00_run/config.json"):
        nsml_local.load_path(bundle)   # what main.py's nsml load does: no copy, the bundle itself
    assert state.bundle is None and state._workdir is None and victim.read_bytes() == VICTIM_BYTES


@pytest.mark.parametrize("rel", ["members/00_run/extra.bin", "run_me.py"])
def test_an_unlisted_extra_file_is_refused_by_name(crafted, rel):
    bundle, victim = crafted
    (bundle / rel).write_bytes(b"\x00extra")
    assert f"unlisted file {rel}" in str(_attempt(bundle, victim))


def test_an_altered_file_with_its_manifest_entry_deleted_is_refused(crafted):
    bundle, victim = crafted
    rel = "members/00_run/model.safetensors"
    data = bytearray((bundle / rel).read_bytes())
    data[-1] ^= 0x01
    (bundle / rel).write_bytes(bytes(data))
    _edit_manifest(bundle, lambda files: files.pop(rel))
    assert f"unlisted file {rel}" in str(_attempt(bundle, victim))


def test_a_listed_file_outside_the_format_is_refused(crafted):
    bundle, victim = crafted
    (bundle / "descriptors" / "extra.json").write_text("{}")
    _reseal(bundle, "descriptors/extra.json")
    assert "unexpected file descriptors/extra.json" in str(_attempt(bundle, victim))


def test_a_member_folder_that_is_not_a_plain_name_is_refused(crafted):
    bundle, victim = crafted
    spec = json.loads((bundle / "ensemble.json").read_text())
    spec["members"][1]["folder"] = ".."
    (bundle / "ensemble.json").write_text(json.dumps(spec))
    os.rename(bundle / "descriptors" / "01_desc.safetensors", bundle / "descriptors" / "...safetensors")
    _edit_manifest(bundle, lambda files: [files.pop(k) for k in list(files)
                                          if k.startswith(("members/01", "descriptors/01"))])
    shutil.rmtree(bundle / "members" / "01_desc")
    _reseal(bundle, "ensemble.json", "descriptors/...safetensors", "descriptors/ids.json")
    err = _attempt(bundle, victim)
    assert "'..'" in str(err) and "ensemble.json" in str(err)


class _Payload:
    """Unpickling this would overwrite the victim."""

    def __init__(self, victim: Path) -> None:
        self.victim = str(victim)

    def __reduce__(self):
        return exec, (f"open({self.victim!r}, 'wb').write(b'pwned')",)


@pytest.mark.parametrize("rel", ["descriptors/00_run.safetensors", "members/00_run/model.safetensors",
                                 "members/01_desc/descriptors.npy"])
def test_a_pickle_in_place_of_an_array_file_is_refused_never_run(crafted, rel):
    bundle, victim = crafted
    (bundle / rel).write_bytes(pickle.dumps({"w": _Payload(victim)}))
    _reseal(bundle, rel)
    err = _attempt(bundle, victim)
    assert f"{rel} is not a valid" in str(err)


# -- a save killed at every step -------------------------------------------------------------
def _save_killed(bundle: Bundle, path: Path, kill_at: int, log: Path) -> int:
    """Save ``bundle`` to ``path`` in a forked child that dies (os._exit, no clean-up) just before
    its ``kill_at``-th file operation; return the child's exit status (KILLED, or 0 when done)."""
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            count = [0]

            def wrap(fn):
                def step(*args, **kwargs):
                    if count[0] == kill_at:
                        os._exit(KILLED)
                    count[0] += 1
                    return fn(*args, **kwargs)
                return step
            for module, name in [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "unlink"),
                                 (os, "rmdir"), (shutil, "copyfile")]:
                setattr(module, name, wrap(getattr(module, name)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bundle.save(path)
            status = 0
        except BaseException:
            log.write_text(traceback.format_exc())
        finally:
            os._exit(status)
    _, code = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("first_save", [False, True])
def test_a_save_killed_at_any_step_leaves_a_bundle_the_next_load_or_save_finds(tmp_path, monkeypatch, first_save):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a kill, not a power cut: keep the calls, skip the wait
    path = _make_bundle(tmp_path)
    old = Bundle.load(path)
    new = Bundle.load(path)
    new.post = PostProcessing(weights=[3.0, 1.0])
    target = tmp_path / "T" if first_save else path
    versions = {json.dumps(PostProcessing().to_dict()): "old", json.dumps(new.post.to_dict()): "new"}
    recovered, leftovers, log = 0, [], tmp_path / "child.log"

    def staged():
        return [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    for kill_at in range(1000):
        code = _save_killed(new, target, kill_at, log)
        assert code in (0, KILLED), log.read_text() if log.exists() else code
        missing, killed_with = not target.exists(), staged()
        recover_by_save = kill_at % 2 == 1 and not first_save
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if recover_by_save:
                old.save(target)  # recovers first, then writes the old version back
            try:
                loaded = Bundle.load(target)
            except BundleError as exc:  # a first save killed before its bundle was complete
                assert first_save and missing and "not found" in str(exc), exc
                loaded = None
        said = " ".join(str(w.message) for w in caught)
        if loaded is not None:
            version = versions[json.dumps(loaded.post.to_dict())]
            assert version in ({"old"} if recover_by_save else {"new"} if first_save else {"old", "new"})
            if missing:  # killed between moving the old bundle out and the new one in
                recovered += 1
                assert f"{target}: recovered {target.name} from {target.name}.tmp-" in said
        if killed_with and not missing:
            assert "removed leftovers of an interrupted save" in said and all(n in said for n in killed_with)
        leftovers += staged()
        if code == 0:
            break
        if first_save:
            shutil.rmtree(target, ignore_errors=True)
    assert code == 0 and kill_at > 10, "the save was never allowed to finish"
    assert recovered, "no kill point fell between the two renames"
    assert not leftovers, "the next load or save leaves no leftovers"
