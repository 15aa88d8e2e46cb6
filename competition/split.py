"""Held-out class split: train classes for training, held-out classes for tuning.

The held-out classes play the part of the unseen test classes: their images are
divided into queries and references, at least one of each per class. A class with
a single image cannot give both and stays in train. The split is seeded and
deterministic, and saved as a small JSON whose ``hash`` lets every later stage
(and every ensemble member) prove that it used the same split.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from competition.cli import UserError
from competition.data import TrainIndex
from competition.fileio import atomic_write_text

SPLIT_VERSION = 1


class SplitError(UserError, ValueError):
    """A held-out split that cannot be read, does not fit the dataset, or cannot be made."""


@dataclass(frozen=True)
class HeldoutSplit:
    """Class lists and the query/reference image ids of the held-out classes."""

    train_classes: tuple[str, ...]
    heldout_classes: tuple[str, ...]
    query_ids: tuple[str, ...]       # train-image ids "<class>/<file>"
    reference_ids: tuple[str, ...]
    seed: int
    rule: dict = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """sha256 (first 16 hex digits) of the split's content, independent of file formatting."""
        blob = json.dumps(self._content(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _content(self) -> dict:
        d = asdict(self)
        for k in ("train_classes", "heldout_classes", "query_ids", "reference_ids"):
            d[k] = list(d[k])
        return d

    def to_dict(self) -> dict:
        return {"version": SPLIT_VERSION, **self._content(), "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict, where: str = "split") -> "HeldoutSplit":
        try:
            split = cls(
                train_classes=tuple(d["train_classes"]),
                heldout_classes=tuple(d["heldout_classes"]),
                query_ids=tuple(d["query_ids"]),
                reference_ids=tuple(d["reference_ids"]),
                seed=int(d["seed"]),
                rule=dict(d.get("rule", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SplitError(f"{where}: not a held-out split file ({exc!r})") from exc
        if "hash" in d and d["hash"] != split.hash:
            raise SplitError(f"{where}: hash {d['hash']} does not match its content ({split.hash}); "
                             "the file was edited or corrupted")
        return split

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeldoutSplit":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SplitError(f"{path}: cannot read held-out split ({exc})") from exc
        return cls.from_dict(d, where=str(path))

    def check_against(self, index: TrainIndex) -> None:
        """Raise ValueError when the dataset lacks a class or image this split names."""
        have = set(index.ids)
        missing = [i for i in self.query_ids + self.reference_ids if i not in have]
        if missing:
            raise SplitError(f"{index.root}: {len(missing)} held-out images of split {self.hash} "
                             f"are missing, e.g. {missing[:3]}")


def make_split(
    index: TrainIndex,
    heldout: float | int = 0.3,
    query_fraction: float = 0.25,
    seed: int = 0,
) -> HeldoutSplit:
    """Split the classes of ``index`` into train and held-out.

    ``heldout``: a fraction in [0, 1) of the eligible classes, or an integer count; 0 holds out
    nothing (every class trains: a final refit).
    ``query_fraction``: share of each held-out class's images used as queries
    (at least one query and one reference per class).
    Returns a deterministic ``HeldoutSplit`` for a given index and seed.
    """
    if not 0.0 < query_fraction < 1.0:
        raise SplitError(f"query_fraction must be in (0, 1), got {query_fraction}")
    by_class: dict[str, list[str]] = {}
    for img_id, label in zip(index.ids, index.labels):
        by_class.setdefault(label, []).append(img_id)
    eligible = sorted(c for c, ids in by_class.items() if len(ids) >= 2)
    if heldout == 0:   # every class trains (a final refit): no held-out classes
        return HeldoutSplit(train_classes=tuple(sorted(by_class)), heldout_classes=(), query_ids=(),
                            reference_ids=(), seed=seed,
                            rule={"heldout": heldout, "query_fraction": query_fraction, "min_images": 2})
    if isinstance(heldout, float) and not isinstance(heldout, bool) and heldout < 1.0:
        if heldout < 0.0:
            raise SplitError(f"held-out fraction must be in [0, 1), got {heldout}")
        n_heldout = max(1, int(round(heldout * len(eligible))))
    else:
        n_heldout = int(heldout)
    if not 1 <= n_heldout < len(by_class):
        raise SplitError(f"cannot hold out {n_heldout} of {len(by_class)} classes "
                         f"({len(eligible)} have the 2+ images a held-out class needs)")
    if n_heldout > len(eligible):
        raise SplitError(f"only {len(eligible)} classes have 2+ images; cannot hold out {n_heldout}")
    rng = np.random.default_rng(seed)
    heldout_classes = sorted(rng.choice(eligible, size=n_heldout, replace=False).tolist())
    queries, references = [], []
    for cls in heldout_classes:
        ids = sorted(by_class[cls])
        order = rng.permutation(len(ids))
        n_query = min(len(ids) - 1, max(1, int(round(query_fraction * len(ids)))))
        queries += [ids[i] for i in order[:n_query]]
        references += [ids[i] for i in order[n_query:]]
    held = set(heldout_classes)
    return HeldoutSplit(
        train_classes=tuple(c for c in sorted(by_class) if c not in held),
        heldout_classes=tuple(heldout_classes),
        query_ids=tuple(sorted(queries)),
        reference_ids=tuple(sorted(references)),
        seed=seed,
        rule={"heldout": heldout, "query_fraction": query_fraction, "min_images": 2},
    )


def split_labels(ids: tuple[str, ...] | list[str]) -> list[str]:
    """Class of each train-image id ``<class>/<file>``."""
    return [i.split("/", 1)[0] for i in ids]
