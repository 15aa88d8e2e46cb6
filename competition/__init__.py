"""The competition's contract: what the organisers define, and nothing of the kit.

* ``data``: the NSML "AI Vision" folder layout and robust image reading
  (``ROOT/train/train_data/<class>/<image>``, ``ROOT/test/test_data/{query,reference}/<image>``,
  ``ROOT/test/labels.csv``); an image's name is its file name without the extension.
* ``split``: the held-out class split that stands in for the unseen test classes.
* ``metrics``: mAP, the hackathon's mAP@k and Recall@K over rankings (n_queries, m) of
  reference indices.
* ``submission``: the leaderboard's rules (every query once, distinct known references,
  ``min(k, n_references)`` of them), building, writing and scoring a submission.
* ``nsml_local``: a stand-in for the NSML platform where the ``nsml`` package is absent.
* ``picture``: queries and their top references, framed by ground truth.
* ``synth``: the embedded default dataset (``python -m competition.synth``).
* ``fileio``: atomic writes (temp file, then rename), used by every package.

This package imports no other package of the kit; every other package may import it.
"""

from .data import (
                   DataError,
                   LoadReport,
                   TestIndex,
                   TrainIndex,
                   UnreadableImage,
                   image_name,
                   list_images,
                   load_image,
                   read_labels,
                   scan_test,
                   scan_train,
)
from .metrics import average_precision, file_keys, mean_average_precision, recall_at_k, retrieval_scores
from .split import HeldoutSplit, make_split, split_labels
from .submission import SubmissionError, build_submission, score_submission, validate_submission, write_submission

__all__ = [
    "DataError",
    "HeldoutSplit",
    "LoadReport",
    "SubmissionError",
    "TestIndex",
    "TrainIndex",
    "UnreadableImage",
    "average_precision",
    "build_submission",
    "file_keys",
    "image_name",
    "list_images",
    "load_image",
    "make_split",
    "mean_average_precision",
    "read_labels",
    "recall_at_k",
    "retrieval_scores",
    "scan_test",
    "scan_train",
    "score_submission",
    "split_labels",
    "validate_submission",
    "write_submission",
]
