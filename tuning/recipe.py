"""The whole recipe in one command: data, split, members, ensemble, tuning, local
submission, and a table of what each stage adds.

    python -m tuning.recipe --out runs/demo                 # embedded generated data
    python -m tuning.recipe --out runs/real --data DATASET  # a dataset in the hackathon layout

Every step writes its result into OUT and is skipped when it is already there, so an
interrupted run picks up where it stopped (a member's training resumes mid-run).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from competition.cli import ArgumentParser, number, run_command
from competition.data import QUERY_DIR, REFERENCE_DIR, image_name, list_images, read_labels, scan_train
from competition.fileio import atomic_write_json, atomic_write_text
from competition.metrics import file_keys
from competition.split import HeldoutSplit, make_split
from ensemble.postprocess import PostProcessing
from rerank.pipeline import RerankParams
from tuning.heldout import HeldoutSet, heldout_set
from tuning.objective import evaluate


@dataclass
class MemberSpec:
    """One backbone to train: its name in the ensemble and its TrainConfig fields."""

    name: str
    arch: str
    options: dict = field(default_factory=dict)   # any backbones.train.TrainConfig field


# Three small networks of different designs that train from scratch in a minute or two each
# on 2 CPU cores (mobilenetv3 and efficientnet barely move from scratch at this size).
DEMO_MEMBERS = [
    MemberSpec("resnet10t", "resnet10t", {"image_size": 64, "epochs": 20, "lr": 3e-3, "embedding_dim": 128}),
    MemberSpec("resnet14t", "resnet14t", {"image_size": 64, "epochs": 20, "lr": 3e-3, "embedding_dim": 128,
                                          "head": "cosface", "margin": 0.2, "scale": 16.0}),
    MemberSpec("regnet", "regnetx_002", {"image_size": 64, "epochs": 25, "lr": 3e-3, "embedding_dim": 128,
                                         "head": "cosface", "margin": 0.2, "scale": 16.0}),
]
# The embedded default for the main job: larger than the generator's own default so that
# the held-out split (14 classes, ~40 queries) is big enough to tune on.
DEMO_DATA = {"train_classes": 48, "images_per_class": 12, "test_classes": 12,
             "queries_per_class": 3, "references_per_class": 9}


@dataclass
class RecipeConfig:
    """What the recipe runs; ``data`` None generates the embedded default dataset."""

    out: str = "runs/demo"
    data: str | None = None
    members: list[MemberSpec] = field(default_factory=lambda: list(DEMO_MEMBERS))
    heldout: float = 0.3
    seed: int = 0
    trials: int = 60
    synth: dict = field(default_factory=lambda: dict(DEMO_DATA))   # SynthConfig fields (no --data)
    device: str = "auto"
    workers: int = 0
    batch_size: int = 32
    k: int = 1000


def _say(msg: str) -> None:
    print(f"[recipe] {msg}", flush=True)


def prepare_data(cfg: RecipeConfig) -> Path:
    """Return the dataset root, generating the embedded default under OUT/data if needed."""
    if cfg.data:
        return Path(cfg.data)
    from competition.synth import SynthConfig, generate
    root = Path(cfg.out) / "data"
    if not (root / "test" / "labels.csv").is_file():
        summary = generate(root, SynthConfig(seed=cfg.seed, overwrite=root.exists(), **cfg.synth))
        _say(f"generated {summary['images']} images in {root}")
    return root


def prepare_split(cfg: RecipeConfig, data: Path) -> Path:
    """Write (once) and return OUT/split.json, the held-out split every member shares."""
    path = Path(cfg.out) / "split.json"
    if not path.is_file():
        make_split(scan_train(data), cfg.heldout, seed=cfg.seed).save(path)
    split = HeldoutSplit.load(path)
    _say(f"split {split.hash}: {len(split.train_classes)} train classes, {len(split.heldout_classes)} held out")
    return path


def train_members(cfg: RecipeConfig, data: Path, split_path: Path) -> dict[str, dict]:
    """Train (or resume, or skip) every member; return {name: {"run_dir", "seconds", ...}}."""
    from backbones.checkpoint import can_resume
    from backbones.train import TrainConfig, train
    done: dict[str, dict] = {}
    for i, spec in enumerate(cfg.members):
        run_dir = Path(cfg.out) / "members" / spec.name
        marker = run_dir / "recipe_done.json"
        if marker.is_file():
            done[spec.name] = json.loads(marker.read_text())
            continue
        options = {"batch_size": cfg.batch_size, "workers": cfg.workers, "device": cfg.device,
                   "seed": cfg.seed + i, **spec.options}
        tc = TrainConfig(data=str(data), out=str(run_dir), arch=spec.arch, split=str(split_path),
                         resume=can_resume(run_dir), **options)
        _say(f"training member {spec.name} ({spec.arch})" + (" - resuming" if tc.resume else ""))
        t0 = time.time()
        result = train(tc)
        info = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1), "arch": spec.arch,
                "best": result.get("best")}
        atomic_write_json(marker, info)
        done[spec.name] = info
    return done


def build_and_tune(cfg: RecipeConfig, data: Path, members: dict[str, dict]) -> Path:
    """Build the ensemble checkpoint OUT/bundle (once) and run the tuning study on it."""
    from ensemble.build import BuildConfig, build_from_paths
    from ensemble.bundle import is_bundle
    from tuning.search import SearchConfig, tune_bundle
    bundle_dir = Path(cfg.out) / "bundle"
    if not is_bundle(bundle_dir):
        _, summary = build_from_paths([members[m.name]["run_dir"] for m in cfg.members], data, bundle_dir,
                                      BuildConfig(device=cfg.device, seed=cfg.seed, progress=False))
        _say(summary.line())
    if cfg.trials > 0:
        result = tune_bundle(bundle_dir, SearchConfig(n_trials=cfg.trials, seed=cfg.seed))
        _say(f"tuned: held-out search half mAP@{cfg.k} {result.best_value:.4f} "
             f"(defaults {result.defaults_value:.4f}); check half {result.check_best['map_at_k']:.4f} "
             f"(defaults {result.check_defaults['map_at_k']:.4f})")
    return bundle_dir


def test_set(bundle, data: Path, cache_dir: Path, device: str) -> HeldoutSet:
    """Member descriptors of the test queries and references, as a HeldoutSet scored like the held-out one."""
    labels = read_labels(data)
    ensemble = bundle.ensemble(device=device, cache_dir=cache_dir)
    query_paths, ref_paths = list_images(data / QUERY_DIR), list_images(data / REFERENCE_DIR)
    # the set names Ensemble.rank uses, so the local submission reuses these descriptors
    query, q_ok = ensemble.member_descriptors(query_paths, set_name="query")
    reference, r_ok = ensemble.member_descriptors(ref_paths, set_name="reference")
    q_labels = [labels["query"][image_name(p)] for p, ok in zip(query_paths, q_ok) if ok]
    r_labels = [labels["reference"][image_name(p)] for p, ok in zip(ref_paths, r_ok) if ok]
    return HeldoutSet(bundle.member_names, query, reference, bundle.train_descriptors(), q_labels, r_labels)


def stage_rows(member_names: list[str], tuned: PostProcessing, n_images: int) -> dict[str, PostProcessing]:
    """The table's rows: each member alone, then the ensemble with one more stage each, then tuned."""
    n = len(member_names)
    rows = {f"{name} alone": PostProcessing(weights=[float(i == j) for j in range(n)])
            for i, name in enumerate(member_names)}
    rows["ensemble, equal weights"] = PostProcessing()
    whitened = PostProcessing(whiten=True, whiten_power=0.5)
    rows["+ PCA-whitening"] = whitened
    expanded = replace(whitened, rerank=RerankParams(dba_n=1, dba_alpha=3.0, aqe_n=2, aqe_alpha=3.0))
    rows["+ DBA/aQE"] = expanded
    k1 = max(2, min(20, n_images // 4))
    rows["+ k-reciprocal (defaults)"] = replace(expanded, rerank=replace(
        expanded.rerank, use_kreciprocal=True, k1=k1, k2=min(6, k1)))
    rows["tuned"] = tuned
    return rows


def score_rows(rows: dict[str, PostProcessing], heldout: HeldoutSet, test: HeldoutSet | None,
               k: int) -> list[dict]:
    """Score every row on the held-out split and (when given) the test set:
    ``[{"row", "heldout": scores, "test": scores or None, "seconds"}]``, scores as ``evaluate`` gives them."""
    table = []
    for name, post in rows.items():
        t0 = time.time()
        table.append({"row": name, "heldout": evaluate(heldout, post, k=k),
                      "test": None if test is None else evaluate(test, post, k=k),
                      "seconds": round(time.time() - t0, 2)})
    return table


def table_for_file(table: list[dict], k: int) -> list[dict]:
    """The table's rows with their scores spelled as files spell them (``mAP@<k>``, ``Recall@1``)."""
    return [{**r, "heldout": file_keys(r["heldout"], k), "test": r["test"] and file_keys(r["test"], k)}
            for r in table]


def submit_through_main(cfg: RecipeConfig, data: Path, bundle_dir: Path) -> dict | None:
    """Run the NSML entry point (``python -m main``) in test mode in a subprocess; return its scores.

    It ranks through main.py's own infer path, reusing the test descriptors
    ``test_set`` cached in OUT/cache rather than extracting them a second time."""
    run_dir = Path(cfg.out).resolve()
    out = run_dir / "submission"
    cmd = [sys.executable, "-m", "main", "--mode", "test",
           "--pause", "1", "--data", str(Path(data).resolve()), "--checkpoint", str(Path(bundle_dir).resolve()),
           "--out", str(out), "--device", cfg.device, "--cache-dir", str(run_dir / "cache")]
    _say("local submission: " + " ".join(cmd[1:]))
    # run from OUT: the installed main module, never a main.py that happens to sit in the caller's folder
    subprocess.run(cmd, check=True, cwd=run_dir)
    scores = out / "scores.json"
    return json.loads(scores.read_text()) if scores.is_file() else None


def format_table(table: list[dict], k: int) -> str:
    """A markdown table of the rows."""
    has_test = table[0]["test"] is not None
    head = f"| row | held-out mAP@{k} |" + (f" test mAP@{k} | test Recall@1 |" if has_test else "") + " time (s, training included) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        cells = [r["row"], f"{r['heldout']['map_at_k']:.4f}"]
        if has_test:
            cells += [f"{r['test']['map_at_k']:.4f}", f"{r['test']['recall_at_1']:.4f}"]
        cells.append(f"{r['seconds'] + r.get('train_seconds', 0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(table: list[dict], path: Path, k: int) -> None:
    """A horizontal bar chart of held-out and test mAP@k per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["row"] for r in table][::-1]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(y + 0.2, [r["heldout"]["map_at_k"] for r in table][::-1], height=0.4, label="held-out")
    if table[0]["test"] is not None:
        ax.barh(y - 0.2, [r["test"]["map_at_k"] for r in table][::-1], height=0.4, label="test")
    ax.set_yticks(y, names)
    ax.set_xlabel(f"mAP@{k}")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_recipe(cfg: RecipeConfig) -> list[dict]:
    """Run every step (skipping finished ones); return the table rows and write OUT/results.*."""
    from ensemble.bundle import Bundle
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(cfg)
    split_path = prepare_split(cfg, data)
    members = train_members(cfg, data, split_path)
    bundle_dir = build_and_tune(cfg, data, members)
    bundle = Bundle.load(bundle_dir)
    heldout = heldout_set(bundle)
    has_labels = (data / "test" / "labels.csv").is_file()
    test = test_set(bundle, data, out / "cache", cfg.device) if has_labels else None
    n_images = min(len(heldout.reference_labels), len(test.reference_labels) if test else 10**9)
    table = score_rows(stage_rows(bundle.member_names, bundle.post, n_images), heldout, test, cfg.k)
    for r in table:
        name = r["row"].removesuffix(" alone")
        if name in members:
            r["train_seconds"] = members[name]["seconds"]
    submitted = submit_through_main(cfg, data, bundle_dir)
    results = {"config": asdict(cfg), "data": str(data), "table": table_for_file(table, cfg.k), "submission": submitted,
               "tuned_post": bundle.post.to_dict(), "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "results.json", results)
    text = format_table(table, cfg.k)
    atomic_write_text(out / "results.md", text + "\n")
    plot_table(table, out / "results.png", cfg.k)
    print("\n" + text)
    if submitted:
        print(f"\nlocal submission of the tuned checkpoint: mAP@{cfg.k} {submitted[f'mAP@{cfg.k}']:.4f}, "
              f"Recall@1 {submitted['Recall@1']:.4f} (the 'tuned' row's test column, through main.py)")
    print(f"\nresults in {out}/results.{{md,json,png}}; total {time.time() - t0:.0f} s")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m tuning.recipe", description=__doc__)
    ap.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (re-running resumes)")
    ap.add_argument("--data", metavar="DIR", help="dataset root (default: generate the embedded default)")
    ap.add_argument("--trials", type=number(int, 0), default=60, metavar="N", help="Optuna trials")
    ap.add_argument("--epochs", type=number(int, 1), metavar="N", help="override every member's epochs")
    ap.add_argument("--seed", type=number(int, 0), default=0, metavar="N", help="seed of data, split and members")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--workers", type=number(int, 0), default=0, metavar="N", help="DataLoader workers")
    args = ap.parse_args(argv)
    members = [MemberSpec(m.name, m.arch, {**m.options, **({"epochs": args.epochs} if args.epochs else {})})
               for m in DEMO_MEMBERS]
    run_recipe(RecipeConfig(out=args.out, data=args.data, members=members, trials=args.trials,
                            seed=args.seed, device=args.device, workers=args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
