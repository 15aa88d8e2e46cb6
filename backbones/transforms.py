"""Image transforms and datasets for training and extraction.

Unreadable files never crash a run: a training sample that cannot be decoded is
replaced by another image of the same class (so P x K batches keep their shape)
and its path is passed back for counting; an extraction sample comes back as
``None`` with the reason, and the caller masks it out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from competition.data import DATASET_MAX_SIDE, UnreadableImage, load_image


@dataclass
class AugmentConfig:
    """Training augmentation: random resized crop, horizontal flip, colour jitter."""

    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 disables


def train_transform(image_size: int, aug: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image -> augmented (3, image_size, image_size) float tensor."""
    ops: list = [T.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), antialias=True)]
    if aug.hflip > 0:
        ops.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        ops.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4)))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = 1.0, scale: float = 1.0) -> T.Compose:
    """PIL image -> (3, s, s) tensor: resize the shorter side to s / crop_pct, centre-crop s = image_size*scale."""
    size = max(8, int(round(image_size * scale)))
    return T.Compose([T.Resize(int(round(size / crop_pct)), antialias=True), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])


class TrainDataset(Dataset):
    """(image tensor, label, unreadable paths met) per index; bad files are swapped for a classmate."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], transform):
        self.paths = [os.fspath(p) for p in paths]
        self.labels = [int(x) for x in labels]
        self.transform = transform
        self.by_class: dict[int, list[int]] = {}
        for i, c in enumerate(self.labels):
            self.by_class.setdefault(c, []).append(i)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        label = self.labels[index]
        mates = self.by_class[label]
        start = mates.index(index)
        bad: list[tuple[str, str]] = []
        for j in mates[start:] + mates[:start]:
            try:
                img = load_image(self.paths[j], max_side=DATASET_MAX_SIDE)
            except UnreadableImage as exc:
                bad.append((exc.path, exc.reason))
                continue
            return self.transform(img), label, bad
        return None, label, bad  # every image of the class is unreadable


def train_collate(batch):
    """Return (images (B,3,H,W), labels (B,), [(path, reason) of unreadable files])."""
    bad = [b for _, _, bads in batch for b in bads]
    kept = [(x, y) for x, y, _ in batch if x is not None]
    if not kept:
        return None, None, bad
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept]), bad


class PathDataset(Dataset):
    """(index, [one tensor per transform] or None, reason) for each path."""

    def __init__(self, paths: Sequence[str | os.PathLike], transforms: Sequence):
        self.paths = [os.fspath(p) for p in paths]
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            img = load_image(self.paths[index], max_side=DATASET_MAX_SIDE)
        except UnreadableImage as exc:
            return index, None, exc.reason
        return index, [t(img) for t in self.transforms], ""


def path_collate(batch):
    """Return (indices of readable items (B,), [stacked (B,3,H,W) per scale], [(index, reason) failures])."""
    failed = [(i, r) for i, x, r in batch if x is None]
    ok = [(i, x) for i, x, _ in batch if x is not None]
    if not ok:
        return torch.empty(0, dtype=torch.long), [], failed
    idx = torch.tensor([i for i, _ in ok])
    per_scale = [torch.stack([x[s] for _, x in ok]) for s in range(len(ok[0][1]))]
    return idx, per_scale, failed
