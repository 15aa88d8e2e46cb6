"""The submission rules: what a leaderboard accepts, how rankings become a submission,
how it is written, and how it is scored locally.

A submission is NSML's ``[(i, (query_name, [reference_name, ...])), ...]``: every query
once, each list ``min(length, n_references)`` distinct, known reference names, best
first (``length`` 1000 in the hackathon's phase 2, None = every reference in phase 1).
``validate_submission`` checks exactly that, on names; ``build_submission`` can only produce
valid ones: it checks the rankings once, as index arrays (``check_rankings``), repairs the rows
that break a rule, and returns a ``Submission``, NSML's list that also carries those indices, so
that writing and scoring (``score_rankings``) never turn names back into indices.

Files (``write_submission``): ``submission.json`` ``{query: [reference, ...]}`` holds any
submission; ``submission.csv`` (Kaggle style, ``query,references`` with space-separated
reference ids, UTF-8, RFC 4180 line ends; read it with ``parse_submission_csv``) is written
only when every name survives that format: a reference name holding whitespace would split
into two ids, so such a submission gets the JSON and a warning naming the names, never a CSV
that reads back differently. Names are checked once each (the distinct ones), and both files
are streamed to disk a block of queries at a time.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from competition.cli import UserError
from competition.fileio import atomic_path
from competition.metrics import retrieval_scores

_BLOCK = 1024                        # queries per block when names are made and files written
_CSV_QUOTED = re.compile(r'[,"\r\n]')  # what makes the csv module quote a field (the comma dialect)


class Submission(list):
    """NSML's ``[(i, (query_name, [reference_name, ...])), ...]``. Made by ``build_submission``, it
    also holds ``indices`` (n_queries, L) int64, the same lists as positions in ``reference_names``
    (None for a list made otherwise)."""

    indices: np.ndarray | None = None
    reference_names: Sequence[str] = ()


class SubmissionError(UserError, ValueError):
    """A submission that a leaderboard would reject; the message names the queries."""


def _unpack(entry) -> tuple[str, list[str]]:
    """``(i, (query_name, [reference_name, ...]))`` -> (query_name, list)."""
    try:
        _, (query, ranked) = entry
    except (TypeError, ValueError) as exc:
        raise SubmissionError(f"entry {entry!r:.80} is not (i, (query_name, [reference_name, ...]))") from exc
    return query, ranked


def _repeats(names: Sequence) -> list:
    """The entries of ``names`` that repeat an earlier one, in order ([] when all are distinct)."""
    if len(set(names)) == len(names):
        return []
    seen, repeats = set(), []
    for n in names:
        if n in seen:
            repeats.append(n)
        seen.add(n)
    return repeats


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
        dups = _repeats(ranked)
        if dups:
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


def check_rankings(indices: np.ndarray, n_refs: int, want: int) -> np.ndarray:
    """Return a (n_queries,) bool mask of the rows of ``indices`` (n_queries, m) whose first ``want``
    entries are a valid list: ``want`` distinct indices in [0, n_refs)."""
    if indices.shape[1] < want:
        return np.zeros(len(indices), dtype=bool)
    head = indices[:, :want]
    good = ((head >= 0) & (head < n_refs)).all(axis=1)
    if want > 1:
        ordered = np.sort(head, axis=1)
        good &= (ordered[:, 1:] != ordered[:, :-1]).all(axis=1)
    return good


def _repair_row(ranked: np.ndarray, n_refs: int, want: int) -> np.ndarray:
    """One row made valid: out-of-range slots and repeats dropped, completed in index order."""
    ranked = ranked[(ranked >= 0) & (ranked < n_refs)]
    _, first = np.unique(ranked, return_index=True)
    ranked = ranked[np.sort(first)][:want]
    if len(ranked) < want:
        missing = np.setdiff1d(np.arange(n_refs), ranked, assume_unique=False)
        ranked = np.concatenate([ranked, missing[: want - len(ranked)]])
    return ranked


def build_submission(
    query_names: Sequence[str],
    reference_names: Sequence[str],
    indices: np.ndarray,
    length: int | None = 1000,
) -> Submission:
    """Return NSML's ``[(i, (query_name, [reference_name, ...])), ...]`` as a ``Submission``.

    ``indices`` (n_queries, m) holds reference indices best first. Rows whose first
    ``min(length, n_references)`` entries (all references when ``length`` is None) are
    distinct valid indices are taken as they are (``check_rankings``, the one check); in the
    others -1 slots and repeats are dropped and the list is completed with the references it
    lacks, in index order, so every list is valid. Query names must be distinct.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 2 or indices.shape[0] != len(query_names):
        raise ValueError(f"rankings of shape {indices.shape} for {len(query_names)} queries")
    twice = _repeats(query_names)
    if twice:
        raise SubmissionError(f"query names listed twice: {twice[:3]} (a submission holds each query once)")
    n_refs = len(reference_names)
    want = n_refs if length is None else min(length, n_refs)
    good = check_rankings(indices, n_refs, want)
    rankings = np.empty((len(indices), want), dtype=np.int64)
    if good.any():  # (then every row is at least ``want`` long)
        rankings[good] = indices[good, :want]
    for row in np.flatnonzero(~good):
        rankings[row] = _repair_row(indices[row], n_refs, want)
    names = np.empty(n_refs, dtype=object)
    names[:] = list(reference_names)
    out = Submission()
    for start in range(0, len(rankings), _BLOCK):
        block = names[rankings[start:start + _BLOCK]]
        out.extend((start + i, (query_names[start + i], row.tolist())) for i, row in enumerate(block))
    out.indices, out.reference_names = rankings, reference_names
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


def csv_unsafe_names(submission: dict[str, list[str]], references: Iterable | None = None) -> list[str]:
    """Return the names (sorted, distinct) that ``submission.csv`` cannot carry: reference names
    that are not one whitespace-free token (empty, or holding a space, tab, newline, non-breaking
    space, ...), and any name that is not a UTF-8-encodable string. ``references``: the distinct
    reference names the lists use, when the caller knows them (each name is checked once)."""
    if references is None:
        references = {r for ranked in submission.values() for r in ranked}
    bad = {q for q in submission if not (isinstance(q, str) and _utf8(q))}
    bad |= {r for r in references if not (isinstance(r, str) and r.split() == [r] and _utf8(r))}
    return sorted(bad, key=repr)


def _write_csv(path: Path, submission: dict[str, list[str]], references_quoted: bool) -> None:
    """Stream ``submission.csv``: what ``csv.writer`` writes (RFC 4180 line ends, a name holding
    ``,`` ``"`` \\r or \\n quoted); rows that need no quoting are formatted directly."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(["query", "references"])
        lines = []
        for query, ranked in submission.items():
            joined = " ".join(ranked)
            if references_quoted or not joined or _CSV_QUOTED.search(query):
                fh.write("".join(lines))
                lines = []
                writer.writerow([query, joined])
            else:
                lines.append(f"{query},{joined}\r\n")
                if len(lines) == _BLOCK:
                    fh.write("".join(lines))
                    lines = []
        fh.write("".join(lines))


def _json_lists(submission: Submission) -> Iterator[str]:
    """Each list as ``json.dumps`` writes it; from a ``Submission``'s indices, each reference name is
    escaped once (not once per list it is in)."""
    if submission.indices is None:
        yield from (json.dumps(ranked) for _, (_, ranked) in submission)
        return
    escaped = np.empty(len(submission.reference_names), dtype=object)
    escaped[:] = [json.dumps(name) for name in submission.reference_names]
    for start in range(0, len(submission.indices), _BLOCK):
        yield from ("[" + ", ".join(row) + "]" for row in escaped[submission.indices[start:start + _BLOCK]])


def _write_json(path: Path, queries: Sequence[str], lists: Iterator[str]) -> None:
    """Stream ``json.dumps({query: list}) + "\\n"`` to ``path`` (``lists``: each already as JSON text)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write("{")
        for i, (query, ranked) in enumerate(zip(queries, lists)):
            fh.write(f"{', ' if i else ''}{json.dumps(query)}: {ranked}")
        fh.write("}\n")


def parse_submission_csv(text: str) -> dict[str, list[str]]:
    """Read ``submission.csv``'s text (open it with ``newline=""``, UTF-8) -> ``{query: [reference, ...]}``."""
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header != ["query", "references"]:
        raise SubmissionError(f"not a submission CSV: header {header!r}, expected ['query', 'references']")
    return {query: refs.split() for query, refs in rows}


def write_submission(submission: Submission, out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write ``submission.csv`` when its names allow, then ``submission.json``, into ``out_dir``
    atomically (the JSON last: a folder holding it is complete); return (json path, csv path or None).

    The CSV is skipped, with a warning naming the offending names (``csv_unsafe_names``), when it
    could not read back to exactly ``submission``; a ``submission.csv`` left by an earlier run is
    then removed. Raises ``SubmissionError`` (nothing written) for a query listed twice or a
    query name that is not a string.
    """
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "submission.json", out_dir / "submission.csv"
    indices = getattr(submission, "indices", None)
    if indices is not None:  # built from rankings: query names distinct, references named once each
        as_dict = {q: ranked for _, (q, ranked) in submission}
        used = np.zeros(len(submission.reference_names), dtype=bool)
        used[indices.ravel()] = True
        references = [submission.reference_names[i] for i in np.flatnonzero(used)]
    else:
        as_dict, references = _as_dict(submission), None
    bad = [q for q in as_dict if not isinstance(q, str)]
    if bad:
        raise SubmissionError(f"query names must be strings, got {bad[:3]}")
    if references is None:
        references = {r for ranked in as_dict.values() for r in ranked}
    unsafe = csv_unsafe_names(as_dict, references)
    if unsafe:
        csv_path.unlink(missing_ok=True)
        warnings.warn(f"{csv_path} not written: {len(unsafe)} names would not read back from space-separated "
                      f"reference ids ({', '.join(map(repr, unsafe[:5]))}); {json_path} holds the submission",
                      stacklevel=2)
    else:
        _write_csv(csv_path, as_dict, any(_CSV_QUOTED.search(r) for r in references))
    _write_json(json_path, list(as_dict), _json_lists(submission if indices is not None else Submission(submission)))
    return json_path, None if unsafe else csv_path


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
    _require_labels(coverage, query_names)
    rankings = rankings_from_names(submission, coverage.labelled_queries, reference_names)
    return _scores(rankings, coverage, labels, reference_names, k)


def score_rankings(indices: np.ndarray, labels: dict[str, dict[str, str]], query_names: Sequence[str],
                   reference_names: Sequence[str], k: int = 1000) -> dict[str, float]:
    """``score_submission`` of rankings held as indices: ``indices`` (n_queries, m) positions in
    ``reference_names`` (a ``Submission``'s ``indices``), row i for ``query_names[i]``."""
    coverage = label_coverage(labels, query_names, reference_names)
    _require_labels(coverage, query_names)
    indices = np.asarray(indices)
    if coverage.unlabelled_queries:  # keep the labelled rows (a copy only then)
        labelled = set(coverage.labelled_queries)
        indices = indices[np.fromiter((q in labelled for q in query_names), dtype=bool, count=len(query_names))]
    return _scores(indices, coverage, labels, reference_names, k)


def _require_labels(coverage: LabelCoverage, query_names: Sequence[str]) -> None:
    if not coverage.labelled_queries:
        raise SubmissionError(f"none of the {len(query_names)} queries has a label "
                              f"(e.g. {list(query_names)[:3]}): nothing to score")


def _scores(rankings: np.ndarray, coverage: LabelCoverage, labels: dict[str, dict[str, str]],
            reference_names: Sequence[str], k: int) -> dict[str, float]:
    """The scores of ``rankings``, whose rows are ``coverage.labelled_queries`` in order."""
    classes = {c: i for i, c in enumerate(sorted(set(labels["query"].values()) | set(labels["reference"].values())))}
    no_class = len(classes)  # what an unlabelled reference gets: no query has it
    q_codes = [classes[labels["query"][q]] for q in coverage.labelled_queries]
    r_codes = [classes[labels["reference"][r]] if r in labels["reference"] else no_class for r in reference_names]
    scores = retrieval_scores(rankings, q_codes, r_codes, k=k, recall_at=(1, 5, 10), with_map=True)
    return {**scores, "n_query": len(coverage.labelled_queries),
            "n_query_unlabelled": len(coverage.unlabelled_queries),
            "n_reference_unlabelled": len(coverage.unlabelled_references)}
