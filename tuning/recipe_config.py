"""A recipe as a file: the whole run (data, split, members, tuning, refit) in TOML.

    # every key is optional but [[members]]; these are the defaults
    data = ""              # dataset root; "" generates the embedded default under OUT/data
    heldout = 0.3          # share of the train classes held out for tuning
    seed = 0               # seed of the data, the split, the members (seed + i) and the study
    trials = 100           # Optuna trials of the tuning study
    k = 1000               # mAP@k everywhere: best checkpoints, tuning, the table, the submission
    storage = ""           # Optuna storage: "" = SQLite in BUNDLE.tuning/, journal:PATH or an RDB URL
    distractors = "references"  # train-class distractors in the tuning gallery (tuning.search)
    devices = ["auto"]     # member i trains on devices[i % len(devices)]
    parallel = 1           # members trained at once, each in its own process and log
    workers = 0            # DataLoader workers of every member
    refit = false          # after tuning, retrain every member on all train classes
    [synth]                # the generated dataset, when data = "" (competition.synth.SynthConfig fields)
    [defaults]             # training options every member starts from (any backbones.train option)
    [[members]]            # one table per member: name, arch, and any backbones.train option
    name = "resnet10t"
    arch = "resnet10t"

``demo_recipe()`` is recipes/demo.toml, what the command runs without a file. Paths in a
file are relative to the file's folder. Unknown keys are refused by name, with
the file and line. ``apply_overrides`` lays command-line values over the file's, and
``to_toml`` writes the resolved recipe (``--print-config``; the run folder keeps a copy).
"""
from __future__ import annotations

import copy
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from competition.cli import UserError
from tuning.heldout import parse_distractors

RECIPE_FILE = "recipe.toml"       # the resolved copy a run folder keeps
RECIPE_ONLY = ("data", "out", "split", "resume", "seed")   # training options the recipe sets itself


class RecipeError(UserError, ValueError):
    """A recipe file or override that cannot be used; the message names the file, line and key."""


@dataclass
class MemberSpec:
    """One backbone to train: its name in the ensemble, its architecture and training options."""

    name: str
    arch: str
    options: dict = field(default_factory=dict)   # any backbones.config.TrainConfig field

    def train_options(self, defaults: dict) -> dict:
        """``defaults`` overlaid with this member's options and arch (without the recipe-set ones)."""
        return {**defaults, **self.options, "arch": self.arch}


# Three small networks of different designs (residual, densely connected, plain) that learn from
# scratch at 64 px on 2 CPU cores; the generated dataset is large enough for a held-out split
# and a test set whose table is stable from seed to seed (BENCHMARKS.md).
DEMO_SYNTH = {"train_classes": 60, "images_per_class": 16, "test_classes": 24,
              "queries_per_class": 4, "references_per_class": 12}
DEMO_DEFAULTS = {"batch_size": 32, "image_size": 64, "lr": 3e-3, "embedding_dim": 128, "epochs": 15,
                 "head": "cosface", "margin": 0.2, "scale": 16.0}
DEMO_MEMBERS = [   # the longest to train first: two at a time, the other two share the second slot
    MemberSpec("vgg11", "vgg11_bn", {"epochs": 8}),
    MemberSpec("resnet10t", "resnet10t"),
    MemberSpec("densenet121", "densenet121", {"epochs": 10}),
]


@dataclass
class RecipeConfig:
    """A resolved recipe (see the module docstring for each key)."""

    out: str = "runs/recipe"
    data: str = ""
    heldout: float = 0.3
    seed: int = 0
    trials: int = 100
    k: int = 1000
    storage: str = ""
    distractors: str | int = "references"
    devices: list[str] = field(default_factory=lambda: ["auto"])
    parallel: int = 1
    workers: int = 0
    refit: bool = False
    synth: dict = field(default_factory=lambda: dict(DEMO_SYNTH))
    defaults: dict = field(default_factory=dict)
    members: list[MemberSpec] = field(default_factory=list)

    def check(self, where: str = "recipe") -> "RecipeConfig":
        """Refuse values outside their ranges and member options that training would refuse."""
        from backbones.config import ConfigError, TrainConfig

        problems = []
        if not 0.0 <= self.heldout < 1.0:
            problems.append(f"heldout must be in [0, 1), got {self.heldout}")
        for key, low in (("trials", 0), ("k", 1), ("parallel", 1), ("workers", 0), ("seed", 0)):
            if getattr(self, key) < low:
                problems.append(f"{key} must be >= {low}, got {getattr(self, key)}")
        try:
            parse_distractors(self.distractors)
        except UserError as exc:
            problems.append(str(exc))
        if not self.devices:
            problems.append("devices must list at least one device")
        if not self.members:
            problems.append("no [[members]]")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            problems.append(f"member names must be unique, got {names}")
        for m in self.members:
            set_here = sorted(set(m.options) & set(RECIPE_ONLY))
            if set_here:
                problems.append(f"member {m.name}: {set_here} are set by the recipe, not per member")
                continue
            try:
                TrainConfig.from_dict({"data": "", "out": "", **m.train_options(self.defaults)},
                                      where=f"member {m.name}")
            except ConfigError as exc:
                problems.append(f"member {m.name}: {exc}" if not str(exc).startswith("member ") else str(exc))
        if problems:
            raise RecipeError(f"{where}: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = [{"name": m.name, "arch": m.arch, **m.options} for m in self.members]
        return d


_TOP = {f.name for f in fields(RecipeConfig)} - {"members", "synth", "defaults"}


def demo_recipe() -> RecipeConfig:
    """The embedded demo (recipes/demo.toml): what ``python -m tuning.recipe`` runs without a file."""
    return RecipeConfig(out="runs/demo", heldout=0.4, trials=100, parallel=2, defaults=dict(DEMO_DEFAULTS),
                        members=copy.deepcopy(DEMO_MEMBERS))
_PATH_KEYS = ("data", "storage", "out")


def _line_of(text: str, table: tuple, key: str) -> int | None:
    """1-based line of ``key = ...`` inside ``table`` (() top level, ("synth",), ("members", i))."""
    current, seen = (), {}
    for no, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        m = re.match(r"^\[\[\s*([\w.]+)\s*\]\]", s)
        if m:
            seen[m.group(1)] = seen.get(m.group(1), -1) + 1
            current = (m.group(1), seen[m.group(1)])
            continue
        m = re.match(r"^\[\s*([\w.]+)\s*\]", s)
        if m:
            current = (m.group(1),)
            continue
        if current == table and re.match(rf"^[\"']?{re.escape(key)}[\"']?\s*=", s):
            return no
    return None


def _where(path: Path, text: str, table: tuple, key: str) -> str:
    line = _line_of(text, table, key)
    return f"{path}:{line}" if line else str(path)


def _resolve(value: str, base: Path) -> str:
    """A path relative to ``base`` (the recipe file's folder); "" and URLs stay as they are."""
    if not value or re.match(r"^[a-z][a-z0-9+]*:", value) and not value.startswith("journal:"):
        return value
    if value.startswith("journal:"):
        return "journal:" + _resolve(value[len("journal:"):], base)
    return str((base / value).resolve()) if not Path(value).is_absolute() else value


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read a recipe file; unknown keys are refused naming the file and line."""
    from backbones.config import TrainConfig

    path = Path(path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    known_train = {f.name for f in fields(TrainConfig)}
    problems = []
    for key in raw:
        if key not in _TOP | {"members", "synth", "defaults"}:
            problems.append(f"{_where(path, text, (), key)}: unknown key {key!r}")
    from competition.synth import SynthConfig
    synth_keys = {f.name for f in fields(SynthConfig)} - {"overwrite", "workers"}
    for key in raw.get("synth", {}):
        if key not in synth_keys:
            problems.append(f"{_where(path, text, ('synth',), key)}: unknown [synth] key {key!r}")
    for key in raw.get("defaults", {}):
        if key not in known_train or key in RECIPE_ONLY:
            problems.append(f"{_where(path, text, ('defaults',), key)}: unknown or recipe-set training option {key!r}")
    members = []
    for i, m in enumerate(raw.get("members", [])):
        for key in m:
            if key != "name" and (key not in known_train or key in RECIPE_ONLY):
                problems.append(f"{_where(path, text, ('members', i), key)}: member {m.get('name', i)!r}: "
                                f"unknown or recipe-set training option {key!r}")
        if "name" not in m or "arch" not in m:
            problems.append(f"{path}: member #{i + 1} needs a name and an arch")
            continue
        members.append(MemberSpec(str(m["name"]), str(m["arch"]),
                                  {k: v for k, v in m.items() if k not in ("name", "arch")}))
    if problems:
        raise RecipeError("; ".join(problems))
    base = path.resolve().parent
    cfg = RecipeConfig(out=f"runs/{path.stem}")
    for key in _TOP & set(raw):
        value = raw[key]
        setattr(cfg, key, _resolve(value, base) if key in _PATH_KEYS and isinstance(value, str) else value)
    if "synth" in raw:
        cfg.synth = dict(raw["synth"])
    if "defaults" in raw:
        cfg.defaults = dict(raw["defaults"])
    if "members" in raw:
        cfg.members = members
    for m in cfg.members:
        if isinstance(m.options.get("pretrained"), str) and not m.options["pretrained"].startswith(("timm", "hf-hub:")):
            m.options["pretrained"] = _resolve(m.options["pretrained"], base)
    return cfg.check(where=str(path))


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (numbers, true, ["a"]), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: RecipeConfig, values: dict[str, Any], sets: list[str] | None = None,
                    only_members: list[str] | None = None) -> RecipeConfig:
    """Lay command-line values over ``cfg``: top-level keys, ``epochs``/``image_size`` for every
    member, ``--set KEY=VALUE`` (``trials=10``, ``synth.test_classes=20``, ``defaults.lr=0.01``,
    ``members.NAME.lr=0.01``), and ``only_members`` (train only those); returns a checked copy."""
    cfg = copy.deepcopy(cfg)
    for key, value in values.items():
        if value is None:
            continue
        if key in ("epochs", "image_size"):
            for m in cfg.members:
                m.options[key] = value
        elif key in _PATH_KEYS and isinstance(value, str):
            setattr(cfg, key, _resolve(value, Path.cwd()) if key != "out" else value)
        else:
            setattr(cfg, key, value)
    for item in sets or []:
        key, eq, text = item.partition("=")
        if not eq:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
        value, parts = _parse_value(text), key.strip().split(".")
        if len(parts) == 1 and parts[0] in _TOP:
            setattr(cfg, parts[0], value)
        elif len(parts) == 2 and parts[0] in ("synth", "defaults"):
            getattr(cfg, parts[0])[parts[1]] = value
        elif len(parts) == 3 and parts[0] == "members":
            member = next((m for m in cfg.members if m.name == parts[1]), None)
            if member is None:
                raise RecipeError(f"--set {item!r}: no member named {parts[1]!r}")
            if parts[2] == "arch":
                member.arch = str(value)
            else:
                member.options[parts[2]] = value
        else:
            raise RecipeError(f"--set {item!r}: unknown key {key!r}")
    if only_members:
        unknown = sorted(set(only_members) - {m.name for m in cfg.members})
        if unknown:
            raise RecipeError(f"--members: no member named {unknown} (the recipe has "
                              f"{[m.name for m in cfg.members]})")
        cfg.members = [m for m in cfg.members if m.name in only_members]
    return cfg.check(where="command line")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RecipeConfig) -> str:
    """The resolved recipe as a TOML file that ``load_recipe`` reads back to the same config."""
    d = cfg.to_dict()
    lines = ["# resolved recipe (python -m tuning.recipe --print-config)"]
    lines += [f"{k} = {_toml_value(d[k])}" for k in sorted(_TOP) if k != "out"]
    for table in ("synth", "defaults") if not cfg.data else ("defaults",):
        lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[table].items()]
    for m in d["members"]:
        lines += ["", "[[members]]"] + [f"{k} = {_toml_value(v)}" for k, v in m.items()]
    return "\n".join(lines) + "\n"
