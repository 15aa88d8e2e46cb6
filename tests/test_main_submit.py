"""main.py's local submission checks its inputs before ranking and scores the labelled queries only
(the NSML functions are stubbed: no checkpoint, no network)."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import main
from competition.console import console
from competition.data import DataError
from competition.submission import build_submission

QUERIES, REFS = ["q0", "q1", "q2"], ["r0", "r1", "r2", "r3"]


@pytest.fixture
def world(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for split, names in (("query", QUERIES), ("reference", REFS)):
        folder = data / "test" / "test_data" / split
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{name}.jpg")
    calls = []

    def infer(query_paths):
        calls.append("infer")
        ranking = np.tile(np.arange(len(REFS)), (len(query_paths), 1))
        return build_submission([main.image_name(p) for p in query_paths], REFS, ranking)

    monkeypatch.setattr(main, "nsml", SimpleNamespace(load_path=lambda path: calls.append("load"), infer=infer))
    state = main.SessionState(str(data), top_k=1000, device="cpu")
    args = argparse.Namespace(checkpoint="unused", out=str(tmp_path / "out"), picture=3, k=1000)
    return SimpleNamespace(data=data, state=state, args=args, calls=calls, out=tmp_path / "out")


def _labels(world, text):
    (world.data / "test" / "labels.csv").write_text("split,name,class\n" + text)


@pytest.mark.parametrize("labels,match", [
    ("query,q0,a\nquery,q1\n", r"labels\.csv:3: 2 fields"),
    ("query,q0,a,extra,more\n", r"labels\.csv:2: 5 fields"),
    ("query,other,a\nreference,r0,a\n", r"labels\.csv: labels none of the 3 queries"),
])
def test_bad_labels_fail_before_any_work(world, labels, match):
    _labels(world, labels)
    with pytest.raises(DataError, match=match):
        main.submit_locally(world.state, world.args)
    assert world.calls == ["load"] and not world.out.exists()  # no ranking


def test_an_empty_query_folder_fails_before_any_work(world):
    for f in (world.data / "test" / "test_data" / "query").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"query: no images"):
        main.submit_locally(world.state, world.args)
    assert world.calls == ["load"] and not world.out.exists()  # no ranking


def test_only_labelled_queries_are_scored(world, capsys):
    _labels(world, "query,q0,a\nquery,q2,b\nreference,r0,a\nreference,r2,b\nreference,r3,a\n")  # q1, r1 lack one
    with console():   # the label coverage is a notice: a command's console shows it on stdout
        scores = main.submit_locally(world.state, world.args)
    printed = capsys.readouterr().out
    assert "scored over 2 labelled queries; 1 queries without a label not scored (e.g. 'q1'); " \
           "1 references without a label count as never relevant (e.g. 'r1')" in printed
    assert world.calls == ["load", "infer"]
    # every query ranks r0 r1 r2 r3: q0 (class a: r0, r3) AP@k = (1 + 2/4) / 2, q2 (class b: r2) AP@k = 1/3
    assert scores["mAP@1000"] == pytest.approx(((1 + 2 / 4) / 2 + 1 / 3) / 2)
    assert scores["Recall@1"] == pytest.approx(0.5) and scores["n_query"] == 2
    assert json.loads((world.out / "scores.json").read_text()) == scores
    assert (world.out / "retrieval.png").is_file() and (world.out / "submission.csv").is_file()


def test_an_out_folder_holding_other_files_is_refused_before_any_work(world):
    from competition.cli import UserError
    world.out.mkdir()
    (world.out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*out: holds 1 entries main.py does not write \(e.g. \['notes.txt'"):
        main.submit_locally(world.state, world.args)
    assert world.calls == [] and [p.name for p in world.out.iterdir()] == ["notes.txt"]


def test_a_new_result_replaces_the_whole_folder(world):
    _labels(world, "query,q0,a\nquery,q1,a\nquery,q2,b\n"
                   "reference,r0,a\nreference,r1,a\nreference,r2,b\nreference,r3,b\n")
    main.submit_locally(world.state, world.args)
    assert sorted(p.name for p in world.out.iterdir()) == sorted(main.OUTPUT_FILES)
    (world.data / "test" / "labels.csv").unlink()
    assert main.submit_locally(world.state, world.args) is None
    # no scores.json or retrieval.png of the earlier run beside the new submission
    assert sorted(p.name for p in world.out.iterdir()) == ["submission.csv", "submission.json"]
    assert not [p for p in world.out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
