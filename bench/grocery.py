"""The real-data benchmark: a recipe file run on ../shared/datasets/grocery, plus baseline rows.

    python -m bench.grocery --out runs/grocery                                  # recipes/grocery-cpu.toml
    python -m bench.grocery --config recipes/grocery-gpu.toml --out runs/grocery-gpu
    python -m bench.grocery --out runs/grocery --record     # also copy results into bench/results_grocery.*

Takes every option of ``python -m tuning.recipe`` (the recipe holds the members, tuning and
refit); adds what a recipe does not: two floors on the held-out split and the test set, a
512-bin HSV colour histogram and a pretrained network off the shelf (GeM, no training):

    --baseline-arch ARCH        the off-the-shelf network (default: mobilenetv2_100)
    --baseline-weights SOURCE   its weights, any --pretrained source (default: those of the recipe's
                                member of that architecture; without either the row is left out)
    --record                    also copy the results into bench/results_grocery*.{json,md,png}

The data and weights of recipes/grocery-cpu.toml come from the project's shared folder (its README
says where they come from); recipes/grocery-gpu.toml fetches timm's weights and takes --data.
Writes OUT/results.{json,md,png}; re-running resumes (finished steps are skipped).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from backbones.baselines import hsv_histogram, pretrained_gem
from backbones.model import resolve_arch
from backbones.preflight import pretrained_problem
from competition.cli import UserError, run_command
from competition.data import QUERY_DIR, REFERENCE_DIR, TRAIN_DIR, image_name, list_images, read_labels
from competition.fileio import atomic_write_json, atomic_write_text
from competition.split import HeldoutSplit, split_labels
from ensemble.postprocess import PostProcessing
from tuning.heldout import HeldoutSet
from tuning.objective import evaluate
from tuning.recipe import command_line, recipe_console, run_recipe
from tuning.table import format_table, plot_table, table_for_file

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"
BASELINE_ARCH = "mobilenetv2_100"

log = logging.getLogger(__name__)


def _single(desc_q, desc_r, q_labels, r_labels) -> HeldoutSet:
    return HeldoutSet(["baseline"], [desc_q], [desc_r], [np.zeros((0, desc_q.shape[1]), np.float32)],
                      q_labels, r_labels)


def baseline_weights(cfg, arch: str, source: str | None) -> str | None:
    """The off-the-shelf row's weights: ``source``, else those of the recipe's first member of ``arch``."""
    if source:
        return source
    for m in cfg.members:
        options = m.train_options(cfg.defaults)
        if options.get("pretrained") and m.arch.split(".")[0] == arch:
            return options["pretrained"]
    return None


def baseline_rows(data: Path, split: HeldoutSplit, device: str, arch: str = BASELINE_ARCH,
                  weights: str | None = None) -> list[dict]:
    """HSV histogram and (with ``weights``) off-the-shelf pretrained rows on the held-out split and the test set."""
    labels = read_labels(data)
    sets = {
        "heldout": ([data / TRAIN_DIR / i for i in split.query_ids], split_labels(split.query_ids),
                    [data / TRAIN_DIR / i for i in split.reference_ids], split_labels(split.reference_ids)),
    }
    q_paths, r_paths = list_images(data / QUERY_DIR), list_images(data / REFERENCE_DIR)
    sets["test"] = (q_paths, [labels["query"][image_name(p)] for p in q_paths],
                    r_paths, [labels["reference"][image_name(p)] for p in r_paths])
    describers = {"512-bin HSV colour histogram": hsv_histogram}
    if weights:
        name = "mobilenetv2" if arch == BASELINE_ARCH else arch
        describers[f"pretrained {name} off the shelf (GeM, 160 px)"] = lambda paths: pretrained_gem(
            arch, weights, paths, image_size=160, device=device, progress=False)
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
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--record", action="store_true")
    own.add_argument("--baseline-arch", default=BASELINE_ARCH)
    own.add_argument("--baseline-weights")
    bench, argv = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if "--config" not in argv:
        argv = ["--config", str(RECIPES / "grocery-cpu.toml"), *argv]
    args, cfg = command_line(argv)
    if cfg is None:   # --print-config
        return 0
    if not cfg.data:
        raise UserError(f"{args.config}: the recipe names no data: pass --data DIR (the grocery set, in the "
                        "hackathon layout)")
    weights = baseline_weights(cfg, bench.baseline_arch, bench.baseline_weights)
    why = pretrained_problem(weights, resolve_arch(bench.baseline_arch)) if weights else None
    if why:   # before the hours of the recipe, not after
        raise UserError(f"--baseline-weights: {why}")
    if not weights:
        log.warning("no %s weights in the recipe nor --baseline-weights: no off-the-shelf row", bench.baseline_arch)
    t0 = time.time()
    with recipe_console(args.quiet):
        table = run_recipe(cfg)
    out = Path(cfg.out)
    split = HeldoutSplit.load(out / "split.json")
    table = baseline_rows(Path(cfg.data), split, cfg.devices[0], bench.baseline_arch, weights) + table
    results = json.loads((out / "results.json").read_text())
    results.update(table=table_for_file(table, cfg.k), total_seconds=round(time.time() - t0, 1))
    atomic_write_json(out / "results.json", results)
    text = format_table(table, cfg.k)
    atomic_write_text(out / "results.md", text + "\n")
    plot_table(table, out / "results.png", cfg.k)
    print("\n" + text)
    if bench.record:
        suffix = "" if Path(args.config).stem == "grocery-cpu" else "_" + Path(args.config).stem
        for ext in ("json", "md", "png"):
            shutil.copyfile(out / f"results.{ext}", HERE / f"results_grocery{suffix}.{ext}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
