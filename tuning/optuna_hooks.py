"""The Optuna internals the kit relies on, in one place (checked with optuna 5.1).

Everything else in ``tuning`` uses Optuna's public API. Two guarantees have no public
hook, so they lean on an internal, here and nowhere else:

* An RDB trial names its worker in the same SQL transaction that creates it
  (``tuning.workers``): Optuna wraps every ``RDBStorage`` given to ``create_study`` or
  ``load_study`` in its private ``_CachedStorage``, whose public ``create_new_trial`` calls
  the backend's private ``_create_new_trial``. ``RDBCreationHook`` overrides that one method.
* A retried trial keeps the parameters its dead original was enqueued with, even those it
  never suggested: ``Study.enqueue_trial`` keeps them in the ``fixed_params`` system
  attribute, which ``enqueued_params`` reads.

``tests/test_tuning_workers.py::test_the_optuna_internals_the_kit_relies_on_still_hold`` fails,
naming the installed Optuna version, when a release changes either.
"""
from __future__ import annotations

from typing import Any

from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

CHECKED_WITH = "optuna 5.1"
FIXED_PARAMS_ATTR = "fixed_params"   # Study.enqueue_trial's system attribute


def enqueued_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters ``trial`` was enqueued with ({} for a trial the sampler drew)."""
    return dict(trial.system_attrs.get(FIXED_PARAMS_ATTR, {}))


class RDBCreationHook(RDBStorage):
    """``RDBStorage`` whose new trials start from ``creation_template`` (one transaction)."""

    def creation_template(self, template_trial: FrozenTrial | None) -> FrozenTrial | None:
        """The template a new trial is created from (subclasses fill in their attributes)."""
        return template_trial

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # optuna's _CachedStorage (the wrapper of every RDBStorage) calls this, not create_new_trial
        return super()._create_new_trial(study_id, self.creation_template(template_trial))
