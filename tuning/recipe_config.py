"""A recipe as a file: the whole run (data, split, members, tuning, refit) in TOML.

    # every key is optional but [[members]]; these are the defaults
    data = ""              # dataset root; "" generates the embedded default under OUT/data
    heldout = 0.3          # share of the train classes held out for tuning, in [0, 0.99]
    seed = 0               # seed of the data, the split, the members (seed + i) and the study
    trials = 100           # Optuna trials of the tuning study (0: no tuning)
    k = 1000               # mAP@k everywhere: best checkpoints, tuning, the table, the submission
    storage = ""           # Optuna storage: "" = SQLite in BUNDLE.tuning/, journal:PATH or an RDB URL
    distractors = 0        # train-class distractors in the tuning gallery: a count, "references", "all"
    devices = ["auto"]     # member i trains on devices[i % len(devices)] (a list, even of one)
    parallel = 1           # members trained at once, each in its own process and log
    workers = 0            # DataLoader workers of every member
    refit = false          # after tuning, retrain every member on all train classes
    tensorboard = ""       # a folder: every member's curves and the study, for `tensorboard --logdir`
    [synth]                # the generated dataset, when data = "" (competition.synth.SynthConfig fields)
    [defaults]             # training options every member starts from (any backbones.train option)
    [[members]]            # one table per member: name, arch, flip, and any backbones.train option
    name = "resnet10t"     # its folder and its name in the ensemble
    arch = "resnet10t"
    flip = false           # the bundle extracts this member with flip TTA (each image and its mirror)

Every value is checked against its declaration by one function (``competition.settings``), whether
it comes from a file or from ``--set KEY=VALUE``: the top-level keys are ``RecipeConfig``'s fields,
``[synth]`` keys ``SynthConfig``'s, member and ``[defaults]`` keys ``TrainConfig``'s (a new training
option is taken as soon as it is declared there). An integer refuses 2.5 and "2", a boolean anything
but true/false, a list a bare string (``devices = ["cpu"]``, not ``"cpu"``). Every problem is found
before anything runs and reported at once, one line each: ``FILE:LINE: KEY: expected ..., got ...``
(``--set KEY: ...`` on the command line). Paths in a file are relative to the file's folder, on the
command line to the working folder. ``apply_overrides`` lays command-line values over the file's;
``to_toml`` writes the resolved recipe (``--print-config``; the run folder keeps a copy).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from competition.cli import UserErrors
from competition.settings import Setting, SettingError, declared, setting, shown
from competition.tomlfile import TomlError, dumps, read_toml
from tuning.heldout import parse_distractors

RECIPE_FILE = "recipe.toml"       # the resolved copy a run folder keeps
RECIPE_ONLY = ("data", "out", "split", "resume", "seed")   # training options the recipe sets itself
TABLES = ("synth", "defaults", "members")
PATH_KEYS = ("data", "storage", "out", "pretrained", "tensorboard")   # relative to the file's (or working) folder
MEMBER_ONLY = {
    "name": Setting(str, help="the member's folder and its name in the ensemble"),
    "flip": Setting(bool, help="the bundle extracts this member with flip TTA"),
}
SYNTH_RANGES = {"size": (24, 1024)}    # competition.synth's limits; every count is >= 1


class RecipeError(UserErrors, ValueError):
    """A recipe file or override that cannot be used: one line per problem, naming the file, line and key."""


@dataclass
class MemberSpec:
    """One backbone to train: its name in the ensemble, its architecture, training options and TTA."""

    name: str
    arch: str
    options: dict = field(default_factory=dict)   # any backbones.config.TrainConfig field
    flip: bool = False

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

    out: str = setting("runs/recipe", "run folder (re-running resumes)")
    data: str = setting("", 'dataset root; "" generates the embedded dataset under OUT/data')
    heldout: float = setting(0.3, "share of the train classes held out for tuning", 0.0, 0.99)
    seed: int = setting(0, "seed of the data, the split, the members (seed + i) and the study", 0, 2**31 - 1)
    trials: int = setting(100, "Optuna trials of the tuning study (0: no tuning)", 0)
    k: int = setting(1000, "mAP@k everywhere: best checkpoints, tuning, the table, the submission", 1)
    storage: str = setting("", 'Optuna storage: "" = SQLite in BUNDLE.tuning/, journal:PATH or an RDB URL')
    distractors: str | int = setting(0, "train-class distractors in the tuning gallery",
                                     convert=parse_distractors, expected='a count >= 0, "references" or "all"')
    devices: list[str] = setting(["auto"], "member i trains on devices[i % len(devices)]", low=1)
    parallel: int = setting(1, "members trained at once, each in its own process and log", 1, 64)
    workers: int = setting(0, "DataLoader workers of every member", 0, 256)
    refit: bool = setting(False, "after tuning, retrain every member on all train classes")
    tensorboard: str = setting("", 'TensorBoard folder for every step: the members\' curves (DIR/members/NAME, '
                               'DIR/refit-members/NAME) and the study (DIR/tuning); "" = none')
    synth: dict = field(default_factory=lambda: dict(DEMO_SYNTH))
    defaults: dict = field(default_factory=dict)
    members: list[MemberSpec] = field(default_factory=list)
    origin: dict = field(default_factory=dict, compare=False, repr=False)   # dotted key -> "FILE:LINE" / "--set"

    def where(self, *keys: str) -> str:
        """``"FILE:LINE: KEY"`` (or ``"--set KEY"``) of the first of ``keys`` (dotted) that was set; the last
        key alone when none was."""
        for key in keys:
            if key in self.origin:
                return _label(self.origin[key], key)
        return keys[-1]

    def check(self) -> "RecipeConfig":
        """Refuse what no single key shows: no members, twice a name, options training would refuse."""
        problems = self.problems()
        if problems:
            raise RecipeError(problems)
        return self

    def problems(self) -> list[str]:
        """One line per problem across keys (``check`` without raising)."""
        from backbones.config import ConfigError, TrainConfig
        problems = []
        if not self.members:
            problems.append(f"{self.origin.get('members', 'recipe')}: no [[members]]: a recipe trains at least one")
        names = [m.name for m in self.members]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{self.where(f'members.{name}')}: the name {name!r} is given to {names.count(name)} "
                            "members; names must be unique")
        for m in self.members:
            try:
                TrainConfig.from_dict({"data": "", "out": "", **m.train_options(self.defaults)})
            except ConfigError as exc:
                problems.append(f"{self.where(f'members.{m.name}')}: {exc}")
        return problems

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "origin"}
        d["members"] = [{"name": m.name, "arch": m.arch, **({"flip": True} if m.flip else {}), **m.options}
                        for m in self.members]
        return d


TOP = declared(RecipeConfig)


@functools.cache
def synth_settings() -> dict[str, Setting]:
    """The ``[synth]`` keys: SynthConfig's fields but the ones the recipe sets, every count >= 1."""
    from competition.synth import SynthConfig
    return {name: dataclasses.replace(s, low=SYNTH_RANGES.get(name, (1, None))[0],
                                      high=SYNTH_RANGES.get(name, (1, None))[1])
            for name, s in declared(SynthConfig).items() if name not in ("seed", "workers", "overwrite")}


@functools.cache
def train_settings() -> dict[str, Setting]:
    """The member and ``[defaults]`` keys: every training option but the ones the recipe sets."""
    from backbones.config import option_settings  # (imported on first use: it brings torch)
    return {k: v for k, v in option_settings().items() if k not in RECIPE_ONLY}


def demo_recipe() -> RecipeConfig:
    """The embedded demo (recipes/demo.toml): what ``python -m tuning.recipe`` runs without a file."""
    return RecipeConfig(out="runs/demo", heldout=0.4, trials=100, parallel=2, defaults=dict(DEMO_DEFAULTS),
                        members=copy.deepcopy(DEMO_MEMBERS))


def _resolve(value: Any, base: Path | None) -> Any:
    """A path relative to ``base``; "", URLs (but journal:PATH), timm and hf-hub: sources stay as they are."""
    if base is None or not isinstance(value, str) or not value or value == "timm":
        return value
    if value.startswith("journal:"):
        return "journal:" + _resolve(value[len("journal:"):], base)
    if re.match(r"^[a-z][a-z0-9+-]*:", value) and not re.match(r"^[a-zA-Z]:[\\/]", value):
        return value
    return value if Path(value).is_absolute() else str((base / value).resolve())


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")


class KeyProblem(Exception):
    """A key that names nothing settable (the message says why); internal to this module."""


def _target(cfg: RecipeConfig, parts: list[str], base: Path | None) -> tuple[Setting, Callable[[Any], None]]:
    """The setting at a dotted key and a function storing a checked value there (paths resolved against
    ``base``); KeyProblem when the key names nothing settable."""
    head, rest = parts[0], parts[1:]

    def put(store: Callable[[Any], None], key: str) -> Callable[[Any], None]:
        return lambda value: store(_resolve(value, base) if key in PATH_KEYS else value)

    if head in ("synth", "defaults") and len(rest) == 1:
        key, table = rest[0], getattr(cfg, head)
        if head == "defaults" and key in RECIPE_ONLY:
            raise KeyProblem("set by the recipe for every member, not in [defaults]")
        settings = synth_settings() if head == "synth" else train_settings()
        if key not in settings:
            raise KeyProblem(_unknown(key, list(settings)))
        return settings[key], put(lambda v: table.__setitem__(key, v), key)
    if head == "members" and len(rest) == 2:
        member = next((m for m in cfg.members if m.name == rest[0]), None)
        if member is None:
            raise KeyProblem(f"no member named {rest[0]!r} (the recipe has {[m.name for m in cfg.members]})")
        key = rest[1]
        if key in RECIPE_ONLY:
            raise KeyProblem("set by the recipe for every member, not per member")
        if key in ("name", "flip", "arch"):
            return MEMBER_ONLY.get(key) or train_settings()[key], lambda v: setattr(member, key, v)
        if key not in train_settings():
            raise KeyProblem(_unknown(key, [*train_settings(), *MEMBER_ONLY]))
        return train_settings()[key], put(lambda v: member.options.__setitem__(key, v), key)
    if rest or head in TABLES:
        raise KeyProblem(f"{head} is a table: set its keys ({head}.KEY)" if head in TABLES and not rest
                         else _unknown(".".join(parts), [*TOP, "synth.KEY", "defaults.KEY", "members.NAME.KEY"]))
    if head not in TOP:
        raise KeyProblem(_unknown(head, list(TOP)))
    return TOP[head], put(lambda v: setattr(cfg, head, v), head)


def _label(origin: str, key: str) -> str:
    """How a message names a key set at ``origin``: "FILE:LINE: KEY", "--set KEY" or the option ("--trials")."""
    return f"--set {key}" if origin == "--set" else origin if origin.startswith("--") else f"{origin}: {key}"


def _store(cfg: RecipeConfig, key: str, value: Any, base: Path | None, origin: str, problems: list[str],
           text: str | None = None) -> None:
    """Check ``value`` (or the command-line ``text``) against ``key``'s setting and store it; a problem
    is appended as ``ORIGIN: KEY: why`` ("--set KEY: why" on the command line)."""
    label = _label(origin, key)
    try:
        setting_, store = _target(cfg, key.split("."), base)
        store(setting_.check(setting_.parse_text(text) if text is not None else value))
        cfg.origin[key] = origin
    except (KeyProblem, SettingError) as exc:
        problems.append(f"{label}: {exc}")


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read and check a recipe file; RecipeError lists every problem, one line each, with FILE:LINE."""
    path = Path(path)
    try:
        raw, lines = read_toml(path)
    except TomlError as exc:
        raise RecipeError(str(exc)) from None
    base = path.resolve().parent

    def at(*keys: Any) -> str:
        return f"{path}:{lines[keys]}" if keys in lines else str(path)

    cfg, problems = RecipeConfig(out=f"runs/{path.stem}"), []
    for key, value in raw.items():
        if key in ("synth", "defaults") and isinstance(value, dict):
            if key == "synth":
                cfg.synth = {}   # a [synth] table replaces the demo's: SynthConfig's defaults fill the rest
            for k, v in value.items():
                _store(cfg, f"{key}.{k}", v, base, at(key, k), problems)
        elif key == "members" and isinstance(value, list) and all(isinstance(m, dict) for m in value):
            cfg.origin["members"] = at("members")
            for i, table in enumerate(value):
                _add_member(cfg, table, i, base, lambda *k, i=i: at("members", i, *k), problems)
        elif key in TABLES:
            problems.append(f"{at(key)}: {key}: expected a table [{key}]" if key != "members" else
                            f"{at(key)}: members: expected [[members]] tables")
        else:
            _store(cfg, key, value, base, at(key), problems)
    cfg.origin.setdefault("members", str(path))
    return _checked(cfg, problems)


def _checked(cfg: RecipeConfig, problems: list[str]) -> RecipeConfig:
    """``cfg`` when neither its keys (``problems``, found while reading them) nor its values as a whole
    (``RecipeConfig.problems``, asked only of clean keys) are wrong; else RecipeError listing them."""
    problems = problems or cfg.problems()
    if problems:
        raise RecipeError(problems)
    return cfg


def _add_member(cfg: RecipeConfig, table: dict, i: int, base: Path, at: Callable[..., str],
                problems: list[str]) -> None:
    """Append the member of a ``[[members]]`` table (the i-th) to ``cfg`` and store its keys."""
    name = table.get("name")
    label = name if isinstance(name, str) and name else f"#{i + 1}"
    bad = [k for k in ("name", "arch") if not isinstance(table.get(k), str) or not table[k]]
    for key in bad:
        problems.append(f"{at(key)}: members.{label}.{key}: expected a non-empty string, got {shown(table[key])}"
                        if key in table else f"{at()}: members.{label}: no {key} (every member needs a name and "
                        "an arch)")
    if bad:
        return
    if any(m.name == name for m in cfg.members):
        problems.append(f"{at('name')}: members.{name}: the name {name!r} is taken by an earlier member; names "
                        "must be unique")
        return
    cfg.members.append(MemberSpec(name, ""))
    cfg.origin[f"members.{name}"] = at()
    for key, value in table.items():
        if key != "name":
            _store(cfg, f"members.{name}.{key}", value, base, at(key), problems)


def apply_overrides(cfg: RecipeConfig, values: dict[str, Any], sets: list[str] | None = None,
                    only_members: list[str] | None = None) -> RecipeConfig:
    """Lay command-line values over ``cfg``: top-level keys (``--trials`` ...), ``epochs``/``image_size``
    for every member, ``--set KEY=VALUE`` (``trials=10``, ``synth.test_classes=20``, ``defaults.lr=0.01``,
    ``members.NAME.lr=0.01``), and ``only_members`` (train only those); returns a checked copy.
    Paths are relative to the working folder (``--out`` is kept as given)."""
    cfg, problems, cwd = copy.deepcopy(cfg), [], Path.cwd()
    for key, value in values.items():
        if value is None:
            continue
        option = "--" + key.replace("_", "-")
        if key in ("epochs", "image_size"):
            for m in cfg.members:
                _store(cfg, f"members.{m.name}.{key}", value, None, option, problems)
        else:
            _store(cfg, key, value, None if key == "out" else cwd, option, problems)
    for item in sets or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        _store(cfg, key.strip(), None, cwd, "--set", problems, text=text.strip())
    if only_members:
        unknown = [n for n in only_members if n not in {m.name for m in cfg.members}]
        if unknown:
            problems.append(f"--members: no member named {', '.join(map(repr, unknown))} (the recipe has "
                            f"{[m.name for m in cfg.members]})")
        cfg.members = [m for m in cfg.members if m.name in only_members]
    return _checked(cfg, problems)


def to_toml(cfg: RecipeConfig) -> str:
    """The resolved recipe as a TOML file that ``load_recipe`` reads back to the same config."""
    d = cfg.to_dict()
    doc = {k: d[k] for k in TOP if k != "out"}
    if not cfg.data:
        doc["synth"] = d["synth"]
    doc["defaults"] = d["defaults"]
    members = "".join(f"\n[[members]]\n{dumps(m)}" for m in d["members"])   # never inline: one table each
    return "# resolved recipe (python -m tuning.recipe --print-config)\n" + dumps(doc) + members
