"""Does the held-out objective predict the leaderboard? Objective variants against test, on several splits.

    python -m bench.objective_fidelity --split grocery=runs/grocery/bundle --split harsh=runs/harsh/bundle \
        --data ../shared/datasets/grocery --generated hard [--trials 60] [--space sized|fixed] \
        [--out bench/results_objective.json]
    python -m bench.objective_fidelity --merge a.json b.json [--out all.json]   # one summary over both

For every split (a bundle whose members describe ``--data``'s test images, or a generated split,
``bench/generated.py``), ``--trials`` post-processings are drawn at random (seeded) from the tuning
space, plus the textbook ones (k-reciprocal and diffusion defaults); each is scored by every
objective variant and on the test set. Per variant and split: Kendall tau and Spearman rho against
test mAP@k, the highest objective value (saturation), "pick": the test score of the configuration
the variant (and, for fold objectives, each final-choice rule) ranks first minus the best test score
of the sample, whether the pick falls below the textbook k-reciprocal row, and seconds per evaluation.

Variants (``tuning.problems``):
* ``halves``: the search half's queries against its own references (the oldest objective).
* ``gallery+n``: the search half's queries against every held-out reference plus n train-class
  distractors (n = 0 or as many as the references: the objective before class folds).
* ``folds<F>+n``: F class folds of the non-check classes against the same gallery, the mean over
  folds; rules ``mean`` and ``mean-<c>sd`` (mean minus c times the fold spread) pick among them.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
from scipy.stats import kendalltau, spearmanr

from competition.fileio import atomic_write_json
from tuning.folds import class_sizes, fold_problem, make_folds
from tuning.heldout import HeldoutSet
from tuning.objective import WhiteningCache, max_whiten_dim, rank
from tuning.problems import distractor_count, split_halves
from tuning.space import SearchSpace, post_from_params, sized_space, standard_params, suggest_postprocessing

FOLDS = (2, 3, 5)
SPREAD_WEIGHTS = (0.0, 0.5, 1.0)


def sample_posts(heldout: HeldoutSet, n: int, seed: int, space: SearchSpace) -> list:
    """The textbook k-reciprocal and diffusion post-processings, then ``n`` drawn at random from ``space``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names, max_dim = heldout.member_names, max_whiten_dim(heldout)
    posts = [post_from_params(standard_params(names, space, max_dim, stage), names, space)
             for stage in ("kreciprocal", "diffusion")]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        posts.append(suggest_postprocessing(trial, names, max_dim, space))
        study.tell(trial, 0.0)
    return posts


def problems(heldout: HeldoutSet, seed: int = 0) -> dict:
    """name -> (problem set, {variant: query fold labels (-1: not scored)}): one ranking per problem set
    serves every fold count (the check classes are the same for any F)."""
    search_half, _, search_classes, _ = split_halves(heldout, seed)
    out = {"halves": (search_half, {"halves": np.zeros(len(search_half.query_labels), np.int64)})}
    for n_name, n in (("0", 0), ("refs", distractor_count("references", heldout))):
        gallery = heldout.with_distractors(n, seed=seed) if n else heldout
        one = gallery.query_classes(search_classes)
        out[f"gallery+{n_name}"] = (one, {f"gallery+{n_name}": np.zeros(len(one.query_labels), np.int64)})
        first = make_folds(heldout, FOLDS[0], 0.25, seed)
        data = fold_problem(heldout, first, n, seed).data
        variants = {}
        for f in FOLDS:
            folds = make_folds(heldout, f, 0.25, seed)
            fold_of = {c: i for i, fold in enumerate(folds.folds) for c in fold}
            variants[f"folds{f}+{n_name}"] = np.array([fold_of.get(c, -1) for c in data.query_labels])
        out[f"folds+{n_name}"] = (data, variants)
    return out


def score_sample(heldout: HeldoutSet, test: HeldoutSet, posts: list, k: int, seed: int) -> dict:
    """Every post scored by every variant (per-fold maps) and on test; seconds per evaluation per problem."""
    from competition.metrics import average_precision

    probs = problems(heldout, seed)
    cache = WhiteningCache(heldout.train)   # every problem and the test whiten with the same train-class fit
    rows = {name: [] for p in probs.values() for name in p[1]}
    seconds = {name: 0.0 for name in probs}
    test_scores = []
    for i, post in enumerate(posts):
        for pname, (data, variants) in probs.items():
            t0 = time.perf_counter()
            indices = rank(data, post, k, cache.get(post))
            ap = average_precision(indices, data.query_labels, data.reference_labels, k=k)
            seconds[pname] += time.perf_counter() - t0
            for vname, fold_of in variants.items():
                rows[vname].append([float(ap[fold_of == f].mean()) for f in range(fold_of.max() + 1)])
        idx = rank(test, post, k, cache.get(post))
        test_scores.append(float(average_precision(idx, test.query_labels, test.reference_labels, k=k).mean()))
        print(f"  config {i}: test {test_scores[-1]:.4f}  " + "  ".join(
            f"{v} {np.mean(r[-1]):.4f}" for v, r in rows.items() if v.startswith(("gallery+refs", "folds3"))),
              flush=True)
    per_eval = {v: seconds[p] / len(posts) for p, (_, variants) in probs.items() for v in variants}
    return {"fold_maps": rows, "test": test_scores, "s_per_eval": per_eval}


def summarise(scored: dict) -> dict:
    """Per variant (and rule): tau, Spearman, max objective, pick - best, pick below the textbook row."""
    test = np.asarray(scored["test"])
    textbook = test[0]
    out = {}
    for variant, folds in scored["fold_maps"].items():
        folds = np.asarray(folds)
        mean, spread = folds.mean(axis=1), folds.std(axis=1)
        rules = {"mean": mean} if folds.shape[1] == 1 else {
            ("mean" if c == 0 else f"mean-{c:g}sd"): mean - c * spread for c in SPREAD_WEIGHTS}
        for rule, value in rules.items():
            pick = int(np.argmax(value))
            out[f"{variant} [{rule}]" if len(rules) > 1 else variant] = {
                "kendall_tau": float(kendalltau(value, test).statistic),
                "spearman": float(spearmanr(value, test).statistic),
                "max": float(value.max()), "pick_test": float(test[pick]), "best_test": float(test.max()),
                "pick_minus_best": float(test[pick] - test.max()), "textbook_test": float(textbook),
                "below_textbook": bool(test[pick] < textbook - 1e-12),
                "s_per_eval": scored["s_per_eval"][variant]}
    return out


def bundle_split(bundle_dir: str, data: str, device: str) -> tuple[HeldoutSet, HeldoutSet]:
    from ensemble.bundle import Bundle
    from tuning.heldout import heldout_set
    from tuning.table import describe_test_set

    bundle = Bundle.load(bundle_dir)
    return heldout_set(bundle), describe_test_set(bundle, Path(data), Path(bundle_dir).parent / "cache", device)


def generated_split(seed: int, scale: float) -> tuple[HeldoutSet, HeldoutSet]:
    """A generated split (``bench/generated.py``), ``scale`` times a grocery-like size."""
    from bench.generated import GeneratedConfig, generate

    cfg = GeneratedConfig(train_images=int(12_000 * scale), train_classes=int(220 * scale),
                          test_queries=int(3_000 * scale), test_references=int(6_000 * scale), seed=seed)
    g = generate(cfg)
    train_rows, q_rows, r_rows = g.heldout_rows(seed=seed)
    heldout = HeldoutSet(g.member_names, [t[q_rows] for t in g.train], [t[r_rows] for t in g.train],
                         [t[train_rows] for t in g.train], g.train_labels[q_rows], g.train_labels[r_rows])
    test = HeldoutSet(g.member_names, g.query, g.reference, heldout.train, g.query_labels, g.reference_labels)
    return heldout, test


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.objective_fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", action="append", default=[], metavar="NAME=BUNDLE", help="a bundle's split")
    ap.add_argument("--data", help="the dataset whose test set the bundles' members describe")
    ap.add_argument("--generated", action="append", default=[], metavar="NAME[:SEED[:SCALE]]",
                    help="a generated split (bench/generated.py)")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--space", choices=["sized", "fixed"], default="sized",
                    help="draw from the space sized by the class sizes (the default study's) or the fixed one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write every score and the summaries as JSON")
    ap.add_argument("--merge", nargs="+", metavar="FILE.json", help="no scoring: print the tables of earlier "
                    "--out files together, with the summary over all their splits (and write them to --out)")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    splits = {}
    for spec in a.split:
        name, _, bundle = spec.partition("=")
        splits[name] = lambda b=bundle: bundle_split(b, a.data, a.device)
    for spec in a.generated:
        name, seed, scale = (spec.split(":") + ["0", "1"])[:3]
        splits[name] = lambda s=int(seed), x=float(scale): generated_split(s, x)
    results = {}
    for name, load in splits.items():
        heldout, test = load()
        space = sized_space(SearchSpace(), *class_sizes(heldout)) if a.space == "sized" else SearchSpace()
        print(f"{name}: {len(heldout.query_labels)} held-out queries, {len(test.query_labels)} test queries",
              flush=True)
        scored = score_sample(heldout, test, sample_posts(heldout, a.trials, a.seed, space), a.k, a.seed)
        results[name] = {"summary": summarise(scored), "scores": scored, "space": replace(space).__dict__}
        print_table(name, results[name]["summary"])
        if a.out:
            atomic_write_json(a.out, {"trials": a.trials, "seed": a.seed, "space": a.space, "splits": results})
    if len(results) > 1:
        print_overall(results)
    return 0


def merge(files: list[str], out: str | None) -> int:
    """Print (and write to ``out``) the splits of several result files as one result."""
    import json

    loaded = [json.loads(Path(f).read_text()) for f in files]
    results = {name: r for d in loaded for name, r in d["splits"].items()}
    for name, r in results.items():
        print_table(name, r["summary"])
    print_overall(results)
    if out:
        atomic_write_json(out, {**{k: loaded[0][k] for k in ("trials", "seed", "space")}, "merged": files,
                                "splits": results})
    return 0


def print_table(name: str, summary: dict) -> None:
    print(f"\n{name}\n| objective | Kendall tau | Spearman | max objective | pick - best | below textbook | s/eval |")
    print("|---|---|---|---|---|---|---|")
    for v, s in summary.items():
        print(f"| {v} | {s['kendall_tau']:.3f} | {s['spearman']:.3f} | {s['max']:.4f} | "
              f"{100 * s['pick_minus_best']:+.2f} | {'yes' if s['below_textbook'] else 'no'} | {s['s_per_eval']:.2f} |")


def print_overall(results: dict) -> None:
    variants = list(next(iter(results.values()))["summary"])
    print("\nall splits\n| objective | mean Kendall tau | worst pick - best (points) | picks below textbook |")
    print("|---|---|---|---|")
    for v in variants:
        rows = [r["summary"][v] for r in results.values()]
        print(f"| {v} | {np.mean([s['kendall_tau'] for s in rows]):.3f} | "
              f"{100 * min(s['pick_minus_best'] for s in rows):+.2f} | {sum(s['below_textbook'] for s in rows)} |")


if __name__ == "__main__":
    raise SystemExit(main())
