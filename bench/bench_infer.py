"""Time and peak memory of inference at the phase-2 size: 18,027 queries x 36,748 references.

    python bench/bench_infer.py [--members 3] [--d 512]              # plain: weighted concatenation, exact search
    python bench/bench_infer.py --kreciprocal                         # + k-reciprocal re-ranking (k1 20, k2 6)
    python bench/bench_infer.py --tuned                               # the textbook tuned path (below)
    python bench/bench_infer.py --whiten-dim 512 --dba-n 2 --aqe-n 2 --kreciprocal
    python bench/bench_infer.py --post BUNDLE/postprocessing.json     # any stored post-processing

``--tuned`` is ``tuning.objective.standard_params``' textbook post-processing: PCA-whitening
(every component, power 0.5), DBA and alpha-QE over 2 neighbours (alpha 3), k-reciprocal
(k1 20, k2 6, lambda 0.3). Whitening is fitted on 5,000 train-class rows (main.py's default
``--max-train-images``) before the clock starts.

Three precomputed-descriptor members (``FileMember``: clustered random unit vectors,
memory-mapped .npy files) stand in for trained backbones, so the measurement is the
ensemble + ranking + submission path of ``main.py``'s infer and local submission, not the CNN
forward passes (see bench_backbones.py for those): ``Ensemble.rank`` (member reads, weighted
concatenation and whitening, ``rerank``), ``build_submission``, the local scores and
``write_submission``. Each stage's wall time and peak RSS are printed (VmHWM, reset at the
start of each stage where Linux allows it), with the load average before and after: numbers
taken on busy cores are slower than on idle ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ensemble.model as model_mod  # noqa: E402
import rerank as rerank_pkg  # noqa: E402
import rerank.pipeline as pipeline_mod  # noqa: E402
from competition import submission as submission_mod  # noqa: E402
from ensemble.members import FileMember  # noqa: E402
from ensemble.model import Ensemble  # noqa: E402
from ensemble.postprocess import PostProcessing, fit_whitening_for  # noqa: E402
from rerank.pipeline import RerankParams  # noqa: E402

PHASE2 = (18_027, 36_748)
N_TRAIN = 5_000
RERANK_STEPS = {"database_augmentation": "rerank: DBA", "alpha_query_expansion": "rerank: aQE",
                "k_reciprocal": "rerank: k-reciprocal", "search": "rerank: search"}


def _peak_mb() -> float:
    """Peak RSS (MB) since the last ``_reset_peak``, or of the whole process where Linux has no VmHWM."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class Stages:
    """Wall time and peak RSS per named stage, summed over calls; ``wrap`` times a module's function."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        _reset_peak()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
            self.peak[name] = max(self.peak.get(name, 0.0), _peak_mb())

    def wrap(self, module, attr: str, name) -> None:
        """Time every call of ``module.attr`` as stage ``name`` (a str, or a function of the call's kwargs)."""
        inner = getattr(module, attr)

        def timed(*args, **kwargs):
            with self.stage(name(kwargs) if callable(name) else name):
                return inner(*args, **kwargs)
        setattr(module, attr, timed)


def post_from_args(args: argparse.Namespace) -> PostProcessing:
    """The post-processing the options ask for (see the module docstring)."""
    if args.post:
        return PostProcessing.from_dict(json.loads(Path(args.post).read_text()))
    if args.tuned:
        return PostProcessing(whiten=True, whiten_power=0.5, rerank=RerankParams(
            dba_n=2, aqe_n=2, use_kreciprocal=True, k1=20, k2=6, lambda_value=0.3))
    return PostProcessing(whiten=args.whiten_dim is not None, whiten_dim=args.whiten_dim or None,
                          whiten_power=args.whiten_power,
                          rerank=RerankParams(dba_n=args.dba_n, aqe_n=args.aqe_n, use_kreciprocal=args.kreciprocal))


def make_members(folder: Path, n_members: int, d: int, names: list[str], n_train: int,
                 rng: np.random.Generator) -> tuple[list[FileMember], list[np.ndarray], np.ndarray]:
    """Write the members' .npy/.txt files; return (members, per-member train rows, cluster of each image)."""
    centres = rng.normal(size=(len(names) // 15, d)).astype(np.float32)
    cluster = rng.integers(0, len(centres), len(names) + n_train)
    members, train = [], []
    for m in range(n_members):
        x = centres[cluster] + 0.8 * rng.normal(size=(len(cluster), d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / f"m{m}.npy", x[:len(names)])
        (folder / f"m{m}.txt").write_text("\n".join(names) + "\n")
        train.append(x[len(names):])
        del x
        members.append(FileMember.from_file(folder / f"m{m}.npy"))
    return members, train, cluster[:len(names)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--kreciprocal", action="store_true")
    ap.add_argument("--whiten-dim", type=int, metavar="N", help="PCA-whitening to N dims (0: every component)")
    ap.add_argument("--whiten-power", type=float, default=0.5)
    ap.add_argument("--dba-n", type=int, default=0)
    ap.add_argument("--aqe-n", type=int, default=0)
    ap.add_argument("--tuned", action="store_true", help="the textbook tuned post-processing (see above)")
    ap.add_argument("--post", metavar="FILE.json", help="a PostProcessing file (e.g. a bundle's postprocessing.json)")
    ap.add_argument("--size", type=int, nargs=2, default=PHASE2, metavar=("QUERIES", "REFERENCES"),
                    help="a smaller set for a quick check")
    args = ap.parse_args()
    nq, nr = args.size
    load_before = os.getloadavg()
    names = [f"q{i:05d}" for i in range(nq)] + [f"r{i:05d}" for i in range(nr)]
    stages = Stages()
    with tempfile.TemporaryDirectory() as tmp:
        members, train, cluster = make_members(Path(tmp), args.members, args.d, names, N_TRAIN,
                                               np.random.default_rng(0))
        post = post_from_args(args)
        t0 = time.perf_counter()
        whitening = fit_whitening_for(train, post)
        fit_s = time.perf_counter() - t0
        del train
        ensemble = Ensemble(members, post=post, whitening=whitening)
        stages.wrap(model_mod, "describe_all", lambda kw: f"members: read {kw.get('set_name', '')}")
        stages.wrap(model_mod, "ensemble_descriptors", "concatenate + whiten")
        for attr, name in RERANK_STEPS.items():
            stages.wrap(pipeline_mod, attr, name)
        stages.wrap(rerank_pkg, "rerank", "rerank: total")  # what Ensemble.rank imports
        labels = {"query": {n: str(c) for n, c in zip(names[:nq], cluster[:nq])},
                  "reference": {n: str(c) for n, c in zip(names[nq:], cluster[nq:])}}
        rss_before = _peak_mb()
        t_all = time.perf_counter()
        with stages.stage("rank: total"):
            ranking = ensemble.rank([f"{n}.jpg" for n in names[:nq]], [f"{n}.jpg" for n in names[nq:]], top_k=1000)
        with stages.stage("submission: lists"):
            submission = submission_mod.build_submission(names[:nq], names[nq:], ranking.indices, length=1000)
        with stages.stage("submission: scores"):
            scores = submission_mod.score_rankings(submission.indices, labels, names[:nq], names[nq:])
        with stages.stage("submission: files"):
            submission_mod.write_submission(submission, Path(tmp) / "out")
        wall = time.perf_counter() - t_all
    report(stages, args, post, wall, fit_s, rss_before, scores, load_before)


def report(stages: Stages, args, post: PostProcessing, wall: float, fit_s: float, rss_before: float,
           scores: dict, load_before: tuple) -> None:
    """Print the stages as a markdown table (stages inside ``rerank`` and ``rank`` without their own
    peak: their memory is in the sub-stages')."""
    w, p = stages.wall, stages.peak
    inner = sum(v for k, v in w.items() if k.startswith("rerank: ") and k != "rerank: total")
    w["rerank: checks, glue"] = w.get("rerank: total", 0.0) - inner
    inside_rank = sum(v for k, v in w.items() if k.startswith(("members: ", "concatenate")) or k == "rerank: total")
    w["rank: other"] = w["rank: total"] - inside_rank
    rr = post.rerank
    print(f"{args.members} members x d={args.d}, {args.size[0]} x {args.size[1]}, whiten={post.whiten} "
          f"(dim {post.whiten_dim}, power {post.whiten_power}), dba_n={rr.dba_n}, aqe_n={rr.aqe_n}, "
          f"k-reciprocal={rr.use_kreciprocal}; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print("| stage | wall s | peak RSS MB |\n|---|---|---|")
    order = [k for k in w if k not in ("rank: total", "rerank: total")]
    for name in sorted(order, key=lambda k: (not k.startswith(("members", "concat", "rerank", "rank")), k)):
        print(f"| {name} | {w[name]:.1f} | {p.get(name, float('nan')):.0f} |")
    print(f"| **total** | **{wall:.1f}** | {max(p.values()):.0f} |")
    print(f"(whitening fit before the clock: {fit_s:.1f} s; RSS before ranking {rss_before:.0f} MB; "
          f"mAP@1000 {scores['map_at_k']:.4f})")


if __name__ == "__main__":
    main()
