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

Descriptors: unit float32 rows in, unit float32 rows out. Rows become unit where they are
read (a descriptor file, float16 rows of the cache or of a bundle: ``l2_normalize``, once) and
where a step changes their norm (the whitening); the weighted concatenation of unit rows is unit
by construction, and no step re-normalises, re-checks or copies what it was handed. Inputs are
validated where they enter the package (``Ensemble``, ``Bundle``, the public functions), not at
every inner call.
"""

from competition.lazy import lazy_exports

# name -> submodule; imported on first use, so ``python -m ensemble.<module>`` runs its module once
_EXPORTS = {
    "BuildConfig": "build",
    "BuildOptions": "build",
    "Bundle": "bundle",
    "BundleError": "bundle",
    "Ensemble": "model",
    "FileMember": "members",
    "Member": "members",
    "MemberCheckError": "build",
    "MemberError": "members",
    "PostProcessing": "postprocess",
    "Ranking": "model",
    "RunMember": "members",
    "TTA": "members",
    "Whitening": "whitening",
    "build_bundle": "build",
    "build_from_paths": "build",
    "check_members": "build",
    "concatenate": "combine",
    "describe_all": "members",
    "ensemble_descriptors": "postprocess",
    "fit_whitening": "whitening",
    "fit_whitening_for": "postprocess",
    "is_bundle": "bundle",
    "l2_normalize": "combine",
    "normalize_weights": "combine",
    "open_member": "members",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
