"""NSML entry point: build, save, load and serve the ensemble checkpoint.

On NSML (``nsml submit``) the platform runs ``main.py --mode test --pause 1``, calls
``load(dir)`` and then ``infer(queries, _)``. Without the ``nsml`` package a local
stand-in (competition/nsml_local.py) runs the same code:

    # build an ensemble from trained backbone runs (train mode)
    python main.py --mode train --data DATASET --members RUN1 RUN2 --trials 100
    # a local submission, scored when DATASET/test/labels.csv exists
    python main.py --mode test --pause 1 --data DATASET --checkpoint checkpoints/local/final

Test mode writes ``--out``: submission.json, submission.csv (when its names allow), and with
labels scores.json and retrieval.png. The files are written into a staging folder beside it,
which replaces ``--out`` whole at the end: ``--out`` holds the previous complete result or the
new one, never a mix, and a failed write is one line naming the file (exit status 2). An
``--out`` holding other files is refused at start. The checkpoint is read in place, verified.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
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
from competition.console import console
from competition.data import QUERY_DIR, REFERENCE_DIR, image_name, list_images, read_labels
from competition.fileio import atomic_write_json, copy_file, make_dirs
from competition.metrics import file_keys
from competition.submission import Submission, build_submission, score_rankings, validate_submission, write_submission

OUTPUT_FILES = ("submission.json", "submission.csv", "scores.json", "retrieval.png")

log = logging.getLogger(__name__)


class SessionState:
    """What the bound functions share: the loaded bundle, its ensemble, and the member runs loaded so far."""

    def __init__(self, data_root: str | None, top_k: int | None, device: str, cache_dir: str | None = None,
                 workers: int | None = None):
        self.data_root = data_root
        self.cache_dir = cache_dir  # descriptor cache for local runs (None: extract every time)
        self.top_k = top_k
        self.device = device
        self.workers = workers      # image-decoding workers of member extraction (None: auto)
        self.bundle = None
        self.ensemble = None        # the bundle's Ensemble, made (and its members preloaded) once
        self.reference_paths: list[Path] | None = None  # the reference folder, listed once
        self.member_dirs: list[Path] = []
        self._workdir: Path | None = None

    @property
    def workdir(self) -> Path:
        """A private folder for member runs copied from NSML sessions and a train-mode build; gone at exit."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="kit-session-"))
            atexit.register(shutil.rmtree, self._workdir, ignore_errors=True)
        return self._workdir

    def inference_ensemble(self):
        """The loaded bundle's ``Ensemble`` on this session's device, workers and cache (made once)."""
        if self.ensemble is None:
            self.ensemble = self.bundle.ensemble(device=self.device, workers=self.workers, cache_dir=self.cache_dir)
        return self.ensemble


def copy_run(source: Path, target: Path) -> Path:
    """Copy what a build needs of a member run (weights, config, split) to ``target``; return it."""
    from backbones.checkpoint import run_files, split_path
    files = dict(run_files(source))
    if split_path(source).is_file():
        files[split_path(source).name] = split_path(source)
    make_dirs(target)
    for name, src in files.items():
        copy_file(src, target / name)
    return target


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
        if not candidate.is_dir():
            raise UserError(f"{candidate}: checkpoint folder not found")
        if is_bundle(candidate):
            state.bundle, state.ensemble = Bundle.load(candidate), None  # read in place, verified
            # NSML may delete dir_name once load returns: what inference needs goes into memory now
            state.inference_ensemble().preload()
            log.info("loaded ensemble checkpoint from %s", source)
        elif is_run(candidate):  # a member for a build: its files are read later, so they are copied
            state.member_dirs.append(copy_run(candidate, state.workdir / f"member-{len(state.member_dirs)}"))
            log.info("loaded member run from %s", source)
        else:
            raise UserError(f"{source}: neither an ensemble checkpoint nor a backbone run")

    def infer(queries: list[str], _=None):
        submission = run_inference(state, queries)
        return list(submission) if IS_ON_NSML else submission  # the platform gets a plain list

    nsml.bind(save=save, load=load, infer=infer)


def run_inference(state: SessionState, query_paths: list[str]) -> Submission:
    """Rank the references for ``query_paths``: NSML's ``[(i, (query, [refs...])), ...]``, as a
    ``Submission`` that also holds the rankings as indices."""
    if state.bundle is None:
        raise RuntimeError("infer called before load: no ensemble checkpoint")
    ensemble = state.inference_ensemble()
    if state.reference_paths is None:  # on NSML infer is all there is: listed at its first call
        state.reference_paths = list_images(Path(state.data_root or DATASET_PATH) / REFERENCE_DIR)
    reference_paths = state.reference_paths
    top_k = len(reference_paths) if state.top_k is None else min(state.top_k, len(reference_paths))
    ranking = ensemble.rank(query_paths, reference_paths, top_k=top_k)
    return build_submission([image_name(p) for p in query_paths], [image_name(p) for p in reference_paths],
                            ranking.indices, length=state.top_k)


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
    log.info("%s", summary.line())
    nsml.report(step=0, members=len(members))
    if args.trials > 0:
        from ensemble.bundle import Bundle
        from tuning.search import SearchConfig, tune_bundle
        with console():   # Optuna is imported now: its log joins the console's
            result = tune_bundle(out, SearchConfig(n_trials=args.trials, seed=args.seed, k=args.k))
        nsml.report(summary=True, step=args.trials, heldout_map=result.best_value,
                    heldout_map_default=result.defaults_value)
        state.bundle = Bundle.load(out)
    target = nsml.save("final")
    if not IS_ON_NSML:
        print(f"ensemble checkpoint saved to {target}", flush=True)


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` whose results could not replace it whole: not a folder, holding files
    main.py does not write, or in a place this user cannot write to."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            raise UserError(f"--out {out}: holds {len(other)} entries main.py does not write (e.g. {other[:3]}); "
                            "each run replaces the whole folder: choose a new folder, or one of an earlier run")
    existing = Path(os.path.abspath(out)).parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write into {existing} (permission denied)")


def submission_rankings(submission, query_names: list[str], reference_names: list[str], length: int | None):
    """The rankings of an infer result as indices: those a ``Submission`` holds, else (a list made
    elsewhere) its names, validated and turned into positions in ``reference_names``."""
    indices = getattr(submission, "indices", None)
    if indices is not None and list(submission.reference_names) == reference_names:
        return indices
    from competition.submission import rankings_from_names
    by_name = validate_submission(submission, query_names, reference_names, length=length)
    return rankings_from_names(by_name, query_names, reference_names)


def submit_locally(state: SessionState, args: argparse.Namespace) -> dict | None:
    """Load the checkpoint, check the inputs (query and reference folders, test/labels.csv) before
    ranking, infer on every query, score the labelled queries when labels exist, and write
    ``--out`` (submission.json, submission.csv when its names allow, scores.json, retrieval.png)
    into a staging folder swapped in whole: ``--out`` holds the previous complete result or the new
    one, never a mix (``ensemble.sealed.replace_dir``)."""
    from competition.data import LABELS_FILE, DataError, scan_test
    from competition.submission import label_coverage
    from ensemble.sealed import replace_dir
    if not args.checkpoint:
        raise UserError("test mode without NSML needs --checkpoint (an ensemble checkpoint folder)")
    out = Path(args.out)
    check_out_folder(out)
    nsml.load_path(args.checkpoint)
    root = Path(state.data_root)
    test = scan_test(root)  # an empty query or reference folder is a DataError naming it
    state.reference_paths = test.reference_paths  # listed once: infer takes them from here
    query_paths = [str(p) for p in test.query_paths]
    query_names, reference_names = test.query_names, test.reference_names
    try:
        labels = read_labels(root)  # a malformed file stops here, before the ranking
    except FileNotFoundError:
        labels = None
        log.info("no test/labels.csv: the submission will not be scored")
    if labels is not None:
        coverage = label_coverage(labels, query_names, reference_names)
        if not coverage.labelled_queries:
            raise DataError(f"{root / LABELS_FILE}: labels none of the {len(query_names)} queries in "
                            f"{root / QUERY_DIR} (e.g. {query_names[:3]}); fix it, or remove it for an unscored run")
        if coverage.unlabelled_queries or coverage.unlabelled_references:
            log.info("%s", coverage.summary())
    submission = nsml.infer(query_paths)
    scores = indices = None
    if labels is not None:
        submitted = [q for _, (q, _) in submission]
        indices = submission_rankings(submission, submitted, reference_names, state.top_k)
        scores = file_keys(score_rankings(indices, labels, submitted, reference_names, k=args.k), args.k)
    written: list[Path] = []

    def write(folder: Path) -> None:  # submission.json last: a staging folder holding it is complete
        if scores is not None:
            atomic_write_json(folder / "scores.json", scores)
            if args.picture:
                draw_retrieval_picture(submission, indices, query_paths, test.reference_paths, labels,
                                       folder / "retrieval.png", args.picture, k=args.k)
        written.extend(p for p in write_submission(submission, folder) if p is not None)

    make_dirs(out.parent)
    replace_dir(out, write, lambda folder: (folder / "submission.json").is_file())
    files = ", ".join(str(out / p.name) for p in written)
    no_csv = "" if len(written) > 1 else " (no CSV: see the warning)"
    print(f"submission: {len(submission)} queries -> {files}{no_csv}", flush=True)
    if scores is not None:
        print("local leaderboard: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.startswith("n_"))
              + f"  ({scores['n_query']} queries)", flush=True)
    return scores


def draw_retrieval_picture(submission, indices, query_paths: list[str], reference_paths: list[Path], labels: dict,
                           path: Path, n: int, k: int = 1000, width: int = 6) -> None:
    """retrieval.png: the first ``n`` labelled queries with their top ``width`` references and AP@k
    (``indices``: the submission's rankings as positions in ``reference_paths``)."""
    from competition.metrics import average_precision
    from competition.picture import retrieval_picture
    unlabelled = "\0 no label"   # a reference without a label is never relevant
    ref_labels = [labels["reference"].get(image_name(p), unlabelled) for p in reference_paths]
    rows = [(i, q) for i, (_, (q, _)) in enumerate(submission) if q in labels["query"]][:n]
    if not rows:
        return
    shown = indices[[i for i, _ in rows]]
    q_labels = [labels["query"][q] for _, q in rows]
    ap = average_precision(shown, q_labels, ref_labels, k=k)
    retrieval_picture([query_paths[i] for i, _ in rows],
                      [[reference_paths[j] for j in ranked[:width]] for ranked in shown],
                      [[ref_labels[j] == label for j in ranked[:width]] for ranked, label in zip(shown, q_labels)],
                      path, query_names=[q for _, q in rows], query_ap=ap.tolist(), ap_name=f"AP@{k}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from backbones.extract import WORKERS_HELP, workers_arg
    from ensemble.build import device_arg
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
    local.add_argument("--out", default="submission", metavar="DIR",
                       help="the submission folder (replaced whole by each run)")
    local.add_argument("--cache-dir", metavar="DIR", help="reuse member descriptors cached in this folder")
    local.add_argument("--picture", type=number(int, 0), default=8, metavar="N",
                       help="queries drawn in retrieval.png (0: none)")
    p.add_argument("--k", type=number(int, 1), default=1000, metavar="N",
                   help="references ranked per query, and the k of the local mAP@k")
    p.add_argument("--full-ranking", action="store_true",
                   help="rank every reference (phase 1) instead of the top k")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda or cuda:N")
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
    log.info("%s", runtime_report(args.device))
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
