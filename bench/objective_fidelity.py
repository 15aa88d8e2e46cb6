"""Does the held-out objective predict the leaderboard? Kendall tau between objectives and test.

    python -m bench.objective_fidelity --bundle runs/grocery/bundle --data ../shared/datasets/grocery \
        [--trials 60] [--seed 0] [--out bench/results_objective.json]

Samples ``--trials`` post-processings at random from the tuning search space (seeded), and
scores each with every objective variant below and on the test set (the bundle's members
describe the test images; labels from test/labels.csv). Reports, per variant: Kendall tau
and Spearman rho against test mAP@k, the highest objective value (saturation), the test
score of the configuration the variant would choose against the best test score in the
sample, and the seconds one evaluation takes.

Variants (search classes = the study's search half of the held-out classes):
* ``search-half``: search-class queries against search-class references (the old objective).
* ``gallery``: every held-out query against every held-out reference in one ranking, scored
  on the search-class queries (the check half's references are unseen-class distractors).
* ``gallery+train(n)``: the same, plus n of the bundle's train-class descriptors as distractors
  (as many as the held-out references, or all of them).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import optuna
from scipy.stats import kendalltau, spearmanr

from competition.fileio import atomic_write_json
from ensemble.bundle import Bundle
from tuning.heldout import HeldoutSet, heldout_set
from tuning.objective import SearchSpace, evaluate, max_whiten_dim, suggest_postprocessing
from tuning.search import SearchConfig, tuning_problems
from tuning.table import describe_test_set


def sample_posts(heldout: HeldoutSet, n: int, seed: int, space: SearchSpace) -> list:
    """``n`` post-processings drawn at random from the search space."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    posts = []
    for _ in range(n):
        trial = study.ask()
        posts.append(suggest_postprocessing(trial, heldout.member_names, max_whiten_dim(heldout), space))
        study.tell(trial, 0.0)
    return posts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.objective_fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the per-trial scores and the summary as JSON")
    a = ap.parse_args(argv)
    bundle = Bundle.load(a.bundle)
    heldout = heldout_set(bundle)
    test = describe_test_set(bundle, Path(a.data), Path(a.bundle).parent / "cache", a.device)
    # the study's own search problem under each objective (tuning.search.tuning_problems)
    variants = {name: tuning_problems(heldout, SearchConfig(**kw))[0] for name, kw in (
        ("search-half", {"objective": "halves"}), ("gallery", {"distractors": 0}),
        ("gallery+train(n_ref)", {"distractors": "references"}), ("gallery+train(all)", {"distractors": "all"}))}
    posts = sample_posts(heldout, a.trials, a.seed, SearchSpace())
    scores = {name: [] for name in [*variants, "test"]}
    seconds = {name: 0.0 for name in variants}
    for i, post in enumerate(posts):
        for name, problem in variants.items():
            t0 = time.perf_counter()
            scores[name].append(evaluate(problem, post, k=a.k)["map_at_k"])
            seconds[name] += time.perf_counter() - t0
        scores["test"].append(evaluate(test, post, k=a.k)["map_at_k"])
        print(f"trial {i}: " + "  ".join(f"{n} {v[-1]:.4f}" for n, v in scores.items()), flush=True)
    test_scores = np.asarray(scores["test"])
    summary = {}
    for name in variants:
        v = np.asarray(scores[name])
        summary[name] = {"kendall_tau": float(kendalltau(v, test_scores).statistic),
                         "spearman": float(spearmanr(v, test_scores).statistic),
                         "max": float(v.max()), "chosen_test": float(test_scores[int(v.argmax())]),
                         "best_test": float(test_scores.max()), "s_per_eval": seconds[name] / len(posts)}
    print("\n| objective | Kendall tau | Spearman | max objective | test of chosen | best test | s/eval |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['kendall_tau']:.3f} | {s['spearman']:.3f} | {s['max']:.4f} | {s['chosen_test']:.4f} | "
              f"{s['best_test']:.4f} | {s['s_per_eval']:.2f} |")
    if a.out:
        atomic_write_json(a.out, {"summary": summary, "scores": scores, "trials": a.trials, "seed": a.seed,
                                  "bundle": str(a.bundle), "posts": [p.to_dict() for p in posts]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
