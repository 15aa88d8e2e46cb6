"""The data layer every stage uses: the hackathon folder layout, robust image
loading, and the ground-truth labels of a local test set.

Layout (NSML "AI Vision"):

    ROOT/train/train_data/<class>/<image>
    ROOT/test/test_data/query/<image>
    ROOT/test/test_data/reference/<image>
    ROOT/test/labels.csv                    split,name,class   (optional)

An image's *name* is its file name without the last extension (names may contain
dots). A train image's *id* is ``<class>/<file name>``: names repeat across classes.
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from competition.cli import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TRAIN_DIR = Path("train") / "train_data"
QUERY_DIR = Path("test") / "test_data" / "query"
REFERENCE_DIR = Path("test") / "test_data" / "reference"
LABELS_FILE = Path("test") / "labels.csv"

# A truncated JPEG must be an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(UserError, ValueError):
    """The dataset folder (or one of its files) is not what the layout promises."""


class UnreadableImage(OSError):
    """An image file that cannot be decoded; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def image_name(path: str | os.PathLike) -> str:
    """Return the image's name: its file name without the last extension."""
    base = os.path.basename(os.fspath(path))
    stem, _ext = os.path.splitext(base)
    return stem


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file's extension is one we read."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, CMYK, RGBA, LA, I;16, I, F, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image as RGB with its EXIF orientation applied.

    Raises ``UnreadableImage`` (naming the file) for empty, truncated or
    undecodable files.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from exc


@dataclass
class LoadReport:
    """Counts what was skipped while reading a set of images; warns once per file."""

    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    loaded: int = 0

    def record_failure(self, exc: UnreadableImage) -> None:
        if exc.path not in self.skipped:
            self.skipped[exc.path] = exc.reason
            warnings.warn(f"skipping unreadable image {exc.path} ({exc.reason})", stacklevel=3)

    def summary(self) -> str:
        return f"{self.loaded} images loaded, {len(self.skipped)} unreadable skipped"


def try_load_image(path: str | os.PathLike, report: LoadReport | None = None) -> Image.Image | None:
    """Return the RGB image, or None (recorded in ``report``) when it cannot be read."""
    try:
        img = load_image(path)
    except UnreadableImage as exc:
        if report is not None:
            report.record_failure(exc)
        else:
            warnings.warn(f"skipping unreadable image {exc.path} ({exc.reason})", stacklevel=2)
        return None
    if report is not None:
        report.loaded += 1
    return img


@dataclass
class ScanReport:
    """What a folder scan ignored: empty class folders and non-image files."""

    empty_classes: list[str] = field(default_factory=list)
    non_images: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.empty_classes)} empty class folders and {len(self.non_images)} non-image files ignored"

    def warn_if_any(self, where: str) -> None:
        if self.empty_classes or self.non_images:
            examples = (self.empty_classes + self.non_images)[:3]
            warnings.warn(f"{where}: {self.summary()} (e.g. {', '.join(examples)})", stacklevel=3)


@dataclass
class TrainIndex:
    """The train images of a dataset: parallel lists, sorted by class then file."""

    root: Path
    paths: list[Path]
    ids: list[str]          # "<class>/<file name>"
    labels: list[str]       # class of each image
    classes: list[str]      # sorted class names with at least one image
    report: ScanReport

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep_classes: set[str] | list[str]) -> "TrainIndex":
        """Return the images whose class is in ``keep_classes``."""
        keep = set(keep_classes)
        idx = [i for i, c in enumerate(self.labels) if c in keep]
        return TrainIndex(
            root=self.root,
            paths=[self.paths[i] for i in idx],
            ids=[self.ids[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            classes=sorted(keep & set(self.classes)),
            report=self.report,
        )


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found (expected the NSML layout "
                        "train/train_data/<class>/<image>, test/test_data/{query,reference}/<image>)")


def scan_train(root: str | os.PathLike) -> TrainIndex:
    """Index ``root/train/train_data``; empty class folders and non-images are reported."""
    root = Path(root)
    train_dir = root / TRAIN_DIR
    _require_dir(train_dir, "train")
    report = ScanReport()
    paths, ids, labels, classes = [], [], [], []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.is_file())
        images = [f for f in files if is_image_file(f)]
        report.non_images += [str(f) for f in files if not is_image_file(f)]
        if not images:
            report.empty_classes.append(str(class_dir))
            continue
        classes.append(class_dir.name)
        for f in images:
            paths.append(f)
            ids.append(f"{class_dir.name}/{f.name}")
            labels.append(class_dir.name)
    if not paths:
        raise DataError(f"{train_dir}: no train images found")
    report.warn_if_any(str(train_dir))
    return TrainIndex(root, paths, ids, labels, classes, report)


def _scan_flat(folder: Path, report: ScanReport) -> list[Path]:
    _require_dir(folder, folder.name)
    files = sorted(f for f in folder.iterdir() if f.is_file())
    report.non_images += [str(f) for f in files if not is_image_file(f)]
    images = [f for f in files if is_image_file(f)]
    seen: dict[str, Path] = {}
    for f in images:
        name = image_name(f)
        if name in seen:
            raise DataError(f"{folder}: two images share the name {name!r} ({seen[name].name}, {f.name})")
        seen[name] = f
    return images


@dataclass
class TestIndex:
    """The query and reference images of a dataset, sorted by file name."""

    root: Path
    query_paths: list[Path]
    reference_paths: list[Path]
    report: ScanReport

    @property
    def query_names(self) -> list[str]:
        return [image_name(p) for p in self.query_paths]

    @property
    def reference_names(self) -> list[str]:
        return [image_name(p) for p in self.reference_paths]


def scan_test(root: str | os.PathLike) -> TestIndex:
    """Index ``root/test/test_data/{query,reference}``."""
    root = Path(root)
    report = ScanReport()
    queries = _scan_flat(root / QUERY_DIR, report)
    references = _scan_flat(root / REFERENCE_DIR, report)
    report.warn_if_any(str(root / "test" / "test_data"))
    return TestIndex(root, queries, references, report)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Return the image files of a flat folder, sorted (what NSML's infer receives)."""
    return _scan_flat(Path(folder), ScanReport())


def read_labels(root_or_file: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read ``test/labels.csv`` -> ``{"query": {name: class}, "reference": {name: class}}``.

    Raises ``DataError`` naming the file and line for a malformed file, and
    ``FileNotFoundError`` when there is no labels file.
    """
    path = Path(root_or_file)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground-truth labels file")
    out: dict[str, dict[str, str]] = {"query": {}, "reference": {}}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"split", "name", "class"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; expected split,name,class")
        for line_no, row in enumerate(reader, start=2):
            split, name, cls = row["split"], row["name"], row["class"]
            if split not in out:
                raise DataError(f"{path}:{line_no}: split must be 'query' or 'reference', got {split!r}")
            if not name or cls is None or cls == "":
                raise DataError(f"{path}:{line_no}: empty name or class")
            if name in out[split]:
                raise DataError(f"{path}:{line_no}: {split} {name!r} listed twice")
            out[split][name] = cls
    return out


def labels_for(names: list[str], labels: dict[str, str], where: str) -> list[str]:
    """Look up each name's class; a name without a label is an error naming it."""
    missing = [n for n in names if n not in labels]
    if missing:
        raise DataError(f"{where}: {len(missing)} images have no label, e.g. {missing[:3]}")
    return [labels[n] for n in names]
