"""Generated member descriptors shaped like the hackathon's data, for benchmarks at any scale.

Classes have sizes drawn like the hackathon's (log-normal around ``images_per_class``, some of
2-5 images). Each class is a short chain of modes in a latent space (views of a product: a query
near one end does not see the far end directly, its neighbours' neighbours do), so DBA, aQE,
k-reciprocal and diffusion have something to win. Each image is a mode plus noise; each member
maps the latent space to ``dim`` dimensions by its own random projection and adds its own noise
and a strong nuisance direction shared by all its images (PCA-whitening removes it), so members
differ in quality and the ensemble beats each of them.

    modes of a class: a random start s ~ N(0, I), then steps of length mode_step * sqrt(latent)
    latent z = (mode_(class, j) + noise * e) / sqrt(latent)                  (e ~ N(0, I))
    member m: x = L2norm(P_m z + member_noise_m * e' + nuisance * sqrt(dim) * t * u_m)
    (P_m a (latent, dim) Gaussian matrix, e' ~ N(0, I_dim), t ~ N(0, 1), u_m a unit direction)

``Generated`` holds, per member, memory-mapped (n, dim) float32 unit rows of every image (train,
test queries, test references), the labels and names, and a held-out split of the train classes
laid out as the kit's split makes it (a share of the classes, 25% of each one's images as queries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["GeneratedConfig", "Generated", "generate"]


@dataclass
class GeneratedConfig:
    """Sizes and difficulty; the defaults are the hackathon's phase 2."""

    train_images: int = 73_551
    train_classes: int = 1_383
    test_queries: int = 18_027
    test_references: int = 36_748
    images_per_class: float = 53.0      # median class size of the test classes (train: from the two above)
    members: int = 3
    dim: int = 512
    latent: int = 32
    modes: tuple[int, int] = (1, 5)     # modes per class, uniform in [low, high]
    mode_step: float = 1.5              # distance between consecutive modes (per latent dimension)
    noise: float = 0.55                 # image noise around its mode (per latent dimension)
    member_noise: tuple[float, ...] = (0.6, 0.8, 1.0)
    nuisance: float = 0.2
    heldout: float = 0.3
    query_fraction: float = 0.25
    seed: int = 0


@dataclass
class Generated:
    """Per member m: ``train[m]`` (n_train, dim), ``query[m]`` (nq, dim), ``reference[m]`` (nr, dim)."""

    train: list[np.ndarray]
    query: list[np.ndarray]
    reference: list[np.ndarray]
    train_labels: np.ndarray
    query_labels: np.ndarray
    reference_labels: np.ndarray
    heldout_classes: list[str]
    member_names: list[str] = field(default_factory=list)

    def heldout_rows(self, query_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train rows, held-out query rows, held-out reference rows) into ``train``: the train classes'
        images, and each held-out class's images split as the kit's split does (at least one of each)."""
        rng = np.random.default_rng(seed)
        held = np.isin(self.train_labels, self.heldout_classes)
        queries, references = [], []
        for c in self.heldout_classes:
            rows = rng.permutation(np.flatnonzero(self.train_labels == c))
            n_q = min(max(1, int(round(query_fraction * len(rows)))), len(rows) - 1)
            queries.append(rows[:n_q])
            references.append(rows[n_q:])
        return np.flatnonzero(~held), np.sort(np.concatenate(queries)), np.sort(np.concatenate(references))


def _class_sizes(rng: np.random.Generator, total: int, n_classes: int, minimum: int) -> np.ndarray:
    """``n_classes`` log-normal sizes (a long tail, a few tiny classes) summing to ``total``, each >= minimum."""
    raw = rng.lognormal(0.0, 0.6, n_classes)
    raw[rng.random(n_classes) < 0.04] = 0.0          # about 4% of the classes get only 2-5 images
    sizes = np.maximum(minimum, np.floor(raw / raw.sum() * total)).astype(np.int64)
    tiny = raw == 0.0
    sizes[tiny] = rng.integers(2, 6, tiny.sum())
    while sizes.sum() != total:                      # adjust the largest classes to hit the total exactly
        i = int(np.argmax(sizes)) if sizes.sum() > total else int(rng.integers(n_classes))
        sizes[i] += -1 if sizes.sum() > total else 1
    return sizes


def _modes(rng: np.random.Generator, n_classes: int, cfg: GeneratedConfig) -> list[np.ndarray]:
    """Per class an (m, latent) chain of modes: a random start, then steps of ``mode_step``."""
    out = []
    for _ in range(n_classes):
        m = int(rng.integers(cfg.modes[0], cfg.modes[1] + 1))
        start = rng.standard_normal(cfg.latent)
        steps = rng.standard_normal((m - 1, cfg.latent))
        steps *= cfg.mode_step * np.sqrt(cfg.latent) / np.linalg.norm(steps, axis=1, keepdims=True).clip(1e-9)
        out.append(np.vstack([start, start + np.cumsum(steps, axis=0)]) if m > 1 else start[None])
    return out


def _latent(rng: np.random.Generator, labels: np.ndarray, modes: list[np.ndarray], noise: float) -> np.ndarray:
    """(n, latent) image latents: a random mode of the image's class plus noise."""
    pick = np.array([rng.integers(len(modes[c])) for c in labels])
    centres = np.stack([modes[c][j] for c, j in zip(labels, pick)])
    return centres + noise * rng.standard_normal(centres.shape)


def generate(cfg: GeneratedConfig, folder: str | Path | None = None, chunk: int = 16_384) -> Generated:
    """Generate the descriptors (memory-mapped .npy files in ``folder``, in memory when None)."""
    rng = np.random.default_rng(cfg.seed)
    n_test = cfg.test_queries + cfg.test_references
    n_test_classes = max(1, int(round(n_test / cfg.images_per_class)))
    train_sizes = _class_sizes(rng, cfg.train_images, cfg.train_classes, 2)
    test_sizes = _class_sizes(rng, n_test, n_test_classes, 3)
    modes = _modes(rng, cfg.train_classes + n_test_classes, cfg)
    names = np.array([f"c{i:05d}" for i in range(cfg.train_classes + n_test_classes)])
    train_labels = np.repeat(np.arange(cfg.train_classes), train_sizes)
    test_labels = np.repeat(np.arange(cfg.train_classes, cfg.train_classes + n_test_classes), test_sizes)
    # test: each class gives about queries/(queries + references) of its images as queries, at least one
    is_query = np.zeros(n_test, bool)
    share = cfg.test_queries / n_test
    start = 0
    for size in test_sizes:
        n_q = min(max(1, int(round(share * size))), size - 1)
        is_query[start + rng.choice(size, n_q, replace=False)] = True
        start += size
    sets = {"train": train_labels, "query": test_labels[is_query], "reference": test_labels[~is_query]}
    latents = {s: _latent(rng, lab, modes, cfg.noise) / np.sqrt(cfg.latent) for s, lab in sets.items()}
    arrays: dict[str, list[np.ndarray]] = {s: [] for s in sets}
    for m in range(cfg.members):
        projection = rng.standard_normal((cfg.latent, cfg.dim)).astype(np.float32)
        direction = rng.standard_normal(cfg.dim).astype(np.float32)
        direction /= np.linalg.norm(direction)
        noise = cfg.member_noise[m % len(cfg.member_noise)]
        for s, z in latents.items():
            out = (np.lib.format.open_memmap(Path(folder) / f"m{m}_{s}.npy", mode="w+", dtype=np.float32,
                                             shape=(len(z), cfg.dim)) if folder is not None
                   else np.empty((len(z), cfg.dim), np.float32))
            for a in range(0, len(z), chunk):
                b = min(a + chunk, len(z))
                x = z[a:b].astype(np.float32) @ projection
                x += noise * rng.standard_normal(x.shape, dtype=np.float32)
                x += cfg.nuisance * np.sqrt(cfg.dim) * rng.standard_normal((b - a, 1), dtype=np.float32) * direction
                out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
            if folder is not None:
                out.flush()
            arrays[s].append(out)
    n_held = int(round(cfg.heldout * cfg.train_classes))
    heldout = sorted(names[rng.choice(cfg.train_classes, n_held, replace=False)].tolist())
    return Generated(arrays["train"], arrays["query"], arrays["reference"], names[train_labels],
                     names[sets["query"]], names[sets["reference"]], heldout,
                     [f"m{m}" for m in range(cfg.members)])
