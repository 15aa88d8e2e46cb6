"""The submission rules: validation, building, writing, local scoring; the NSML stand-in."""
import csv
import json

import numpy as np
import pytest

from competition.metrics import mean_average_precision
from competition.nsml_local import bind, checkpoint_dir, load, save
from competition.submission import (
    SubmissionError,
    build_submission,
    rankings_from_names,
    score_submission,
    validate_submission,
    write_submission,
)

QUERIES = ["qa", "qb"]
REFS = ["r0", "r1", "r2", "r3"]
LABELS = {"query": {"qa": "x", "qb": "y"}, "reference": {"r0": "x", "r1": "y", "r2": "x", "r3": "y"}}


def test_duplicates_padding_and_unknown_indices_never_reach_the_output():
    indices = np.array([[2, 2, -1, 0], [3, 9, 3, 1]])
    sub = build_submission(QUERIES, REFS, indices, length=3)
    assert sub == [(0, ("qa", ["r2", "r0", "r1"])), (1, ("qb", ["r3", "r1", "r0"]))]
    validate_submission(sub, QUERIES, REFS, length=3)
    full = build_submission(QUERIES, REFS, indices, length=None)
    assert all(len(refs) == 4 and len(set(refs)) == 4 for _, (_, refs) in full)


def test_local_score_equals_metrics_module():
    rng = np.random.default_rng(0)
    indices = np.stack([rng.permutation(4) for _ in QUERIES])
    sub = validate_submission(build_submission(QUERIES, REFS, indices, length=1000), QUERIES, REFS, length=1000)
    scores = score_submission(sub, LABELS, query_names=QUERIES, reference_names=REFS)
    q_labels = [LABELS["query"][q] for q in QUERIES]
    r_labels = [LABELS["reference"][r] for r in REFS]
    assert scores["map_at_k"] == pytest.approx(mean_average_precision(indices, q_labels, r_labels, k=1000))
    assert scores["map"] == pytest.approx(mean_average_precision(indices, q_labels, r_labels))


def test_written_files_round_trip(tmp_path):
    sub = build_submission(QUERIES, REFS, np.array([[0, 1], [3, 2]]), length=2)
    json_path, csv_path = write_submission(sub, tmp_path)
    assert json.loads(json_path.read_text()) == {"qa": ["r0", "r1"], "qb": ["r3", "r2"]}
    rows = list(csv.DictReader(open(csv_path)))
    assert rows == [{"query": "qa", "references": "r0 r1"}, {"query": "qb", "references": "r3 r2"}]


def test_local_nsml_save_and_load_call_the_bound_functions(tmp_path, monkeypatch):
    monkeypatch.setattr("competition.nsml_local.CHECKPOINT_ROOT", tmp_path)
    seen = []
    bind(save=lambda d: (open(f"{d}/w.txt", "w").write("hi"), seen.append(("save", d))),
         load=lambda d: seen.append(("load", open(f"{d}/w.txt").read())))
    target = save("final", session="s1")
    assert target == checkpoint_dir("final", "s1") and (target / "w.txt").is_file()
    load("final", session="s1")
    assert seen[-1] == ("load", "hi")
    with pytest.raises(FileNotFoundError, match="other"):
        load("final", session="other")


Q12, R123 = ["q1", "q2"], ["r1", "r2", "r3"]


def test_validator_accepts_nsml_format_and_rankings_round_trip():
    sub = [(0, ("q1", ["r2", "r1"])), (1, ("q2", ["r3", "r1"]))]
    parsed = validate_submission(sub, Q12, R123, length=2)
    assert parsed == {"q1": ["r2", "r1"], "q2": ["r3", "r1"]}
    assert rankings_from_names(parsed, Q12, R123).tolist() == [[1, 0], [2, 0]]


@pytest.mark.parametrize("sub,match", [
    ({"q1": ["r1", "r1", "r2"], "q2": ["r1", "r2", "r3"]}, "q1.*duplicate"),
    ({"q1": ["r1", "r9", "r2"], "q2": ["r1", "r2", "r3"]}, "q1.*unknown reference"),
    ({"q1": ["r1", "r2", "r3"]}, "missing.*q2"),
    ({"q1": ["r1", "r2", "r3"], "q2": ["r1", "r2"]}, "q2.*2 references listed, 3 required"),
    ({"q1": ["r1", "r2", "r3"], "q2": ["r1", "r2", "r3"], "q3": ["r1", "r2", "r3"]}, "unknown queries.*q3"),
])
def test_validator_names_the_query(sub, match):
    with pytest.raises(SubmissionError, match=match):
        validate_submission(sub, Q12, R123, length=None)


def test_validator_rejects_malformed_entries():
    with pytest.raises(SubmissionError, match="not \\(i, \\(query_name"):
        validate_submission([("q1", ["r1"])], Q12, R123)
