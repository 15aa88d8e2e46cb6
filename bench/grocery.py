"""The real-data benchmark: the whole recipe on ../shared/datasets/grocery, every stage measured.

    python -m bench.grocery --out runs/grocery                      # 2 CPU cores, about an hour
    python -m bench.grocery --out runs/grocery-gpu --scale gpu      # a GPU machine: larger, 224 px

Holds out 30% of the train classes, trains three different members (mobilenetv2_100
fine-tuned from ../shared/pretrained at two resolutions with different heads, and a
small network from random initialisation), builds the ensemble, tunes it, submits
locally on the unseen test classes, and adds two floors: a 512-bin HSV colour
histogram and the pretrained mobilenetv2 off the shelf (GeM, no training).
Writes OUT/results.{json,md,png} and, with --record, bench/results_grocery.{json,md,png}.
Re-running resumes: finished steps are skipped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from backbones.baselines import hsv_histogram, pretrained_gem
from competition.data import QUERY_DIR, REFERENCE_DIR, TRAIN_DIR, image_name, list_images, read_labels
from competition.fileio import atomic_write_json, atomic_write_text
from competition.split import HeldoutSplit, split_labels
from ensemble.postprocess import PostProcessing
from tuning.heldout import HeldoutSet
from tuning.objective import evaluate
from tuning.recipe import MemberSpec, RecipeConfig, format_table, plot_table, run_recipe, table_for_file

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DATA = SHARED / "datasets" / "grocery"
PRETRAINED = SHARED / "pretrained" / "mobilenetv2_100.safetensors"


def members_for(scale: str) -> list[MemberSpec]:
    """Three members that differ; epochs budgeted for ~1 hour on 2 CPU cores (cpu) or a GPU (gpu)."""
    ft = {"pretrained": str(PRETRAINED), "freeze_bn": True, "body_lr_mult": 0.1, "lr": 1e-3,
          "warmup_epochs": 0.5, "margin": 0.2, "crop_scale": (0.5, 1.0), "embedding_dim": 512, "images_per_class": 4,
          "channels_last": True}
    scratch = {"lr": 3e-3, "embedding_dim": 256, "channels_last": True, "warmup_epochs": 1.0}
    if scale == "gpu":
        return [
            MemberSpec("mnv2-224-arcface", "mobilenetv2_100", {**ft, "image_size": 224, "epochs": 20}),
            MemberSpec("mnv2-192-cosface", "mobilenetv2_100", {**ft, "image_size": 192, "epochs": 20,
                                                               "head": "cosface", "margin": 0.35}),
            MemberSpec("mnv2-160-triplet", "mobilenetv2_100", {**ft, "image_size": 160, "epochs": 20,
                                                               "triplet_weight": 1.0}),
            MemberSpec("resnet18-scratch", "resnet18", {**scratch, "image_size": 160, "epochs": 60}),
        ]
    return [
        MemberSpec("mnv2-160-arcface", "mobilenetv2_100", {**ft, "image_size": 160, "epochs": 6}),
        MemberSpec("mnv2-192-cosface", "mobilenetv2_100", {**ft, "image_size": 192, "epochs": 5,
                                                           "head": "cosface", "margin": 0.35}),
        MemberSpec("resnet10t-scratch", "resnet10t", {**scratch, "image_size": 112, "epochs": 15}),
    ]


def _single(desc_q, desc_r, q_labels, r_labels) -> HeldoutSet:
    return HeldoutSet(["baseline"], [desc_q], [desc_r], [np.zeros((0, desc_q.shape[1]), np.float32)],
                      q_labels, r_labels)


def baseline_rows(data: Path, split: HeldoutSplit, device: str) -> list[dict]:
    """HSV histogram and off-the-shelf pretrained rows on the held-out split and the test set."""
    labels = read_labels(data)
    sets = {
        "heldout": ([data / TRAIN_DIR / i for i in split.query_ids], split_labels(split.query_ids),
                    [data / TRAIN_DIR / i for i in split.reference_ids], split_labels(split.reference_ids)),
    }
    q_paths, r_paths = list_images(data / QUERY_DIR), list_images(data / REFERENCE_DIR)
    sets["test"] = (q_paths, [labels["query"][image_name(p)] for p in q_paths],
                    r_paths, [labels["reference"][image_name(p)] for p in r_paths])
    describers = {
        "512-bin HSV colour histogram": hsv_histogram,
        "pretrained mobilenetv2 off the shelf (GeM, 160 px)":
            lambda paths: pretrained_gem("mobilenetv2_100", PRETRAINED, paths, image_size=160,
                                         device=device, progress=False),
    }
    rows = []
    for name, describe in describers.items():
        t0 = time.time()
        row = {"row": name}
        for part, (qp, ql, rp, rl) in sets.items():
            q, q_ok = describe(qp)
            r, r_ok = describe(rp)
            row[part] = evaluate(_single(q, r, np.asarray(ql)[q_ok], np.asarray(rl)[r_ok]), PostProcessing())
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grocery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/grocery", help="run folder (git-ignored; re-running resumes)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="copy the results into bench/results_grocery.*")
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg = RecipeConfig(out=args.out, data=args.data, members=members_for(args.scale), heldout=0.3,
                       trials=args.trials, device=args.device, workers=args.workers,
                       batch_size=64 if args.scale == "cpu" else 128)
    table = run_recipe(cfg)
    split = HeldoutSplit.load(Path(args.out) / "split.json")
    table = baseline_rows(Path(args.data), split, args.device) + table
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    results.update(table=table_for_file(table, 1000), total_seconds=round(time.time() - t0, 1), scale=args.scale)
    atomic_write_json(out / "results.json", results)
    text = format_table(table, 1000)
    atomic_write_text(out / "results.md", text + "\n")
    plot_table(table, out / "results.png", 1000)
    print("\n" + text)
    if args.record:
        suffix = "" if args.scale == "cpu" else "_gpu"
        for ext in ("json", "md", "png"):
            shutil.copyfile(out / f"results.{ext}", HERE / f"results_grocery{suffix}.{ext}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
