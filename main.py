"""NSML entry point: build, save, load and serve the ensemble checkpoint.

On NSML (``nsml submit``) the platform runs ``main.py --mode test --pause 1``, calls
``load(dir)`` and then ``infer(queries, _)``. Without the ``nsml`` package a local
stand-in (competition/nsml_local.py) runs the same code:

    # build an ensemble from trained backbone runs (train mode)
    python main.py --mode train --data DATASET --members RUN1 RUN2 --trials 100
    # a local submission, scored when DATASET/test/labels.csv exists
    python main.py --mode test --pause 1 --data DATASET --checkpoint checkpoints/local/final
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:  # on the NSML platform
    import nsml
    from nsml import DATASET_PATH

    IS_ON_NSML = True
except ImportError:  # anywhere else: the local stand-in with the same functions
    from competition import nsml_local as nsml

    DATASET_PATH = None
    IS_ON_NSML = False

from competition.cli import ArgumentParser, UserError, number, run_command
from competition.data import QUERY_DIR, REFERENCE_DIR, image_name, list_images, read_labels
from competition.fileio import atomic_write_json
from competition.metrics import file_keys
from competition.submission import build_submission, score_submission, validate_submission, write_submission


class SessionState:
    """What the bound functions share: the loaded bundle and the member runs loaded so far."""

    def __init__(self, data_root: str | None, top_k: int | None, device: str, cache_dir: str | None = None,
                 workers: int | None = None):
        self.data_root = data_root
        self.cache_dir = cache_dir  # descriptor cache for local runs (None: extract every time)
        self.top_k = top_k
        self.device = device
        self.workers = workers      # image-decoding workers of member extraction (None: auto)
        self.bundle = None
        self.member_dirs: list[Path] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="kit-session-"))  # private copies; gone at exit
        atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)


def bind_model(state: SessionState) -> None:
    """nsml.bind(save, load, infer) over ``state``."""

    def save(dir_name: str, *args, **kwargs) -> None:
        if state.bundle is None:
            raise RuntimeError("nothing to save: no ensemble was built or loaded")
        state.bundle.save(Path(dir_name) / "bundle")

    def load(dir_name: str, *args, **kwargs) -> None:
        from backbones.checkpoint import is_run
        from ensemble.bundle import Bundle, is_bundle
        source = Path(dir_name)
        candidate = source / "bundle" if (source / "bundle").is_dir() else source
        # NSML may remove dir_name afterwards: keep a private copy
        target = state.workdir / f"loaded-{len(state.member_dirs)}-{int(time.time() * 1000)}"
        if not candidate.is_dir():
            raise UserError(f"{candidate}: checkpoint folder not found")
        shutil.copytree(candidate, target, symlinks=True)
        if is_bundle(target):
            try:
                state.bundle = Bundle.load(target)
            except UserError as exc:  # name the folder the user gave, not the private copy
                raise type(exc)(str(exc).replace(str(target), str(candidate))) from None
            print(f"loaded ensemble checkpoint from {source}", flush=True)
        elif is_run(target):
            state.member_dirs.append(target)
            print(f"loaded member run from {source}", flush=True)
        else:
            raise UserError(f"{source}: neither an ensemble checkpoint nor a backbone run")

    def infer(queries: list[str], _=None):
        return run_inference(state, queries)

    nsml.bind(save=save, load=load, infer=infer)


def run_inference(state: SessionState, query_paths: list[str]):
    """Rank the references for ``query_paths``: NSML's ``[(i, (query, [refs...])), ...]``."""
    if state.bundle is None:
        raise RuntimeError("infer called before load: no ensemble checkpoint")
    root = state.data_root or DATASET_PATH
    reference_paths = list_images(Path(root) / REFERENCE_DIR)
    query_names = [image_name(p) for p in query_paths]
    reference_names = [image_name(p) for p in reference_paths]
    member_kw = {"workers": state.workers, "cache_dir": state.cache_dir}
    ensemble = state.bundle.ensemble(device=state.device, **member_kw)
    top_k = len(reference_paths) if state.top_k is None else min(state.top_k, len(reference_paths))
    ranking = ensemble.rank([str(p) for p in query_paths], [str(p) for p in reference_paths], top_k=top_k)
    submission = build_submission(query_names, reference_names, ranking.indices, length=state.top_k)
    validate_submission(submission, query_names, reference_names, length=state.top_k)
    return submission


def build_checkpoint(state: SessionState, args: argparse.Namespace) -> None:
    """Build the ensemble (members from run dirs and earlier sessions), tune it, save it."""
    from ensemble.build import BuildConfig, build_from_paths
    for spec in args.sessions:
        session, _, checkpoint = spec.partition(":")
        nsml.load(checkpoint=checkpoint or "final", session=session)
    members = [Path(m) for m in args.members] + state.member_dirs
    if not members:
        raise UserError("train mode needs --members RUN_DIR ... and/or --sessions SESSION[:CHECKPOINT] ...")
    out = state.workdir / "bundle"
    config = BuildConfig(device=args.device, split=args.split, max_train_images=args.max_train_images,
                         seed=args.seed, workers=args.workers, cache_dir=state.workdir / "cache")
    state.bundle, summary = build_from_paths([str(m) for m in members], state.data_root or DATASET_PATH,
                                             out, config)
    print(summary.line(), flush=True)
    nsml.report(step=0, members=len(members))
    if args.trials > 0:
        from ensemble.bundle import Bundle
        from tuning.search import SearchConfig, tune_bundle
        result = tune_bundle(out, SearchConfig(n_trials=args.trials, seed=args.seed, k=args.k))
        nsml.report(summary=True, step=args.trials, heldout_map=result.best_value,
                    heldout_map_default=result.defaults_value)
        state.bundle = Bundle.load(out)
    target = nsml.save("final")
    if not IS_ON_NSML:
        print(f"ensemble checkpoint saved to {target}", flush=True)


def submit_locally(state: SessionState, args: argparse.Namespace) -> dict | None:
    """Load the checkpoint, check the inputs (query and reference folders, test/labels.csv) before
    ranking, infer on every query, validate, write JSON (+ CSV when its names allow), and score the
    labelled queries when labels exist."""
    from competition.data import LABELS_FILE, DataError, scan_test
    from competition.submission import label_coverage
    if not args.checkpoint:
        raise UserError("test mode without NSML needs --checkpoint (an ensemble checkpoint folder)")
    nsml.load_path(args.checkpoint)
    root = Path(state.data_root)
    test = scan_test(root)  # an empty query or reference folder is a DataError naming it
    query_paths = [str(p) for p in test.query_paths]
    query_names, reference_names = test.query_names, test.reference_names
    try:
        labels = read_labels(root)  # a malformed file stops here, before the ranking
    except FileNotFoundError:
        labels = None
        print("no test/labels.csv: the submission will not be scored", flush=True)
    if labels is not None:
        coverage = label_coverage(labels, query_names, reference_names)
        if not coverage.labelled_queries:
            raise DataError(f"{root / LABELS_FILE}: labels none of the {len(query_names)} queries in "
                            f"{root / QUERY_DIR} (e.g. {query_names[:3]}); fix it, or remove it for an unscored run")
        if coverage.unlabelled_queries or coverage.unlabelled_references:
            print(coverage.summary(), flush=True)
    submission = nsml.infer(query_paths)
    out = Path(args.out)
    json_path, csv_path = write_submission(submission, out)
    written = f"{json_path}, {csv_path}" if csv_path else f"{json_path} (no CSV: see the warning)"
    print(f"submission: {len(submission)} queries -> {written}", flush=True)
    if labels is None:
        return None
    # infer validated the submission; here it is only scored
    scores = file_keys(score_submission({q: refs for _, (q, refs) in submission}, labels,
                                        query_names=[q for _, (q, _) in submission],
                                        reference_names=reference_names, k=args.k), args.k)
    print("local leaderboard: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.startswith("n_"))
          + f"  ({scores['n_query']} queries)", flush=True)
    atomic_write_json(out / "scores.json", scores)
    if args.picture:
        draw_retrieval_picture(submission, query_paths, labels, root, out / "retrieval.png", args.picture, k=args.k)
    return scores


def draw_retrieval_picture(submission, query_paths: list[str], labels: dict, root: Path, path: Path, n: int,
                           k: int = 1000, width: int = 6) -> None:
    """retrieval.png: the first ``n`` labelled queries with their top ``width`` references and AP@k."""
    from competition.metrics import average_precision
    from competition.picture import retrieval_picture
    from competition.submission import rankings_from_names
    by_name = {image_name(p): p for p in list_images(root / REFERENCE_DIR)}
    unlabelled = "\0 no label"   # a reference without a label is never relevant
    ref_labels = [labels["reference"].get(r, unlabelled) for r in by_name]
    rows = [(i, q, refs) for i, (_, (q, refs)) in enumerate(submission) if q in labels["query"]][:n]
    if not rows:
        return
    shown = {q: refs for _, q, refs in rows}
    ap = average_precision(rankings_from_names(shown, list(shown), list(by_name)),
                           [labels["query"][q] for q in shown], ref_labels, k=k)
    retrieval_picture([query_paths[i] for i, _, _ in rows],
                      [[by_name[r] for r in refs[:width]] for _, _, refs in rows],
                      [[labels["reference"].get(r) == labels["query"][q] for r in refs[:width]] for _, q, refs in rows],
                      path, query_names=list(shown), query_ap=ap.tolist(), ap_name=f"AP@{k}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from backbones.extract import WORKERS_HELP, workers_arg
    p = ArgumentParser(prog="python main.py", description=__doc__)
    nsml_args = p.add_argument_group("NSML's reserved arguments")
    nsml_args.add_argument("--mode", choices=["train", "test"], default="train",
                           help="train: build (and tune) the ensemble checkpoint; test: submit")
    nsml_args.add_argument("--iteration", default="0", help="NSML: the checkpoint to load")
    nsml_args.add_argument("--pause", type=number(int, 0, 1), default=0, metavar="0|1",
                           help="NSML sets 1 when it loads a model to serve it")
    build = p.add_argument_group("train mode: building the ensemble checkpoint")
    build.add_argument("--members", nargs="*", default=[], metavar="RUN", help="backbone run folders")
    build.add_argument("--sessions", nargs="*", default=[], metavar="SESSION[:CHECKPOINT]",
                       help="earlier NSML sessions whose checkpoints are loaded as members")
    build.add_argument("--split", metavar="SPLIT.json", help="held-out split JSON (default: the members' own)")
    build.add_argument("--max-train-images", type=number(int, 2), default=5000, metavar="N",
                       help="train-class images the whitening is fitted on")
    build.add_argument("--trials", type=number(int, 0), default=0, metavar="N",
                       help="Optuna trials after building (0: no tuning)")
    build.add_argument("--seed", type=number(int, 0), default=0, metavar="N", help="seed of tuning and subsampling")
    local = p.add_argument_group("running without NSML")
    local.add_argument("--data", metavar="DIR", help="dataset root (NSML gives DATASET_PATH)")
    local.add_argument("--checkpoint", metavar="DIR", help="the ensemble checkpoint folder to load in test mode")
    local.add_argument("--out", default="submission", metavar="DIR", help="where the submission files go")
    local.add_argument("--cache-dir", metavar="DIR", help="reuse member descriptors cached in this folder")
    local.add_argument("--picture", type=number(int, 0), default=8, metavar="N",
                       help="queries drawn in retrieval.png (0: none)")
    p.add_argument("--k", type=number(int, 1), default=1000, metavar="N",
                   help="references ranked per query, and the k of the local mAP@k")
    p.add_argument("--full-ranking", action="store_true",
                   help="rank every reference (phase 1) instead of the top k")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=workers_arg, default="auto", metavar="N|auto", help=WORKERS_HELP)
    return p.parse_args(argv)


def runtime_report(device: str) -> str:
    """The startup line: where members extract and faiss searches, and in what precision."""
    from backbones.extract import autocast_dtype, runtime_line, torch_device
    dev = torch_device(device)
    return "runtime: " + runtime_line(dev, autocast_dtype("auto", dev))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not IS_ON_NSML:
        if not args.data:
            raise UserError("without NSML, --data DATASET is required")
        nsml.DATASET_PATH = args.data
    print(runtime_report(args.device), flush=True)
    state = SessionState(args.data or DATASET_PATH, None if args.full_ranking else args.k, args.device,
                         args.cache_dir, args.workers)
    bind_model(state)
    if args.pause:
        nsml.paused(scope=locals())
    if args.mode == "train":
        build_checkpoint(state, args)
    elif not IS_ON_NSML:
        submit_locally(state, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
