"""``--neck-init pca``: a fine-tuned member that starts at the off-the-shelf descriptor.

The neck (Linear C -> d, BatchNorm1d d) is set from a PCA of the
body's GeM features f on a sample of train images. With mu their mean, U (C, d) the top
principal directions and lambda the variances along them:

    fc.weight = U^T,  bn.running_mean = U^T mu,  bn.running_var = lambda,
    bn.weight = sqrt((lambda + eps) / mean(lambda + eps)),  bn.bias = 0

so in evaluation mode the neck outputs U^T (f - mu) / sqrt(mean lambda): the network's
descriptor at epoch 0 is the centred off-the-shelf GeM feature projected on its d main
directions, L2-normalised (the global factor only keeps the gradients through BatchNorm at
their usual size: sqrt(lambda) itself would shrink them by the features' scale). When d
exceeds what the sample supports (d > min(C, n - 1)) the extra outputs start at 0.

Not the default: on the grocery set a random neck starts as well (a random projection keeps
the geometry) and fine-tunes faster (BENCHMARKS.md, "Fine-tuning a pretrained member").
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from backbones.model import RetrievalNet, input_memory_format
from backbones.transforms import PathDataset, eval_transform, path_collate


def gem_features(model: RetrievalNet, paths: Sequence[str | os.PathLike], image_size: int,
                 device: torch.device, batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """(n_ok, C) float64 GeM-pooled body features (before the neck) of the readable ``paths``."""
    loader = DataLoader(PathDataset(paths, [eval_transform(image_size, model.spec.mean, model.spec.std)]),
                        batch_size=batch_size, num_workers=workers, collate_fn=path_collate)
    memory_format = input_memory_format(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for idx, views, _failed in loader:
                if len(idx):
                    x = views[0].to(device).contiguous(memory_format=memory_format)
                    rows.append(model.gem(model.features(x)).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, model.in_features))


def init_neck_from_features(model: RetrievalNet, features: np.ndarray) -> str:
    """Set the neck from a PCA of (n, C) body features (see the module docstring); return a report line."""
    if not model.has_neck:
        return "no neck to initialise (the descriptor is the body's GeM feature)"
    n, c = features.shape
    d = model.embedding_dim
    if n < 2:
        return f"neck left at random: {n} readable image(s) for its PCA"
    mu = features.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov(features - mu, rowvar=False))
    order = np.argsort(eigenvalues)[::-1][:min(d, c, n - 1)]
    k = len(order)
    weight = np.zeros((d, c))
    weight[:k] = vectors[:, order].T
    var = np.ones(d)
    var[:k] = np.maximum(eigenvalues[order], 1e-12)
    bn = model.bn
    scale = np.sqrt((var + bn.eps) / np.mean(var[:k] + bn.eps))   # relative scales; the mean gain is 1
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(weight))
        bn.running_mean.copy_(torch.from_numpy(weight @ mu))
        bn.running_var.copy_(torch.from_numpy(var))
        bn.weight.copy_(torch.from_numpy(scale))
        bn.weight[k:] = 1.0
        bn.bias.zero_()
    return (f"neck initialised from a PCA of the pretrained body's GeM features ({n} train images, "
            f"{k} of {d} dims, {eigenvalues[order].sum() / max(eigenvalues.sum(), 1e-12):.0%} of the variance)")
