"""Small image datasets in the hackathon layout, made by the kit's own generator."""
from __future__ import annotations

from pathlib import Path

from competition.data import TRAIN_DIR
from competition.synth import SynthConfig, generate


def make_dataset(root: Path, train_classes: int = 8, images_per_class: int = 6, test_classes: int = 3,
                 queries_per_class: int = 2, references_per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Generate a dataset under ``root`` (train classes, test query/reference, labels.csv); return ``root``."""
    generate(root, SynthConfig(seed=seed, train_classes=train_classes, images_per_class=images_per_class,
                               test_classes=test_classes, queries_per_class=queries_per_class,
                               references_per_class=references_per_class, size=size))
    return root


def train_paths(root: Path) -> list[Path]:
    """Every train image of a generated dataset, sorted."""
    return sorted((root / TRAIN_DIR).glob("*/*.jpg"))
