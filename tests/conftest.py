"""Shared pytest fixtures. Fixtures of the backbones tests are prefixed ``backbones_``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _backbones_image(rng: np.random.Generator, cls: int, size: int) -> Image.Image:
    """A class-specific colour + stripe pattern with per-image noise and shift."""
    base = np.array([(cls * 67) % 256, (cls * 131 + 40) % 256, (cls * 29 + 90) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = 4 + cls % 5
    stripes = ((xx + yy * (cls % 3) + rng.integers(0, period)) // period) % 2
    img = base[None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_backbones_dataset(root: Path, n_classes: int = 8, per_class: int = 6, n_test_classes: int = 3,
                           size: int = 40, seed: int = 0) -> Path:
    """Write a tiny hackathon-layout dataset (train classes c00.., test query/reference + labels.csv)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / "train" / "train_data" / f"c{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            _backbones_image(rng, c, size).save(d / f"{i}.png")
    rows = ["split,name,class"]
    for split, n in (("query", 2), ("reference", 4)):
        d = root / "test" / "test_data" / split
        d.mkdir(parents=True)
        for c in range(n_test_classes):
            for i in range(n):
                name = f"{split[0]}{c}_{i}"
                _backbones_image(rng, 100 + c, size).save(d / f"{name}.png")
                rows.append(f"{split},{name},t{c}")
    (root / "test" / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def backbones_dataset(tmp_path: Path) -> Path:
    """A fresh tiny dataset (8 train classes x 6 images, 40 px; 3 test classes) under tmp_path/data."""
    return make_backbones_dataset(tmp_path / "data")


# ---- tuning (issue 6): tiny held-out sets for tests/test_tuning_*.py ----
import numpy as _tuning_np  # noqa: E402
import pytest as _tuning_pytest  # noqa: E402


def make_tuning_heldout(seed: int = 0, n_classes: int = 12, nq_per: int = 3, nr_per: int = 10, d: int = 32,
                        n_train_classes: int = 30, nt_per: int = 10):
    """A 2-member HeldoutSet of clustered random descriptors (36 queries, 120 references, d=32 each).

    Member "a" is informative but carries a strong shared nuisance direction (whitening
    helps), member "b" is noisier (weights matter); the train classes differ from the
    held-out ones.
    """
    from tuning.heldout import HeldoutSet

    rng = _tuning_np.random.default_rng(seed)
    nuisance = rng.normal(size=d)
    nuisance /= _tuning_np.linalg.norm(nuisance)

    def member(centres, labels, noise, nuisance_scale):
        x = centres[labels] + noise * rng.normal(size=(len(labels), d))
        x += nuisance_scale * rng.normal(size=(len(labels), 1)) * nuisance[None, :]
        return (x / _tuning_np.linalg.norm(x, axis=1, keepdims=True)).astype(_tuning_np.float32)

    total = n_classes + n_train_classes
    ql = _tuning_np.repeat(_tuning_np.arange(n_classes), nq_per)
    rl = _tuning_np.repeat(_tuning_np.arange(n_classes), nr_per)
    tl = _tuning_np.repeat(_tuning_np.arange(n_classes, total), nt_per)
    members = []
    for noise, scale in ((1.3, 6.0), (2.2, 0.0)):
        centres = rng.normal(size=(total, d))
        members.append([member(centres, lab, noise, scale) for lab in (ql, rl, tl)])
    names = _tuning_np.array([f"c{i:02d}" for i in range(total)])
    return HeldoutSet(["a", "b"], [m[0] for m in members], [m[1] for m in members], [m[2] for m in members],
                      names[ql], names[rl])


def save_tuning_heldout(heldout, path) -> None:
    """Write a HeldoutSet to .npz (for worker subprocesses); ``load_tuning_heldout`` reads it."""
    arrays = {"member_names": _tuning_np.array(heldout.member_names), "query_labels": heldout.query_labels,
              "reference_labels": heldout.reference_labels}
    for i in range(len(heldout.member_names)):
        arrays.update({f"query{i}": heldout.query[i], f"reference{i}": heldout.reference[i],
                       f"train{i}": heldout.train[i]})
    _tuning_np.savez(path, **arrays)


def load_tuning_heldout(path):
    from tuning.heldout import HeldoutSet

    z = _tuning_np.load(path)
    n = len(z["member_names"])
    return HeldoutSet([str(s) for s in z["member_names"]], [z[f"query{i}"] for i in range(n)],
                      [z[f"reference{i}"] for i in range(n)], [z[f"train{i}"] for i in range(n)],
                      z["query_labels"], z["reference_labels"])


@_tuning_pytest.fixture
def tuning_heldout():
    """Tiny 2-member HeldoutSet for the tuning tests (see ``make_tuning_heldout``)."""
    return make_tuning_heldout()


# ---- ensemble (issue 5): tiny dataset, fake run dirs and a counting fake extractor ----
import json as _ens_json  # noqa: E402
from types import SimpleNamespace as _EnsNS  # noqa: E402


def _ens_image(cls: int, i: int, size: int = 12) -> Image.Image:
    """A small image whose mean colour depends on the class, with per-image noise."""
    rng = np.random.default_rng(1000 * cls + i)
    base = np.array([(cls * 53) % 256, (cls * 97 + 30) % 256, (cls * 31 + 70) % 256], dtype=np.float32)
    img = base[None, None, :] + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


class EnsFakeExtractor:
    """Stands in for ``backbones.extract.extract_descriptors``: the "model" is the (48, d) matrix
    ``w`` in RUN/model.safetensors applied to a 4x4 RGB thumbnail. Counts calls and images."""

    def __init__(self) -> None:
        self.calls = 0
        self.images: list[str] = []

    def __call__(self, run_dir, paths, **kw):
        from safetensors.numpy import load_file

        from backbones.data import try_load_image

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


def make_ens_dataset(root: Path, n_classes: int = 6, per_class: int = 4) -> Path:
    """Write train/train_data/k<c>/<i>.png (n_classes x per_class 12-px images)."""
    for c in range(n_classes):
        d = root / "train" / "train_data" / f"k{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _ens_image(c, i).save(d / f"{i}.png")
    return root


def make_ens_run(run_dir: Path, dim: int = 8, seed: int = 0, split_hash=None, classes=None) -> Path:
    """Write a fake backbone run dir: config.json + model.safetensors holding w (48, dim)."""
    from safetensors.numpy import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    w = np.random.default_rng(seed).normal(size=(48, dim)).astype(np.float32)
    save_file({"w": w}, str(run_dir / "model.safetensors"))
    config = {"arch": "fake", "image_size": 12, "embedding_dim": dim, "split_hash": split_hash,
              "classes": None if classes is None else list(classes), "model": {"embedding_dim": dim}}
    (run_dir / "config.json").write_text(_ens_json.dumps(config))
    return run_dir


@pytest.fixture
def ens_env(tmp_path: Path):
    """Ensemble test kit: ``data`` (6 classes x 4 images), ``split`` (2 held-out classes),
    ``extractor`` (counting fake), ``make_run(name, dim, seed, split_hash=..., classes=...)``."""
    from backbones.data import scan_train
    from tuning.split import make_split

    data = make_ens_dataset(tmp_path / "data")
    split = make_split(scan_train(data), heldout=2, query_fraction=0.5, seed=0)
    extractor = EnsFakeExtractor()

    def make_run(name: str, dim: int = 8, seed: int = 0, **kw) -> Path:
        kw.setdefault("split_hash", split.hash)
        kw.setdefault("classes", split.train_classes)
        return make_ens_run(tmp_path / "runs" / name, dim, seed, **kw)

    return _EnsNS(root=tmp_path, data=data, split=split, extractor=extractor, make_run=make_run)
