"""The tuning search space: what a trial may choose, and how its parameters decode.

A trial chooses member weights (on a grid), PCA-whitening (on/off, dim, power), DBA and alpha-QE
(neighbours, alpha), and a re-ranker: k-reciprocal (k1, k2, lambda), or else diffusion (k, alpha,
gamma), or else none. ``post_from_params`` is the one decoder (for trials, enqueued trials and the
final choice).

Ranges sized by the data (``sized_space``): with s the median number of images (queries and
references) of a held-out class and r its median number of references,

    k1 in [max(2, s/6), max(20, s)]        k2 in [1, max(6, s/5)]
    DBA n, aQE n in [0, max(3, r/3)]        diffusion k in [max(5, s/3), max(20, 2 s)] (log scale)

(rounded), so a neighbourhood can reach about one class among all images (k-reciprocal, diffusion)
or a third of its references (expansion), at any scale, and the textbook k-reciprocal (k1 20, k2 6)
is always inside (small classes: the demo's 16 images per class put the best trials on the upper
edges of [3, 16] and [1, 3]); a range never exceeds what the study's set allows (``fit_space``).
``boundary_notes`` says when the best trials sit on the edge of a range. ``SIZED_SPACE_RULE`` numbers
the rule, so a recipe re-runs a study sized by an older one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import optuna

from competition.settings import known_keys
from ensemble.postprocess import PostProcessing
from rerank.pipeline import RerankParams

__all__ = ["RERANKER_KEYS", "SIZED_SPACE_RULE", "SearchSpace", "boundary_notes", "default_params", "fit_space",
           "post_from_params", "sized_space", "standard_params", "suggest_descriptors", "suggest_postprocessing",
           "suggest_reranker", "weight_name"]

RERANKER_KEYS = ("kreciprocal", "k1", "k2", "lambda_value", "diffusion", "diffusion_k", "diffusion_alpha",
                 "diffusion_gamma")   # the trial parameters ``suggest_reranker`` draws


@dataclass
class SearchSpace:
    """Ranges of the searched parameters (see ``suggest_postprocessing``)."""

    weight_low: float = 0.1
    weight_high: float = 1.0
    weight_step: float = 0.05     # weights on a grid: whitening cache hits, exact reproduction
    whiten_dim_min: int = 16
    whiten_shrinkage: float = 0.1
    max_dba_n: int = 10
    max_aqe_n: int = 10
    alpha_low: float = 0.0
    alpha_high: float = 5.0
    kreciprocal: bool = True
    k1_range: tuple[int, int] = (5, 40)
    k2_range: tuple[int, int] = (1, 10)
    lambda_range: tuple[float, float] = (0.05, 0.95)
    diffusion: bool = True
    diffusion_k_range: tuple[int, int] = (10, 100)
    diffusion_alpha_range: tuple[float, float] = (0.5, 0.99)
    diffusion_gamma_range: tuple[float, float] = (1.0, 5.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchSpace":
        """A space from a plain dict (a report, a recipe); unknown keys raise ``ValueError``."""
        data = known_keys(data, cls, "SearchSpace keys")
        ranges = {k: tuple(v) for k, v in data.items() if k.endswith("_range")}
        return cls(**{**data, **ranges})


SIZED_SPACE_RULE = 2   # bumped whenever the rule of ``sized_space`` changes: a recipe then re-runs its study


def sized_space(space: SearchSpace, images_per_class: float, references_per_class: float) -> SearchSpace:
    """``space`` with the size-bound ranges derived from the class sizes (rule in the module docstring)."""
    s, r = float(images_per_class), float(references_per_class)
    expand = max(3, round(r / 3))
    return replace(space, k1_range=(max(2, round(s / 6)), max(20, round(s))), k2_range=(1, max(6, round(s / 5))),
                   max_dba_n=expand, max_aqe_n=expand,
                   diffusion_k_range=(max(5, round(s / 3)), max(20, round(2 * s))))


def fit_space(space: SearchSpace, n_queries: int, n_references: int) -> SearchSpace:
    """Narrow the size-bound ranges to a set of ``n_queries`` + ``n_references``: k1, k2 and the diffusion
    k to n_queries + n_references - 1, the DBA and aQE neighbour counts to n_references (``rerank``
    would clamp larger values anyway: trials there would repeat one another)."""
    hi = max(1, n_queries + n_references - 1)
    clamp = lambda r: (min(r[0], hi), min(r[1], hi))  # noqa: E731
    return replace(space, k1_range=clamp(space.k1_range), k2_range=clamp(space.k2_range),
                   diffusion_k_range=clamp(space.diffusion_k_range),
                   max_dba_n=min(space.max_dba_n, n_references), max_aqe_n=min(space.max_aqe_n, n_references))


def weight_name(member: str) -> str:
    return f"weight_{member}"


def suggest_postprocessing(trial: optuna.Trial, member_names: Sequence[str], max_dim: int,
                           space: SearchSpace) -> PostProcessing:
    """Sample one ``PostProcessing`` from ``space`` (conditional params only when switched on)."""
    suggest_descriptors(trial, member_names, max_dim, space)
    suggest_reranker(trial, space)
    return post_from_params(trial.params, member_names, space)


def suggest_descriptors(trial: optuna.Trial, member_names: Sequence[str], max_dim: int, space: SearchSpace) -> None:
    """Sample what the descriptors a re-ranker sees depend on: weights, whitening, DBA, aQE."""
    if len(member_names) > 1:
        for name in member_names:
            trial.suggest_float(weight_name(name), space.weight_low, space.weight_high, step=space.weight_step)
    if max_dim >= 2 and trial.suggest_categorical("whiten", [False, True]):
        trial.suggest_int("whiten_dim", min(space.whiten_dim_min, max_dim), max_dim, log=True)
        trial.suggest_float("whiten_power", 0.0, 1.0)
    if trial.suggest_int("dba_n", 0, space.max_dba_n) > 1:
        trial.suggest_float("dba_alpha", space.alpha_low, space.alpha_high)
    if trial.suggest_int("aqe_n", 0, space.max_aqe_n) > 0:
        trial.suggest_float("aqe_alpha", space.alpha_low, space.alpha_high)


def suggest_reranker(trial: optuna.Trial, space: SearchSpace) -> None:
    """Sample the re-ranker: k-reciprocal, else diffusion, else none, with its parameters."""
    kreciprocal = space.kreciprocal and trial.suggest_categorical("kreciprocal", [False, True])
    if kreciprocal:
        trial.suggest_int("k1", *space.k1_range)
        trial.suggest_int("k2", *space.k2_range)
        trial.suggest_float("lambda_value", *space.lambda_range)
    elif space.diffusion and trial.suggest_categorical("diffusion", [False, True]):
        trial.suggest_int("diffusion_k", *space.diffusion_k_range, log=True)
        trial.suggest_float("diffusion_alpha", *space.diffusion_alpha_range)
        trial.suggest_float("diffusion_gamma", *space.diffusion_gamma_range)


def post_from_params(params: dict[str, Any], member_names: Sequence[str], space: SearchSpace) -> PostProcessing:
    """Decode a trial's parameters into the ``PostProcessing`` they stand for."""
    base = RerankParams()
    weights = None
    if len(member_names) > 1:
        weights = [float(params.get(weight_name(n), 1.0)) for n in member_names]
    whiten = bool(params.get("whiten", False))
    use_kr = bool(params.get("kreciprocal", False))
    use_diffusion = not use_kr and bool(params.get("diffusion", False))
    rr = RerankParams(
        dba_n=int(params.get("dba_n", 0)),
        dba_alpha=float(params.get("dba_alpha", base.dba_alpha)),
        aqe_n=int(params.get("aqe_n", 0)),
        aqe_alpha=float(params.get("aqe_alpha", base.aqe_alpha)),
        use_kreciprocal=use_kr,
        k1=int(params.get("k1", base.k1)),
        k2=int(params.get("k2", base.k2)),
        lambda_value=float(params.get("lambda_value", base.lambda_value)),
        use_diffusion=use_diffusion,
        diffusion_k=int(params.get("diffusion_k", base.diffusion_k)),
        diffusion_alpha=float(params.get("diffusion_alpha", base.diffusion_alpha)),
        diffusion_gamma=float(params.get("diffusion_gamma", base.diffusion_gamma)),
    )
    return PostProcessing(
        weights=weights,
        whiten=whiten,
        whiten_dim=int(params["whiten_dim"]) if whiten and "whiten_dim" in params else None,
        whiten_power=float(params.get("whiten_power", 1.0)),
        whiten_shrinkage=space.whiten_shrinkage,
        rerank=rr,
    )


def default_params(member_names: Sequence[str], space: SearchSpace) -> dict[str, Any]:
    """Trial parameters of the untuned defaults: equal weights, no whitening, no re-ranking."""
    params: dict[str, Any] = {}
    if len(member_names) > 1:
        params.update({weight_name(n): space.weight_high for n in member_names})
    params.update({"whiten": False, "dba_n": 0, "aqe_n": 0})
    if space.kreciprocal:
        params["kreciprocal"] = False
    if space.diffusion:
        params["diffusion"] = False
    return params


def _within(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])


def standard_params(member_names: Sequence[str], space: SearchSpace, max_dim: int,
                    stage: str = "kreciprocal") -> dict[str, Any]:
    """Trial parameters of the textbook post-processing, cumulative by ``stage``: "whiten" (PCA-whitening
    at power 0.5), "expand" (+ DBA and aQE over 2 neighbours, alpha 3), then a re-ranker with its
    textbook parameters clamped to ``space``: "kreciprocal" (k1 20, k2 6, lambda 0.3) or "diffusion"
    (k 50, alpha 0.99, gamma 3). A study starts from them as from the untuned defaults, so the tuned
    result is never below the textbook ones on the search problem."""
    params = default_params(member_names, space)
    if max_dim >= 2:
        params.update(whiten=True, whiten_dim=max_dim, whiten_power=0.5)
    if stage in ("expand", "kreciprocal", "diffusion"):
        params.update(dba_n=min(2, space.max_dba_n), dba_alpha=3.0, aqe_n=min(2, space.max_aqe_n), aqe_alpha=3.0)
    if stage == "kreciprocal" and space.kreciprocal:
        params.update(kreciprocal=True, k1=_within(20, space.k1_range), k2=_within(6, space.k2_range),
                      lambda_value=0.3)
        params.pop("diffusion", None)   # not asked when k-reciprocal is on
    if stage == "diffusion" and space.diffusion:
        params.update(diffusion=True, diffusion_k=_within(50, space.diffusion_k_range), diffusion_alpha=0.99,
                      diffusion_gamma=3.0)
    return params


def _edge(value: float, low: float, high: float, log: bool) -> str | None:
    """"bottom"/"top" when ``value`` lies in the outer 5% of [low, high] (log scale when ``log``)."""
    if high <= low:
        return None
    to = (lambda v: math.log(v)) if log and low > 0 else (lambda v: v)
    pos = (to(value) - to(low)) / (to(high) - to(low))
    return "bottom" if pos <= 0.05 else "top" if pos >= 0.95 else None


def boundary_notes(params: Sequence[dict[str, Any]], space: SearchSpace) -> list[str]:
    """Sentences naming the size-bound parameters whose value sits on the edge of its range in most of
    ``params`` (the best trials' parameters): the best may lie beyond the range."""
    ranges = {"k1": (*space.k1_range, False), "k2": (*space.k2_range, False), "dba_n": (0, space.max_dba_n, False),
              "aqe_n": (0, space.max_aqe_n, False), "diffusion_k": (*space.diffusion_k_range, True)}
    notes = []
    for name, (low, high, log) in ranges.items():
        values = [p[name] for p in params if name in p]
        edges = [_edge(v, low, high, log) for v in values]
        for side in ("bottom", "top"):
            if values and edges.count(side) * 2 > len(values) and not (side == "bottom" and low == 0):
                notes.append(f"{name} sits at the {side} of its range [{low}, {high}] in {edges.count(side)} of the "
                             f"{len(values)} best trials that use it: the best value may lie beyond the range")
    return notes
