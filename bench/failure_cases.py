"""How the recipe meets a user's mistakes: each case run against a kit checkout, as a table row.

    python -m bench.failure_cases --kit /path/to/checkout --out runs/failures [--only NAME ...]

Every case is a tiny two-member recipe (generated data, 32 px, one epoch) with one thing wrong,
run as ``python -m tuning.recipe`` with PYTHONPATH set to ``--kit`` (so the same script measures
the code before and after a change). A row says the exit status, the first line the user sees
of the error (``error: ...``, or a traceback's last line), how many lines it took, whether the
run folder was created, whether a member trained first, and the seconds to the answer. Three
cases are run in steps: two runs in one folder, a SIGKILL of a ``parallel = 2`` recipe (training
processes alive 10 s later), and a copied run folder re-run (members re-trained).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE = {
    "heldout": "0.4", "trials": "2",
    "synth": {"train_classes": "8", "images_per_class": "4", "test_classes": "2", "queries_per_class": "1",
              "references_per_class": "2"},
    "defaults": {"image_size": "32", "epochs": "1", "embedding_dim": "16", "batch_size": "8",
                 "images_per_class": "2"},
    "members": [{"name": '"a"', "arch": '"resnet10t"'}, {"name": '"b"', "arch": '"resnet10t"'}],
}
# name -> (changes: "key" top level, "synth.key", "defaults.key", "b.key" the last member; extra arguments)
CASES = {
    "trials = \"15\"": ({"trials": '"15"'}, []),
    "heldout = \"0.4\"": ({"heldout": '"0.4"'}, []),
    "member epochs = 2.5": ({"b.epochs": "2.5"}, []),
    "k = 10.5": ({"k": "10.5"}, []),
    "devices = \"cpu\"": ({"devices": '"cpu"'}, []),
    "[synth] train_classes = \"many\"": ({"synth.train_classes": '"many"'}, []),
    "trials = 15.5": ({"trials": "15.5"}, []),
    "refit = \"yes\"": ({"refit": '"yes"'}, []),
    "member name = 7": ({"b.name": "7"}, []),
    "batch_size = 16.0": ({"defaults.batch_size": "16.0"}, []),
    "--set trials=abc": ({}, ["--set", "trials=abc"]),
    "--set refit=maybe": ({}, ["--set", "refit=maybe", "--print-config"]),
    "--set synth.bogus=3 --print-config": ({}, ["--set", "synth.bogus=3", "--print-config"]),
    "storage = \"mysql://nope\"": ({"storage": '"mysql://nope/db"'}, []),
    "last member: missing pretrained file": ({"b.pretrained": '"missing.safetensors"'}, []),
    "last member: unknown arch": ({"b.arch": '"resnet10tt"'}, []),
    "last member: device = \"gpu\"": ({"b.device": '"gpu"'}, []),
}


def recipe_text(changes: dict[str, str]) -> str:
    """The base recipe with ``changes`` applied, as TOML."""
    top = {k: v for k, v in BASE.items() if not isinstance(v, (dict, list))}
    tables = {"synth": dict(BASE["synth"]), "defaults": dict(BASE["defaults"])}
    members = [dict(m) for m in BASE["members"]]
    for key, value in changes.items():
        where, _, name = key.rpartition(".")
        target = top if not where else tables[where] if where in tables else members[-1]
        target[name] = value
    lines = [f"{k} = {v}" for k, v in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {v}" for k, v in table.items()]
    for m in members:
        lines += ["", "[[members]]"] + [f"{k} = {v}" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def _run(kit: Path, folder: Path, args: list[str], timeout: float = 900) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(kit), "PYTHONWARNINGS": "ignore"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "tuning.recipe", *args], cwd=folder, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or ""), timeout
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _answer(text: str) -> tuple[str, int]:
    """(the first error line, or a traceback's last line; how many lines the error took)."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[0][:150], len(errors)
    if "Traceback" in text:
        start = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        return "traceback: " + lines[-1][:140], len(lines) - start
    return (lines[-1][:150] if lines else ""), 0


def error_case(kit: Path, root: Path, name: str, changes: dict, extra: list[str]) -> dict:
    folder = root / name.replace(" ", "_").replace('"', "").replace("/", "")[:40]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "r.toml").write_text(recipe_text(changes))
    rc, text, seconds = _run(kit, folder, ["--config", "r.toml", "--out", "out", *extra])
    answer, n_lines = _answer(text)
    trained = any((folder / "out" / "members" / m / "model.safetensors").is_file() for m in ("a", "b"))
    return {"case": name, "exit": rc, "answer": answer, "lines": n_lines, "out created": (folder / "out").exists(),
            "a member trained first": trained, "seconds": round(seconds, 1)}


def two_runs(kit: Path, root: Path) -> dict:
    folder = root / "two_runs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "r.toml").write_text(recipe_text({"defaults.epochs": "30"}))
    env = {**os.environ, "PYTHONPATH": str(kit), "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "tuning.recipe", "--config", "r.toml", "--out", "out"],
                             cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (folder / "out" / "members" / "a").is_dir() and first.poll() is None:
            time.sleep(0.5)
        rc, text, seconds = _run(kit, folder, ["--config", "r.toml", "--out", "out"], timeout=120)
    finally:
        first.kill()
        first.wait()
    answer, n_lines = _answer(text)
    return {"case": "a second run on the same --out", "exit": rc, "answer": answer, "lines": n_lines,
            "seconds": round(seconds, 1)}


def _children(parent: int) -> list[int]:
    """Pids of the spawned worker processes (not the resource tracker) whose parent is ``parent``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and "spawn_main" in cmd:
            found.append(int(proc.name))
    return found


def orphans(kit: Path, root: Path) -> dict:
    folder = root / "orphans"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "r.toml").write_text(recipe_text({"defaults.epochs": "30", "parallel": "2"}))
    env = {**os.environ, "PYTHONPATH": str(kit), "PYTHONWARNINGS": "ignore"}
    recipe = subprocess.Popen([sys.executable, "-m", "tuning.recipe", "--config", "r.toml", "--out", "out"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = [folder / "out" / "members" / m / "train.log" for m in ("a", "b")]
    while not all(log.is_file() and "steps/epoch" in log.read_text() for log in logs) and recipe.poll() is None:
        time.sleep(0.5)
    members = _children(recipe.pid)
    recipe.send_signal(signal.SIGKILL)
    recipe.wait()
    time.sleep(10)
    alive = [pid for pid in members if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return {"case": "SIGKILL of a parallel = 2 recipe", "members": len(members), "alive 10 s later": len(alive)}


def relocation(kit: Path, root: Path) -> dict:
    folder = root / "relocation"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "r.toml").write_text(recipe_text({}))
    rc, text, _ = _run(kit, folder, ["--config", "r.toml", "--out", "a"])
    if rc != 0:
        return {"case": "cp -a runs/a runs/b, re-run on b", "exit": rc, "answer": _answer(text)[0]}
    subprocess.run(["cp", "-a", str(folder / "a"), str(folder / "b")], check=True)
    rc, text, seconds = _run(kit, folder, ["--config", "r.toml", "--out", "b"])
    said = [line for line in text.splitlines() if line.startswith("[recipe]")]
    return {"case": "cp -a runs/a runs/b, re-run on b", "exit": rc, "seconds": round(seconds, 1),
            "members re-trained": sum("[recipe] training" in line for line in said),
            "tuning re-run": any("[recipe] tuned," in line for line in said),
            "first change said": next((line for line in said if "changed" in line), "")[:150]}


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(str(r.get(k, "")).replace("|", "/") for k in keys) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.failure_cases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to run")
    ap.add_argument("--out", type=Path, default=Path("runs/failures"), help="work folder")
    ap.add_argument("--only", nargs="+", help="case names (or: two-runs, orphans, relocation)")
    args = ap.parse_args(argv)
    root = args.out.resolve()
    rows = [error_case(args.kit.resolve(), root, name, *CASES[name]) for name in CASES
            if not args.only or name in args.only]
    print(markdown(rows), flush=True)
    steps = [(n, f) for n, f in (("two-runs", two_runs), ("orphans", orphans), ("relocation", relocation))
             if not args.only or n in args.only]
    for _, step in steps:
        print("\n" + markdown([step(args.kit.resolve(), root)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
