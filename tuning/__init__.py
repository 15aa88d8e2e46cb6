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

from .heldout import HeldoutSet, heldout_set
from .objective import SearchSpace, evaluate, post_from_params
from .search import SearchConfig, SearchResult, run_search, tune_bundle

__all__ = [
    "HeldoutSet",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "evaluate",
    "heldout_set",
    "post_from_params",
    "run_search",
    "tune_bundle",
]
