"""Metrics against sklearn and hand-computed cases; score names in code and in files."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from competition.metrics import (
    average_precision,
    file_keys,
    mean_average_precision,
    recall_at_k,
    retrieval_scores,
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


def test_retrieval_scores_and_their_file_spelling():
    ranking = np.array([[1, 0, 2], [0, 2, 1]])
    scores = retrieval_scores(ranking, ["a", "b"], ["a", "b", "a"], k=2, recall_at=(1, 2), with_map=True)
    assert scores["map_at_k"] == pytest.approx(mean_average_precision(ranking, ["a", "b"], ["a", "b", "a"], k=2))
    assert (scores["recall_at_1"], scores["recall_at_2"]) == (0.0, 0.5)
    named = file_keys({**scores, "n_query": 2}, k=2)
    assert set(named) == {"mAP@2", "mAP", "Recall@1", "Recall@2", "n_query"}
    assert named["mAP@2"] == scores["map_at_k"]
