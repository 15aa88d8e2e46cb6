"""Turn rankings into a leaderboard submission, write it, and score it locally."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from backbones.fileio import atomic_write_text
from tuning.metrics import (
    mean_average_precision, rankings_from_names, recall_at_k, validate_submission,
)

Submission = list[tuple[int, tuple[str, list[str]]]]


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
    submission: Submission | dict[str, list[str]],
    labels: dict[str, dict[str, str]],
    length: int | None = 1000,
    query_names: Sequence[str] | None = None,
    reference_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Validate a submission and score it as a leaderboard would.

    ``labels`` is ``backbones.data.read_labels(...)``. Returns mAP@1000 (the
    hackathon's), mAP over the list, and Recall@1/5/10.
    """
    queries = list(query_names) if query_names is not None else sorted(labels["query"])
    refs = list(reference_names) if reference_names is not None else sorted(labels["reference"])
    parsed = validate_submission(submission, queries, refs, length=length)
    rankings = rankings_from_names(parsed, queries, refs)
    q_labels = [labels["query"][q] for q in queries]
    r_labels = [labels["reference"][r] for r in refs]
    scores = {"mAP@1000": mean_average_precision(rankings, q_labels, r_labels, k=1000),
              "mAP": mean_average_precision(rankings, q_labels, r_labels)}
    for k in (1, 5, 10):
        scores[f"Recall@{k}"] = recall_at_k(rankings, q_labels, r_labels, k)
    return scores
