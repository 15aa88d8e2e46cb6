"""What drawing a trial costs: Optuna's TPESampler against tuning.sampling.ReproducibleSampler.

    python bench/bench_sampler.py [--trials 300] [--members 3] [--storage memory|sqlite|journal]

Each sampler runs a study of ``--trials`` trials on the kit's search space
(``suggest_postprocessing``, k-reciprocal included) with an objective that costs nothing
(a smooth function of the parameters), so the time is the sampler's and the storage's.
Prints a markdown table: seconds per trial over the whole study and over its last 50 trials.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import optuna


def run(sampler: optuna.samplers.BaseSampler, n_trials: int, members: list[str], storage: str | None) -> list[float]:
    """Seconds of each trial (ask, suggest, tell) of a study with a free objective."""
    from tuning.objective import SearchSpace, suggest_postprocessing

    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage)
    seconds = []
    for _ in range(n_trials):
        t0 = time.perf_counter()
        trial = study.ask()
        post = suggest_postprocessing(trial, members, 256, SearchSpace())
        value = math.sin(3 * (post.whiten_power or 0)) + 0.1 * post.rerank.k1 / 40 - 0.05 * post.rerank.dba_n
        study.tell(trial, value)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    from tuning.sampling import ReproducibleSampler

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--storage", choices=["memory", "sqlite", "journal"], default="memory")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    members = [f"m{i}" for i in range(args.members)]
    print("| sampler | storage | trials | s/trial (all) | s/trial (last 50) |\n|---|---|---|---|---|")
    for name, sampler in (("TPESampler(seed=0)", optuna.samplers.TPESampler(seed=0)),
                          ("ReproducibleSampler(0)", ReproducibleSampler(0))):
        with tempfile.TemporaryDirectory() as tmp:
            storage = {"memory": None, "sqlite": f"sqlite:///{tmp}/s.db",
                       "journal": optuna.storages.JournalStorage(
                           optuna.storages.journal.JournalFileBackend(f"{tmp}/j.log"))}[args.storage]
            seconds = run(sampler, args.trials, members, storage)
        print(f"| {name} | {args.storage} | {args.trials} | {sum(seconds) / len(seconds):.3f} | "
              f"{sum(seconds[-50:]) / len(seconds[-50:]):.3f} |")


if __name__ == "__main__":
    main()
