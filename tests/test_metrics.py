"""Metrics against sklearn and hand-computed cases; the submission validator."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tuning.metrics import (
    SubmissionError, average_precision, mean_average_precision, rankings_from_names,
    recall_at_k, validate_submission,
)


def test_full_ranking_ap_matches_sklearn():
    rng = np.random.default_rng(0)
    nq, nr, n_classes = 40, 60, 6
    q_labels = rng.integers(0, n_classes, nq)
    r_labels = rng.integers(0, n_classes, nr)
    scores = rng.normal(size=(nq, nr))
    rankings = np.argsort(-scores, axis=1)
    ours = average_precision(rankings, q_labels, r_labels)
    for i in range(nq):
        y = r_labels == q_labels[i]
        if y.any():
            assert ours[i] == pytest.approx(average_precision_score(y, scores[i]), abs=1e-12)
        else:
            assert ours[i] == 0.0


def test_hand_computed_map_at_k():
    # relevant refs: 0, 2, 5 (class "a"); R = 3
    r_labels = ["a", "b", "a", "b", "b", "a"]
    ranking = np.array([[0, 1, 2, 3, 4, 5]])
    # hits at ranks 1, 3, 6: P = 1, 2/3, 3/6
    assert mean_average_precision(ranking, ["a"], r_labels) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    # @2: one hit at rank 1; hackathon normaliser min(R, k) = 2
    assert mean_average_precision(ranking, ["a"], r_labels, k=2) == pytest.approx(0.5)
    # the other convention divides by the hits in the top k = 1
    assert mean_average_precision(ranking, ["a"], r_labels, k=2, normaliser="hits") == pytest.approx(1.0)
    # @4: hits at 1, 3 -> (1 + 2/3) / min(3, 4)
    assert mean_average_precision(ranking, ["a"], r_labels, k=4) == pytest.approx((1 + 2 / 3) / 3)


def test_truncated_ranking_and_padding_and_no_relevant():
    r_labels = ["a", "b", "a"]
    # only one of two relevant listed: AP = 1/2
    assert mean_average_precision(np.array([[0, -1, -1]]), ["a"], r_labels) == pytest.approx(0.5)
    # a query whose class has no reference scores 0
    assert mean_average_precision(np.array([[0, 1, 2]]), ["z"], r_labels, k=2) == 0.0


def test_recall_at_k():
    r_labels = [0, 1, 1, 0]
    rankings = np.array([[1, 2, 0, 3], [1, 0, 2, 3]])
    assert recall_at_k(rankings, [0, 1], r_labels, 1) == pytest.approx(0.5)
    assert recall_at_k(rankings, [0, 1], r_labels, 3) == pytest.approx(1.0)


def test_bad_rankings_are_refused():
    with pytest.raises(ValueError, match="outside"):
        mean_average_precision(np.array([[5]]), [0], [0, 0])
    with pytest.raises(ValueError, match="rows"):
        mean_average_precision(np.array([[0], [1]]), [0], [0, 0])


QUERIES, REFS = ["q1", "q2"], ["r1", "r2", "r3"]


def test_validator_accepts_nsml_format_and_rankings_round_trip():
    sub = [(0, ("q1", ["r2", "r1"])), (1, ("q2", ["r3", "r1"]))]
    parsed = validate_submission(sub, QUERIES, REFS, length=2)
    assert parsed == {"q1": ["r2", "r1"], "q2": ["r3", "r1"]}
    assert rankings_from_names(parsed, QUERIES, REFS).tolist() == [[1, 0], [2, 0]]


@pytest.mark.parametrize("sub,match", [
    ({"q1": ["r1", "r1", "r2"], "q2": ["r1", "r2", "r3"]}, "q1.*duplicate"),
    ({"q1": ["r1", "r9", "r2"], "q2": ["r1", "r2", "r3"]}, "q1.*unknown reference"),
    ({"q1": ["r1", "r2", "r3"]}, "missing.*q2"),
    ({"q1": ["r1", "r2", "r3"], "q2": ["r1", "r2"]}, "q2.*2 references listed, 3 required"),
    ({"q1": ["r1", "r2", "r3"], "q2": ["r1", "r2", "r3"], "q3": ["r1", "r2", "r3"]}, "unknown queries.*q3"),
])
def test_validator_names_the_query(sub, match):
    with pytest.raises(SubmissionError, match=match):
        validate_submission(sub, QUERIES, REFS, length=None)


def test_validator_rejects_malformed_entries():
    with pytest.raises(SubmissionError, match="not \\(i, \\(query_name"):
        validate_submission([("q1", ["r1"])], QUERIES, REFS)
