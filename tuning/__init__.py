"""Tuning the post-processing against the held-out split, and the whole recipe.

Input contract: a ``HeldoutSet``, per member float32 unit rows of the held-out queries,
references and train-class images with the queries' and references' class labels (taken
from an ensemble checkpoint by ``heldout_set(bundle)``; no image is read during a study).

* ``evaluate(heldout, post)``: one post-processing scored by mAP@k, through the same code
  inference runs.
* ``run_search`` / ``tune_bundle`` / ``python -m tuning.search``: an Optuna study over the
  whole post-processing on one half of the held-out classes, checked on the other half;
  resumable, several workers may share a storage.
* ``python -m tuning.recipe``: data, split, members, ensemble, tuning and a local
  submission in one resumable command, with a table of what each stage adds.
"""

from competition.lazy import lazy_exports

# name -> submodule; imported on first use, so ``python -m tuning.<module>`` runs its module once
_EXPORTS = {
    "HeldoutSet": "heldout",
    "SearchConfig": "search",
    "SearchResult": "search",
    "SearchSpace": "objective",
    "evaluate": "objective",
    "heldout_set": "heldout",
    "post_from_params": "objective",
    "run_search": "search",
    "tune_bundle": "search",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
