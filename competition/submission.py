"""The submission rules: what a leaderboard accepts, how rankings become a submission,
how it is written, and how it is scored locally.

A submission is NSML's ``[(i, (query_name, [reference_name, ...])), ...]``: every query
once, each list ``min(length, n_references)`` distinct, known reference names, best
first (``length`` 1000 in the hackathon's phase 2, None = every reference in phase 1).
``validate_submission`` checks exactly that; ``build_submission`` can only produce
valid ones.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from competition.cli import UserError
from competition.fileio import atomic_write_text
from competition.metrics import retrieval_scores

Submission = list[tuple[int, tuple[str, list[str]]]]


class SubmissionError(UserError, ValueError):
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


def build_submission(
    query_names: Sequence[str],
    reference_names: Sequence[str],
    indices: np.ndarray,
    length: int | None = 1000,
) -> Submission:
    """Return NSML's ``[(i, (query_name, [reference_name, ...])), ...]``.

    ``indices`` (n_queries, m) holds reference indices best first; -1 slots and
    repeats are dropped, and a list shorter than ``min(length, n_references)``
    (all references when ``length`` is None) is completed with the references
    it lacks, in index order, so every list is valid.
    """
    indices = np.asarray(indices)
    if indices.shape[0] != len(query_names):
        raise ValueError(f"{indices.shape[0]} ranking rows for {len(query_names)} queries")
    n_refs = len(reference_names)
    want = n_refs if length is None else min(length, n_refs)
    out: Submission = []
    for row, query in enumerate(query_names):
        ranked = indices[row]
        ranked = ranked[(ranked >= 0) & (ranked < n_refs)]
        _, first = np.unique(ranked, return_index=True)
        ranked = ranked[np.sort(first)][:want]
        if len(ranked) < want:
            missing = np.setdiff1d(np.arange(n_refs), ranked, assume_unique=False)
            ranked = np.concatenate([ranked, missing[: want - len(ranked)]])
        out.append((row, (query, [reference_names[i] for i in ranked])))
    return out


def write_submission(submission: Submission, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``submission.json`` and a Kaggle-style ``submission.csv`` (query,references) atomically."""
    out_dir = Path(out_dir)
    as_dict = {q: refs for _, (q, refs) in submission}
    json_path, csv_path = out_dir / "submission.json", out_dir / "submission.csv"
    atomic_write_text(json_path, json.dumps(as_dict) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query", "references"])
    for q, refs in as_dict.items():
        writer.writerow([q, " ".join(refs)])
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def score_submission(
    submission: dict[str, list[str]],
    labels: dict[str, dict[str, str]],
    query_names: Sequence[str],
    reference_names: Sequence[str],
    k: int = 1000,
) -> dict[str, float]:
    """Score a validated submission (``validate_submission``'s ``{query: [references]}``) as a
    leaderboard would: ``{"map_at_k", "map", "recall_at_1", "recall_at_5", "recall_at_10"}``.

    ``labels`` is ``competition.data.read_labels(...)``.
    """
    rankings = rankings_from_names(submission, query_names, reference_names)
    q_labels = [labels["query"][q] for q in query_names]
    r_labels = [labels["reference"][r] for r in reference_names]
    return retrieval_scores(rankings, q_labels, r_labels, k=k, recall_at=(1, 5, 10), with_map=True)
