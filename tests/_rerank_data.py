"""Small seeded fixtures shared by the tests/test_rerank_*.py files."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int = 64, n_clusters: int = 60, seed: int = 0,
              noise: float = 0.6) -> np.ndarray:
    """Seeded float32 unit vectors around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
