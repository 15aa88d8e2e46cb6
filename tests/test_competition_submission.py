"""The submission rules: validation, building, writing, local scoring; the NSML stand-in."""
import csv
import io
import json
import re

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


AWKWARD_QUERIES = ["plain", "with space", "c,omma", 'quo"te', "ünï©ødé-🦊", "tab\there", "new\nline", "cr\rhere",
                   " lead", "trail ", "nbsp\u00a0x", "query", ""]
SAFE_REFS = ["r0", "c,omma", 'quo"te', "'single'", "ünï©ødé", "semi;colon", "r.dots.jpg"]


def _read_back(json_path, csv_path):
    with open(json_path, encoding="utf-8") as fh:
        from_json = json.load(fh)
    from_csv = None
    if csv_path is not None:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            from_csv = {row["query"]: row["references"].split() for row in csv.DictReader(fh)}
    return from_json, from_csv


def test_awkward_query_names_round_trip_through_both_files(tmp_path):
    rng = np.random.default_rng(0)
    sub = [(i, (q, [SAFE_REFS[j] for j in rng.permutation(len(SAFE_REFS))[:5]])) for i, q in enumerate(AWKWARD_QUERIES)]
    json_path, csv_path = write_submission(sub, tmp_path)
    submitted = {q: refs for _, (q, refs) in sub}
    from_json, from_csv = _read_back(json_path, csv_path)
    assert from_json == submitted and from_csv == submitted
    assert list(from_csv) == AWKWARD_QUERIES  # order kept too
    from competition.submission import parse_submission_csv
    assert parse_submission_csv(csv_path.read_bytes().decode("utf-8")) == submitted


@pytest.mark.parametrize("bad_ref", ["r-with space", "tab\tref", "nl\nref", "nbsp\u00a0ref", "", "sur\udc80rogate"])
def test_reference_names_the_csv_cannot_carry_get_the_json_and_a_warning(tmp_path, bad_ref):
    (tmp_path / "submission.csv").write_text("query,references\nold,stale\n")  # an earlier run's file
    sub = [(0, ("q0", ["r0", bad_ref, "r1"])), (1, ("q1", ["r1", "r0", bad_ref]))]
    with pytest.warns(UserWarning, match=r"submission\.csv not written: 1 names .*" + re.escape(repr(bad_ref))):
        json_path, csv_path = write_submission(sub, tmp_path)
    assert csv_path is None and not (tmp_path / "submission.csv").exists()
    from_json, _ = _read_back(json_path, None)
    assert from_json == {"q0": ["r0", bad_ref, "r1"], "q1": ["r1", "r0", bad_ref]}


def test_a_query_listed_twice_is_refused_before_writing(tmp_path):
    with pytest.raises(SubmissionError, match="'qa' listed twice"):
        write_submission([(0, ("qa", ["r0"])), (1, ("qa", ["r1"]))], tmp_path)
    assert not list(tmp_path.iterdir())


def _slow_scores(sub, labels, queries, refs, k=1000):
    """AP@k and Recall@1 by hand over the labelled queries; unlabelled references never relevant."""
    aps, hits1 = [], []
    for q in queries:
        if q not in labels["query"]:
            continue
        cls = labels["query"][q]
        relevant = [r for r in refs if labels["reference"].get(r) == cls]
        found, total = 0, 0.0
        for i, r in enumerate(sub[q][:k], start=1):
            if labels["reference"].get(r) == cls:
                found += 1
                total += found / i
        aps.append(total / min(len(relevant), k) if relevant else 0.0)
        hits1.append(labels["reference"].get(sub[q][0]) == cls)
    return sum(aps) / len(aps), sum(hits1) / len(hits1)


def test_only_labelled_queries_are_scored_and_unlabelled_references_never_count():
    from competition.submission import label_coverage
    queries, refs = ["qa", "qb", "qc", "qd"], ["r0", "r1", "r2", "r3", "r4", "r5"]
    labels = {"query": {"qa": "x", "qb": "y", "qd": "none"},
              "reference": {"r0": "x", "r1": "y", "r2": "x", "r4": "y"}}  # qc, r3, r5 unlabelled
    rng = np.random.default_rng(1)
    sub = {q: [refs[j] for j in rng.permutation(len(refs))] for q in queries}
    sub["qb"] = ["r3", "r5", "r1", "r0", "r4", "r2"]  # unlabelled references first: no hits
    scores = score_submission(sub, labels, query_names=queries, reference_names=refs)
    map_k, recall_1 = _slow_scores(sub, labels, queries, refs)
    assert scores["map_at_k"] == pytest.approx(map_k) and scores["recall_at_1"] == pytest.approx(recall_1)
    assert (scores["n_query"], scores["n_query_unlabelled"], scores["n_reference_unlabelled"]) == (3, 1, 2)
    coverage = label_coverage(labels, queries, refs)
    assert coverage.unlabelled_queries == ["qc"] and coverage.unlabelled_references == ["r3", "r5"]
    assert "1 queries without a label not scored (e.g. 'qc')" in coverage.summary()
    assert "2 references without a label count as never relevant" in coverage.summary()
    with pytest.raises(SubmissionError, match="none of the 4 queries has a label"):
        score_submission(sub, {"query": {}, "reference": labels["reference"]}, queries, refs)


def _slow_valid(row, n_refs, want):
    """The rule by hand: the first ``want`` entries are distinct indices in [0, n_refs)."""
    head = list(row[:want])
    return len(head) == want and all(0 <= i < n_refs for i in head) and len(set(head)) == want


def test_rankings_are_checked_once_as_indices_and_only_broken_rows_repaired():
    from competition.submission import Submission, check_rankings
    rng = np.random.default_rng(3)
    n_refs, want = 6, 4
    rows = [rng.permutation(n_refs)[:5] for _ in range(40)]
    for r in rows[::3]:
        r[rng.integers(0, 3)] = rng.choice([-1, n_refs, r[3]])  # out of range, or a repeat of the fourth
    indices = np.array(rows)
    assert check_rankings(indices, n_refs, want).tolist() == [_slow_valid(r, n_refs, want) for r in rows]
    queries = [f"q{i}" for i in range(len(rows))]
    refs = [f"r{i}" for i in range(n_refs)]
    sub = build_submission(queries, refs, indices, length=want)
    assert isinstance(sub, Submission) and sub.indices.shape == (len(rows), want) and sub.reference_names == refs
    for (i, (q, ranked)), row, carried in zip(sub, rows, sub.indices):
        assert q == queries[i] and ranked == [refs[j] for j in carried] and len(set(ranked)) == want
        if _slow_valid(row, n_refs, want):
            assert carried.tolist() == list(row[:want])
    short = build_submission(QUERIES, REFS, np.array([[1], [3]]), length=None)   # one column for four wanted
    assert [refs for _, (_, refs) in short] == [["r1", "r0", "r2", "r3"], ["r3", "r0", "r1", "r2"]]
    with pytest.raises(SubmissionError, match=r"listed twice: \['qa'\]"):
        build_submission(["qa", "qa"], REFS, np.zeros((2, 1), int), length=1)


@pytest.mark.parametrize("refs", [SAFE_REFS, ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]])
def test_streamed_files_are_what_json_and_csv_write(tmp_path, refs):
    rng = np.random.default_rng(0)
    indices = np.stack([rng.permutation(len(refs))[:5] for _ in AWKWARD_QUERIES])
    sub = build_submission(AWKWARD_QUERIES, refs, indices, length=5)
    json_path, csv_path = write_submission(sub, tmp_path)
    as_dict = {q: ranked for _, (q, ranked) in sub}
    assert json_path.read_text(encoding="utf-8") == json.dumps(as_dict) + "\n"
    expected = io.StringIO()
    writer = csv.writer(expected, lineterminator="\r\n")
    writer.writerows([["query", "references"]] + [[q, " ".join(r)] for q, r in as_dict.items()])
    assert csv_path.read_bytes().decode("utf-8") == expected.getvalue()
    assert write_submission(list(sub), tmp_path / "plain")[0].read_bytes() == json_path.read_bytes()


def test_scores_from_indices_equal_scores_from_names():
    from competition.submission import score_rankings
    queries, refs = ["qa", "qb", "qc", "qd"], ["r0", "r1", "r2", "r3", "r4", "r5"]
    labels = {"query": {"qa": "x", "qb": "y", "qd": "none"},
              "reference": {"r0": "x", "r1": "y", "r2": "x", "r4": "y"}}
    rng = np.random.default_rng(2)
    sub = build_submission(queries, refs, np.stack([rng.permutation(6) for _ in queries]), length=4)
    by_names = score_submission({q: r for _, (q, r) in sub}, labels, queries, refs, k=3)
    assert score_rankings(sub.indices, labels, queries, refs, k=3) == by_names
