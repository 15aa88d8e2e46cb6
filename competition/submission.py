"""The submission rules: what a leaderboard accepts, how rankings become a submission,
how it is written, and how it is scored locally.

A submission is NSML's ``[(i, (query_name, [reference_name, ...])), ...]``: every query
once, each list ``min(length, n_references)`` distinct, known reference names, best
first (``length`` 1000 in the hackathon's phase 2, None = every reference in phase 1).
``validate_submission`` checks exactly that; ``build_submission`` can only produce
valid ones.

Files (``write_submission``): ``submission.json`` ``{query: [reference, ...]}`` holds any
submission; ``submission.csv`` (Kaggle style, ``query,references`` with space-separated
reference ids, UTF-8, RFC 4180 line ends; read it with ``parse_submission_csv``) is written
only when every name survives that format: a reference name holding whitespace would split
into two ids, so such a submission gets the JSON and a warning naming the names, never a CSV
that reads back differently.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from dataclasses import dataclass
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


def _as_dict(submission: Submission) -> dict[str, list[str]]:
    """NSML's list -> ``{query: [reference, ...]}``; a query listed twice is a ``SubmissionError``."""
    out: dict[str, list[str]] = {}
    for entry in submission:
        query, ranked = _unpack(entry)
        if query in out:
            raise SubmissionError(f"query {query!r} listed twice: a submission file holds each query once")
        out[query] = list(ranked)
    return out


def _utf8(name) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a file name that was not UTF-8
        return False
    return True


def csv_unsafe_names(submission: dict[str, list[str]]) -> list[str]:
    """Return the names (sorted, distinct) that ``submission.csv`` cannot carry: reference names
    that are not one whitespace-free token (empty, or holding a space, tab, newline, non-breaking
    space, ...), and any name that is not a UTF-8-encodable string."""
    bad = {q for q in submission if not (isinstance(q, str) and _utf8(q))}
    bad |= {r for ranked in submission.values() for r in ranked
            if not (isinstance(r, str) and r.split() == [r] and _utf8(r))}
    return sorted(bad, key=repr)


def _csv_text(submission: dict[str, list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180: a name holding \r or \n gets quoted
    writer.writerow(["query", "references"])
    for query, ranked in submission.items():
        writer.writerow([query, " ".join(ranked)])
    return buf.getvalue()


def parse_submission_csv(text: str) -> dict[str, list[str]]:
    """Read ``submission.csv``'s text (open it with ``newline=""``, UTF-8) -> ``{query: [reference, ...]}``."""
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header != ["query", "references"]:
        raise SubmissionError(f"not a submission CSV: header {header!r}, expected ['query', 'references']")
    return {query: refs.split() for query, refs in rows}


def write_submission(submission: Submission, out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write ``submission.json`` and, when its names allow, ``submission.csv`` into ``out_dir``
    atomically; return (json path, csv path or None).

    The CSV is skipped, with a warning naming the offending names (``csv_unsafe_names``), when it
    could not read back to exactly ``submission``; a ``submission.csv`` left by an earlier run is
    then removed. Raises ``SubmissionError`` (nothing written) for a query listed twice or a
    submission JSON cannot hold (names that are not strings).
    """
    out_dir = Path(out_dir)
    as_dict = _as_dict(submission)
    json_path, csv_path = out_dir / "submission.json", out_dir / "submission.csv"
    json_text = json.dumps(as_dict) + "\n"
    if json.loads(json_text) != as_dict:
        bad = [q for q in as_dict if not isinstance(q, str)]
        raise SubmissionError(f"query names must be strings, got {bad[:3]}")
    atomic_write_text(json_path, json_text)
    unsafe = csv_unsafe_names(as_dict)
    if not unsafe:
        csv_text = _csv_text(as_dict)
        parsed = parse_submission_csv(csv_text)  # the rule above should make this a formality
        if parsed == as_dict:
            atomic_write_text(csv_path, csv_text)
            return json_path, csv_path
        unsafe = [q for q in as_dict if parsed.get(q) != as_dict[q]]
    csv_path.unlink(missing_ok=True)
    warnings.warn(f"{csv_path} not written: {len(unsafe)} names would not read back from space-separated "
                  f"reference ids ({', '.join(map(repr, unsafe[:5]))}); {json_path} holds the submission",
                  stacklevel=2)
    return json_path, None


@dataclass
class LabelCoverage:
    """Which queries of a test set are scored, and which names the ground truth lacks."""

    labelled_queries: list[str]        # scored, in the order given
    unlabelled_queries: list[str]      # left out of the scores
    unlabelled_references: list[str]  # ranked, but never relevant

    def summary(self) -> str:
        """One line for people, e.g. 'scored over 8 labelled queries; 2 queries without a label ...'."""
        text = f"scored over {len(self.labelled_queries)} labelled queries"
        if self.unlabelled_queries:
            text += (f"; {len(self.unlabelled_queries)} queries without a label not scored "
                     f"(e.g. {', '.join(map(repr, self.unlabelled_queries[:3]))})")
        if self.unlabelled_references:
            text += (f"; {len(self.unlabelled_references)} references without a label count as never relevant "
                     f"(e.g. {', '.join(map(repr, self.unlabelled_references[:3]))})")
        return text


def label_coverage(labels: dict[str, dict[str, str]], query_names: Sequence[str],
                   reference_names: Sequence[str]) -> LabelCoverage:
    """Split the test set by ``labels`` (``competition.data.read_labels``'s dict)."""
    return LabelCoverage([q for q in query_names if q in labels["query"]],
                         [q for q in query_names if q not in labels["query"]],
                         [r for r in reference_names if r not in labels["reference"]])


def score_submission(
    submission: dict[str, list[str]],
    labels: dict[str, dict[str, str]],
    query_names: Sequence[str],
    reference_names: Sequence[str],
    k: int = 1000,
) -> dict[str, float]:
    """Score a validated submission (``validate_submission``'s ``{query: [references]}``) as a
    leaderboard would, over the queries of ``query_names`` that ``labels``
    (``competition.data.read_labels``) labels; a reference without a label is never relevant
    (``label_coverage`` names both). Returns ``{"map_at_k", "map", "recall_at_1", "recall_at_5",
    "recall_at_10", "n_query": queries scored, "n_query_unlabelled", "n_reference_unlabelled"}``.
    Raises ``SubmissionError`` when no query has a label.
    """
    coverage = label_coverage(labels, query_names, reference_names)
    if not coverage.labelled_queries:
        raise SubmissionError(f"none of the {len(query_names)} queries has a label "
                              f"(e.g. {list(query_names)[:3]}): nothing to score")
    rankings = rankings_from_names(submission, coverage.labelled_queries, reference_names)
    classes = {c: i for i, c in enumerate(sorted(set(labels["query"].values()) | set(labels["reference"].values())))}
    no_class = len(classes)  # what an unlabelled reference gets: no query has it
    q_codes = [classes[labels["query"][q]] for q in coverage.labelled_queries]
    r_codes = [classes[labels["reference"][r]] if r in labels["reference"] else no_class for r in reference_names]
    scores = retrieval_scores(rankings, q_codes, r_codes, k=k, recall_at=(1, 5, 10), with_map=True)
    return {**scores, "n_query": len(coverage.labelled_queries),
            "n_query_unlabelled": len(coverage.unlabelled_queries),
            "n_reference_unlabelled": len(coverage.unlabelled_references)}
