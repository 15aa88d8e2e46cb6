"""Tiny held-out sets for the tuning tests, and their .npz round trip (for worker processes)."""
from __future__ import annotations

import numpy as np

from tuning.heldout import HeldoutSet


def make_heldout(seed: int = 0, n_classes: int = 12, nq_per: int = 3, nr_per: int = 10, d: int = 32,
                 n_train_classes: int = 30, nt_per: int = 10) -> HeldoutSet:
    """A 2-member HeldoutSet of clustered random descriptors (36 queries, 120 references, d=32 each).

    Member "a" is informative but carries a strong shared nuisance direction (whitening
    helps), member "b" is noisier (weights matter); the train classes differ from the
    held-out ones.
    """
    rng = np.random.default_rng(seed)
    nuisance = rng.normal(size=d)
    nuisance /= np.linalg.norm(nuisance)

    def member(centres, labels, noise, nuisance_scale):
        x = centres[labels] + noise * rng.normal(size=(len(labels), d))
        x += nuisance_scale * rng.normal(size=(len(labels), 1)) * nuisance[None, :]
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    total = n_classes + n_train_classes
    ql = np.repeat(np.arange(n_classes), nq_per)
    rl = np.repeat(np.arange(n_classes), nr_per)
    tl = np.repeat(np.arange(n_classes, total), nt_per)
    members = []
    for noise, scale in ((1.3, 6.0), (2.2, 0.0)):
        centres = rng.normal(size=(total, d))
        members.append([member(centres, lab, noise, scale) for lab in (ql, rl, tl)])
    names = np.array([f"c{i:02d}" for i in range(total)])
    return HeldoutSet(["a", "b"], [m[0] for m in members], [m[1] for m in members], [m[2] for m in members],
                      names[ql], names[rl])


def save_heldout(heldout: HeldoutSet, path) -> None:
    """Write a HeldoutSet to .npz; ``load_heldout`` reads it back."""
    arrays = {"member_names": np.array(heldout.member_names), "query_labels": heldout.query_labels,
              "reference_labels": heldout.reference_labels}
    for i in range(len(heldout.member_names)):
        arrays.update({f"query{i}": heldout.query[i], f"reference{i}": heldout.reference[i],
                       f"train{i}": heldout.train[i]})
    np.savez(path, **arrays)


def load_heldout(path) -> HeldoutSet:
    z = np.load(path)
    n = len(z["member_names"])
    return HeldoutSet([str(s) for s in z["member_names"]], [z[f"query{i}"] for i in range(n)],
                      [z[f"reference{i}"] for i in range(n)], [z[f"train{i}"] for i in range(n)],
                      z["query_labels"], z["reference_labels"])
