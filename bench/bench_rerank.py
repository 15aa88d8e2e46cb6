"""Benchmark for rerank.k_reciprocal (sparse) vs the dense reference, and rerank.diffusion.

Every measured run happens in a fresh subprocess so that ``ru_maxrss`` is
that run's own peak resident memory (faiss allocations included).

    python bench/bench_rerank.py all --out bench/results_rerank.md
    python bench/bench_rerank.py one --impl sparse --nq 18027 --nr 36748   # single run, JSON
    python bench/bench_rerank.py one --impl diffusion --truncate 1000      # diffusion, phase-2 size
    python bench/bench_rerank.py one --impl search --top-k 36748 --device cuda   # full ranking
    python bench/bench_rerank.py truncation --n 4000 --per-class 40 --noise 2.5  # truncated vs whole graph
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
sys.path.insert(0, ROOT)
from rerank.diffusion import DEFAULT_TRUNCATE  # noqa: E402  (after the checkout is on the path)

PHASE2 = (18027, 36748)
TRUNCATION_SETS = [(4000, 40, 2.5), (4000, 15, 2.2)]   # (N, images per cluster, noise)


def clustered(n: int, d: int, n_clusters: int, seed: int, noise: float = 0.8, chunk: int = 8192,
              labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Seeded unit vectors around ``n_clusters`` random centres (float32, built in chunks);
    with ``labels``, also each vector's centre (int64)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    lab = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        lab[s:e] = rng.integers(0, n_clusters, e - s)
        x = centres[lab[s:e]] + (noise / np.sqrt(d)) * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (out, lab) if labels else out


def make_data(nq: int, nr: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    X = clustered(nq + nr, d, clusters, seed)
    return X[:nq], X[nq:]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cmd_one(a: argparse.Namespace) -> None:
    """One measured run in this process; prints a JSON line, optionally saves results."""
    sys.path.insert(0, HERE)
    if a.impl == "sparse":
        from rerank import k_reciprocal
    elif a.impl == "diffusion":
        from rerank import diffusion
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
    elif a.impl == "diffusion":
        dist, idx = diffusion(q, r, a.k, a.alpha, a.gamma, top_k=a.top_k, truncate=a.truncate,
                              device=a.device, progress=a.progress)
    elif a.impl == "search":   # plain exact search; --top-k = --nr is a full ranking
        dist, idx = search(q, r, a.top_k, device=a.device, progress=a.progress)
    else:
        dist, idx = dense_top_k(q, r, a.top_k, k1=a.k1, k2=a.k2, lambda_value=a.lambda_value)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    res = {"impl": a.impl, "device": a.device, "top_k": a.top_k, "nq": a.nq, "nr": a.nr, "d": a.d,
           **({"k": a.k, "alpha": a.alpha, "gamma": a.gamma, "truncate": a.truncate} if a.impl == "diffusion" else {}),
           "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": round(load, 2),
           "peak_rss_mb": round(peak_mb(), 1), "rss_before_mb": round(base_mb, 1),
           "delta_mb": round(peak_mb() - base_mb, 1)}
    if a.save:
        np.savez(a.save, dist=dist, idx=idx)
    print(json.dumps(res), flush=True)


def cmd_recall(a: argparse.Namespace) -> None:
    """Recall@k of the approximate indices against exact search on the phase-2 data."""
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


def cmd_truncation(a: argparse.Namespace) -> None:
    """Truncated diffusion vs the whole graph on a mid-size clustered set: mAP@1000 with the
    clusters as labels, overlap of the top-10 / top-100 with the whole graph's, wall (this process)."""
    from competition.metrics import average_precision
    from rerank import diffusion, search
    X, lab = clustered(a.n, a.d, max(1, a.n // a.per_class), a.seed, a.noise, labels=True)
    nq = round(a.n * PHASE2[0] / sum(PHASE2))
    q, r = X[:nq], X[nq:]

    def score(idx: np.ndarray) -> float:
        return round(float(average_precision(idx, lab[:nq], lab[nq:], k=1000).mean()), 4)

    rows = [{"method": "plain search", "map": score(search(q, r, 1000)[1])}]
    t0 = time.perf_counter()
    whole = diffusion(q, r, a.k, a.alpha, a.gamma, truncate=None)[1]
    rows.append({"method": "whole graph", "map": score(whole), "overlap10": 1.0, "overlap100": 1.0,
                 "wall_s": round(time.perf_counter() - t0, 1)})
    for m in a.truncates:
        t0 = time.perf_counter()
        idx = diffusion(q, r, a.k, a.alpha, a.gamma, truncate=m)[1]
        wall = time.perf_counter() - t0
        overlap = {f"overlap{t}": round(float(np.mean([len(np.intersect1d(x[:t], y[:t]))
                                                       for x, y in zip(idx, whole)]) / t), 4) for t in (10, 100)}
        rows.append({"method": f"truncate {m}", "map": score(idx), **overlap, "wall_s": round(wall, 1)})
    print(json.dumps({"n": a.n, "nq": nq, "per_class": a.per_class, "noise": a.noise, "d": a.d, "rows": rows}),
          flush=True)


def _sub(args: list[str], timeout: float = 1800) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, check=True,
                         capture_output=True, text=True, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _phase2_section(common: list[str]) -> list[str]:
    nq, nr = PHASE2
    base = ["--nq", str(nq), "--nr", str(nr), "--clusters", str((nq + nr) // 15), "--top-k", "1000"] + common
    runs = [("k-reciprocal (k1 20, k2 6, lambda 0.3)", _sub(["one", "--impl", "sparse"] + base), "<= 20 s, <= 1 GB"),
            (f"diffusion (k 50, alpha 0.99, gamma 3, truncate {DEFAULT_TRUNCATE})",
             _sub(["one", "--impl", "diffusion", "--truncate", str(DEFAULT_TRUNCATE)] + base),
             "<= 60 s, <= 2 GB")]
    lines = ["## Phase-2 size (18,027 queries + 36,748 references, top_k=1000)", "",
             "| re-ranker | wall (s) | CPU user+sys (s) | peak RSS (MB) | growth (MB) | 1-min load before | target |",
             "|---|---|---|---|---|---|---|"]
    for name, res, target in runs:
        print("phase2", name, res, flush=True)
        lines.append(f"| {name} | {res['wall_s']} | {res['cpu_s']} | {res['peak_rss_mb']} | {res['delta_mb']} | "
                     f"{res['load_before']} | {target} |")
    return lines + ["", "Growth: peak RSS over imports + input data (the input alone is ~250 MB).", ""]


def _dense_section(common: list[str], sizes: list[int]) -> list[str]:
    lines = ["## Dense reference vs sparse k-reciprocal (top_k=100, each run in its own process)", "",
             "| N (nq + nr) | dense wall (s) | dense CPU (s) | dense peak (MB) | sparse wall (s) "
             "| sparse CPU (s) | sparse peak (MB) | wall ratio | memory ratio (peak / growth) | max abs diff "
             "| top-100 idx equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for N in sizes:
            nq = round(N * PHASE2[0] / sum(PHASE2))
            nr = N - nq
            base = ["--nq", str(nq), "--nr", str(nr), "--clusters", str(N // 15), "--top-k", "100"] + common
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
    return lines + [""]


def _recall_section(common: list[str], k: int) -> list[str]:
    nq, nr = PHASE2
    rows = _sub(["recall", "--nq", str(nq), "--nr", str(nr), "--clusters", str((nq + nr) // 15), "--k", str(k)]
                + common)
    lines = [f"## Approximate search recall@{k} (2,000 phase-2 queries vs 36,748 refs)", "",
             f"| index | params | recall@{k} | recall@10 | wall incl. build (s) |", "|---|---|---|---|---|"]
    return lines + [f"| {x['index']} | {x['params']} | {x['recall']} | {x['recall10']} | {x['wall_s']} |"
                    for x in rows] + [""]


def _truncation_section() -> list[str]:
    lines = ["## Diffusion: truncated subgraphs vs the whole graph (k 50, alpha 0.99, gamma 3)", "",
             "Mid-size clustered sets (d 512, queries:references as in phase 2); mAP@1000 with the clusters "
             "as labels; overlap of the top-10 / top-100 with the whole graph's ranking; wall in one process.", "",
             "| set | method | mAP@1000 | top-10 overlap | top-100 overlap | wall (s) |", "|---|---|---|---|---|---|"]
    for n, per_class, noise in TRUNCATION_SETS:
        res = _sub(["truncation", "--n", str(n), "--per-class", str(per_class), "--noise", str(noise)], timeout=3600)
        print("truncation", res, flush=True)
        name = f"N {n} ({res['nq']} q), {per_class}/class, noise {noise}"
        lines += [f"| {name} | {row['method']} | {row['map']} | {row.get('overlap10', '-')} | "
                  f"{row.get('overlap100', '-')} | {row.get('wall_s', '-')} |" for row in res["rows"]]
    return lines + [""]


def cmd_all(a: argparse.Namespace) -> None:
    common = ["--d", str(a.d), "--seed", str(a.seed)]
    lines = ["# rerank benchmark: k-reciprocal (sparse vs dense) and diffusion", "",
             f"- command: `python bench/bench_rerank.py all --out {a.out}`",
             "- machine: 2-core CPU, 24 GiB, no GPU "
             f"(`{platform.processor() or platform.machine()}`, python {platform.python_version()})",
             f"- date: {time.strftime('%Y-%m-%d')}",
             f"- data: seeded clustered random unit vectors (d={a.d}, ~15 images per cluster, "
             "noise 0.8), see `clustered()`",
             "- wall = the re-ranking call only; peak = ru_maxrss of a fresh subprocess (includes the input data)",
             ""]
    if not a.skip_phase2:
        lines += _phase2_section(common)
    if not a.skip_dense:
        lines += _dense_section(common, a.sizes)
    if not a.skip_recall:
        lines += _recall_section(common, a.k)
    if not a.skip_truncation:
        lines += _truncation_section()
    text = "\n".join(lines)
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
    one.add_argument("--impl", choices=["sparse", "dense", "diffusion", "search"], default="sparse",
                     help="sparse k_reciprocal, its dense reference, rerank.diffusion or plain rerank.search")
    one.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (sparse / search)")
    one.add_argument("--k1", type=int, default=20)
    one.add_argument("--k2", type=int, default=6)
    one.add_argument("--lambda-value", type=float, default=0.3)
    one.add_argument("--top-k", type=int, default=1000)
    one.add_argument("--save", default=None, help="save dist/idx to this .npz")
    one.add_argument("--progress", action="store_true")
    for parser in (one, sub.add_parser("truncation")):
        parser.add_argument("--k", type=int, default=50, help="diffusion: neighbours")
        parser.add_argument("--alpha", type=float, default=0.99, help="diffusion: alpha")
        parser.add_argument("--gamma", type=float, default=3.0, help="diffusion: gamma")
    one.add_argument("--truncate", type=lambda v: None if v == "none" else int(v), default=DEFAULT_TRUNCATE,
                     help="diffusion: rows per query subgraph, or none (whole graph)")
    tr = sub.choices["truncation"]
    tr.add_argument("--d", type=int, default=512)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--n", type=int, default=4000)
    tr.add_argument("--per-class", type=int, default=40)
    tr.add_argument("--noise", type=float, default=2.5)
    tr.add_argument("--truncates", type=int, nargs="+", default=[100, 200, 300, 500, 1000, 2000])
    rec = sub.choices["recall"]
    rec.add_argument("--k", type=int, default=100)
    rec.add_argument("--recall-queries", type=int, default=2000)
    al = sub.choices["all"]
    al.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    al.add_argument("--k", type=int, default=100)
    al.add_argument("--out", default=os.path.join(HERE, "results_rerank.md"))
    al.add_argument("--skip-phase2", action="store_true")
    al.add_argument("--skip-dense", action="store_true")
    al.add_argument("--skip-recall", action="store_true")
    al.add_argument("--skip-truncation", action="store_true")
    a = p.parse_args(argv)
    {"one": cmd_one, "recall": cmd_recall, "truncation": cmd_truncation, "all": cmd_all}[a.cmd](a)


if __name__ == "__main__":
    main()
