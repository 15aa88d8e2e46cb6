"""Ensemble members: run directories and precomputed descriptor files."""
import json
from pathlib import Path

import numpy as np
import pytest
from _image_data import train_paths as _train_paths

from competition.fileio import sha256_file
from ensemble.members import TTA, FileMember, MemberError, RunMember, open_member


def test_file_member_looks_up_descriptors_by_id_or_name(tmp_path):
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(4, 5)).astype(np.float32)
    np.save(tmp_path / "m.npy", desc)
    (tmp_path / "m.txt").write_text("k0/0.png\nk1/0\nq_17\nref.jpg\n")  # id, id w/o ext, name, file name
    m = FileMember.from_file(tmp_path / "m.npy")
    assert (m.name, m.dim, m.split_hash, m.train_classes) == ("m", 5, None, None)
    asked = [Path("/x/ref.jpg"), Path("/d/k1/0.png"), Path("/d/k0/0.png"), Path("/q/q_17.png"),
             Path("/d/k2/0.png")]
    with pytest.warns(UserWarning, match="1 images not in m.npy"):
        out, ok = m.describe(asked)
    assert ok.tolist() == [True, True, True, True, False]
    unit = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    assert np.allclose(out, unit[[3, 1, 0, 2]], atol=1e-6)


def test_file_member_json_names_and_sidecar(tmp_path):
    np.save(tmp_path / "e.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "e.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    (tmp_path / "e.meta.json").write_text(json.dumps({"split_hash": "abc", "train_classes": ["x"], "name": "ext"}))
    m = open_member(tmp_path / "e.npy")
    assert isinstance(m, FileMember) and (m.name, m.split_hash, m.train_classes) == ("ext", "abc", ("x",))
    out, ok = m.describe([Path("c.png"), Path("a.png")])
    assert ok.all() and np.array_equal(out, np.eye(3, dtype=np.float32)[[2, 0]])
    assert set(m.files()) == {"descriptors.npy", "names.json", "descriptors.meta.json"}
    (tmp_path / "e.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(MemberError, match="2 names"):
        FileMember.from_file(tmp_path / "e.npy")


def test_run_member_reads_config_and_uses_the_cache(ens_env):
    run = ens_env.make_run("alpha", dim=6)
    m = open_member(run, extractor=ens_env.extractor, cache_dir=ens_env.root / "cache", tta=TTA(flip=True))
    assert isinstance(m, RunMember)
    assert (m.name, m.dim, m.split_hash) == ("alpha", 6, ens_env.split.hash)
    assert m.train_classes == ens_env.split.train_classes
    assert m.fingerprint == sha256_file(run / "model.safetensors")
    paths = _train_paths(ens_env.data)
    desc, ok = m.describe(paths, set_name="train")
    assert desc.shape == (len(paths), 6) and ok.all()
    calls = ens_env.extractor.calls
    desc2, _ = m.describe(paths, set_name="train")
    assert ens_env.extractor.calls == calls and np.array_equal(desc, desc2)
    assert m.spec()["tta"] == {"flip": True, "scales": [1.0]}


def test_open_member_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(MemberError, match="model.safetensors missing|config.json missing"):
        open_member(tmp_path / "run")
    np.save(tmp_path / "x.npy", np.zeros((2, 2)))
    with pytest.raises(MemberError, match="no names file"):
        open_member(tmp_path / "x.npy")
