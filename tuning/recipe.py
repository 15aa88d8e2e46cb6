"""The whole recipe in one command: data, split, members, ensemble, tuning, an optional refit
on all classes, a local submission, and a table of what each stage adds.

    python -m tuning.recipe                                   # the embedded demo (recipes/demo.toml)
    python -m tuning.recipe --config recipes/grocery-cpu.toml # a recipe file (see tuning/recipe_config.py)
    python -m tuning.recipe --config R.toml --data DATASET --trials 200 --parallel 2 --refit
    python -m tuning.recipe --config R.toml --print-config    # the resolved recipe, nothing run

Every step records the configuration it ran (OUT/steps/*.json, tuning/steps.py) and is
skipped when that is what is asked again; a changed configuration re-runs the step and
those after it, and says which fields changed. An interrupted run picks up where it
stopped (a member's training resumes mid-run). OUT keeps the resolved recipe.toml.

Before any work every problem of the recipe is reported at once (tuning/recipe_preflight.py);
the run holds OUT/run.lock (a second run on OUT is refused); member processes die with the
recipe however it dies; step records name files relative to OUT, so a copied or moved run
folder re-runs nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from competition.cli import ArgumentParser, number, run_command
from competition.console import console
from competition.data import LABELS_FILE, scan_train
from competition.fileio import atomic_write_json, atomic_write_text, sha256_file
from competition.lifeline import die_with_parent, parent_death_signal
from competition.runlock import RunLock
from competition.split import HeldoutSplit, make_split
from tuning.heldout import heldout_set
from tuning.recipe_config import RECIPE_FILE, RecipeConfig, apply_overrides, demo_recipe, load_recipe, to_toml
from tuning.recipe_preflight import check_recipe
from tuning.steps import StepRecord, config_hash
from tuning.table import describe_test_set, format_table, plot_table, score_rows, stage_rows, table_for_file


def in_run(out: str | Path, path: str | Path) -> str:
    """``path`` relative to the run folder ``out`` when inside it (a run folder can move), else absolute."""
    path, out = Path(path).resolve(), Path(out).resolve()
    return path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path)


log = logging.getLogger("tuning.recipe")   # not __name__: "__main__" under python -m


def say(msg: str) -> None:
    """A stage line (shown even with --quiet)."""
    log.info("[recipe] %s", msg)


def recipe_console(quiet: bool = False):
    """The console of a recipe run (``competition.console``): with ``quiet``, the stage lines, warnings
    and the table only."""
    return console(quiet=quiet, keep=[log.name])


def _rerun(what: str, changes: list[str]) -> None:
    if changes and changes != ["not run yet"]:
        say(f"{what}: " + ("resuming" if changes == ["interrupted"] else
                           "configuration changed (" + "; ".join(changes[:6]) + "): running it again"))


def prepare_data(cfg: RecipeConfig) -> Path:
    """Return the dataset root, generating the embedded default under OUT/data when ``data`` is ""."""
    if cfg.data:
        scan_train(cfg.data)  # a wrong path is one clear line, before anything is written
        return Path(cfg.data)
    from competition.synth import SynthConfig, generate
    root = Path(cfg.out) / "data"
    step, config = StepRecord.of(cfg.out, "data"), {"synth": cfg.synth, "seed": cfg.seed}
    changes = step.changes(config)
    if changes:
        _rerun("generated data", changes)
        step.start(config)
        summary = generate(root, SynthConfig(seed=cfg.seed, overwrite=root.exists(), **cfg.synth))
        step.finish(config, images=summary["images"])
        say(f"generated {summary['images']} images in {root}")
    return root


def prepare_split(cfg: RecipeConfig, data: Path) -> HeldoutSplit:
    """Write (when its configuration changed) and return OUT/split.json, the split every member shares."""
    path = Path(cfg.out) / "split.json"
    step, config = StepRecord.of(cfg.out, "split"), {"data": in_run(cfg.out, data), "heldout": cfg.heldout,
                                                       "seed": cfg.seed}
    if step.changes(config) or not path.is_file():
        _rerun("held-out split", step.changes(config))
        split = make_split(scan_train(data), cfg.heldout, seed=cfg.seed)
        split.save(path)
        step.finish(config, hash=split.hash)
    split = HeldoutSplit.load(path)
    say(f"split {split.hash}: {len(split.train_classes)} train classes, {len(split.heldout_classes)} held out")
    return split


def member_options(cfg: RecipeConfig, i: int, data: Path, out: Path, split: HeldoutSplit | None) -> dict:
    """The full training options of member ``i`` (``split`` None: trained on every train class)."""
    spec = cfg.members[i]
    opts = {"workers": cfg.workers, "device": cfg.devices[i % len(cfg.devices)], "seed": cfg.seed + i, "k": cfg.k,
            **spec.train_options(cfg.defaults), "data": str(Path(data).resolve()), "out": str(out.resolve())}
    if cfg.tensorboard and not opts.get("tensorboard"):   # DIR/members/<name>, DIR/refit-members/<name>
        opts["tensorboard"] = str((Path(cfg.tensorboard) / out.parent.name).resolve())
    if split is None:
        opts.update(split=None, heldout_fraction=0.0)
    else:
        opts.update(split=str((Path(cfg.out) / "split.json").resolve()))
    return opts


def _step_config(options: dict, split: HeldoutSplit | None) -> dict:
    """What a member's step depends on: its learning options (a runtime option such as the device,
    workers or verbosity changing does not retrain it) and the split's hash (not where its file is)."""
    from backbones.config import RUNTIME_ONLY
    return {"train": {k: v for k, v in options.items() if k not in (*RUNTIME_ONLY, "split")},
            "split": None if split is None else split.hash}


def _train_in_process(options: dict) -> dict:
    from backbones.config import TrainConfig
    from backbones.train import train
    return train(TrainConfig.from_dict(options))


def _train_in_subprocess(options: dict, log_path: str, threads: int) -> tuple[dict, float]:
    """A worker process: train one member with its own log and thread count (picklable, for spawn);
    returns (train's result, seconds it took)."""
    import contextlib

    import torch
    torch.set_num_threads(threads)
    t0 = time.time()
    with open(log_path, "a", buffering=1) as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        with console():   # no run_command in a spawned worker: the member's notices go to its log
            return _train_in_process({**options, "progress": False}), time.time() - t0


def member_pool(parallel: int) -> ProcessPoolExecutor:
    """``parallel`` spawned worker processes that die with this one however it dies, SIGKILL included
    (``competition.lifeline``; their DataLoader workers follow them)."""
    return ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def train_members(cfg: RecipeConfig, data: Path, split: HeldoutSplit | None, folder: str = "members",
                  label: str = "member") -> dict[str, dict]:
    """Train (or resume, or skip) every member into OUT/<folder>/<name>; ``cfg.parallel`` at once.

    Returns ``{name: {"run_dir", "seconds", "best", "config"}}`` (what actually ran)."""
    from backbones.checkpoint import can_resume
    out = Path(cfg.out)
    todo, done = [], {}
    for i, spec in enumerate(cfg.members):
        run_dir = out / folder / spec.name
        options = member_options(cfg, i, data, run_dir, split)
        step, config = StepRecord.of(out, f"{folder}-{spec.name}"), _step_config(options, split)
        step.forget("train", "split")   # older records named the split's file, now its hash alone
        changes = step.changes(config)
        if not changes:
            done[spec.name] = step.info()
            continue
        _rerun(f"{label} {spec.name}", changes)
        resume = step.started_with(config) and can_resume(run_dir)
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        step.start(config)
        todo.append((spec.name, {**options, "resume": resume}, step, config))
    if not todo:
        return done

    def record(name: str, options: dict, step: StepRecord, config: dict, result: dict, seconds: float) -> None:
        info = {"run_dir": in_run(out, options["out"]), "seconds": round(seconds, 1), "best": result.get("best"),
                "epoch": result.get("epoch"), "options": options}
        step.finish(config, **info)
        done[name] = info

    if cfg.parallel <= 1:
        for name, options, step, config in todo:
            say(f"training {label} {name} ({options['arch']}, {options['device']})"
                + (" - resuming" if options["resume"] else ""))
            t0 = time.time()
            record(name, options, step, config, _train_in_process(options), time.time() - t0)
        return done
    threads = max(1, (os.cpu_count() or 1) // cfg.parallel)
    each = f"{threads} thread{'s' if threads > 1 else ''} each"
    say(f"training {len(todo)} {label}s, {cfg.parallel} at a time ({each}); logs in {out / folder}/<name>/train.log")
    with member_pool(cfg.parallel) as pool:
        started = {}
        for name, options, step, config in todo:   # in recipe order: list the longest member first
            Path(options["out"]).mkdir(parents=True, exist_ok=True)
            log_path = str(Path(options["out"]) / "train.log")
            started[pool.submit(_train_in_subprocess, options, log_path, threads)] = (name, options, step, config)
        for future in as_completed(started):
            name, options, step, config = started[future]
            result, seconds = future.result()
            record(name, options, step, config, result, seconds)
            best = result.get("best")
            say(f"{label} {name} done in {seconds:.0f} s"
                + (f": best held-out mAP@{cfg.k} {best:.4f}" if best is not None else ""))
    return done


def _fingerprints(out: Path, members: dict[str, dict], names: list[str]) -> dict[str, str]:
    from backbones.checkpoint import WEIGHTS_FILE
    return {n: sha256_file(out / members[n]["run_dir"] / WEIGHTS_FILE)[:16] for n in names}


def build_step(cfg: RecipeConfig, data: Path, members: dict[str, dict], name: str = "bundle",
               split_file: Path | None = None, refit_of: dict | None = None) -> Path:
    """Build OUT/<name> from the members when they changed; a rebuilt bundle's old tuning study goes."""
    from ensemble.build import BuildConfig, build_from_paths
    from ensemble.bundle import is_bundle
    from tuning.search import tuning_dir
    bundle_dir = Path(cfg.out) / name
    names = [m.name for m in cfg.members]
    step = StepRecord.of(cfg.out, name)
    flips = [m.flip for m in cfg.members]
    config = {"members": _fingerprints(Path(cfg.out), members, names), "refit_of": refit_of,
              **({"flip": flips} if any(flips) else {})}
    changes = step.changes(config)
    if changes or not is_bundle(bundle_dir):
        _rerun(name, changes)
        shutil.rmtree(tuning_dir(bundle_dir), ignore_errors=True)
        build = BuildConfig(device=cfg.devices[0], seed=cfg.seed, progress=False, workers=cfg.workers,
                            split=split_file, refit_of=refit_of, flip=flips if any(flips) else False)
        _, summary = build_from_paths([Path(cfg.out) / members[n]["run_dir"] for n in names], data, bundle_dir,
                                      build)
        step.finish(config, id=config_hash(config))
        say(summary.line())
    return bundle_dir


def tune_step(cfg: RecipeConfig, bundle_dir: Path) -> None:
    """Run (or resume, or extend) the tuning study on the bundle; a study of another configuration restarts."""
    from tuning.search import SearchConfig, study_settings, tune_bundle
    if cfg.trials <= 0:
        return
    step = StepRecord.of(cfg.out, "tuning")
    search = SearchConfig(n_trials=cfg.trials, seed=cfg.seed, k=cfg.k, distractors=cfg.distractors,
                          heldout_remedy="heldout = 0.4 in the recipe",
                          tensorboard=str(Path(cfg.tensorboard) / "tuning") if cfg.tensorboard else None)
    study_config = {"bundle": StepRecord.of(cfg.out, "bundle").info().get("id"), "k": cfg.k, "seed": cfg.seed,
                    "storage": cfg.storage, "distractors": cfg.distractors, "study": study_settings(search)}
    if step.changes({**study_config, "trials": cfg.trials}) == []:
        return
    result = tune_bundle(bundle_dir, search, storage=cfg.storage or None,
                         study_name=f"postprocessing-{config_hash(study_config)}")
    step.finish({**study_config, "trials": cfg.trials}, best=result.best_value)
    say(f"tuned, {result.rate_line()}: held-out study mAP@{cfg.k} {result.best_value:.4f} "
        f"(defaults {result.defaults_value:.4f}); check classes {result.check_best['map_at_k']:.4f} "
        f"(defaults {result.check_defaults['map_at_k']:.4f}); final choice: {result.final['verdict']}")


def refit_step(cfg: RecipeConfig, data: Path, split: HeldoutSplit, bundle_dir: Path) -> Path:
    """Retrain every member on all train classes, then build OUT/refit with the tuned post-processing."""
    from ensemble.bundle import Bundle
    tuned = Bundle.load(bundle_dir)
    members = train_members(cfg, data, None, folder="refit-members", label="refit member")
    refit_of = {"split": split.hash, "members": dict(zip(tuned.member_names,
                                                         [s["fingerprint"][:16] for s in tuned.member_specs])),
                "post": config_hash(tuned.post.to_dict())}
    refit_dir = build_step(cfg, data, members, name="refit", split_file=Path(cfg.out) / "split.json",
                           refit_of=refit_of)
    refit = Bundle.load(refit_dir)
    if refit.post != tuned.post:
        refit.set_postprocessing(tuned.post)   # whitening refitted on every train class
        say(f"refit bundle {refit_dir}: tuned post-processing adopted, whitening refitted on all train classes")
    return refit_dir


def submit_through_main(cfg: RecipeConfig, data: Path, bundle_dir: Path) -> dict | None:
    """Run the NSML entry point (``python -m main``) in test mode in a subprocess; return its scores.

    It ranks through main.py's own infer path, reusing the test descriptors the table cached in
    OUT/cache rather than extracting them a second time."""
    run_dir = Path(cfg.out).resolve()
    out = run_dir / "submission"
    cmd = [sys.executable, "-m", "main", "--mode", "test", "--pause", "1", "--data", str(Path(data).resolve()),
           "--checkpoint", str(Path(bundle_dir).resolve()), "--out", str(out), "--device", cfg.devices[0],
           "--cache-dir", str(run_dir / "cache"), "--k", str(cfg.k)]
    say("local submission: " + " ".join(cmd[1:]))
    # run from OUT: the installed main module, never a main.py that happens to sit in the caller's folder
    subprocess.run(cmd, check=True, cwd=run_dir, preexec_fn=parent_death_signal)
    scores = out / "scores.json"
    return json.loads(scores.read_text()) if scores.is_file() else None


def run_recipe(cfg: RecipeConfig) -> list[dict]:
    """Run every step (skipping current ones); return the table rows and write OUT/results.*."""
    check_recipe(cfg.check())   # every problem at once, before OUT is created
    with RunLock(cfg.out):
        return _run_recipe(cfg)


def _run_recipe(cfg: RecipeConfig) -> list[dict]:
    from ensemble.bundle import Bundle
    t0 = time.time()
    out = Path(cfg.out)
    atomic_write_text(out / RECIPE_FILE, to_toml(cfg))
    data = prepare_data(cfg)
    split = prepare_split(cfg, data)
    members = train_members(cfg, data, split)
    bundle_dir = build_step(cfg, data, members)
    tune_step(cfg, bundle_dir)
    refit_dir = refit_step(cfg, data, split, bundle_dir) if cfg.refit else None
    bundle = Bundle.load(bundle_dir)
    heldout = heldout_set(bundle)
    has_labels = (data / LABELS_FILE).is_file()
    cache = out / "cache"
    test = describe_test_set(bundle, data, cache, cfg.devices[0]) if has_labels else None
    table = score_rows(stage_rows(heldout, bundle.post), heldout, test, cfg.k)
    for r in table:
        name = r["row"].removesuffix(" alone")
        if name in members:
            r["train_seconds"] = members[name].get("seconds", 0.0)
    final_dir = bundle_dir
    if refit_dir is not None:
        final_dir = refit_dir
        refit = Bundle.load(refit_dir)
        refit_test = describe_test_set(refit, data, cache, cfg.devices[0]) if has_labels else None
        row = score_rows({"refit on all classes": refit.post}, heldout, refit_test, cfg.k)[0]
        row["heldout"] = None   # its members learnt the held-out classes: no honest held-out score
        row["train_seconds"] = sum(StepRecord.of(out, f"refit-members-{m.name}").info().get("seconds", 0.0)
                                   for m in cfg.members)
        table.append(row)
    submitted = submit_through_main(cfg, data, final_dir) if has_labels else None
    results = {"recipe": cfg.to_dict(), "data": str(data), "members": {n: m.get("options") for n, m in members.items()},
               "table": table_for_file(table, cfg.k), "submission": submitted, "submitted_bundle": str(final_dir),
               "tuned_post": bundle.post.to_dict(), "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "results.json", results)
    text = format_table(table, cfg.k)
    atomic_write_text(out / "results.md", text + "\n")
    plot_table(table, out / "results.png", cfg.k)
    print("\n" + text)
    if submitted:
        print(f"\nlocal submission of {final_dir.name}: mAP@{cfg.k} {submitted[f'mAP@{cfg.k}']:.4f}, "
              f"Recall@1 {submitted['Recall@1']:.4f} (the '{table[-1]['row']}' row's test column, through main.py)")
    print(f"\nresults in {out}/results.{{md,json,png}}; total {time.time() - t0:.0f} s")
    return table


def parse_args(argv: list[str] | None = None):
    ap = ArgumentParser(prog="python -m tuning.recipe", description=__doc__)
    ap.add_argument("--config", metavar="FILE.toml", help="a recipe file (default: the embedded demo)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe and stop")
    ap.add_argument("--out", metavar="DIR", help="output folder (default: runs/<recipe name>; re-running resumes)")
    ap.add_argument("--data", metavar="DIR", help="dataset root (default: the recipe's, or generated data)")
    ap.add_argument("--heldout", type=number(float, 0.0, 0.99), metavar="X",
                    help="share of the train classes held out for tuning")
    ap.add_argument("--members", nargs="+", metavar="NAME", help="train and ensemble only these members")
    ap.add_argument("--epochs", type=number(int, 1), metavar="N", help="every member's epochs")
    ap.add_argument("--image-size", "--img-size", type=number(int, 16, 4096), metavar="PX",
                    help="every member's image size")
    ap.add_argument("--trials", type=number(int, 0), metavar="N", help="Optuna trials")
    ap.add_argument("--k", type=number(int, 1), metavar="N", help="mAP@k and the ranking length everywhere")
    ap.add_argument("--storage", metavar="URL", help="Optuna storage: journal:PATH or an RDB URL")
    ap.add_argument("--seed", type=number(int, 0), metavar="N", help="seed of data, split, members and study")
    ap.add_argument("--devices", nargs="+", metavar="DEVICE", help="member i trains on devices[i %% n]")
    ap.add_argument("--parallel", type=number(int, 1, 64), metavar="N", help="members trained at once")
    ap.add_argument("--workers", type=number(int, 0), metavar="N", help="DataLoader workers per member")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                    help="retrain every member on all train classes after tuning")
    ap.add_argument("--quiet", action="store_true", help="print the stage lines and the table only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any recipe value, e.g. synth.test_classes=20 or members.regnet.lr=0.01 (repeatable)")
    return ap.parse_args(argv)


def resolve(args) -> RecipeConfig:
    """The recipe file (or the embedded demo) with the command line laid over it."""
    cfg = load_recipe(args.config) if args.config else demo_recipe()
    values = {k: getattr(args, k) for k in ("out", "data", "heldout", "epochs", "image_size", "trials", "k",
                                             "storage", "seed", "devices", "parallel", "workers", "refit")}
    if args.devices and args.parallel is None:
        values["parallel"] = len(args.devices)
    sets = [*args.set, *(["defaults.quiet=true"] if args.quiet else [])]
    return apply_overrides(cfg, values, sets, args.members)


def command_line(argv: list[str] | None = None) -> tuple[argparse.Namespace, RecipeConfig | None]:
    """The parsed command line and its resolved recipe; None for the recipe when ``--print-config``
    printed it (nothing is to run)."""
    args = parse_args(argv)
    cfg = resolve(args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return args, None
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = command_line(argv)
    if cfg is not None:
        with recipe_console(args.quiet):
            run_recipe(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
