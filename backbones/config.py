"""Every training option in one place: ``TrainConfig``, its command line, and its checks.

Each field of ``TrainConfig`` is the option ``--field-name``; its help sentence, group and
allowed range live beside it (``option(...)``), so the command line, ``TrainConfig.check``
(which a recipe file's members go through too) and ``--help`` can never disagree.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from backbones.heads import HEADS
from competition.cli import ArgumentParser, UserError, number
from competition.settings import Setting, SettingError, declared, known_keys

GROUPS = {
    "data": "data and augmentation",
    "model": "model",
    "optimisation": "optimisation",
    "loss": "loss",
    "runtime": "validation and runtime",
}
AMP_CHOICES = ("auto", "none", "bf16", "fp16")


# options that change how a run goes, not what it learns (a resumed run may change them)
RUNTIME_ONLY = ("data", "out", "workers", "progress", "quiet", "device", "val_batch_size", "resume",
                "stop_after_epoch", "max_steps", "tensorboard")


class ConfigError(UserError, ValueError):
    """A training option with a value outside its range; the message names the option."""


def option(default: Any = MISSING, help: str = "", group: str = "runtime", low: float | None = None,  # noqa: A002
           high: float | None = None, choices: tuple | None = None, aliases: tuple[str, ...] = (),
           metavar: str | None = None):
    """A dataclass field carrying its command-line help, group, range and aliases."""
    meta = {"help": help, "group": group, "low": low, "high": high, "choices": choices, "aliases": aliases,
            "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training option; the command line fills one (``--x-y`` for field ``x_y``)."""

    # data and augmentation
    data: str = option(help="dataset root in the hackathon layout (train/train_data/<class>/<image>)", group="data",
                       metavar="DIR")
    out: str = option(help="run folder: weights, config, log, resumable state", group="data", metavar="DIR")
    split: str | None = option(None, "held-out split JSON to train against (default: a fresh seeded split, "
                               "saved as OUT/split.json)", "data", metavar="SPLIT.json")
    heldout_fraction: float = option(0.3, "share of the train classes held out for validation and tuning, "
                                     "when no --split is given (0: train on every class, no validation)", "data",
                                     0.0, 0.99)
    image_size: int = option(224, "side of the square training and extraction crops, in pixels", "data", 16, 4096,
                             aliases=("--img-size",))
    crop_scale: tuple[float, float] = option((0.35, 1.0), "random-resized-crop area range (min max)", "data",
                                             0.01, 1.0, metavar=("MIN", "MAX"))
    hflip: float = option(0.5, "probability of a horizontal flip", "data", 0.0, 1.0)
    color_jitter: float = option(0.2, "brightness/contrast/saturation jitter strength (0: off)", "data", 0.0, 1.0)
    crop_pct: float = option(1.0, "extraction: resize the shorter side to size / crop_pct, then centre-crop",
                             "data", 0.1, 1.0)
    workers: int = option(2, "DataLoader worker processes", "data", 0, 256)
    # model
    arch: str = option("efficientnet", "a timm model name (a tag such as convnext_tiny.fb_in22k picks the weights "
                       "--pretrained timm fetches), or a family: efficientnet, efficientnet-lite, resnet, convnext, "
                       "regnet, mobilenet, ... (a family takes the member its --pretrained weights are for)",
                       "model", metavar="NAME")
    pretrained: str | None = option(None, "initial body weights, never fetched unless asked: a local .safetensors/"
                                    ".pth file or timm repo folder; timm (timm's weights for --arch); or "
                                    "hf-hub:ORG/NAME (a timm model repo). Fetched ones go through the Hugging Face "
                                    "cache; offline: fill HF_HOME elsewhere, then HF_HUB_OFFLINE=1 (default: random "
                                    "initialisation)", "model", metavar="SOURCE")
    embedding_dim: int = option(512, "descriptor dimension (the neck's output); 0: no neck, the descriptor is the "
                                "body's GeM feature", "model", 0, 65536)
    neck_init: str = option("random", "the neck's initial weights: random, or pca (from the pretrained body's GeM "
                            "features on train images: epoch 0 is the off-the-shelf descriptor; measured slower to "
                            "fine-tune, see BENCHMARKS.md)", "model", choices=("random", "pca"))
    freeze_bn: bool = option(False, "keep the body's BatchNorm statistics (small batches, fused pretrained "
                             "weights)", "model")
    channels_last: bool = option(False, "channels-last memory layout (faster convnets on CPU and with AMP)", "model")
    ema: float = option(0.0, "decay of an exponential moving average of the weights, validated and saved "
                        "instead (0: off)", "model", 0.0, 0.99999)
    # optimisation
    epochs: int = option(10, "epochs to train; 0 with --pretrained saves the network off the shelf, scored",
                         "optimisation", 0, 100000)
    probe_epochs: int = option(0, "first epochs with a frozen body: the neck and head learn on the pretrained "
                               "features (a linear probe), then everything fine-tunes", "optimisation", 0, 100000)
    batch_size: int | None = option(None, "images per batch; sets P = batch size // K (at least K)", "optimisation",
                                    2, 65536)
    classes_per_batch: int = option(16, "P: classes in each batch", "optimisation", 1, 65536)
    images_per_class: int = option(4, "K: images of each class in a batch", "optimisation", 1, 1024)
    lr: float = option(1e-3, "learning rate of the neck and head (peak of the cosine schedule)", "optimisation",
                       1e-8, 10.0)
    body_lr_mult: float = option(0.1, "the body's learning rate as a multiple of --lr", "optimisation", 0.0, 10.0)
    layer_decay: float = option(1.0, "layer-wise learning-rate decay: each body block learns at this times the "
                                "rate of the block above it (1: one rate for the body)", "optimisation", 0.05, 1.0)
    optimizer: str = option("adamw", "optimizer", "optimisation", choices=("adamw", "sgd"))
    momentum: float = option(0.9, "SGD momentum (Nesterov)", "optimisation", 0.0, 0.9999)
    weight_decay: float = option(1e-4, "weight decay (not on biases, norms and GeM p)", "optimisation", 0.0, 1.0)
    warmup_epochs: float = option(1.0, "linear warm-up before the cosine decay, in epochs", "optimisation",
                                  0.0, 1000.0)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", "optimisation", 1, 1024)
    max_steps: int | None = option(None, "stop after this many optimizer steps (a smoke test)", "optimisation",
                                   1, None)
    # loss
    head: str = option("arcface", "metric-learning head", "loss", choices=HEADS)
    scale: float = option(30.0, "margin heads: logit scale s", "loss", 1.0, 1000.0)
    margin: float = option(0.3, "margin heads: margin m (ArcFace: angle in radians; CosFace: cosine)", "loss",
                           0.0, 1.5)
    triplet_weight: float = option(0.0, "weight of a batch-hard triplet loss added to the head's (0: off)", "loss",
                                   0.0, 100.0)
    triplet_margin: float = option(0.3, "margin of the triplet loss", "loss", 0.0, 2.0)
    # validation and runtime
    k: int = option(1000, "keep the checkpoint with the best held-out mAP@k", "runtime", 1, None)
    val_every: int = option(1, "validate every N epochs (and after the last)", "runtime", 1, 100000)
    val_batch_size: int = option(64, "batch size of the validation extraction", "runtime", 1, 65536)
    val_at_start: bool | None = option(None, "score the initial weights as epoch 0; they can be the best "
                                       "checkpoint (default: on with --pretrained)", "runtime")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (auto: a GPU when one is visible)", "runtime",
                         metavar="DEVICE")
    amp: str = option("auto", "mixed precision (auto: bf16 on CUDA, none on CPU)", "runtime", choices=AMP_CHOICES)
    seed: int = option(0, "seed of the split, initialisation, batches and augmentation", "runtime", 0, 2**31 - 1)
    resume: bool = option(False, "continue the run in --out from its last finished epoch", "runtime")
    stop_after_epoch: int | None = option(None, "end this invocation after that epoch (resume later)", "runtime",
                                          1, None)
    progress: bool = option(True, "progress bars (shown only on a terminal)", "runtime")
    quiet: bool = option(False, "print the run's first and last lines only, not a line per epoch", "runtime")
    tensorboard: str | None = option(None, "also log each epoch's loss, learning rates and held-out scores for "
                                     "TensorBoard in DIR/<run folder name> (needs the tensorboard package)",
                                     "runtime", metavar="DIR")

    def check(self) -> "TrainConfig":
        """Raise ``ConfigError`` naming every option outside its range or choices; return self."""
        problems = []
        for name, declared_as in option_settings().items():   # types, ranges and choices
            try:
                declared_as.check(getattr(self, name))
            except SettingError as exc:
                problems.append(f"--{name.replace('_', '-')}: {exc}")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.epochs == 0 and not self.pretrained:
            problems.append("--epochs 0 saves the initial weights: it needs --pretrained (random weights are no "
                            "member)")
        if self.probe_epochs and self.probe_epochs >= self.epochs and self.epochs:
            problems.append(f"--probe-epochs {self.probe_epochs} leaves no epoch to fine-tune in --epochs "
                            f"{self.epochs}")
        batch, k = self.batch_size, self.images_per_class
        if isinstance(batch, int) and isinstance(k, int) and batch < k:
            problems.append(f"--batch-size {self.batch_size} is smaller than --images-per-class "
                            f"{self.images_per_class}: a batch holds P classes of K images each, P >= 1")
        if isinstance(self.crop_scale, tuple) and len(self.crop_scale) == 2 and self.crop_scale[0] > self.crop_scale[1]:
            problems.append(f"--crop-scale: min {self.crop_scale[0]} is above max {self.crop_scale[1]}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    @property
    def batch_classes(self) -> int:
        """P, the classes in each batch: ``batch_size // images_per_class`` when a batch size is given, else
        ``classes_per_batch`` (``check`` refuses a batch size below K, so P >= 1)."""
        return self.batch_size // self.images_per_class if self.batch_size else self.classes_per_batch

    @property
    def scores_start(self) -> bool:
        """Whether the initial weights are scored as epoch 0 (``val_at_start``, auto: with --pretrained)."""
        return bool(self.pretrained) if self.val_at_start is None else self.val_at_start

    def result_options(self) -> dict:
        """The options that decide what a run learns (``to_dict`` without ``RUNTIME_ONLY``)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "training options") -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ConfigError`` naming them and ``where``."""
        d = known_keys(d, cls, "training option(s)", where, error=ConfigError)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).check()


@functools.cache
def option_settings() -> dict[str, Setting]:
    """``{field: Setting}`` of every training option (type, range, choices), read from TrainConfig's fields."""
    return declared(TrainConfig)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The ``python -m backbones.train`` command line, grouped, every option with its default."""
    ap = ArgumentParser(prog="python -m backbones.train", description=description)
    groups = {name: ap.add_argument_group(title) for name, title in GROUPS.items()}
    for f in fields(TrainConfig):
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        kind = _value_kind(f)
        if meta.get("metavar") or kind in (int, float):
            kw["metavar"] = meta.get("metavar") or {int: "N", float: "X"}[kind]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if meta.get("low") is not None or meta.get("high") is not None:
                kw["type"] = number(kind, meta["low"], meta["high"])
            elif kind is not str:
                kw["type"] = kind
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if isinstance(f.default, tuple):
                kw["nargs"] = len(f.default)
        groups[meta["group"]].add_argument(*flags, **kw)
    return ap


def _value_kind(f) -> type:
    """bool, int, float or str for a TrainConfig field (Optional and tuple fields by their items)."""
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name) or text.startswith(f"tuple[{name}"):
            return kind
    return str


def parse_args(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Build a checked ``TrainConfig`` from the command line."""
    a = vars(build_parser(description).parse_args(argv))
    a.pop("debug", None)
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()}).check()
    cfg.classes_per_batch = cfg.batch_classes   # the P a --batch-size sets, recorded as such
    return cfg
