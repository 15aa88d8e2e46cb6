"""ensemble.build: member checks (split, leakage), train subsampling, the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
from _image_data import train_paths

from competition.cli import run_command
from ensemble.build import BuildOptions, MemberCheckError, build_bundle, check_members, main, train_ids_for
from ensemble.bundle import Bundle
from ensemble.members import open_member


def _run(env, name, **kw):
    return open_member(env.make_run(name, **kw), extractor=env.extractor, cache_dir=env.root / "cache")


def _file_member(env, name, meta=None):
    """A FileMember holding descriptors for every train image, named by id."""
    ids = sorted(p.relative_to(env.data / "train" / "train_data").as_posix() for p in train_paths(env.data))
    rng = np.random.default_rng(len(name))
    np.save(env.root / f"{name}.npy", rng.normal(size=(len(ids), 4)).astype(np.float32))
    (env.root / f"{name}.txt").write_text("\n".join(ids) + "\n")
    if meta is not None:
        (env.root / f"{name}.meta.json").write_text(json.dumps(meta))
    return env.root / f"{name}.npy"


def test_leakage_is_refused_naming_member_and_classes(ens_env):
    held = ens_env.split.heldout_classes
    leaky = _run(ens_env, "leaky", classes=list(ens_env.split.train_classes) + [held[0]])
    ok = _run(ens_env, "fine")
    with pytest.raises(MemberCheckError, match=rf"member leaky was trained on 1 held-out classes.*{held[0]}"):
        check_members([ok, leaky], ens_env.split)
    with pytest.raises(MemberCheckError, match="leaky"):
        build_bundle([ok, leaky], ens_env.data, ens_env.split, ens_env.root / "B", BuildOptions(progress=False))
    assert not (ens_env.root / "B").exists() and ens_env.extractor.calls == 0


def test_members_on_different_splits_are_refused(ens_env):
    a = _run(ens_env, "a")
    b = _run(ens_env, "b", split_hash="0123456789abcdef")
    with pytest.raises(MemberCheckError, match=r"different held-out splits: a=\w+, b=0123456789abcdef"):
        check_members([a, b], ens_env.split)
    with pytest.raises(MemberCheckError, match="member b was trained on held-out split 0123456789abcdef"):
        check_members([b], ens_env.split)
    no_split = _run(ens_env, "c", split_hash=None)
    with pytest.raises(MemberCheckError, match="member c: no split_hash"):
        check_members([a, no_split], ens_env.split)


@pytest.mark.filterwarnings("ignore:member ext. train classes unknown")
def test_file_member_without_split_is_allowed_with_a_warning(ens_env):
    f = open_member(_file_member(ens_env, "ext"))
    with pytest.warns(UserWarning, match="member ext: no split_hash"):
        check_members([_run(ens_env, "a"), f], ens_env.split)
    with pytest.raises(MemberCheckError, match="member ext: no split_hash"):
        check_members([f], ens_env.split, allow_unknown_split=False)
    declared = open_member(_file_member(ens_env, "dec", {"split_hash": ens_env.split.hash,
                                                         "train_classes": list(ens_env.split.heldout_classes)}))
    with pytest.raises(MemberCheckError, match="member dec was trained on 2 held-out classes"):
        check_members([declared], ens_env.split)


def test_train_subsample_is_seeded_and_train_classes_only(ens_env):
    a = train_ids_for(ens_env.data, ens_env.split, 7, seed=3)
    assert a == train_ids_for(ens_env.data, ens_env.split, 7, seed=3) and len(a) == 7
    assert {i.split("/")[0] for i in a} <= set(ens_env.split.train_classes)
    assert len(train_ids_for(ens_env.data, ens_env.split, None, 0)) == 4 * len(ens_env.split.train_classes)


def test_unreadable_heldout_image_is_left_out_and_reported(ens_env):
    bad = ens_env.data / "train" / "train_data" / ens_env.split.reference_ids[0]
    bad.write_bytes(b"")
    with pytest.warns(UserWarning):
        bundle, summary = build_bundle([_run(ens_env, "a")], ens_env.data, ens_env.split, ens_env.root / "B",
                                       BuildOptions(progress=False))
    assert summary.unreadable == [str(bad)]
    assert bundle.ids["reference"] == list(ens_env.split.reference_ids[1:])
    assert bundle.set_descriptors("reference")[0].shape[0] == len(ens_env.split.reference_ids) - 1


def test_cli_builds_from_descriptor_files_and_refuses_leakage(ens_env, capsys):
    split_path = ens_env.root / "split.json"
    ens_env.split.save(split_path)
    meta = {"split_hash": ens_env.split.hash, "train_classes": list(ens_env.split.train_classes)}
    m1, m2 = _file_member(ens_env, "one", meta), _file_member(ens_env, "two22", meta)
    out = ens_env.root / "bundle"
    rc = main(["--members", str(m1), str(m2), "--weights", "1", "3", "--data", str(ens_env.data),
               "--out", str(out), "--split", str(split_path), "--max-train-images", "9", "--no-progress"])
    assert rc == 0
    assert capsys.readouterr().out.strip().startswith(f"bundle {out}: 2 members")
    b = Bundle.load(out)
    assert b.post.weights == [1.0, 3.0] and len(b.ids["train"]) == 9 and b.member_names == ["one", "two22"]
    leak = {"split_hash": ens_env.split.hash, "train_classes": list(ens_env.split.heldout_classes[:1])}
    m3 = _file_member(ens_env, "three", leak)
    rc = run_command(main, ["--members", str(m1), str(m3), "--data", str(ens_env.data),
                            "--out", str(ens_env.root / "x"), "--split", str(split_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "member three" in err and ens_env.split.heldout_classes[0] in err


def test_members_trained_on_every_class_are_told_there_is_no_held_out_split(ens_env, capsys):
    from competition.split import HeldoutSplit
    every = HeldoutSplit(tuple(ens_env.split.train_classes) + tuple(ens_env.split.heldout_classes), (), (), (), seed=0)
    run = ens_env.make_run("all", split_hash=every.hash, classes=every.train_classes)
    every.save(run / "split.json")   # what --heldout-fraction 0 leaves in the run folder
    rc = run_command(main, ["--members", str(run), "--data", str(ens_env.data), "--out", str(ens_env.root / "B"),
                            "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {run / 'split.json'}: no held-out split (0 held-out classes")
    assert "--heldout-fraction 0" in err and "no readable" not in err and not (ens_env.root / "B").exists()


def test_a_data_folder_without_the_splits_images_fails_before_extraction(ens_env):
    from competition.data import DataError
    (ens_env.data / "train" / "train_data" / ens_env.split.query_ids[0]).unlink()
    with pytest.raises(DataError, match=r"1 of the split's \d+ held-out images are missing"):
        build_bundle([_run(ens_env, "a")], ens_env.data, ens_env.split, ens_env.root / "B",
                     BuildOptions(progress=False))
    assert ens_env.extractor.calls == 0


@pytest.mark.parametrize("device,needle", [("gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
                                           ("cuda:x", "device must be")])
def test_a_bad_device_is_refused_at_parse_time(ens_env, capsys, device, needle):
    import main as main_py
    for entry in (main, main_py.main):
        with pytest.raises(SystemExit) as info:
            entry(["--members", "r", "--data", str(ens_env.data), "--out", str(ens_env.root / "B"), "--device", device])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: argument --device:") and needle in err
        assert err.count("\n") == 1


def test_flip_is_one_bool_or_one_per_member(ens_env, monkeypatch):
    from competition.cli import UserError
    from ensemble import build as build_mod
    from ensemble.build import BuildConfig, build_from_paths
    seen = []

    def extractor(run_dir, paths, **kw):
        seen.append((Path(run_dir).name, kw["flip"]))
        return ens_env.extractor(run_dir, paths, **kw)
    monkeypatch.setattr(build_mod, "open_member", lambda p, **kw: open_member(p, extractor=extractor, **kw))
    runs = [str(ens_env.make_run(n, dim=4, seed=i)) for i, n in enumerate(("a", "b"))]
    split = ens_env.root / "split.json"
    ens_env.split.save(split)
    bundle, _ = build_from_paths(runs, ens_env.data, ens_env.root / "B",
                                 BuildConfig(split=split, flip=[True, False], progress=False))
    assert [s["tta"]["flip"] for s in bundle.member_specs] == [True, False]
    assert set(seen) == {("a", True), ("b", False)}
    bundle, _ = build_from_paths(runs, ens_env.data, ens_env.root / "C", BuildConfig(split=split, flip=True,
                                                                                     progress=False))
    assert [s["tta"]["flip"] for s in bundle.member_specs] == [True, True]
    with pytest.raises(UserError, match=r"flip: \[True\] should be one bool for every member, or a list of 2"):
        build_from_paths(runs, ens_env.data, ens_env.root / "D", BuildConfig(split=split, flip=[True]))
    assert not (ens_env.root / "D").exists()
