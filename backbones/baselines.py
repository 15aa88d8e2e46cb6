"""Descriptors that need no training, as floors for the benchmark tables.

* ``hsv_histogram``: a 512-bin (8 x 8 x 8) HSV colour histogram, L2-normalised.
* ``pretrained_gem``: an ImageNet-pretrained timm body off the shelf, GeM-pooled
  (p=3) on its last feature map, L2-normalised; no neck, no fine-tuning.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from competition.data import LoadReport, try_load_image


def hsv_histogram(paths: Sequence[str | os.PathLike], bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Return (descriptors (n_ok, bins**3) float32 unit rows, ok (n,) bool)."""
    report = LoadReport()
    rows, ok = [], np.zeros(len(paths), dtype=bool)
    width = 256 // bins
    for i, path in enumerate(paths):
        img = try_load_image(path, report)
        if img is None:
            continue
        hsv = np.asarray(img.convert("HSV")).reshape(-1, 3).astype(np.int64) // width
        hist = np.bincount((hsv[:, 0] * bins + hsv[:, 1]) * bins + hsv[:, 2], minlength=bins ** 3)
        rows.append(hist / max(np.linalg.norm(hist), 1e-12))
        ok[i] = True
    desc = np.asarray(rows, dtype=np.float32).reshape(-1, bins ** 3)
    return desc, ok


def pretrained_gem(arch: str, weights: str | os.PathLike, paths: Sequence[str | os.PathLike],
                   image_size: int = 160, **extract_kw) -> tuple[np.ndarray, np.ndarray]:
    """Return (GeM descriptors (n_ok, C) float32 unit rows, ok (n,) bool) of a pretrained body."""
    from backbones.extract import extract_descriptors
    from backbones.model import build_model

    model = build_model(arch, embedding_dim=0, pretrained=weights, announce=False)   # no neck: GeM of the body
    return extract_descriptors(model, paths, config={"image_size": image_size}, **extract_kw)
