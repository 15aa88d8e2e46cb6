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
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from competition.cli import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TRAIN_DIR = Path("train") / "train_data"
QUERY_DIR = Path("test") / "test_data" / "query"
REFERENCE_DIR = Path("test") / "test_data" / "reference"
LABELS_FILE = Path("test") / "labels.csv"
LABEL_COLUMNS = ("split", "name", "class")
# The longest side the training and extraction datasets decode (load_image's max_side): far above
# what a network sees (a few hundred pixels, x4 at most with multi-scale extraction), far below a
# 12000-pixel photo's ~430 MB of RGB.
DATASET_MAX_SIDE = 2048

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


def load_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Read an image as RGB with its EXIF orientation applied.

    ``max_side``: None returns the full size; otherwise the image's longer side is
    at most ``max_side`` (aspect ratio kept). A large JPEG is then decoded at a
    reduced scale (1/2, 1/4 or 1/8, PIL's draft mode: memory and time fall with
    it) and resized for the rest; other formats are decoded whole, then resized.
    Raises ``UnreadableImage`` (naming the file) for empty, truncated or
    undecodable files, and for images above PIL's decompression-bomb limit.
    """
    path = os.fspath(path)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer or None, got {max_side}")
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as img:
            if max_side is not None and max(img.size) > max_side:
                scale = max_side / max(img.size)  # the decoder keeps both sides >= the request
                img.draft("RGB", (max(1, int(img.width * scale)), max(1, int(img.height * scale))))
            img.load()
            img = _to_rgb(ImageOps.exif_transpose(img))
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(path, f"too many pixels to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from exc
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


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
    """What a folder scan ignored: empty class folders, non-image files and stray subfolders."""

    empty_classes: list[str] = field(default_factory=list)
    non_images: list[str] = field(default_factory=list)
    subfolders: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = [(self.empty_classes, "empty class folders"), (self.non_images, "non-image files"),
                  (self.subfolders, "subfolders")]
        parts = [f"{len(found)} {what}" for found, what in counts if found] or ["nothing"]
        return (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + f"{parts[-1]} ignored"

    def warn_if_any(self, where: str) -> None:
        """One warning naming a few ignored entries, attributed to the caller's line in this module:
        the same message from the same line (a folder scanned twice) shows once."""
        ignored = self.empty_classes + self.non_images + self.subfolders
        if ignored:
            warnings.warn(f"{where}: {self.summary()} (e.g. {', '.join(ignored[:3])})", stacklevel=2)


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
    class_dirs, stray = _sort_entries(train_dir)
    report.non_images += [str(f) for f in stray]  # files beside the class folders
    for class_dir in class_dirs:
        nested, files = _sort_entries(class_dir)
        images = [f for f in files if _is_image_entry(f)]
        report.non_images += [str(f) for f in files if not _is_image_entry(f)]
        report.subfolders += [str(d) for d in nested]
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


def _sort_entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """Return (subfolders, other entries) of ``folder``, each sorted by name."""
    entries = sorted(folder.iterdir())
    return [e for e in entries if e.is_dir()], [e for e in entries if not e.is_dir()]


def _is_image_entry(path: Path) -> bool:
    """A file (not a broken link, not a folder) with an image extension."""
    return is_image_file(path) and path.is_file()


def _scan_flat(folder: Path, report: ScanReport | None = None, require_images: bool = False) -> list[Path]:
    """The images of a flat folder, sorted. Ignored entries get one warning naming the folder (the
    same folder scanned twice warns once) and are added to ``report``.

    Raises ``DataError`` when the folder is missing, when two images share a name (``abc.jpg``
    and ``abc.png``), or, with ``require_images``, when it holds no image."""
    _require_dir(folder, folder.name)
    subfolders, files = _sort_entries(folder)
    images = [f for f in files if _is_image_entry(f)]
    found = ScanReport(non_images=[str(f) for f in files if not _is_image_entry(f)],
                       subfolders=[str(d) for d in subfolders])
    found.warn_if_any(str(folder))
    if report is not None:
        report.non_images += found.non_images
        report.subfolders += found.subfolders
    if require_images and not images:
        ignored = [p.name for p in files + subfolders]
        instead = f" (only {len(ignored)} other entries, e.g. {ignored[:3]})" if ignored else ""
        raise DataError(f"{folder}: no images{instead}; expected {', '.join(sorted(IMAGE_EXTENSIONS))} files")
    seen: dict[str, Path] = {}
    for f in images:
        name = image_name(f)
        if name in seen:
            raise DataError(f"{folder}: two images share the name {name!r} ({seen[name].name}, {f.name}); "
                            "names drop the extension, so rename one")
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
    """Index ``root/test/test_data/{query,reference}``; ignored entries get one warning per folder.

    Raises ``DataError`` when either folder is missing or holds no image (a submission of
    zero queries, or with zero references, is never wanted), or two of its images share a name.
    """
    root = Path(root)
    report = ScanReport()
    queries = _scan_flat(root / QUERY_DIR, report, require_images=True)
    references = _scan_flat(root / REFERENCE_DIR, report, require_images=True)
    return TestIndex(root, queries, references, report)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Return the image files of a flat folder, sorted (what NSML's infer receives); possibly none.

    Non-image files and subfolders are skipped with one warning naming a few. Raises
    ``DataError`` when the folder is missing or two images share a name.
    """
    return _scan_flat(Path(folder))


def read_labels(root_or_file: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read ``test/labels.csv`` -> ``{"query": {name: class}, "reference": {name: class}}``.

    The header names the columns (split, name and class, in any order; more are
    allowed) and every row has as many fields as the header; blank lines are
    skipped. Raises ``DataError`` naming the file and line for a malformed file
    (wrong field count, unknown split, empty name or class, a name listed twice,
    not UTF-8 text), and ``FileNotFoundError`` when there is no labels file.
    """
    path = Path(root_or_file)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground-truth labels file")
    out: dict[str, dict[str, str]] = {"query": {}, "reference": {}}
    expected = ",".join(LABEL_COLUMNS)
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's BOM is not a column
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file; expected the header {expected}")
            missing = [c for c in LABEL_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing}; expected the header {expected}")
            split_col, name_col, class_col = (header.index(c) for c in LABEL_COLUMNS)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} fields, the header has {len(header)} ({','.join(header)})")
                split, name, cls = row[split_col], row[name_col], row[class_col]
                if split not in out:
                    raise DataError(f"{where}: split must be 'query' or 'reference', got {split!r}")
                if not name or not cls:
                    raise DataError(f"{where}: empty name or class")
                if name in out[split]:
                    raise DataError(f"{where}: {split} {name!r} listed twice")
                out[split][name] = cls
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return out


def labels_for(names: list[str], labels: dict[str, str], where: str) -> list[str]:
    """Look up each name's class; a name without a label is an error naming it."""
    missing = [n for n in names if n not in labels]
    if missing:
        raise DataError(f"{where}: {len(missing)} images have no label, e.g. {missing[:3]}")
    return [labels[n] for n in names]
