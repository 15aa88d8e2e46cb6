"""Retrieval metrics: mAP, the hackathon's mAP@k, Recall@K.

Definitions, for one query with ranking r_1, r_2, ... (best first) and
rel_i = 1 when r_i has the query's class:

* P@i = (1/i) * sum_{j<=i} rel_j.
* R = number of references relevant to the query (in the whole reference set).
* AP (k=None) = (1/R) * sum_i P@i * rel_i over the whole ranking given; relevant
  references missing from the ranking add nothing. With a full ranking this is
  sklearn's ``average_precision_score``.
* AP@k, the hackathon's mAP@k (normaliser="relevant", default)
  = (1/min(R, k)) * sum_{i<=k} P@i * rel_i.
  With normaliser="hits" (what some libraries use) the sum is divided by the
  number of relevant references within the top k instead.
* A query with R = 0 (or no hit, for "hits") scores 0.
* Recall@K (Lifted Structured Feature Embedding, as the hackathon cites it):
  1 when any of the top K is relevant, averaged over queries.

mAP is the mean of AP over all queries. Rankings are (n_queries, m) integer
arrays of reference indices; -1 marks an empty slot (never relevant).

Score names: code spells them ``map_at_k`` (mAP@k), ``map`` (mAP over the whole
list) and ``recall_at_<n>``; files (scores.json, logs, reports) spell them as
people read them, ``mAP@<k>``, ``mAP`` and ``Recall@<n>`` (``file_keys``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _codes(query_labels: Sequence, reference_labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Map both label lists onto shared integer codes."""
    q = np.asarray(query_labels)
    r = np.asarray(reference_labels)
    if q.dtype.kind in "iu" and r.dtype.kind in "iu":
        return q.astype(np.int64), r.astype(np.int64)
    _, inverse = np.unique(np.concatenate([q.astype(str), r.astype(str)]), return_inverse=True)
    return inverse[: len(q)].astype(np.int64), inverse[len(q):].astype(np.int64)


def relevance(rankings: np.ndarray, query_labels: Sequence,
              reference_labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Return (rel (nq, m) bool, n_relevant (nq,) int): the hit matrix and R per query."""
    rankings = np.asarray(rankings)
    if rankings.ndim != 2:
        raise ValueError(f"rankings must be a 2-D (n_queries, m) array, got shape {rankings.shape}")
    q, r = _codes(query_labels, reference_labels)
    if rankings.shape[0] != len(q):
        raise ValueError(f"rankings has {rankings.shape[0]} rows but there are {len(q)} query labels")
    if rankings.size and (rankings.max() >= len(r) or rankings.min() < -1):
        raise ValueError(f"rankings hold indices outside [-1, {len(r) - 1}]")
    valid = rankings >= 0
    rel = valid & (r[np.where(valid, rankings, 0)] == q[:, None])
    n_classes = int(max(q.max(initial=-1), r.max(initial=-1))) + 1
    per_class = np.bincount(r, minlength=n_classes)
    return rel, per_class[q]


def average_precision(
    rankings: np.ndarray,
    query_labels: Sequence,
    reference_labels: Sequence,
    k: int | None = None,
    normaliser: str = "relevant",
) -> np.ndarray:
    """Return AP (or AP@k) per query, shape (n_queries,) float64. See the module docstring."""
    if normaliser not in ("relevant", "hits"):
        raise ValueError(f"normaliser must be 'relevant' or 'hits', got {normaliser!r}")
    if k is not None and k < 1:
        raise ValueError(f"k must be a positive integer or None, got {k}")
    rel, n_relevant = relevance(rankings, query_labels, reference_labels)
    if k is not None:
        rel = rel[:, :k]
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    summed = (hits / ranks * rel).sum(axis=1)
    if normaliser == "hits":
        denom = rel.sum(axis=1).astype(np.float64)
    elif k is None:
        denom = n_relevant.astype(np.float64)
    else:
        denom = np.minimum(n_relevant, k).astype(np.float64)
    return np.divide(summed, denom, out=np.zeros_like(summed), where=denom > 0)


def mean_average_precision(
    rankings: np.ndarray,
    query_labels: Sequence,
    reference_labels: Sequence,
    k: int | None = None,
    normaliser: str = "relevant",
) -> float:
    """mAP (k=None) or the hackathon's mAP@k over all queries; see the module docstring."""
    ap = average_precision(rankings, query_labels, reference_labels, k=k, normaliser=normaliser)
    return float(ap.mean()) if ap.size else 0.0


def recall_at_k(rankings: np.ndarray, query_labels: Sequence, reference_labels: Sequence, k: int) -> float:
    """Fraction of queries with at least one relevant reference in the top k."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    rel, _ = relevance(rankings, query_labels, reference_labels)
    return float(rel[:, :k].any(axis=1).mean()) if rel.shape[0] else 0.0


def retrieval_scores(rankings: np.ndarray, query_labels: Sequence, reference_labels: Sequence, k: int = 1000,
                     recall_at: Sequence[int] = (1,), with_map: bool = False) -> dict[str, float]:
    """Return ``{"map_at_k": mAP@k, "recall_at_<n>": Recall@n for n in recall_at}`` (and ``"map"``
    over the whole list when ``with_map``)."""
    out = {"map_at_k": mean_average_precision(rankings, query_labels, reference_labels, k=k)}
    if with_map:
        out["map"] = mean_average_precision(rankings, query_labels, reference_labels)
    for n in recall_at:
        out[f"recall_at_{n}"] = recall_at_k(rankings, query_labels, reference_labels, n)
    return out


def file_keys(scores: dict[str, float], k: int) -> dict[str, float]:
    """Spell score keys as files show them: map_at_k -> ``mAP@<k>``, map -> ``mAP``,
    recall_at_n -> ``Recall@n``; other keys (counts) pass through."""
    out = {}
    for key, value in scores.items():
        if key == "map_at_k":
            key = f"mAP@{k}"
        elif key == "map":
            key = "mAP"
        elif key.startswith("recall_at_"):
            key = "Recall@" + key[len("recall_at_"):]
        out[key] = value
    return out
