"""Tuning throughput: Optuna trials per minute on a synthetic held-out split.

    python bench/bench_tuning.py [--queries 1000] [--refs 4000] [--dim 512] [--train 3000]
                                 [--seconds 90] [--threads 2] [--objective gallery|halves] [--distractors N]

Builds a 2-member held-out set (clustered random unit descriptors, ``--dim`` per
member, so 2*dim concatenated) and runs ``run_search`` (in-memory storage) for
``--seconds`` per mode: the search space without k-reciprocal, and with it (then
TPE switches k-reciprocal on in part of the trials; per-trial times are split by
that flag). The study ranks the search half's queries (about half of them): against every
held-out reference plus ``--distractors`` train images (``gallery``, the default), or
against the search half's references alone (``halves``); a full-split ``evaluate`` is
timed too.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def synthetic_heldout(nq: int, nr: int, dim: int, n_train: int, n_classes: int = 500, seed: int = 0):
    """2-member HeldoutSet of clustered random descriptors (labels are class names)."""
    from tuning.heldout import HeldoutSet

    rng = np.random.default_rng(seed)
    ql = rng.integers(0, n_classes, nq)
    rl = np.concatenate([ql[: min(nq, nr)], rng.integers(0, n_classes, max(0, nr - nq))])
    tl = rng.integers(n_classes, 2 * n_classes, n_train)
    members = []
    for noise in (1.0, 1.6):
        centres = rng.normal(size=(2 * n_classes, dim)).astype(np.float32)
        sets = []
        for lab in (ql, rl, tl):
            x = centres[lab] + noise * rng.normal(size=(len(lab), dim)).astype(np.float32)
            sets.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        members.append(sets)
    names = np.array([f"c{i:04d}" for i in range(2 * n_classes)])
    return HeldoutSet(["m0", "m1"], [m[0] for m in members], [m[1] for m in members], [m[2] for m in members],
                      names[ql], names[rl])


def run_mode(heldout, seconds: float, kreciprocal: bool, objective: str = "gallery",
             distractors: str = "references") -> dict:
    """Run a study for ``seconds``; return trial counts and mean trial durations."""
    import optuna

    from tuning.objective import SearchSpace
    from tuning.search import SearchConfig, run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = SearchConfig(n_trials=10_000, timeout=seconds, seed=0, space=SearchSpace(kreciprocal=kreciprocal),
                       objective=objective, distractors=distractors)
    t0 = time.perf_counter()
    r = run_search(heldout, cfg)
    wall = time.perf_counter() - t0
    trials = [t for t in r.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    dur = {flag: [t.duration.total_seconds() for t in trials if bool(t.params.get("kreciprocal")) == flag]
           for flag in (False, True)}
    search_time = sum(t.duration.total_seconds() for t in trials)
    return {"n": len(trials), "wall": wall, "search_time": search_time,
            "per_min": 60.0 * len(trials) / search_time, "dur": dur, "best": r.best_value,
            "defaults": r.defaults_value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--refs", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--objective", choices=["gallery", "halves"], default="gallery",
                    help="the study's problem (tuning.search.tuning_problems)")
    ap.add_argument("--distractors", default="references", help="train-class distractors in the gallery")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from ensemble.postprocess import PostProcessing
    from rerank.pipeline import RerankParams
    from tuning.objective import evaluate

    h = synthetic_heldout(args.queries, args.refs, args.dim, args.train)
    print(f"held-out: {args.queries} queries + {args.refs} references, 2 members x d={args.dim} "
          f"({2 * args.dim} concatenated), {args.train} train images; objective {args.objective} "
          f"(distractors {args.distractors}); python {platform.python_version()}")
    for name, post in [("plain", PostProcessing()),
                       ("whiten+DBA+aQE", PostProcessing(whiten=True, rerank=RerankParams(dba_n=5, aqe_n=5))),
                       ("k-reciprocal", PostProcessing(rerank=RerankParams(use_kreciprocal=True)))]:
        t0 = time.perf_counter()
        evaluate(h, post)
        print(f"full-split evaluate, {name}: {time.perf_counter() - t0:.2f} s")
    print("\n| search space | trials | trial time (s) | trials/min | mean s/trial without k-recip | "
          "mean s/trial with k-recip | best vs defaults (search half) |")
    print("|---|---|---|---|---|---|---|")
    for kr in (False, True):
        m = run_mode(h, args.seconds, kr, args.objective, args.distractors)
        mean = {f: (f"{np.mean(v):.2f} (n={len(v)})" if v else "-") for f, v in m["dur"].items()}
        print(f"| {'with' if kr else 'without'} k-reciprocal | {m['n']} | {m['search_time']:.0f} | "
              f"{m['per_min']:.1f} | {mean[False]} | {mean[True]} | {m['best']:.4f} vs {m['defaults']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
