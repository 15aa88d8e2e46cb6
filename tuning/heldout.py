"""The held-out descriptors a tuning study works on: no image is read during a study.

``heldout_set(bundle)`` takes them from an ensemble checkpoint, which caches every
member's descriptors of the held-out queries and references and of the train classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from competition.cli import UserError
from competition.split import split_labels


@dataclass
class HeldoutSet:
    """Per-member descriptors of the held-out split and of the train classes.

    ``query[m]`` (nq, d_m), ``reference[m]`` (nr, d_m) and ``train[m]`` (nt, d_m) are
    float32 unit-length descriptors of member m; ``train`` (train-class images only,
    never test images) is what whitening is fitted on. Labels are class names.
    """

    member_names: list[str]
    query: list[np.ndarray]
    reference: list[np.ndarray]
    train: list[np.ndarray]
    query_labels: np.ndarray
    reference_labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.member_names)
        if not (len(self.query) == len(self.reference) == len(self.train) == n) or n == 0:
            raise ValueError(f"HeldoutSet: {n} member names but {len(self.query)}/{len(self.reference)}/"
                             f"{len(self.train)} query/reference/train arrays")
        for name, q, r, t in zip(self.member_names, self.query, self.reference, self.train):
            if len(q) != len(self.query_labels) or len(r) != len(self.reference_labels):
                raise ValueError(f"HeldoutSet member {name}: {len(q)} queries / {len(r)} references but "
                                 f"{len(self.query_labels)} / {len(self.reference_labels)} labels")
            if not (q.shape[1] == r.shape[1] == t.shape[1]):
                raise ValueError(f"HeldoutSet member {name}: query/reference/train dims differ")
        self.query_labels = np.asarray(self.query_labels)
        self.reference_labels = np.asarray(self.reference_labels)

    def subset_classes(self, classes: set[str] | list[str]) -> "HeldoutSet":
        """Return the queries and references whose class is in ``classes`` (train unchanged)."""
        keep = set(classes)
        qm = np.isin(self.query_labels, list(keep))
        rm = np.isin(self.reference_labels, list(keep))
        return HeldoutSet(self.member_names, [q[qm] for q in self.query], [r[rm] for r in self.reference],
                          self.train, self.query_labels[qm], self.reference_labels[rm])

    def query_classes(self, classes: set[str] | list[str]) -> "HeldoutSet":
        """Return the queries whose class is in ``classes``; every reference stays (the others are
        distractors from unseen classes)."""
        return self.select_queries(np.isin(self.query_labels, list(set(classes))))

    def select_queries(self, mask: np.ndarray) -> "HeldoutSet":
        """Return the set with only the queries where ``mask`` (nq,) is true (references unchanged)."""
        return HeldoutSet(self.member_names, [q[mask] for q in self.query], self.reference, self.train,
                          self.query_labels[mask], self.reference_labels)

    def with_distractors(self, n: int | None, seed: int = 0) -> "HeldoutSet":
        """Return the set with ``n`` train-class descriptors (a seeded sample; None: all) added to the
        references as distractors that are relevant to no query."""
        n_train = len(self.train[0])
        n = n_train if n is None else min(int(n), n_train)
        if n <= 0:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(n_train, n, replace=False))
        labels = np.array([f"\0distractor {i}" for i in idx])   # no class name starts with a NUL
        return HeldoutSet(self.member_names, self.query,
                          [np.concatenate([r, t[idx]]) for r, t in zip(self.reference, self.train)],
                          self.train, self.query_labels, np.concatenate([self.reference_labels, labels]))


def parse_distractors(setting: str | int) -> str | int:
    """Return the distractors setting as "references", "all" or a count >= 0 (UserError otherwise)."""
    if setting in ("references", "all"):
        return setting
    try:
        n = int(setting) if not isinstance(setting, bool) else -1
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise UserError(f"distractors must be a count >= 0, 'references' or 'all', got {setting!r}")
    return n


def heldout_set(bundle) -> HeldoutSet:
    """Return the ``HeldoutSet`` (float32 unit rows) of an ``ensemble.Bundle``'s cached held-out
    and train-class descriptors."""
    return HeldoutSet(
        member_names=bundle.member_names,
        query=bundle.set_descriptors("query"),
        reference=bundle.set_descriptors("reference"),
        train=bundle.train_descriptors(),
        query_labels=np.asarray(split_labels(bundle.ids["query"])),
        reference_labels=np.asarray(split_labels(bundle.ids["reference"])),
    )
