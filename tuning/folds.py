"""The class-fold objective: what a tuning trial scores, and what the report checks.

The held-out classes that have both queries and references are shuffled (seeded) and cut into a
*check* set, a share of the classes the study never scores (the report's estimate of how the
choice generalises), and F *folds* balanced by query count. A trial ranks the queries of every
fold against one gallery: every held-out reference (the check classes' included) plus optional
train-class distractors, so each fold's queries meet the other classes' references as
unseen-class distractors, as test queries meet the other test classes. Its value is

    value = (1 / F) * sum_f mAP@k(the queries of fold f, ranked against the gallery)

and the spread of the F fold scores (their standard deviation) is recorded beside it.

A split too large to rank in a few seconds per trial is sampled by class (``max_images``): a
seeded share rho of each fold's classes, with all their queries and references, and the same
share rho of the rest of the gallery (the other classes' references by class, the distractors by
image), so that class sizes and the density of distractors stay those of the whole split. The
final choice re-scores its candidates on the whole split (``fold_problem(..., max_images=None)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from competition.cli import UserError
from tuning.heldout import HeldoutSet

__all__ = ["ClassFolds", "FoldProblem", "FoldScores", "class_sizes", "fold_problem", "make_folds"]


@dataclass(frozen=True)
class ClassFolds:
    """Held-out class names: ``folds[f]`` the classes of fold f, ``check`` those the study never scores."""

    folds: tuple[tuple[str, ...], ...]
    check: tuple[str, ...]

    @property
    def fold_classes(self) -> list[str]:
        return [c for fold in self.folds for c in fold]


def scored_classes(heldout: HeldoutSet) -> np.ndarray:
    """Sorted classes that have at least one query and one reference (the only ones a query can find)."""
    return np.intersect1d(np.unique(heldout.query_labels), np.unique(heldout.reference_labels))


def make_folds(heldout: HeldoutSet, n_folds: int = 3, check_share: float = 0.25, seed: int = 0) -> ClassFolds:
    """Cut the scored held-out classes into a check set and ``n_folds`` folds (seeded).

    The check set holds round(check_share * n) classes (at least one when check_share > 0, and
    never all); the rest go to the fold with the fewest queries so far, in a seeded order, so
    folds hold about the same number of queries. Fewer classes than folds: one fold per class.
    """
    classes = scored_classes(heldout)
    if len(classes) < 2:
        raise UserError(f"need at least 2 held-out classes with queries and references, got {len(classes)}: "
                        "hold out more classes")
    if n_folds < 1 or not 0.0 <= check_share < 1.0:
        raise ValueError(f"need n_folds >= 1 and check_share in [0, 1), got {n_folds}, {check_share}")
    order = classes[np.random.default_rng(seed).permutation(len(classes))]
    n_check = min(max(1, round(check_share * len(order))), len(order) - 1) if check_share > 0 else 0
    check, rest = order[:n_check], order[n_check:]
    n_folds = min(n_folds, len(rest))
    counts = dict(zip(*np.unique(heldout.query_labels, return_counts=True)))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    load = np.zeros(n_folds, dtype=np.int64)
    for c in rest:
        f = int(np.argmin(load))   # first of the least loaded: deterministic
        folds[f].append(str(c))
        load[f] += counts[c]
    return ClassFolds(tuple(tuple(sorted(f)) for f in folds), tuple(sorted(str(c) for c in check)))


def class_sizes(heldout: HeldoutSet) -> tuple[float, float]:
    """(images, references) per scored held-out class, medians: the scale of one class's neighbourhood
    among all images (k-reciprocal, diffusion) and among the references (DBA, aQE)."""
    classes = scored_classes(heldout)
    q = np.array([np.sum(heldout.query_labels == c) for c in classes])
    r = np.array([np.sum(heldout.reference_labels == c) for c in classes])
    return float(np.median(q + r)), float(np.median(r))


@dataclass
class FoldScores:
    """One ranking scored fold by fold: ``fold_maps`` (F,), ``ap`` (nq,) AP@k per query, ``recall_at_1``
    over the fold queries; ``check_map`` and ``check_recall_at_1`` over the check queries (None without)."""

    fold_maps: np.ndarray
    check_map: float | None
    ap: np.ndarray
    recall_at_1: float | None
    check_recall_at_1: float | None = None

    @property
    def value(self) -> float:
        """The trial's value: the mean of the fold scores."""
        return float(self.fold_maps.mean())

    @property
    def spread(self) -> float:
        """Standard deviation of the fold scores (0 for one fold)."""
        return float(self.fold_maps.std())


@dataclass
class FoldProblem:
    """Queries against the gallery; ``query_fold[i]`` is query i's fold, -1 for a check query."""

    data: HeldoutSet
    query_fold: np.ndarray
    n_folds: int
    rate: float = 1.0    # share of the split kept (1: the whole split)

    def score(self, indices: np.ndarray, k: int) -> FoldScores:
        """Score a ranking ``indices`` (nq, m) into the gallery fold by fold."""
        from competition.metrics import average_precision, relevance

        ap = average_precision(indices, self.data.query_labels, self.data.reference_labels, k=k)
        hit1 = relevance(indices[:, :1], self.data.query_labels, self.data.reference_labels)[0][:, 0]
        in_fold = [self.query_fold == f for f in range(self.n_folds)]
        fold_maps = np.array([ap[m].mean() if m.any() else np.nan for m in in_fold])
        in_folds, check = self.query_fold >= 0, self.query_fold < 0

        def mean(x: np.ndarray, mask: np.ndarray) -> float | None:
            return float(x[mask].mean()) if mask.any() else None

        return FoldScores(fold_maps, mean(ap, check), ap, mean(hit1, in_folds), mean(hit1, check))


def _sample_classes(classes: list[str] | tuple[str, ...], rate: float, rng: np.random.Generator) -> list[str]:
    """A seeded share ``rate`` of ``classes`` (at least one)."""
    n = max(1, int(round(rate * len(classes))))
    return sorted(str(c) for c in rng.choice(np.asarray(classes), n, replace=False))


def fold_problem(heldout: HeldoutSet, folds: ClassFolds, distractors: int = 0, seed: int = 0,
                 with_check: bool = False, max_images: int | None = None) -> FoldProblem:
    """The fold queries (and the check queries when ``with_check``) against the gallery of every
    held-out reference plus ``distractors`` train-class images; sampled by class down to about
    ``max_images`` queries + gallery images (see the module docstring; None: the whole split)."""
    gallery = heldout.with_distractors(distractors, seed=seed) if distractors > 0 else heldout
    n_ref = len(heldout.reference_labels)
    query_classes = folds.fold_classes + (list(folds.check) if with_check else [])
    n_query = int(np.isin(heldout.query_labels, query_classes).sum())
    total = n_query + len(gallery.reference_labels)
    rate = 1.0 if max_images is None or total <= max_images else max_images / total
    keep_query = np.isin(gallery.query_labels, query_classes)
    keep_ref = np.ones(len(gallery.reference_labels), dtype=bool)
    if rate < 1.0:   # a miniature: rho of the query classes, of the other classes, of the distractors
        rng = np.random.default_rng([seed, 1])
        ref_labels = gallery.reference_labels[:n_ref]
        others = np.setdiff1d(np.unique(ref_labels), query_classes)
        kept_folds = [tuple(_sample_classes(f, rate, rng)) for f in folds.folds]
        kept_check = tuple(_sample_classes(folds.check, rate, rng)) if with_check and folds.check else ()
        folds = ClassFolds(kept_folds, kept_check if with_check else folds.check)
        query_classes = folds.fold_classes + list(kept_check)
        keep_query = np.isin(gallery.query_labels, query_classes)
        kept_others = _sample_classes(others, rate, rng) if len(others) else []
        keep_ref[:n_ref] = np.isin(ref_labels, query_classes + kept_others)
        n_distractors = len(gallery.reference_labels) - n_ref
        if n_distractors:
            keep_ref[n_ref:] = False
            chosen = rng.choice(n_distractors, max(1, int(round(rate * n_distractors))), replace=False)
            keep_ref[n_ref + chosen] = True
    data = HeldoutSet(gallery.member_names, [q[keep_query] for q in gallery.query],
                      [r[keep_ref] for r in gallery.reference], gallery.train,
                      gallery.query_labels[keep_query], gallery.reference_labels[keep_ref])
    fold_of = {c: f for f, fold in enumerate(folds.folds) for c in fold}
    query_fold = np.array([fold_of.get(c, -1) for c in data.query_labels], dtype=np.int64)
    return FoldProblem(data, query_fold, len(folds.folds), rate)
