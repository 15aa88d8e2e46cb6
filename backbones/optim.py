"""How a backbone is optimised: parameter groups, layer-wise learning rates, and the schedule.

Learning rates, for a peak ``lr``:
* neck, GeM p and head: ``lr``;
* body layer i of L (timm's ``group_matcher`` order, stem first): ``lr * body_lr_mult *
  layer_decay ** (L - 1 - i)``, so the last block learns fastest and the stem slowest
  (``layer_decay`` 1: one body rate);
* no weight decay on 1-d tensors (biases, norms, p).

Schedule (per optimizer step s, multiplying each group's rate): the neck and head warm up
linearly for ``warmup`` steps, then follow a cosine to 0 at ``total``. With a linear probe of
``probe`` steps the body's factor is 0 until then (a frozen body: the neck and head learn on
the pretrained features first), then it warms up and decays the same way over the steps left.
"""
from __future__ import annotations

import math
from typing import Callable

import torch.nn as nn

from backbones.model import RetrievalNet


def body_layers(body: nn.Module) -> dict[str, int]:
    """``{parameter name: layer index}`` of a timm body, stem 0 (one layer when it has no group_matcher)."""
    if not hasattr(body, "group_matcher"):
        return {name: 0 for name, _ in body.named_parameters()}
    from timm.models import group_parameters
    layers = group_parameters(body, body.group_matcher(coarse=False), reverse=True)
    return {name: layers.get(name, max(layers.values(), default=0)) for name, _ in body.named_parameters()}


def param_groups(model: RetrievalNet, loss: nn.Module, lr: float, body_lr_mult: float, weight_decay: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups (see the module docstring); each carries ``part`` "body" or "neck"."""
    groups: dict[tuple, dict] = {}

    def add(p: nn.Parameter, part: str, group_lr: float) -> None:
        if not p.requires_grad:
            return
        wd = weight_decay if p.ndim >= 2 else 0.0
        g = groups.setdefault((part, group_lr, wd), {"params": [], "lr": group_lr, "weight_decay": wd, "part": part})
        g["params"].append(p)

    layers = body_layers(model.body)
    top = max(layers.values(), default=0)
    for name, p in model.body.named_parameters():
        add(p, "body", lr * body_lr_mult * layer_decay ** (top - layers[name]))
    body_ids = {id(p) for p in model.body.parameters()}
    for p in [p for p in model.parameters() if id(p) not in body_ids] + list(loss.parameters()):
        add(p, "neck", lr)
    return list(groups.values())


def warmup_cosine(warmup: int, total: int, start: int = 0) -> Callable[[int], float]:
    """Factor 0 before ``start``, a linear warm-up of ``warmup`` steps, then a cosine to 0 at ``total``."""
    def factor(step: int) -> float:
        s = step - start
        if s < 0:
            return 0.0
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - start - warmup))))
    return factor


def schedules(groups: list[dict], warmup: int, total: int, probe: int = 0) -> list[Callable[[int], float]]:
    """One ``LambdaLR`` factor per group: the body's starts after ``probe`` steps."""
    return [warmup_cosine(warmup, total, probe if g["part"] == "body" else 0) for g in groups]
