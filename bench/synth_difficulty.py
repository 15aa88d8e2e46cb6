"""How hard is the synthetic dataset? mAP@1000 of trivial baselines on its test split.

    python -m bench.synth_difficulty [--data DIR | --seeds 0 1 2] [--size 96] ...

(a) 512-bin HSV colour histogram (8x8x8, L2-normalised, cosine ranking);
(b) random ranking (mean over 20 permutations). Without --data it generates
default datasets for each seed in a temporary folder.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np

from backbones.baselines import hsv_histogram
from competition.metrics import mean_average_precision
from competition.synth import SynthConfig, generate


def evaluate(root: Path, k: int = 1000) -> dict[str, float]:
    rows = list(csv.DictReader(open(root / "test" / "labels.csv")))
    q = [r for r in rows if r["split"] == "query"]
    ref = [r for r in rows if r["split"] == "reference"]
    fq, _ = hsv_histogram([root / "test/test_data/query" / f"{r['name']}.jpg" for r in q])
    fr, _ = hsv_histogram([root / "test/test_data/reference" / f"{r['name']}.jpg" for r in ref])
    ql, rl = [r["class"] for r in q], [r["class"] for r in ref]
    hist = mean_average_precision(np.argsort(-(fq @ fr.T), axis=1, kind="stable"), ql, rl, k=k)
    rng = np.random.default_rng(0)
    rand = np.mean([mean_average_precision(np.stack([rng.permutation(len(ref)) for _ in q]), ql, rl, k=k)
                    for _ in range(20)])
    return {"hsv_hist": hist, "random": float(rand), "queries": len(q), "references": len(ref),
            "classes": len(set(ql))}


def main() -> None:
    d = SynthConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an existing dataset (else generate one per seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--test-classes", type=int, default=d.test_classes)
    ap.add_argument("--queries-per-class", type=int, default=d.queries_per_class)
    ap.add_argument("--references-per-class", type=int, default=d.references_per_class)
    ap.add_argument("--size", type=int, default=d.size)
    a = ap.parse_args()
    if a.data:
        print(a.data, evaluate(a.data))
        return
    res = []
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SynthConfig(seed=seed, train_classes=1, images_per_class=1, test_classes=a.test_classes,
                              queries_per_class=a.queries_per_class,
                              references_per_class=a.references_per_class, size=a.size)
            generate(Path(tmp) / "d", cfg)
            res.append(evaluate(Path(tmp) / "d"))
            print(f"seed {seed}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in res[-1].items()))
    print(f"mean over {len(res)} seeds: hsv_hist mAP@1000={np.mean([r['hsv_hist'] for r in res]):.3f}, "
          f"random={np.mean([r['random'] for r in res]):.3f}")


if __name__ == "__main__":
    main()
