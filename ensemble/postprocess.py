"""The post-processing an ensemble applies after extraction, as one parameter set.

member descriptors --(weights)--> concatenation --(PCA-whitening)--> ensemble
descriptors --(DBA, aQE, k-reciprocal: ``rerank``)--> rankings.

``PostProcessing`` is what the tuner searches over and what the ensemble
checkpoint stores; ``fit_whitening_for`` and ``ensemble_descriptors`` are the one
implementation that tuning and inference share.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from competition.settings import known_keys
from ensemble.combine import concatenate
from ensemble.whitening import Whitening, fit_whitening
from rerank.pipeline import RerankParams


@dataclass
class PostProcessing:
    """Member weights, whitening and re-ranking parameters.

    ``weights`` None means equal weights. ``whiten_dim`` None keeps every
    component the training set supports. ``whiten_power`` 0 is a plain PCA
    rotation, 1 full whitening: the one place the power lives (the fitted
    ``Whitening`` holds none).
    """

    weights: list[float] | None = None
    whiten: bool = False
    whiten_dim: int | None = None
    whiten_power: float = 1.0
    whiten_shrinkage: float = 0.1
    rerank: RerankParams = field(default_factory=RerankParams)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rerank"] = self.rerank.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PostProcessing":
        """Inverse of :meth:`to_dict`; unknown keys, its own or the re-ranker's, raise ``ValueError``."""
        d = known_keys(d, cls, "PostProcessing keys")
        rerank = RerankParams(**known_keys(d.pop("rerank", {}), RerankParams, "RerankParams keys"))
        return cls(rerank=rerank, **d)


def fit_whitening_for(train_member_desc: Sequence[np.ndarray], post: PostProcessing) -> Whitening | None:
    """Fit the whitening ``post`` asks for on train-class member descriptors (None when off).

    The fit keeps every component; ``ensemble_descriptors`` applies ``post``'s dim and
    power, so those can change without a refit (only the weights and shrinkage need one).
    """
    if not post.whiten:
        return None
    train = concatenate(train_member_desc, post.weights)
    return fit_whitening(train, dim=None, shrinkage=post.whiten_shrinkage)


def ensemble_descriptors(member_desc: Sequence[np.ndarray], post: PostProcessing,
                         whitening: Whitening | None) -> np.ndarray:
    """Return the (n, D) float32 unit-length ensemble descriptors of one image set."""
    combined = concatenate(member_desc, post.weights)
    if not post.whiten:
        return combined
    if whitening is None:
        raise ValueError("post-processing asks for whitening but none was fitted")
    dim = None if post.whiten_dim is None else min(post.whiten_dim, whitening.dim)
    return whitening.apply(combined, power=post.whiten_power, dim=dim)

