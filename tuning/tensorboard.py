"""A tuning study in TensorBoard: ``tensorboard --logdir DIR``.

What ``DIR`` holds (event files, one per process and writer; tags):

* ``trial/mAP@K``       each completed trial's value on the search half, step = trial number;
* ``trial/best_mAP@K``  the best value among the completed trials numbered up to it, step = trial number;
* ``chosen/parameters`` (text) the post-processing written into the bundle, a markdown table;
* the same as TensorBoard hparams, with the metrics ``chosen/search_mAP@K``,
  ``chosen/check_mAP@K`` and ``chosen/defaults_mAP@K``.

Each worker process logs the trials it runs (``StudyBoard``, an Optuna callback; the
threads of ``n_jobs`` share one writer under a lock), so workers sharing a study may share
``DIR``. Written through ``torch.utils.tensorboard``, which needs the ``tensorboard``
package: ``require_tensorboard`` (``backbones.board``'s, shared with training) says so as a one-line
``UserError``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from backbones.board import require_tensorboard

__all__ = ["StudyBoard", "choice_table", "flat_parameters", "require_tensorboard", "write_choice"]


class StudyBoard:
    """Optuna callback: each completed trial's value and the best so far, step = trial number.

    A context manager: the writer is flushed after every trial (to watch a study live) and
    closed on exit.
    """

    def __init__(self, logdir: str | os.PathLike, k: int = 1000) -> None:
        self.writer = require_tensorboard()(log_dir=str(logdir))
        self.value_tag, self.best_tag = f"trial/mAP@{k}", f"trial/best_mAP@{k}"
        self._lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = max(t.value for t in done if t.number <= trial.number)   # the study maximises mAP@k
        with self._lock:
            self.writer.add_scalar(self.value_tag, trial.value, trial.number)
            self.writer.add_scalar(self.best_tag, best, trial.number)
            self.writer.flush()

    @classmethod
    def open(cls, logdir: str | os.PathLike | None, k: int = 1000) -> "StudyBoard | contextlib.nullcontext[None]":
        """A board on ``logdir``, or a context giving None without one."""
        return cls(logdir, k) if logdir else contextlib.nullcontext()

    def __enter__(self) -> "StudyBoard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.close()


def flat_parameters(post: dict[str, Any], member_names: Sequence[str] | None = None) -> dict[str, Any]:
    """A ``PostProcessing.to_dict()`` as one level of scalars: ``weight_<member>`` for the weights
    (``weight_<i>`` without names), ``rerank.<key>`` for the re-ranking; floats to 4 significant digits."""
    flat: dict[str, Any] = {}
    for key, value in post.items():
        if key == "weights" and value is not None:
            names = member_names if member_names is not None and len(member_names) == len(value) else range(len(value))
            flat.update({f"weight_{name}": w for name, w in zip(names, value)})
        elif isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in flat.items()}


def choice_table(params: dict[str, Any]) -> str:
    """Markdown table of ``params`` (TensorBoard renders text summaries as markdown)."""
    return "\n".join(["| parameter | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in params.items())])


def write_choice(logdir: str | os.PathLike, result: Any, member_names: Sequence[str] | None = None) -> None:
    """Log the chosen post-processing of a ``tuning.search.SearchResult`` as text and hparams."""
    params = flat_parameters(result.best_post.to_dict(), member_names)
    k = result.k
    metrics = {f"chosen/search_mAP@{k}": float(result.best_value),
               f"chosen/check_mAP@{k}": float(result.check_best["map_at_k"]),
               f"chosen/defaults_mAP@{k}": float(result.defaults_value)}
    with require_tensorboard()(log_dir=str(logdir)) as writer:
        writer.add_text("chosen/parameters", f"trial {result.best_trial}\n\n" + choice_table(params))
        # run_name ".": the hparams land in DIR itself, beside the trials, not in a timestamped sub-run
        writer.add_hparams({k_: v for k_, v in params.items() if v is not None}, metrics, run_name=".")
