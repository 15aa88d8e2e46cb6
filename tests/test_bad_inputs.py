"""A bad-input corpus through the whole pipeline: ``python -m backbones.train``, ``python -m ensemble.build``
and ``main.py --mode test --pause 1``. Every file is generated here (no binary file is committed).

One tiny dataset holds every "skip and count" case at once, in train class folders and in the query
and reference folders: each command must finish without a traceback, name every file it could not
read and count them, and main.py must write a submission that an independent checker (below) accepts.
The refusals (two images sharing a name, a folder with nothing readable as an image) get their own tiny
cases: one line ``error: ...`` naming the file, status 2, no traceback.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _image_data import make_dataset
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The extensions the competition contract reads as images (kept apart from competition.data on purpose:
# the checker below must not share the code it checks).
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ARCH, SIZE = "mobilenetv3_small_050", 32


# -- the corpus ------------------------------------------------------------------------------------

def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _encoded(fmt: str, convert: Callable[[Image.Image], Image.Image] = lambda im: im, **kw):
    def make(src: Image.Image) -> bytes:
        buf = io.BytesIO()
        convert(src).save(buf, format=fmt, **kw)
        return buf.getvalue()
    return make


def _png16(src: Image.Image) -> bytes:
    grey = np.asarray(src.convert("L"), dtype=np.uint16) * 257   # the full 16-bit range
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")                  # mode I;16
    return buf.getvalue()


def _palette_transparent(src: Image.Image) -> bytes:
    pal = src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def _rgba(src: Image.Image) -> bytes:
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(src.size))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    return buf.getvalue()


def _exif_rotated(src: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90 degrees clockwise to display
    return _jpeg(src.resize((src.width, src.height * 2 // 3)), exif=exif)


def _animated_gif(src: Image.Image) -> bytes:
    tints = [(255, 255, 255), (255, 0, 0), (0, 0, 255)]   # frames that differ (PIL merges equal ones)
    frames = [Image.blend(src, Image.new("RGB", src.size, tint), 0.3) for tint in tints]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(_src: Image.Image) -> bytes:
    """A valid PNG header declaring 40000 x 40000 RGB (far above PIL's decompression-bomb limit), and a
    few bytes of pixel data: opening it must be refused without decoding."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _apple_double(_src: Image.Image) -> bytes:
    """What macOS leaves beside ``x.jpg`` on a foreign file system as ``._x.jpg``."""
    return struct.pack(">II", 0x00051607, 0x00020000) + b"Mac OS X        " + b"\0" * 60


@dataclass(frozen=True)
class Case:
    what: str
    file: str
    make: Callable[[Image.Image], bytes]
    readable: bool


UNREADABLE = [
    Case("zero bytes", "empty.jpg", lambda src: b"", False),
    Case("truncated JPEG (cut inside the scan)", "truncated.jpg", lambda src: _jpeg(src)[:len(_jpeg(src)) * 3 // 5],
         False),
    Case("random bytes named .jpg", "noise.jpg", lambda src: np.random.default_rng(0).bytes(3000), False),
    Case("text named .png", "notes.png", lambda src: b"not a picture, just some words\n" * 20, False),
    Case("above the decompression-bomb limit", "bomb.png", _bomb_png, False),
    Case("macOS AppleDouble file", "._shot.jpg", _apple_double, False),
]
READABLE = [
    Case("16-bit PNG", "deep16.png", _png16, True),
    Case("CMYK JPEG", "cmyk.jpg", _encoded("JPEG", lambda im: im.convert("CMYK")), True),
    Case("palette PNG with transparency", "palette.png", _palette_transparent, True),
    Case("RGBA PNG", "alpha.png", _rgba, True),
    Case("greyscale JPEG", "grey.jpg", _encoded("JPEG", lambda im: im.convert("L")), True),
    Case("greyscale PNG with alpha", "grey-alpha.png", _encoded("PNG", lambda im: im.convert("LA")), True),
    Case("1-bit TIFF", "bilevel.tif", _encoded("TIFF", lambda im: im.convert("1")), True),
    Case("32-bit float TIFF", "float.tif", _encoded("TIFF", lambda im: im.convert("F")), True),
    Case("PNG content named .jpg", "really-png.jpg", _encoded("PNG"), True),
    Case("EXIF-rotated JPEG", "rotated.jpg", _exif_rotated, True),
    Case("1x1 image", "dot.png", _encoded("PNG", lambda im: im.resize((1, 1))), True),
    Case("animated GIF", "anim.gif", _animated_gif, True),
    Case("WebP", "photo.webp", _encoded("WEBP"), True),
    Case("BMP", "bitmap.bmp", _encoded("BMP"), True),
    Case("TIFF", "scan.tiff", _encoded("TIFF"), True),
    Case("upper-case extension", "LOUD.JPG", _jpeg, True),
    Case("unicode name", "café ü 商品.jpg", _jpeg, True),
    Case("spaces, commas and quotes", "my photo, \"best\" 'one'.jpg", _jpeg, True),
    Case("emoji name", "🛒 cart 🙂.png", _encoded("PNG"), True),
    Case("Korean name", "상품 사진.jpg", _jpeg, True),
    Case("name not UTF-8 (EUC-KR bytes)", os.fsdecode(b"\xbb\xf3\xc7\xb0.jpg"), _jpeg, True),
    Case("dots in the name", "v1.2.final.jpeg", _jpeg, True),
]
CASES = UNREADABLE + READABLE


def _add_ignored(folder: Path, src: Image.Image) -> list[Path]:
    """A ``.DS_Store`` and a subfolder holding an image: both ignored and named."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 40)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.jpg").write_bytes(_jpeg(src))
    return [folder / ".DS_Store", folder / "sub"]


def _write_labels(data: Path, extra: dict[str, dict[str, str]]) -> None:
    path = data / "test" / "labels.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows += [[split, name, cls] for split, names in extra.items() for name, cls in names.items()]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def _class_of(data: Path) -> dict[tuple[str, str], str]:
    with open(data / "test" / "labels.csv", newline="", encoding="utf-8") as fh:
        return {(r["split"], r["name"]): r["class"] for r in csv.DictReader(fh)}


def build_corpus(data: Path) -> dict:
    """Add every case to a generated dataset: each in some train class folder (made from an image of that
    class; two class folders get odd names), and in the query and reference folders (made from a test
    image, labelled with its class; a name that is not UTF-8 cannot be labelled and stays unlabelled).
    Returns {"unreadable": {part: [paths]}, "ignored": {part: [paths]}}."""
    train_root = data / "train" / "train_data"
    class_dirs = sorted(d for d in train_root.iterdir() if d.is_dir())
    odd_names = [f"{class_dirs[3].name} été, \"x\" 'y'",
                 os.fsdecode(class_dirs[4].name.encode() + b" \xbb\xf3\xc7\xb0")]
    for i, name in enumerate(odd_names, start=3):
        class_dirs[i] = class_dirs[i].rename(train_root / name)
    class_sources = [load_rgb(min(d.glob("*.jpg"))) for d in class_dirs]
    unreadable: dict[str, list[Path]] = {"train": [], "query": [], "reference": []}
    for i, case in enumerate(CASES):
        path = class_dirs[i % len(class_dirs)] / case.file
        path.write_bytes(case.make(class_sources[i % len(class_dirs)]))
        if not case.readable:
            unreadable["train"].append(path)
    # a name collision in a train class folder is no collision: train ids keep the extension
    (class_dirs[0] / "abc.jpg").write_bytes(_jpeg(class_sources[0]))
    (class_dirs[0] / "abc.png").write_bytes(_encoded("PNG")(class_sources[0]))
    (train_root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 40)
    ignored = {"train": [train_root / ".DS_Store", *_add_ignored(class_dirs[1], class_sources[1])]}
    labels = _class_of(data)
    extra: dict[str, dict[str, str]] = {"query": {}, "reference": {}}
    for part in ("query", "reference"):
        folder = data / "test" / "test_data" / part
        sources = sorted(folder.glob("*.jpg"))
        for i, case in enumerate(CASES):
            source = sources[i % len(sources)]
            path = folder / case.file
            path.write_bytes(case.make(load_rgb(source)))
            name = os.path.splitext(case.file)[0]
            if name.isprintable():   # (a lone surrogate: a name that is not UTF-8)
                extra[part][name] = labels[(part, source.stem)]
            if not case.readable:
                unreadable[part].append(path)
        ignored[part] = _add_ignored(folder, load_rgb(sources[0]))
    _write_labels(data, extra)
    return {"unreadable": unreadable, "ignored": ignored}


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


# -- running the commands ----------------------------------------------------------------------------

def run(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KIT_DEBUG", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(REPO), KIT_CHECKPOINTS=str(cwd / "checkpoints"), KIT_SESSION="bad-inputs",
               OMP_NUM_THREADS="1", **(env_extra or {}))   # one thread: tiny nets, and a busy machine is no slower
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          encoding="utf-8", timeout=600)


def train_args(data: Path, run_dir: Path) -> list[str]:
    return ["-m", "backbones.train", "--data", str(data), "--out", str(run_dir), "--arch", ARCH,
            "--img-size", str(SIZE), "--epochs", "1", "--embedding-dim", "16", "--classes-per-batch", "4",
            "--images-per-class", "2", "--workers", "0", "--device", "cpu", "--heldout-fraction", "0.34"]


def submit_args(data: Path, checkpoint: Path, out: Path) -> list[str]:
    return [str(REPO / "main.py"), "--mode", "test", "--pause", "1", "--data", str(data), "--checkpoint",
            str(checkpoint), "--out", str(out), "--device", "cpu", "--workers", "0", "--picture", "100"]


def ok_run(proc: subprocess.CompletedProcess, what: str) -> str:
    """stdout + stderr of a command that must have succeeded without a traceback."""
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (what, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The corpus dataset run once through train, build and main.py --mode test."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = make_dataset(root / "data", train_classes=6, images_per_class=5, test_classes=2,
                        queries_per_class=2, references_per_class=3)
    corpus = build_corpus(data)
    out = {"root": root, "data": data, **corpus}
    out["train"] = ok_run(run(train_args(data, root / "run"), root), "train")
    build = ["-m", "ensemble.build", "--members", str(root / "run"), "--data", str(data), "--device", "cpu",
             "--workers", "0", "--no-progress", "--cache-dir", str(root / "cache")]
    out["build"] = ok_run(run(build + ["--out", str(root / "bundle")], root), "build")
    # again, from the descriptor cache (which remembers the unreadable files instead of reading them)
    out["rebuild"] = ok_run(run(build + ["--out", str(root / "bundle-again")], root), "build again")
    out["submit"] = ok_run(run(submit_args(data, root / "bundle", root / "submission"), root), "main.py")
    return out


# -- the independent checker -------------------------------------------------------------------------

def images_in(folder: Path) -> list[str]:
    """Names (file name without the last extension) of the image files directly in ``folder``."""
    return [os.path.splitext(e.name)[0] for e in os.scandir(folder)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS]


def check_submission(path: Path, data: Path, k: int = 1000) -> dict[str, list[str]]:
    """Every query exactly once, each list min(k, n_references) distinct real reference names."""
    def no_duplicate_keys(pairs):
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"a query listed twice in {path}"
        return dict(pairs)

    submission = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicate_keys)
    queries = images_in(data / "test" / "test_data" / "query")
    references = set(images_in(data / "test" / "test_data" / "reference"))
    assert sorted(submission) == sorted(queries)
    for query, ranked in submission.items():
        assert all(isinstance(r, str) for r in ranked), query
        assert len(ranked) == min(k, len(references)), (query, len(ranked), len(references))
        assert len(set(ranked)) == len(ranked), (query, "duplicate reference")
        assert set(ranked) <= references, (query, set(ranked) - references)
    return submission


def shown(path: Path) -> str:
    """How a command's output shows ``path``: bytes that are not UTF-8 as ``\\udcXX`` (stderr's backslashreplace)."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _count(pattern: str, text: str) -> int | None:
    found = re.search(pattern, text)
    return None if found is None else int(found.group(1))


# -- the skip-and-count cases ------------------------------------------------------------------------

def test_the_corpus_holds_every_case_and_decodes_as_intended(tmp_path):
    """The generated files are what their case says (so the pipeline tests test something)."""
    src = Image.new("RGB", (24, 24), (200, 40, 45))
    modes = {}
    for case in READABLE:
        path = tmp_path / case.file
        path.write_bytes(case.make(src))
        with Image.open(path) as img:
            modes[case.what] = (img.mode, img.size, getattr(img, "n_frames", 1), img.getexif().get(0x0112))
    assert modes["16-bit PNG"][0].startswith("I") and modes["CMYK JPEG"][0] == "CMYK"
    assert modes["palette PNG with transparency"][0] == "P" and modes["RGBA PNG"][0] == "RGBA"
    assert modes["greyscale JPEG"][0] == "L" and modes["1x1 image"][1] == (1, 1)
    assert (modes["1-bit TIFF"][0], modes["32-bit float TIFF"][0],
            modes["greyscale PNG with alpha"][0]) == ("1", "F", "LA")
    assert modes["animated GIF"][2] == 3 and modes["EXIF-rotated JPEG"][3] == 6
    for case in UNREADABLE:
        path = tmp_path / case.file
        path.write_bytes(case.make(src))
        with pytest.raises((OSError, SyntaxError, Image.DecompressionBombError)), Image.open(path) as img:
            img.load()


def test_train_names_and_counts_the_files_it_skips(pipeline):
    text, bad = pipeline["train"], pipeline["unreadable"]["train"]
    split = json.loads((pipeline["root"] / "run" / "split.json").read_text())
    heldout = set(split["heldout_classes"])
    for path in bad:
        if path.parent.name in heldout:   # read by every validation
            assert shown(path) in text, path
    skipped = _count(r"(\d+) unreadable training images skipped", text) or 0
    named = [p for p in bad if p.parent.name not in heldout and shown(p) in text]
    assert skipped == len(named), (skipped, named, text[-3000:])
    for path in pipeline["ignored"]["train"]:
        assert shown(path) in text, path


@pytest.mark.parametrize("run_name", ["build", "rebuild"])
def test_build_names_and_counts_every_unreadable_train_image(pipeline, run_name):
    text, bad = pipeline[run_name], pipeline["unreadable"]["train"]
    for path in bad:   # the build describes every train-folder image (train classes and held-out ones)
        assert shown(path) in text, path
    assert _count(r"descriptors, (\d+) unreadable", text) == len(bad), text[-2000:]
    n_images = sum(1 for p in (pipeline["data"] / "train" / "train_data").glob("*/*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    described = re.search(r"(\d+) train / (\d+) query / (\d+) reference descriptors", text)
    assert sum(int(n) for n in described.groups()) == n_images - len(bad), text[-2000:]


def test_submission_is_valid_and_names_every_bad_test_file(pipeline):
    text, data = pipeline["submit"], pipeline["data"]
    submission = check_submission(pipeline["root"] / "submission" / "submission.json", data)
    assert "local leaderboard: mAP@1000" in text
    scores = json.loads((pipeline["root"] / "submission" / "scores.json").read_text())
    assert scores["n_query"] == len(submission) - 1   # every query but the one named in bytes that are not UTF-8
    for part in ("query", "reference"):
        for path in pipeline["unreadable"][part] + pipeline["ignored"][part]:
            assert shown(path) in text, (part, path)
    n_bad_refs, n_bad_queries = (len(pipeline["unreadable"][p]) for p in ("reference", "query"))
    assert _count(r"(\d+) unreadable references excluded", text) == n_bad_refs
    assert _count(r"(\d+) unreadable queries answered", text) == n_bad_queries
    bad_refs = {p.stem for p in pipeline["unreadable"]["reference"]}
    for ranked in submission.values():   # readable references first, the unreadable ones only to fill the list
        assert set(ranked[-len(bad_refs):]) == bad_refs


# -- the refusals ------------------------------------------------------------------------------------

def _one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def small_copy(pipeline):
    """make(name): a fresh tiny dataset for one refusal (submitted with the corpus run's bundle)."""
    def make(name: str) -> Path:
        data = pipeline["root"] / name
        make_dataset(data, train_classes=2, images_per_class=2, test_classes=2, queries_per_class=1,
                     references_per_class=2, seed=5)
        return data
    return make


@pytest.mark.parametrize("part", ["query", "reference"])
def test_two_images_sharing_a_name_are_refused_in_one_line(pipeline, small_copy, part):
    data = small_copy(f"collision-{part}")
    folder = data / "test" / "test_data" / part
    src = load_rgb(min(folder.glob("*.jpg")))
    (folder / "abc.jpg").write_bytes(_jpeg(src))
    (folder / "abc.png").write_bytes(_encoded("PNG")(src))
    out = pipeline["root"] / f"sub-collision-{part}"
    proc = run(submit_args(data, pipeline["root"] / "bundle", out), pipeline["root"])
    _one_line_refusal(proc, str(folder), "abc.jpg", "abc.png")
    assert not out.exists()


def test_a_query_folder_with_no_image_is_refused_in_one_line(pipeline, small_copy):
    data = small_copy("no-query-image")
    folder = data / "test" / "test_data" / "query"
    src = load_rgb(min(folder.glob("*.jpg")))
    for f in folder.glob("*.jpg"):
        f.unlink()
    _add_ignored(folder, src)
    out = pipeline["root"] / "sub-no-query"
    proc = run(submit_args(data, pipeline["root"] / "bundle", out), pipeline["root"])
    _one_line_refusal(proc, str(folder), "no images")
    assert not out.exists()
