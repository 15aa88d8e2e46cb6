"""A phase-2 rehearsal: the bundle-level steps of a recipe at the hackathon's real sizes, timed.

    python -m bench.rehearsal --work /tmp/phase2 [--trials 200] [--device cpu] [--scale 1.0] [--out FILE.json]

Generates three members' descriptors (d 512, memory-mapped; ``bench/generated.py``) for a dataset of
the phase-2 sizes: 73,551 train images in 1,383 classes and a test of 18,027 queries x 36,748
references, in the hackathon layout (image files are empty placeholders: the members are
precomputed ``FileMember``s that look images up by name, so no pixel is read). Then it runs, each
step in its own process as the recipe runs it, and prints wall time and peak memory per step:

1. ``ensemble.build`` (the members' descriptors of the held-out split and the train classes);
2. ``tuning.search`` (the study: ``--trials``, the default objective, every re-ranker in the space);
3. ``main.py --mode test`` with the tuned bundle (inference through main.py's infer path on the
   whole test, submission written, validated and scored against test/labels.csv);
4. the same with the untuned defaults, for the tuned-vs-defaults line.

``--scale`` shrinks every size (0.1: a quick dry run). The work folder is reused: generated data
is kept (``--fresh`` regenerates), steps re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.generated import GeneratedConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(cfg: GeneratedConfig, work: Path) -> Path:
    """Generate the members' descriptors and lay out DATA (empty image files, labels.csv); returns DATA."""
    from competition.data import scan_train
    from competition.split import make_split

    data, members = work / "data", work / "members"
    for d in (data, members):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    g = generate(cfg, folder=members)
    names = {"train": [f"t{i:06d}" for i in range(len(g.train_labels))],
             "query": [f"q{i:05d}" for i in range(len(g.query_labels))],
             "reference": [f"r{i:05d}" for i in range(len(g.reference_labels))]}
    for name, label in zip(names["train"], g.train_labels):
        (data / "train" / "train_data" / label).mkdir(parents=True, exist_ok=True)
        (data / "train" / "train_data" / label / f"{name}.jpg").touch()
    for s, folder in (("query", "query"), ("reference", "reference")):
        (data / "test" / "test_data" / folder).mkdir(parents=True, exist_ok=True)
        for name in names[s]:
            (data / "test" / "test_data" / folder / f"{name}.jpg").touch()
    lines = ["split,name,class"] + [f"{s},{n},{c}" for s, labels in (("query", g.query_labels),
                                                                     ("reference", g.reference_labels))
                                    for n, c in zip(names[s], labels)]
    (data / "test" / "labels.csv").write_text("\n".join(lines) + "\n")
    split = make_split(scan_train(data), cfg.heldout, seed=cfg.seed)
    split.save(work / "split.json")
    all_names = names["train"] + names["query"] + names["reference"]
    for m in range(cfg.members):
        stacked = np.lib.format.open_memmap(members / f"{g.member_names[m]}.npy", mode="w+", dtype=np.float32,
                                            shape=(len(all_names), cfg.dim))
        start = 0
        for part in (g.train[m], g.query[m], g.reference[m]):
            stacked[start:start + len(part)] = part
            start += len(part)
        stacked.flush()
        del stacked
        (members / f"{g.member_names[m]}.txt").write_text("\n".join(all_names) + "\n")
        (members / f"{g.member_names[m]}.meta.json").write_text(json.dumps(
            {"name": g.member_names[m], "split_hash": split.hash, "train_classes": list(split.train_classes)}))
        for s in ("train", "query", "reference"):
            (members / f"m{m}_{s}.npy").unlink()
    return data


def run_step(name: str, cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in its own process (output to ``log``); return wall seconds and its peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    row = {"step": name, "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 2),
           "exit": code, "log": str(log)}
    print(f"{name}: {wall:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB" + (f", EXIT {code} (see {log})" if code
                                                                           else ""), flush=True)
    if code:
        print(log.read_text()[-3000:], file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rehearsal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work folder (data, members, bundle, logs)")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="every size times this (a dry run: 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="regenerate the data")
    ap.add_argument("--out", type=Path, help="write the step table as JSON")
    a = ap.parse_args(argv)
    d = GeneratedConfig()
    cfg = GeneratedConfig(train_images=int(d.train_images * a.scale), train_classes=int(d.train_classes * a.scale),
                          test_queries=int(d.test_queries * a.scale), test_references=int(d.test_references * a.scale),
                          seed=a.seed)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    print(f"phase-2 rehearsal (scale {a.scale}): {cfg.train_images} train images in {cfg.train_classes} classes, "
          f"{cfg.test_queries} x {cfg.test_references} test, {cfg.members} members x d {cfg.dim}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, python {platform.python_version()}", flush=True)
    steps = []
    t0 = time.perf_counter()
    data = work / "data"
    if a.fresh or not (work / "split.json").is_file():
        data = write_dataset(cfg, work)
    steps.append({"step": "generate", "wall_s": round(time.perf_counter() - t0, 1),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)})
    print(f"generate: {steps[-1]['wall_s']} s", flush=True)
    bundle, logs = work / "bundle", work / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(work / "bundle.tuning", ignore_errors=True)
    members = [str(work / "members" / f"m{m}.npy") for m in range(cfg.members)]
    steps.append(run_step("ensemble.build", [py, "-m", "ensemble.build", "--members", *members, "--data", str(data),
                                             "--out", str(bundle), "--split", str(work / "split.json"),
                                             "--device", a.device, "--no-progress"], logs / "build.log"))
    steps.append(run_step(f"tuning.search ({a.trials} trials)", [py, "-m", "tuning.search", "--bundle", str(bundle),
                                                                  "--trials", str(a.trials), "--seed", str(a.seed)],
                          logs / "search.log"))
    steps.append(run_step("main.py test (tuned)", [py, "-m", "main", "--mode", "test", "--data", str(data),
                                                   "--checkpoint", str(bundle), "--out", str(work / "submission"),
                                                   "--device", a.device, "--picture", "0"], logs / "main.log"))
    scores = {"tuned": _scores(work / "submission")}
    defaults = work / "bundle-defaults"
    shutil.rmtree(defaults, ignore_errors=True)
    _defaults_copy(bundle, defaults)
    steps.append(run_step("main.py test (defaults)", [py, "-m", "main", "--mode", "test", "--data", str(data),
                                                      "--checkpoint", str(defaults), "--out",
                                                      str(work / "submission-defaults"), "--device", a.device,
                                                      "--picture", "0"], logs / "main-defaults.log"))
    scores["defaults"] = _scores(work / "submission-defaults")
    print(f"test mAP@1000: tuned {scores['tuned']:.4f}, untuned defaults {scores['defaults']:.4f}")
    print("\n| step | wall (s) | peak RSS (GB) |\n|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['wall_s']:.1f} | {s['peak_rss_gb']:.2f} |")
    if a.out:
        a.out.write_text(json.dumps({"config": cfg.__dict__, "steps": steps, "scores": scores}, indent=1) + "\n")
    return 0


def _scores(folder: Path) -> float:
    path = folder / "scores.json"
    return json.loads(path.read_text())["mAP@1000"] if path.is_file() else float("nan")


def _defaults_copy(bundle: Path, out: Path) -> None:
    """A copy of the tuned bundle with the untuned post-processing (the members' files are shared by copy)."""
    from ensemble.bundle import Bundle
    from ensemble.postprocess import PostProcessing

    b = Bundle.load(bundle)
    b.post = PostProcessing()
    b.whitening = None
    b.save(out)


if __name__ == "__main__":
    raise SystemExit(main())
