"""Ensembles of retrieval backbones, and the checkpoint that answers queries.

Input contract: a *member* describes images, ``describe(paths) -> (desc (n_ok, d) float32
unit rows in input order, ok (n,) bool)``: a trained run folder (``RunMember``), or
precomputed descriptors (``FileMember``). The ensemble descriptor of an image is the
members' unit rows weighted by sqrt(w_m / sum w), concatenated, optionally PCA-whitened
(fitted on train-class images only) and L2-normalised; ``rerank`` then ranks them.

* ``PostProcessing``: weights, whitening and re-ranking parameters in one set, what
  tuning searches and what a checkpoint stores.
* ``Ensemble``: members plus post-processing; ``rank(query_paths, reference_paths)``.
* ``Bundle``: the ensemble checkpoint on disk (members, whitening, post-processing, the
  held-out split and cached descriptors), verified by sha256 on load.
* ``build_bundle`` / ``python -m ensemble.build``: members -> checkpoint, refusing
  members trained on another split or on held-out classes.
"""

from .build import BuildConfig, BuildOptions, MemberCheckError, build_bundle, build_from_paths, check_members
from .bundle import Bundle, BundleError, is_bundle
from .combine import concatenate, l2_normalize, normalize_weights
from .members import TTA, FileMember, Member, MemberError, RunMember, describe_all, open_member
from .model import Ensemble, Ranking
from .postprocess import PostProcessing, ensemble_descriptors, fit_whitening_for
from .whitening import Whitening, fit_whitening

__all__ = [
    "BuildConfig",
    "BuildOptions",
    "Bundle",
    "BundleError",
    "Ensemble",
    "FileMember",
    "Member",
    "MemberCheckError",
    "MemberError",
    "PostProcessing",
    "Ranking",
    "RunMember",
    "TTA",
    "Whitening",
    "build_bundle",
    "build_from_paths",
    "check_members",
    "concatenate",
    "describe_all",
    "ensemble_descriptors",
    "fit_whitening",
    "fit_whitening_for",
    "is_bundle",
    "l2_normalize",
    "normalize_weights",
    "open_member",
]
