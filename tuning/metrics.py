"""Retrieval metrics (mAP, mAP@k, Recall@K) and the submission validator.

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
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _codes(query_labels: Sequence, reference_labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Map both label lists onto shared integer codes."""
    q = np.asarray(query_labels)
    r = np.asarray(reference_labels)
    if q.dtype.kind in "iu" and r.dtype.kind in "iu":
        return q.astype(np.int64), r.astype(np.int64)
    _, inverse = np.unique(np.concatenate([q.astype(str), r.astype(str)]), return_inverse=True)
    return inverse[: len(q)].astype(np.int64), inverse[len(q):].astype(np.int64)


def relevance(rankings: np.ndarray, query_labels: Sequence, reference_labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
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


class SubmissionError(ValueError):
    """A submission that a leaderboard would reject; the message names the queries."""


def _unpack(entry) -> tuple[str, list[str]]:
    """``(i, (query_name, [reference_name, ...]))`` -> (query_name, list)."""
    try:
        _, (query, ranked) = entry
    except (TypeError, ValueError) as exc:
        raise SubmissionError(f"entry {entry!r:.80} is not (i, (query_name, [reference_name, ...]))") from exc
    return query, ranked


def validate_submission(
    submission: Iterable,
    query_names: Sequence[str],
    reference_names: Sequence[str],
    length: int | None = 1000,
) -> dict[str, list[str]]:
    """Check a submission and return it as ``{query_name: [reference_name, ...]}``.

    ``submission`` is NSML's ``[(i, (query_name, [reference_name, ...])), ...]``
    or a ``{query_name: [...]}`` mapping. Every query must appear once, every
    listed reference must exist, no reference may appear twice in one list, and
    each list must hold ``min(length, n_references)`` names (all of them when
    ``length`` is None). Raises ``SubmissionError`` listing the offending queries.
    """
    items = list(submission.items()) if isinstance(submission, dict) else [_unpack(e) for e in submission]
    refs = set(reference_names)
    expected = len(refs) if length is None else min(length, len(refs))
    problems: list[str] = []
    result: dict[str, list[str]] = {}
    for query, ranked in items:
        ranked = list(ranked)
        if query in result:
            problems.append(f"query {query!r}: listed twice")
            continue
        result[query] = ranked
        unknown = [r for r in ranked if r not in refs]
        if unknown:
            problems.append(f"query {query!r}: {len(unknown)} unknown reference ids, e.g. {unknown[:3]}")
        if len(set(ranked)) != len(ranked):
            seen, dups = set(), []
            for r in ranked:
                if r in seen:
                    dups.append(r)
                seen.add(r)
            problems.append(f"query {query!r}: duplicate reference ids {dups[:3]}")
        if len(ranked) != expected:
            problems.append(f"query {query!r}: {len(ranked)} references listed, {expected} required")
    wanted = set(query_names)
    missing = [q for q in query_names if q not in result]
    extra = [q for q in result if q not in wanted]
    if missing:
        problems.append(f"{len(missing)} queries missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unknown queries, e.g. {extra[:3]}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SubmissionError(f"invalid submission ({len(problems)} problems):\n  {shown}{more}")
    return result


def rankings_from_names(
    submission: dict[str, list[str]], query_names: Sequence[str], reference_names: Sequence[str]
) -> np.ndarray:
    """Turn ``{query: [reference names]}`` into an index array (-1 pads short lists)."""
    position = {name: i for i, name in enumerate(reference_names)}
    width = max((len(v) for v in submission.values()), default=0)
    out = np.full((len(query_names), width), -1, dtype=np.int64)
    for row, q in enumerate(query_names):
        ranked = submission[q]
        out[row, : len(ranked)] = [position[r] for r in ranked]
    return out
