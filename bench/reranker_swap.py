"""k-reciprocal or diffusion on the same tuned descriptors: which re-ranker wins on a real split?

    python -m bench.reranker_swap --run runs/grocery --data ../shared/datasets/grocery [--out FILE.json]

Takes a recipe run folder's tuned bundle (``RUN/bundle``, its cached test descriptors in
``RUN/cache``) and keeps everything the study chose but the re-ranker, then scores on the
held-out split and the test set: no re-ranker; the tuned k-reciprocal; k-reciprocal with the
textbook (k1, k2, lambda); diffusion with its defaults; and diffusion with (k, alpha, gamma)
picked on the held-out split from a grid (k around the references per class, as
``tuning.space.sized_space`` sizes it). The test column is never used to pick anything.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

from rerank.pipeline import RerankParams
from tuning.folds import class_sizes
from tuning.objective import WhiteningCache, evaluate

ALPHAS, GAMMAS = (0.9, 0.95, 0.99), (1.0, 3.0)


def diffusion_grid(base: RerankParams, images_per_class: float) -> list[RerankParams]:
    """``base`` (its DBA and aQE) with diffusion for k in {s/2, s, 2s} (s images per class) x alpha x gamma."""
    ks = sorted({max(5, round(images_per_class * f)) for f in (0.5, 1.0, 2.0)})
    return [replace(base, use_kreciprocal=False, use_diffusion=True, diffusion_k=k, diffusion_alpha=a,
                    diffusion_gamma=g) for k, a, g in itertools.product(ks, ALPHAS, GAMMAS)]


def main(argv: list[str] | None = None) -> int:
    from ensemble.bundle import Bundle
    from tuning.heldout import heldout_set
    from tuning.table import describe_test_set

    ap = argparse.ArgumentParser(prog="python -m bench.reranker_swap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a recipe run folder (RUN/bundle, RUN/cache)")
    ap.add_argument("--data", required=True, help="the dataset whose test set the members describe")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args(argv)

    run = Path(args.run)
    bundle = Bundle.load(run / "bundle")
    heldout = heldout_set(bundle)
    test = describe_test_set(bundle, Path(args.data), run / "cache", "cpu")
    tuned, cache = bundle.post, WhiteningCache(heldout.train)
    expand = replace(tuned.rerank, use_kreciprocal=False, use_diffusion=False)
    textbook = RerankParams()
    candidates = {
        "tuned descriptors, no re-ranker": expand,
        "tuned k-reciprocal" if tuned.rerank.use_kreciprocal else "tuned (its re-ranker)": tuned.rerank,
        "k-reciprocal, textbook k1/k2/lambda": replace(expand, use_kreciprocal=True, k1=textbook.k1,
                                                       k2=textbook.k2, lambda_value=textbook.lambda_value),
        "diffusion (defaults)": replace(expand, use_diffusion=True),
    }

    def score(params: RerankParams) -> dict:
        post = replace(tuned, rerank=params)
        t0 = time.perf_counter()
        row = {"heldout": evaluate(heldout, post, args.k, cache.get(post))["map_at_k"],
               "test": evaluate(test, post, args.k, cache.get(post))["map_at_k"]}
        return {**row, "seconds": time.perf_counter() - t0}

    rows = {name: {**score(p), "params": p.to_dict()} for name, p in candidates.items()}
    grid = []
    for p in diffusion_grid(expand, class_sizes(heldout)[0]):
        grid.append({**score(p), "params": p.to_dict()})
        print(f"  diffusion k {p.diffusion_k} alpha {p.diffusion_alpha} gamma {p.diffusion_gamma:g}: "
              f"held-out {grid[-1]['heldout']:.4f} test {grid[-1]['test']:.4f}", flush=True)
    best = max(grid, key=lambda g: g["heldout"])
    d = best["params"]
    rows[f"diffusion, grid pick on held-out (k {d['diffusion_k']}, alpha {d['diffusion_alpha']}, "
         f"gamma {d['diffusion_gamma']:g})"] = best
    rows["(diffusion, best test of the grid: not a choice)"] = max(grid, key=lambda g: g["test"])

    print(f"\n| re-ranker on the tuned descriptors ({run}) | held-out mAP@{args.k} | test mAP@{args.k} | s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['heldout']:.4f} | {r['test']:.4f} | {r['seconds']:.1f} |")
    if args.out:
        from competition.fileio import atomic_write_json
        atomic_write_json(args.out, {"rows": rows, "grid": grid})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
