"""The data layer: every kind of image we must read, and every kind we must skip."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from competition.data import (
    DataError,
    LoadReport,
    UnreadableImage,
    image_name,
    load_image,
    read_labels,
    scan_test,
    scan_train,
    try_load_image,
)


def _rgb_array(w=32, h=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_formats_load_as_rgb(tmp_path, fmt, ext):
    path = tmp_path / f"a.{ext}"
    Image.fromarray(_rgb_array()).save(path, fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 24)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_modes_convert_to_rgb(tmp_path, mode):
    base = Image.fromarray(_rgb_array())
    if mode == "I;16":
        arr = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80)
        img = Image.fromarray(arr)  # 16-bit greyscale (I;16)
        assert img.mode.startswith("I;16")
    else:
        img = base.convert(mode)
    fmt, ext = ("JPEG", "jpg") if mode == "CMYK" else ("PNG", "png")
    path = tmp_path / f"img.{ext}"
    img.save(path, fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (32, 24)
    if mode == "I;16":  # 16-bit is rescaled, not clipped to white
        arr = np.asarray(out)
        assert arr.min() == 0 and arr.max() == 255


def test_rgba_transparent_becomes_white(tmp_path):
    arr = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    assert (np.asarray(load_image(tmp_path / "t.png")) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_rgb_array(w=40, h=20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "o.jpg", "JPEG", exif=exif.tobytes())
    assert load_image(tmp_path / "o.jpg").size == (20, 40)


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(64, 64)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_bad_files_raise_naming_the_file(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        _truncated_jpeg(path)
    else:
        path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(UnreadableImage) as err:
        load_image(path)
    assert str(path) in str(err.value)
    report = LoadReport()
    with pytest.warns(UserWarning, match=path.name):
        assert try_load_image(path, report) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file warns only once
        assert try_load_image(path, report) is None
    assert list(report.skipped) == [str(path)] and report.loaded == 0
    assert "1 unreadable" in report.summary()


def test_image_name_keeps_inner_dots():
    assert image_name("/x/y/a.b.c.jpg") == "a.b.c"
    assert image_name("plain.png") == "plain"


def _layout(root):
    for cls, n in [("c1", 3), ("c2", 2)]:
        d = root / "train" / "train_data" / cls
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_rgb_array(seed=i)).save(d / f"s{i}.jpg")
    (root / "train" / "train_data" / "empty_class").mkdir()
    (root / "train" / "train_data" / "c1" / "notes.txt").write_text("hi")
    for split in ("query", "reference"):
        d = root / "test" / "test_data" / split
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_rgb_array(seed=10 + i)).save(d / f"{split[0]}.{i}.jpg")
    (root / "test" / "labels.csv").write_text(
        "split,name,class\nquery,q.0,x\nquery,q.1,y\nreference,r.0,x\nreference,r.1,y\n")


def test_scan_layout_reports_ignored_entries(tmp_path):
    _layout(tmp_path)
    with pytest.warns(UserWarning, match="1 empty class folders and 1 non-image"):
        index = scan_train(tmp_path)
    assert index.classes == ["c1", "c2"]
    assert index.ids == ["c1/s0.jpg", "c1/s1.jpg", "c1/s2.jpg", "c2/s0.jpg", "c2/s1.jpg"]
    assert index.labels == ["c1"] * 3 + ["c2"] * 2
    test = scan_test(tmp_path)
    assert test.query_names == ["q.0", "q.1"] and test.reference_names == ["r.0", "r.1"]
    labels = read_labels(tmp_path)
    assert labels["query"] == {"q.0": "x", "q.1": "y"}


def test_missing_layout_and_bad_labels_are_named(tmp_path):
    with pytest.raises(DataError, match="train"):
        scan_train(tmp_path)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "labels.csv").write_text("split,name\nquery,a\n")
    with pytest.raises(DataError, match="labels.csv.*class"):
        read_labels(tmp_path)
    (tmp_path / "test" / "labels.csv").write_text("split,name,class\nquery,a,1\nbogus,b,2\n")
    with pytest.raises(DataError, match="labels.csv:3"):
        read_labels(tmp_path)
