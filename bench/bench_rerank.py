"""Benchmark for rerank.k_reciprocal (sparse) vs the dense reference.

Every measured run happens in a fresh subprocess so that ``ru_maxrss`` is
that run's own peak resident memory (faiss allocations included).

    python bench/bench_rerank.py all --out bench/results_rerank.md
    python bench/bench_rerank.py one --impl sparse --nq 18027 --nr 36748   # single run, JSON
    python bench/bench_rerank.py one --impl search --top-k 36748 --device cuda   # full ranking
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHASE2 = (18027, 36748)


def clustered(n: int, d: int, n_clusters: int, seed: int, noise: float = 0.8,
              chunk: int = 8192) -> np.ndarray:
    """Seeded unit vectors around ``n_clusters`` random centres (float32, built in chunks)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        lab = rng.integers(0, n_clusters, e - s)
        x = centres[lab] + (noise / np.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_data(nq: int, nr: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    X = clustered(nq + nr, d, clusters, seed)
    return X[:nq], X[nq:]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cmd_one(a: argparse.Namespace) -> None:
    """One measured run in this process; prints a JSON line, optionally saves results."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    if a.impl == "sparse":
        from rerank import k_reciprocal
    elif a.impl == "search":
        from rerank import search
    else:
        from dense_kreciprocal import dense_top_k
    q, r = make_data(a.nq, a.nr, a.d, a.clusters, a.seed)
    base_mb = peak_mb()   # after imports and input data
    load = os.getloadavg()[0]
    c0 = time.process_time()
    t0 = time.perf_counter()
    if a.impl == "sparse":
        dist, idx = k_reciprocal(q, r, a.k1, a.k2, a.lambda_value, top_k=a.top_k,
                                 device=a.device, progress=a.progress)
    elif a.impl == "search":   # plain exact search; --top-k = --nr is a full ranking
        dist, idx = search(q, r, a.top_k, device=a.device, progress=a.progress)
    else:
        dist, idx = dense_top_k(q, r, a.top_k, k1=a.k1, k2=a.k2, lambda_value=a.lambda_value)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    res = {"impl": a.impl, "device": a.device, "top_k": a.top_k, "nq": a.nq, "nr": a.nr, "d": a.d,
           "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": round(load, 2),
           "peak_rss_mb": round(peak_mb(), 1), "rss_before_mb": round(base_mb, 1),
           "delta_mb": round(peak_mb() - base_mb, 1)}
    if a.save:
        np.savez(a.save, dist=dist, idx=idx)
    print(json.dumps(res), flush=True)


def cmd_recall(a: argparse.Namespace) -> None:
    """Recall@k of the approximate indices against exact search on the phase-2 data."""
    sys.path.insert(0, ROOT)
    from rerank import search
    q, r = make_data(a.nq, a.nr, a.d, a.clusters, a.seed)
    q = q[:a.recall_queries]
    t0 = time.perf_counter()
    _, exact = search(q, r, a.k)
    rows = [{"index": "flat", "params": "-", "recall": 1.0, "recall10": 1.0,
             "wall_s": round(time.perf_counter() - t0, 2)}]
    for kind, params in [("hnsw", {"ef_search": 128}), ("hnsw", {"ef_search": 512}),
                         ("ivf", {"nprobe": 8}), ("ivf", {"nprobe": 32})]:
        t0 = time.perf_counter()
        _, approx = search(q, r, a.k, index=kind, **params)
        wall = time.perf_counter() - t0
        hits = sum(len(np.intersect1d(x, y)) for x, y in zip(exact, approx))
        hits10 = sum(len(np.intersect1d(x[:10], y[:10])) for x, y in zip(exact, approx))
        rows.append({"index": kind, "params": json.dumps(params), "wall_s": round(wall, 2),
                     "recall": round(hits / exact.size, 4),
                     "recall10": round(hits10 / (10 * len(exact)), 4)})
    print(json.dumps(rows), flush=True)


def _sub(args: list[str], timeout: float = 1800) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, check=True,
                         capture_output=True, text=True, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_all(a: argparse.Namespace) -> None:
    common = ["--d", str(a.d), "--seed", str(a.seed)]
    lines = ["# rerank benchmark: k-reciprocal re-ranking, sparse vs dense", "",
             f"- command: `python bench/bench_rerank.py all --out {a.out}`",
             "- machine: 2-core CPU, 24 GiB, no GPU "
             f"(`{platform.processor() or platform.machine()}`, python {platform.python_version()})",
             "- date: 2026-11-23",
             f"- data: seeded clustered random unit vectors (d={a.d}, ~15 images per cluster, "
             "noise 0.8), see `clustered()`",
             "- params: k1=20, k2=6, lambda=0.3 (defaults); wall = k_reciprocal call only; "
             "peak = ru_maxrss of a fresh subprocess (includes the input data)", ""]
    if not a.skip_phase2:
        nq, nr = PHASE2
        res = _sub(["one", "--impl", "sparse", "--nq", str(nq), "--nr", str(nr),
                    "--clusters", str((nq + nr) // 15), "--top-k", "1000"] + common)
        print("phase2", res, flush=True)
        lines += ["## Phase-2 size (18,027 queries + 36,748 references, top_k=1000)", "",
                  "| impl | N | wall (s) | CPU user+sys (s) | peak RSS (MB) | 1-min load before | target |",
                  "|---|---|---|---|---|---|---|",
                  f"| sparse | {nq + nr} | {res['wall_s']} | {res['cpu_s']} | {res['peak_rss_mb']} | "
                  f"{res['load_before']} | < 90 s, < 3 GB |", "",
                  f"Peak growth during the call (over imports + input data): {res['delta_mb']} MB.", ""]
    lines += ["## Dense reference vs sparse (top_k=100, each run in its own process)", "",
              "| N (nq + nr) | dense wall (s) | dense CPU (s) | dense peak (MB) | sparse wall (s) "
              "| sparse CPU (s) | sparse peak (MB) | wall ratio | memory ratio (peak / growth) | max abs diff "
              "| top-100 idx equal |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for N in a.sizes:
            nq = round(N * PHASE2[0] / sum(PHASE2))
            nr = N - nq
            base = ["--nq", str(nq), "--nr", str(nr), "--clusters", str(N // 15),
                    "--top-k", "100"] + common
            rd = _sub(["one", "--impl", "dense", "--save", f"{tmp}/d.npz"] + base)
            rs = _sub(["one", "--impl", "sparse", "--save", f"{tmp}/s.npz"] + base)
            d, s = np.load(f"{tmp}/d.npz"), np.load(f"{tmp}/s.npz")
            diff = float(np.abs(d["dist"] - s["dist"]).max())
            same = float((d["idx"] == s["idx"]).mean())
            print(N, rd, rs, diff, same, flush=True)
            lines.append(
                f"| {N} ({nq} + {nr}) | {rd['wall_s']} | {rd['cpu_s']} | {rd['peak_rss_mb']} | "
                f"{rs['wall_s']} | {rs['cpu_s']} | {rs['peak_rss_mb']} | "
                f"{rd['wall_s'] / max(rs['wall_s'], 1e-9):.1f}x | "
                f"{rd['peak_rss_mb'] / rs['peak_rss_mb']:.1f}x / "
                f"{rd['delta_mb'] / max(rs['delta_mb'], 1e-9):.1f}x | {diff:.2e} | {same:.4f} |")
    if not a.skip_recall:
        nq, nr = PHASE2
        rows = _sub(["recall", "--nq", str(nq), "--nr", str(nr), "--clusters",
                     str((nq + nr) // 15)] + common)
        lines += ["", f"## Approximate search recall@{a.k} (2,000 phase-2 queries vs 36,748 refs)", "",
                  f"| index | params | recall@{a.k} | recall@10 | wall incl. build (s) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['index']} | {x['params']} | {x['recall']} | {x['recall10']} | {x['wall_s']} |"
                  for x in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("one", "recall", "all"):
        sp_ = sub.add_parser(name)
        sp_.add_argument("--d", type=int, default=512)
        sp_.add_argument("--seed", type=int, default=0)
        sp_.add_argument("--nq", type=int, default=PHASE2[0])
        sp_.add_argument("--nr", type=int, default=PHASE2[1])
        sp_.add_argument("--clusters", type=int, default=sum(PHASE2) // 15)
    one = sub.choices["one"]
    one.add_argument("--impl", choices=["sparse", "dense", "search"], default="sparse",
                     help="sparse k_reciprocal, its dense reference, or plain rerank.search")
    one.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (sparse / search)")
    one.add_argument("--k1", type=int, default=20)
    one.add_argument("--k2", type=int, default=6)
    one.add_argument("--lambda-value", type=float, default=0.3)
    one.add_argument("--top-k", type=int, default=1000)
    one.add_argument("--save", default=None, help="save dist/idx to this .npz")
    one.add_argument("--progress", action="store_true")
    rec = sub.choices["recall"]
    rec.add_argument("--k", type=int, default=100)
    rec.add_argument("--recall-queries", type=int, default=2000)
    al = sub.choices["all"]
    al.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    al.add_argument("--k", type=int, default=100)
    al.add_argument("--out", default=os.path.join(HERE, "results_rerank.md"))
    al.add_argument("--skip-phase2", action="store_true")
    al.add_argument("--skip-recall", action="store_true")
    a = p.parse_args(argv)
    {"one": cmd_one, "recall": cmd_recall, "all": cmd_all}[a.cmd](a)


if __name__ == "__main__":
    main()
