"""Build an ensemble bundle from trained members and a dataset.

    python -m ensemble.build --members RUN1 RUN2 [X.npy ...] [--weights 1 2] --data DATASET \\
        --out BUNDLE [--split SPLIT.json] [--max-train-images N] [--device auto] [--batch-size 64] [--workers auto]
        [--flip]

Checks first what can be checked before any extraction: the device, every member opens, a
held-out split with held-out classes is found, the data folder holds the split's images; refuses
members trained on different held-out splits, or on held-out classes (leakage), naming the member
and the classes. Then extracts (through the descriptor cache) each member's descriptors of the
train classes (for whitening; optionally a seeded subsample) and of the held-out
queries/references (for tuning), and writes the bundle with default post-processing (given or
equal weights, no whitening, no re-ranking). ``--flip`` (``BuildConfig.flip``: one bool for every
member, or a list with one per member) averages a run member's descriptors with those of the
mirror images.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from competition.cli import ArgumentParser, UserError, number, run_command, show_progress
from competition.data import TRAIN_DIR, DataError, scan_train
from competition.split import HeldoutSplit
from ensemble.bundle import Bundle
from ensemble.combine import normalize_weights
from ensemble.members import TTA, Member, RunMember, describe_all, open_member
from ensemble.postprocess import PostProcessing


class MemberCheckError(UserError, ValueError):
    """Members that must not be ensembled on this split (different split, or leakage)."""


def check_device(device: str, option: str = "--device") -> str:
    """Return ``device`` (auto, cpu, cuda or cuda:N) when this machine can run it, else a ``UserError``
    naming ``option``: training's rule (``backbones.preflight.device_problem``; a CUDA device on a
    machine without a GPU falls back to the CPU, with a warning where it is used)."""
    from backbones.preflight import device_problem
    why = device_problem(device)
    if why is not None:
        raise UserError(f"{option}: {why}")
    return device


def device_arg(text: str) -> str:
    """argparse ``type`` of ``--device``: ``check_device`` at parse time."""
    try:
        return check_device(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device: ")) from None


@dataclass
class BuildOptions:
    """What ``build_bundle`` extracts and how (``BuildConfig`` adds how members are opened)."""

    weights: list[float] | None = None
    max_train_images: int | None = None
    seed: int = 0
    allow_unknown_split: bool = True   # members that do not declare a split: warn instead of refuse
    progress: bool = True
    refit_of: dict | None = None       # a final refit: {"split", "members", "post"} it was tuned with


@dataclass
class BuildSummary:
    """Counts of what went into the bundle (``line()`` is the CLI's last line)."""

    out: Path
    members: list[str]
    dims: list[int]
    split_hash: str
    n_train: int
    n_query: int
    n_reference: int
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        mem = ", ".join(f"{n} (d={d})" for n, d in zip(self.members, self.dims))
        return (f"bundle {self.out}: {len(self.members)} members [{mem}], split {self.split_hash}, "
                f"{self.n_train} train / {self.n_query} query / {self.n_reference} reference descriptors, "
                f"{len(self.unreadable)} unreadable, {self.seconds:.1f} s")


def check_members(members: Sequence[Member], split: HeldoutSplit, allow_unknown_split: bool = True,
                  refit: bool = False) -> list[str]:
    """Raise ``MemberCheckError`` for split mismatches or leakage; return warnings for unknowns.

    ``refit``: the deliberate mixing of a final refit, whose members must instead have been
    trained on every class of the split (train and held-out ones).
    """
    if refit:
        every = set(split.train_classes) | set(split.heldout_classes)
        missing = {m.name: sorted(every - set(m.train_classes or ())) for m in members}
        errors = [f"member {n} was not trained on every class (a refit member must be): {len(c)} missing, "
                  f"e.g. {c[:5]}" for n, c in missing.items() if c]
        if errors:
            raise MemberCheckError("refusing to build a refit: " + "; ".join(errors))
        return []
    notes, errors = [], []
    for m in members:
        if m.split_hash is None:
            msg = f"member {m.name}: no split_hash declared; cannot prove it used split {split.hash}"
            if allow_unknown_split and m.kind == "file":
                notes.append(msg)
            else:
                errors.append(msg)
        elif m.split_hash != split.hash:
            errors.append(f"member {m.name} was trained on held-out split {m.split_hash}, "
                          f"but the ensemble is built on split {split.hash}")
        if m.train_classes is None:
            notes.append(f"member {m.name}: train classes unknown; cannot check it for leakage")
        else:
            leaked = sorted(set(m.train_classes) & set(split.heldout_classes))
            if leaked:
                shown = ", ".join(leaked[:10]) + (f" (+{len(leaked) - 10} more)" if len(leaked) > 10 else "")
                errors.append(f"member {m.name} was trained on {len(leaked)} held-out classes "
                              f"(leakage): {shown}")
    hashes = {m.split_hash for m in members if m.split_hash is not None}
    if len(hashes) > 1:
        listing = ", ".join(f"{m.name}={m.split_hash}" for m in members if m.split_hash is not None)
        errors.insert(0, f"members were trained on different held-out splits: {listing}")
    if errors:
        raise MemberCheckError("refusing to ensemble: " + "; ".join(errors))
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return notes


def find_split(members: Sequence[Member], split_file: str | Path | None) -> HeldoutSplit:
    """Load ``split_file``, or else the split a run member trained on; refuse a split without held-out
    images (members trained on every class: nothing to tune on)."""
    from backbones.checkpoint import split_path
    where = split_file
    if where is None:
        where = next((split_path(m.run_dir) for m in members
                      if isinstance(m, RunMember) and split_path(m.run_dir).is_file()), None)
    if where is None:
        raise MemberCheckError("no held-out split: pass --split SPLIT.json (the split the members were trained on)")
    split = HeldoutSplit.load(where)
    if not split.query_ids or not split.reference_ids:
        raise MemberCheckError(
            f"{where}: no held-out split ({len(split.heldout_classes)} held-out classes, {len(split.query_ids)} "
            f"query and {len(split.reference_ids)} reference images): the members were trained on every class "
            "(--heldout-fraction 0), and a bundle is tuned on held-out classes; build from members trained "
            "with a held-out split, or pass --split SPLIT.json")
    return split


def check_data(data: Path, split: HeldoutSplit) -> None:
    """Raise ``DataError`` when ``data`` lacks the split's held-out images (checked before extraction)."""
    root = data / TRAIN_DIR
    if not root.is_dir():
        raise DataError(f"{root}: train folder not found (expected the NSML layout train/train_data/<class>/<image>)")
    missing = [i for i in (*split.query_ids, *split.reference_ids) if not (root / i).is_file()]
    if missing:
        raise DataError(f"{root}: {len(missing)} of the split's {len(split.query_ids) + len(split.reference_ids)} "
                        f"held-out images are missing (e.g. {missing[:3]}): is this the dataset the members "
                        "were trained on?")


def train_ids_for(data: Path, split: HeldoutSplit, max_images: int | None, seed: int,
                  every_class: bool = False) -> list[str]:
    """Image ids of the split's train classes (of every class with ``every_class``: a refit), a seeded
    subsample of ``max_images`` when given."""
    index = scan_train(data)
    if not every_class:
        index = index.subset(split.train_classes)
    ids = list(index.ids)
    if max_images is not None and len(ids) > max_images:
        rng = np.random.default_rng(seed)
        ids = [ids[i] for i in sorted(rng.choice(len(ids), size=max_images, replace=False))]
    return ids


def describe_sets(members: Sequence[Member], data: Path, ids: dict[str, list[str]],
                  progress: bool = True) -> tuple[dict[str, list[str]], list[dict[str, np.ndarray]], list[str]]:
    """Describe each set with each member; keep the images every member describes.

    Returns (kept ids per set, per member {set: (n_kept, d_m) float32}, unreadable paths).
    """
    from tqdm.auto import tqdm
    root = data / TRAIN_DIR
    kept_ids: dict[str, list[str]] = {}
    out: list[dict[str, np.ndarray]] = [{} for _ in members]
    unreadable: list[str] = []
    steps = tqdm(total=len(members) * len(ids), desc="members x sets", disable=not show_progress(progress),
                 file=sys.stderr)
    for s, s_ids in ids.items():
        paths = [root / i for i in s_ids]
        descs, ok = describe_all(members, paths, set_name=s if s == "train" else f"heldout-{s}", root=str(root),
                                 progress=progress, on_member=lambda: steps.update(1))
        unreadable += [str(p) for p, good in zip(paths, ok) if not good]
        kept_ids[s] = [i for i, good in zip(s_ids, ok) if good]
        for mi, d in enumerate(descs):
            out[mi][s] = d
    steps.close()
    return kept_ids, out, unreadable


def build_bundle(members: Sequence[Member], data: str | Path, split: HeldoutSplit, out: str | Path,
                 options: BuildOptions | None = None) -> tuple[Bundle, BuildSummary]:
    """Check the members, describe the train and held-out sets, and write the bundle to ``out``."""
    t0 = time.time()
    opt = options or BuildOptions()
    data = Path(data)
    refit = opt.refit_of is not None
    if refit and opt.refit_of.get("split") != split.hash:
        raise MemberCheckError(f"refusing to build a refit: its post-processing was tuned on split "
                               f"{opt.refit_of.get('split')}, not on {split.hash}")
    check_members(members, split, opt.allow_unknown_split, refit=refit)
    check_data(data, split)
    if opt.weights is not None:
        normalize_weights(opt.weights, len(members))  # raises on a wrong count or bad values
    ids = {"query": list(split.query_ids), "reference": list(split.reference_ids),
           "train": train_ids_for(data, split, opt.max_train_images, opt.seed, every_class=refit)}
    kept, descs, unreadable = describe_sets(members, data, ids, opt.progress)
    for s in ("query", "reference", "train"):
        if not kept[s]:
            raise DataError(f"no readable {s} image in {data}: cannot build a bundle")
    if unreadable:
        warnings.warn(f"{len(unreadable)} images left out of the bundle (unreadable for some member), "
                      f"e.g. {unreadable[:3]}", stacklevel=2)
    post = PostProcessing(weights=None if opt.weights is None else [float(w) for w in opt.weights])
    provenance = {"refit": True, "tuned_on": dict(opt.refit_of)} if refit else {"refit": False}
    bundle = Bundle.from_members(members, split, kept, descs, post, provenance)
    bundle.save(out)
    summary = BuildSummary(Path(out), [m.name for m in members], [int(d["train"].shape[1]) for d in descs],
                           split.hash, len(kept["train"]), len(kept["query"]), len(kept["reference"]),
                           unreadable, time.time() - t0)
    return bundle, summary


@dataclass
class BuildConfig(BuildOptions):
    """``BuildOptions`` plus how ``build_from_paths`` opens the members (paths, not objects)."""

    split: str | Path | None = None        # None: split.json of a run member
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None             # None: backbones.extract.default_workers of the device
    flip: bool | list[bool] = False        # TTA of run members: one bool for all, or one per member
    cache_dir: str | Path | None = None    # None: OUT.cache beside the bundle

    def flips(self, n_members: int) -> list[bool]:
        """One flip flag per member; a list of the wrong length is a ``UserError``."""
        if isinstance(self.flip, bool):
            return [self.flip] * n_members
        flips = list(self.flip)
        if len(flips) != n_members or not all(isinstance(f, bool) for f in flips):
            raise UserError(f"flip: {flips!r} should be one bool for every member, or a list of {n_members} "
                            f"bools (one per member)")
        return flips


def build_from_paths(member_paths: Sequence[str | Path], data: str | Path, out: str | Path,
                     config: BuildConfig | None = None) -> tuple[Bundle, BuildSummary]:
    """Check the device, open run dirs / .npy files as members, find the split, and ``build_bundle``
    into ``out``."""
    cfg = config or BuildConfig()
    check_device(cfg.device)
    flips = cfg.flips(len(member_paths))
    out = Path(out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else out.with_name(out.name + ".cache")
    members = [open_member(p, tta=TTA(flip=flip), cache_dir=cache_dir, device=cfg.device,
                           batch_size=cfg.batch_size, workers=cfg.workers) for p, flip in zip(member_paths, flips)]
    return build_bundle(members, data, find_split(members, cfg.split), out, cfg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from backbones.extract import WORKERS_HELP, workers_arg
    ap = ArgumentParser(prog="python -m ensemble.build", description=__doc__)
    ap.add_argument("--members", nargs="+", required=True, metavar="RUN_OR_NPY",
                    help="backbone run folders or .npy descriptor files")
    ap.add_argument("--weights", nargs="+", type=number(float, 0.0), metavar="W",
                    help="one weight per member (default: equal weights)")
    ap.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset root in the hackathon layout")
    ap.add_argument("--out", required=True, type=Path, metavar="DIR", help="the bundle folder to write")
    ap.add_argument("--split", type=Path, metavar="SPLIT.json",
                    help="held-out split JSON (default: the split a run member trained on)")
    ap.add_argument("--max-train-images", type=number(int, 2), metavar="N",
                    help="seeded subsample of the train-class images the whitening is fitted on (default: all)")
    ap.add_argument("--seed", type=number(int, 0), default=0, metavar="N", help="seed of that subsample")
    ap.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda or cuda:N, for extraction")
    ap.add_argument("--batch-size", type=number(int, 1), default=64, metavar="N", help="extraction batch size")
    ap.add_argument("--workers", type=workers_arg, default="auto", metavar="N|auto", help=WORKERS_HELP)
    ap.add_argument("--flip", action="store_true", help="run members average each image with its mirror image")
    ap.add_argument("--cache-dir", type=Path, metavar="DIR",
                    help="descriptor cache (default: OUT.cache beside the bundle)")
    ap.add_argument("--strict-split", action="store_true",
                    help="refuse descriptor-file members that declare no split_hash")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = BuildConfig(weights=args.weights, split=args.split, max_train_images=args.max_train_images,
                         seed=args.seed, device=args.device, batch_size=args.batch_size, workers=args.workers,
                         flip=args.flip, cache_dir=args.cache_dir, allow_unknown_split=not args.strict_split,
                         progress=not args.no_progress)
    _bundle, summary = build_from_paths(args.members, args.data, args.out, config)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
