"""Time and peak memory of inference at the phase-2 size: 18,027 queries x 36,748 references.

    python bench/bench_infer.py [--members 3] [--d 512] [--kreciprocal]

Three precomputed-descriptor members (``FileMember``: clustered random unit vectors,
memory-mapped .npy files) stand in for trained backbones, so the measurement is the
ensemble + ranking + submission path of ``main.py``'s infer, not the CNN forward passes
(see bench_backbones.py for those).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from competition.submission import build_submission  # noqa: E402
from ensemble.members import FileMember  # noqa: E402
from ensemble.model import Ensemble  # noqa: E402
from ensemble.postprocess import PostProcessing  # noqa: E402
from rerank.pipeline import RerankParams  # noqa: E402

PHASE2 = (18_027, 36_748)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--kreciprocal", action="store_true")
    args = ap.parse_args()
    nq, nr = PHASE2
    names = [f"q{i:05d}" for i in range(nq)] + [f"r{i:05d}" for i in range(nr)]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=((nq + nr) // 15, args.d)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        for m in range(args.members):
            noise = rng.normal(size=(nq + nr, args.d)).astype(np.float32)
            x = centres[rng.integers(0, len(centres), nq + nr)] + 0.8 * noise
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(Path(tmp) / f"m{m}.npy", x)
            (Path(tmp) / f"m{m}.txt").write_text("\n".join(names) + "\n")
            del x
            members.append(FileMember.from_file(Path(tmp) / f"m{m}.npy"))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        post = PostProcessing(rerank=RerankParams(use_kreciprocal=args.kreciprocal))
        ensemble = Ensemble(members, post=post)
        t0 = time.time()
        ranking = ensemble.rank([f"{n}.jpg" for n in names[:nq]], [f"{n}.jpg" for n in names[nq:]], top_k=1000)
        submission = build_submission(names[:nq], names[nq:], ranking.indices, length=1000)
        wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.members} members x d={args.d}, {nq} x {nr}, k-reciprocal={args.kreciprocal}: "
          f"{wall:.1f} s, peak RSS {peak:.0f} MB (before ranking {rss_before:.0f} MB), "
          f"{len(submission)} lists of {len(submission[0][1][1])}")


if __name__ == "__main__":
    main()
