"""The ensemble at inference: members -> weighted concatenation -> whitening -> re-ranking.

``Ensemble.describe`` applies exactly what tuning applied (``ensemble.postprocess``):
per-member unit descriptors times sqrt(weight), concatenated, optionally
PCA-whitened (fitted on train-class descriptors only), L2-normalised.

An image counts as described only when every member describes it. ``rank``
answers every query: an unreadable query gets the mean of the readable reference
descriptors, re-normalised (a "generic" query, whose ranking is the references
closest to the reference centroid), and is reported; unreadable references are left
out of every ranking and reported.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ensemble.combine import l2_normalize, normalize_weights
from ensemble.members import Member, describe_all
from ensemble.postprocess import PostProcessing, ensemble_descriptors, fit_whitening_for
from ensemble.whitening import Whitening


@dataclass
class Ranking:
    """``indices`` (nq, k) int64 into the reference list asked (-1 = empty slot), ``scores``
    (nq, k) float32, and the paths of unreadable queries (given a fallback row) and
    unreadable references (excluded)."""

    indices: np.ndarray
    scores: np.ndarray
    unreadable_queries: list[str] = field(default_factory=list)
    unreadable_references: list[str] = field(default_factory=list)


class Ensemble:
    """Members plus the post-processing (weights, whitening, re-ranking) tuned for them."""

    def __init__(self, members: Sequence[Member], weights: Sequence[float] | None = None,
                 post: PostProcessing | None = None, whitening: Whitening | None = None,
                 device: str = "cpu") -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        post = post or PostProcessing()
        if weights is not None:
            post = replace(post, weights=[float(w) for w in weights])
        if post.weights is not None:
            normalize_weights(post.weights, len(members))  # raises on a wrong count or bad values
        if post.whiten and whitening is None:
            raise ValueError("post-processing asks for whitening: pass a fitted Whitening or call fit_whitening")
        self.members = list(members)
        self.post = post
        self.whitening = whitening
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device  # extraction runs on the members' own device setting

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def preload(self) -> None:
        """Read into memory what the members need to describe images (see ``Member.preload``), so
        that their files may go away (NSML may delete a checkpoint folder once it is loaded)."""
        for m in self.members:
            m.preload()

    def member_descriptors(self, paths: Sequence[str | os.PathLike], *, set_name: str = "images",
                           progress: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
        """Return ([per member (n_ok, d_m) float32], ok (n,)): rows of images every member describes."""
        return describe_all(self.members, paths, set_name=set_name, progress=progress)

    def fit_whitening(self, train_paths: Sequence[str | os.PathLike], progress: bool = False) -> Whitening | None:
        """Fit (and keep) the whitening ``post`` asks for on train-class images; never pass test images."""
        descs, _ok = self.member_descriptors(train_paths, set_name="train", progress=progress)
        self.whitening = fit_whitening_for(descs, self.post)
        return self.whitening

    def describe(self, paths: Sequence[str | os.PathLike], *, set_name: str = "images",
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Return (ensemble descriptors (n_ok, D) float32 unit rows in input order, ok (n,) bool)."""
        descs, ok = self.member_descriptors(paths, set_name=set_name, progress=progress)
        if not ok.any():
            return np.zeros((0, self.output_dim()), np.float32), ok
        return ensemble_descriptors(descs, self.post, self.whitening), ok

    def output_dim(self) -> int:
        """Dimension D of the ensemble descriptors."""
        if self.post.whiten and self.whitening is not None:
            return self.whitening.dim if self.post.whiten_dim is None else min(self.post.whiten_dim,
                                                                                 self.whitening.dim)
        return int(sum(m.dim or 0 for m in self.members))

    def rank(self, query_paths: Sequence[str | os.PathLike], reference_paths: Sequence[str | os.PathLike],
             top_k: int = 1000, *, progress: bool = False) -> Ranking:
        """Rank the references for every query (re-ranked per ``post.rerank``); see ``Ranking``."""
        from rerank import rerank

        ref, ref_ok = self.describe(reference_paths, set_name="reference", progress=progress)
        bad_refs = [str(p) for p, good in zip(reference_paths, ref_ok) if not good]
        if bad_refs:
            warnings.warn(f"{len(bad_refs)} unreadable references excluded from the rankings, "
                          f"e.g. {bad_refs[:3]}", stacklevel=2)
        nq = len(query_paths)
        if len(ref) == 0:
            warnings.warn("no readable reference image: every ranking is empty", stacklevel=2)
            k = min(top_k, len(reference_paths))
            return Ranking(np.full((nq, k), -1, np.int64), np.zeros((nq, k), np.float32),
                           [str(p) for p in query_paths], bad_refs)
        query, q_ok = self.describe(query_paths, set_name="query", progress=progress)
        bad_queries = [str(p) for p, good in zip(query_paths, q_ok) if not good]
        if bad_queries:
            warnings.warn(f"{len(bad_queries)} unreadable queries answered with the reference centroid, "
                          f"e.g. {bad_queries[:3]}", stacklevel=2)
            readable, query = query, np.empty((nq, ref.shape[1]), dtype=np.float32)
            query[q_ok] = readable
            query[~q_ok] = l2_normalize(ref.mean(axis=0, keepdims=True), copy=False)
        if nq == 0:
            k = min(top_k, len(ref))
            return Ranking(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), [], bad_refs)
        scores, idx = rerank(query, ref, self.post.rerank, top_k=top_k, device=self.device, progress=progress)
        indices = np.asarray(idx, dtype=np.int64)
        if bad_refs:  # rows of ``ref`` -> positions in ``reference_paths``
            ref_map = np.flatnonzero(ref_ok)
            indices = np.where(indices >= 0, ref_map[np.clip(indices, 0, None)], -1)
        return Ranking(indices, np.asarray(scores, np.float32), bad_queries, bad_refs)
