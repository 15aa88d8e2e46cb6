"""Training heads for metric learning: ArcFace, CosFace, plain softmax, batch-hard triplet.

Every head maps (embeddings (B, d), labels (B,)) -> a scalar loss; embeddings are
the network's L2-normalised output. Heads and the triplet loss compute in float32 with
autocast off: under bf16 autocast the cosines would keep 8 significant bits (errors near
0.004 at cos ~ 1), which the logit scale s multiplies and which rival the margin's effect.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("arcface", "cosface", "softmax")


def float32(fn):
    """Run ``fn(self, emb, labels)`` with autocast off and ``emb`` as float32 (the result is float32)."""

    @functools.wraps(fn)
    def wrapper(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(emb.device.type, enabled=False):
            return fn(self, emb.float(), labels)

    return wrapper


class _CosineHead(nn.Module):
    """Shared part of the margin heads: class centres on the unit sphere."""

    def __init__(self, dim: int, n_classes: int, scale: float, margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = float(scale), float(margin)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Return cos(theta) between embeddings and class centres, (B, n_classes) float32 (also under autocast)."""
        with torch.autocast(emb.device.type, enabled=False):
            return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))


class ArcFace(_CosineHead):
    """Additive angular margin: s * cos(theta_y + m) for the target class."""

    @float32
    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-7))
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        phi = cos * cos_m - sin * sin_m
        # past theta > pi - m, fall back to a linear penalty (keeps the target monotonic)
        th, mm = math.cos(math.pi - self.margin), math.sin(math.pi - self.margin) * self.margin
        phi = torch.where(cos > th, phi, cos - mm)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.scale * (onehot * phi + (1 - onehot) * cos), labels)


class CosFace(_CosineHead):
    """Additive cosine margin: s * (cos(theta_y) - m) for the target class."""

    @float32
    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.scale * (cos - self.margin * onehot), labels)


class SoftmaxHead(nn.Module):
    """Plain linear classifier with cross-entropy (scale and margin unused)."""

    def __init__(self, dim: int, n_classes: int, scale: float = 1.0, margin: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)

    @float32
    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(emb), labels)


def make_head(kind: str, dim: int, n_classes: int, scale: float = 30.0, margin: float = 0.3) -> nn.Module:
    """Return the head module named ``kind`` (one of HEADS)."""
    table = {"arcface": ArcFace, "cosface": CosFace, "softmax": SoftmaxHead}
    if kind not in table:
        raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")
    return table[kind](dim, n_classes, scale, margin)


def batch_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (hardest positive vs hardest negative per anchor); float32 scalar.

    Anchors without a positive or a negative in the batch are ignored.
    """
    with torch.autocast(emb.device.type, enabled=False):
        return _batch_hard_triplet_loss(emb.float(), labels, margin)


def _batch_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    emb = F.normalize(emb, dim=1)
    dist = (2.0 - 2.0 * emb @ emb.t()).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return emb.sum() * 0.0
    hardest_pos = torch.where(pos, dist, torch.zeros_like(dist)).amax(1)
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, 4.0)).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


class MetricLoss(nn.Module):
    """Margin/softmax head loss plus ``triplet_weight`` x batch-hard triplet loss."""

    def __init__(self, head: nn.Module, triplet_weight: float = 0.0, triplet_margin: float = 0.3):
        super().__init__()
        self.head = head
        self.triplet_weight, self.triplet_margin = float(triplet_weight), float(triplet_margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.head(emb, labels)
        if self.triplet_weight > 0:
            loss = loss + self.triplet_weight * batch_hard_triplet_loss(emb, labels, self.triplet_margin)
        return loss
