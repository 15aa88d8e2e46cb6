"""The real-data benchmark: a recipe file run on ../shared/datasets/grocery, plus baseline rows.

    python -m bench.grocery --out runs/grocery                                  # recipes/grocery-cpu.toml
    python -m bench.grocery --config recipes/grocery-gpu.toml --out runs/grocery-gpu
    python -m bench.grocery --out runs/grocery --record     # also copy results into bench/results_grocery.*

Takes every option of ``python -m tuning.recipe`` (the recipe holds the members, tuning and
refit); adds what a recipe does not: two floors on the held-out split and the test set, a
512-bin HSV colour histogram and the pretrained mobilenetv2 off the shelf (GeM, no training).
Writes OUT/results.{json,md,png}; re-running resumes (finished steps are skipped).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from backbones.baselines import hsv_histogram, pretrained_gem
from competition.cli import run_command
from competition.data import QUERY_DIR, REFERENCE_DIR, TRAIN_DIR, image_name, list_images, read_labels
from competition.fileio import atomic_write_json, atomic_write_text
from competition.split import HeldoutSplit, split_labels
from ensemble.postprocess import PostProcessing
from tuning.heldout import HeldoutSet
from tuning.objective import evaluate
from tuning.recipe import parse_args, resolve, run_recipe
from tuning.recipe_config import to_toml
from tuning.table import format_table, plot_table, table_for_file

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"
PRETRAINED = HERE.parent.parent / "shared" / "pretrained" / "mobilenetv2_100.safetensors"


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
    """The recipe's command line (``python -m tuning.recipe --help``) plus ``--record``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    record = "--record" in argv
    argv = [a for a in argv if a != "--record"]
    if "--config" not in argv:
        argv = ["--config", str(RECIPES / "grocery-cpu.toml"), *argv]
    args = parse_args(argv)
    cfg = resolve(args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    t0 = time.time()
    table = run_recipe(cfg)
    out = Path(cfg.out)
    split = HeldoutSplit.load(out / "split.json")
    table = baseline_rows(Path(cfg.data), split, cfg.devices[0]) + table
    results = json.loads((out / "results.json").read_text())
    results.update(table=table_for_file(table, cfg.k), total_seconds=round(time.time() - t0, 1))
    atomic_write_json(out / "results.json", results)
    text = format_table(table, cfg.k)
    atomic_write_text(out / "results.md", text + "\n")
    plot_table(table, out / "results.png", cfg.k)
    print("\n" + text)
    if record:
        suffix = "" if Path(args.config).stem == "grocery-cpu" else "_" + Path(args.config).stem
        for ext in ("json", "md", "png"):
            shutil.copyfile(out / f"results.{ext}", HERE / f"results_grocery{suffix}.{ext}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
