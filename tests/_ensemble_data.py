"""The ensemble tests' kit: fake run folders whose "model" is a matrix, and a counting fake extractor."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _image_data import make_dataset

from competition.data import scan_train, try_load_image
from competition.split import make_split


class FakeExtractor:
    """Stands in for ``backbones.extract.extract_descriptors``: the "model" is the (48, d) matrix
    ``w`` in RUN/model.safetensors applied to a 4x4 RGB thumbnail. Counts calls and images."""

    def __init__(self) -> None:
        self.calls = 0
        self.images: list[str] = []

    def __call__(self, run_dir, paths, **kw):
        from safetensors.numpy import load_file

        w = load_file(str(Path(run_dir) / "model.safetensors"))["w"]
        self.calls += 1
        self.images += [str(p) for p in paths]
        rows, ok = [], np.zeros(len(paths), dtype=bool)
        for i, p in enumerate(paths):
            img = try_load_image(p)
            if img is None:
                continue
            x = np.asarray(img.resize((4, 4)), dtype=np.float32).reshape(-1) / 255.0 - 0.5
            if kw.get("flip"):
                x = x + 0.01
            rows.append(x @ w)
            ok[i] = True
        desc = np.asarray(rows, dtype=np.float32).reshape(-1, w.shape[1])
        return desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12), ok


def make_fake_run(run_dir: Path, dim: int = 8, seed: int = 0, split_hash=None, classes=None) -> Path:
    """Write a fake backbone run dir: config.json + model.safetensors holding w (48, dim)."""
    from safetensors.numpy import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    w = np.random.default_rng(seed).normal(size=(48, dim)).astype(np.float32)
    save_file({"w": w}, str(run_dir / "model.safetensors"))
    config = {"arch": "fake", "image_size": 12, "embedding_dim": dim, "split_hash": split_hash,
              "classes": None if classes is None else list(classes), "model": {"embedding_dim": dim}}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def make_env(root: Path) -> SimpleNamespace:
    """``data`` (6 train classes x 4 images, 24 px), ``split`` (2 held-out classes), ``extractor``
    (counting fake), ``make_run(name, dim, seed, split_hash=..., classes=...)``, ``root``."""
    data = make_dataset(root / "data", train_classes=6, images_per_class=4, test_classes=1,
                        queries_per_class=1, references_per_class=1, size=24)
    split = make_split(scan_train(data), heldout=2, query_fraction=0.5, seed=0)
    extractor = FakeExtractor()

    def make_run(name: str, dim: int = 8, seed: int = 0, **kw) -> Path:
        kw.setdefault("split_hash", split.hash)
        kw.setdefault("classes", split.train_classes)
        return make_fake_run(root / "runs" / name, dim, seed, **kw)

    return SimpleNamespace(root=root, data=data, split=split, extractor=extractor, make_run=make_run)
