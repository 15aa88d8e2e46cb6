"""Ensemble bundle: round trip, integrity checks, post-processing refit."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ensemble.build import BuildOptions, build_bundle
from ensemble.bundle import Bundle, BundleError
from ensemble.members import open_member
from ensemble.postprocess import PostProcessing, fit_whitening_for
from rerank import RerankParams


def _members(env):
    a = open_member(env.make_run("a", dim=8, seed=1), extractor=env.extractor, cache_dir=env.root / "cache")
    b = open_member(env.make_run("b", dim=5, seed=2), extractor=env.extractor, cache_dir=env.root / "cache")
    return [a, b]


def _build(env, out="B", **opt):
    opt.setdefault("progress", False)
    bundle, summary = build_bundle(_members(env), env.data, env.split, env.root / out, BuildOptions(**opt))
    return bundle, summary


def test_build_writes_a_bundle_that_round_trips_bit_exactly(ens_env):
    bundle, summary = _build(ens_env)
    assert "2 members" in summary.line() and summary.n_query == len(ens_env.split.query_ids)
    path = ens_env.root / "B"
    assert {p.name for p in path.iterdir()} >= {"manifest.json", "ensemble.json", "postprocessing.json",
                                                 "split.json", "descriptors", "members"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"torch", "timm", "numpy", "faiss"} <= set(manifest["packages"])
    assert "members/00_a/model.safetensors" in manifest["files"]
    assert all(not os.path.isabs(f) for f in manifest["files"])
    loaded = Bundle.load(path)
    assert loaded.ids == bundle.ids and loaded.split == ens_env.split
    assert loaded.post.to_dict() == PostProcessing().to_dict()
    for d0, d1 in zip(bundle.descriptors, loaded.descriptors):
        for s in ("query", "reference", "train"):
            assert d1[s].dtype == np.float16 and np.array_equal(d0[s], d1[s])
    assert loaded.member_specs == bundle.member_specs
    assert not [p for p in ens_env.root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_set_postprocessing_refits_whitening_and_persists(ens_env):
    bundle, _ = _build(ens_env)
    post = PostProcessing(weights=[2.0, 1.0], whiten=True, whiten_dim=6, whiten_power=0.5,
                          rerank=RerankParams(aqe_n=2))
    bundle.set_postprocessing(post)
    expected = fit_whitening_for(bundle.train_descriptors(), post)
    assert np.array_equal(bundle.whitening.components, expected.components)
    loaded = Bundle.load(ens_env.root / "B")
    assert loaded.post.to_dict() == post.to_dict()
    for k, v in expected.to_arrays().items():
        assert np.array_equal(loaded.whitening.to_arrays()[k], v)
    loaded.set_postprocessing(PostProcessing())  # whitening off again: the file goes away
    assert Bundle.load(ens_env.root / "B").whitening is None
    assert not (ens_env.root / "B" / "whitening.safetensors").exists()


def test_a_flipped_byte_is_detected_and_named(ens_env):
    _build(ens_env)
    f = ens_env.root / "B" / "members" / "01_b" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt file members/01_b/model.safetensors"):
        Bundle.load(ens_env.root / "B")


def test_a_missing_file_is_named(ens_env):
    _build(ens_env)
    (ens_env.root / "B" / "descriptors" / "00_a.safetensors").unlink()
    with pytest.raises(BundleError, match="missing file descriptors/00_a.safetensors"):
        Bundle.load(ens_env.root / "B")
    (ens_env.root / "B" / "manifest.json").unlink()
    with pytest.raises(BundleError, match="missing file manifest.json"):
        Bundle.load(ens_env.root / "B")


def test_bundle_is_relocatable_and_ranks(ens_env):
    bundle, _ = _build(ens_env)
    bundle.set_postprocessing(PostProcessing(whiten=True, whiten_power=1.0))
    moved = ens_env.root / "elsewhere" / "nsml_model"
    moved.parent.mkdir()
    os.rename(ens_env.root / "B", moved)
    loaded = Bundle.load(moved)
    ens = loaded.ensemble(device="cpu", extractor=ens_env.extractor)
    root = ens_env.data / "train" / "train_data"
    queries = [root / i for i in ens_env.split.query_ids]
    refs = [root / i for i in ens_env.split.reference_ids]
    ranking = ens.rank(queries, refs, top_k=3)
    assert ranking.indices.shape == (len(queries), 3)
    # the ensemble reproduces the cached held-out descriptors it was tuned on
    desc, ok = ens.describe(queries)
    from ensemble.postprocess import ensemble_descriptors
    tuned = ensemble_descriptors(loaded.set_descriptors("query"), loaded.post, loaded.whitening)
    assert ok.all() and np.allclose(desc, tuned, atol=5e-3)
    # re-saving over an existing bundle swaps it in place; saving elsewhere writes a copy
    loaded.save(moved)
    assert Bundle.load(moved).ids == loaded.ids
    copy = loaded.save(ens_env.root / "nsml_dir" / "bundle")
    assert loaded.path == moved and Bundle.load(copy).member_specs == loaded.member_specs


def _hash_counter(monkeypatch):
    """Count ``ensemble.sealed``'s sha256 computations per file; start from an empty memo."""
    from collections import Counter

    from ensemble import sealed
    counts: Counter = Counter()
    real = sealed.sha256_file

    def counted(path, *args):
        counts[Path(path)] += 1
        return real(path, *args)
    monkeypatch.setattr(sealed, "sha256_file", counted)
    monkeypatch.setattr(sealed, "_DIGESTS", {})
    return counts


def test_each_file_is_hashed_once_per_process_and_again_when_it_changes(ens_env, monkeypatch):
    _build(ens_env)
    path = ens_env.root / "B"
    counts = _hash_counter(monkeypatch)
    Bundle.load(path)
    n_files = len(json.loads((path / "manifest.json").read_text())["files"])
    assert sum(counts.values()) == n_files and set(counts.values()) == {1}
    Bundle.load(path)
    assert sum(counts.values()) == n_files                      # the memo: nothing hashed again
    weights = path / "members" / "00_a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())                   # the same bytes, written anew
    assert Bundle.load(path).member_names == ["a", "b"] and counts[weights] == 2
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))                            # changed after it was verified
    with pytest.raises(BundleError, match="corrupt file members/00_a/model.safetensors"):
        Bundle.load(path)


def test_the_tuning_descriptors_are_read_on_first_use_and_checked_then(ens_env, monkeypatch):
    from ensemble import bundle as bundle_mod
    built, _ = _build(ens_env)
    reads = []
    real = bundle_mod._read_arrays
    monkeypatch.setattr(bundle_mod, "_read_arrays",
                        lambda root, rel, full=True: (reads.append((rel, full)), real(root, rel, full))[1])
    loaded = Bundle.load(ens_env.root / "B")
    assert not [rel for rel, full in reads if full and rel.startswith("descriptors/")]
    assert np.array_equal(loaded.set_descriptors("query")[1], built.set_descriptors("query")[1])
    assert [rel for rel, full in reads if full] == ["descriptors/00_a.safetensors", "descriptors/01_b.safetensors"]
    again = Bundle.load(ens_env.root / "B")
    f = ens_env.root / "B" / "descriptors" / "01_b.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt file descriptors/01_b.safetensors"):
        again.descriptors


def test_a_folder_that_cannot_be_locked_is_refused_never_used_unlocked(ens_env, monkeypatch):
    import errno
    import fcntl

    from ensemble.sealed import LockError
    bundle, _ = _build(ens_env)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    for attempt in (lambda: Bundle.load(ens_env.root / "B"), lambda: bundle.save(ens_env.root / "C")):
        with pytest.raises(LockError, match=f"{ens_env.root}: cannot lock the folder \\(No locks available\\)"):
            attempt()
    assert not (ens_env.root / "C").exists()
