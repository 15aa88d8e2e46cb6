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


def _halves_jpeg(path, w, h, exif=None):
    """A JPEG whose left half is red and right half blue."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (220, 20, 20)
    arr[:, w // 2:] = (20, 20, 220)
    img = Image.fromarray(arr)
    img.save(path, "JPEG", quality=90, **({"exif": exif} if exif else {}))
    return img


def test_max_side_decodes_a_large_jpeg_at_reduced_scale(tmp_path, monkeypatch):
    from PIL.JpegImagePlugin import JpegImageFile
    path = tmp_path / "big.jpg"
    _halves_jpeg(path, 4000, 2000)
    decoded = []
    draft = JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        decoded.append(self.size)  # the size the decoder will produce
        return out

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    img = load_image(path, max_side=400)
    assert decoded and max(decoded[0]) <= 2 * 400  # the decoder itself scaled down (1/8 here)
    assert img.mode == "RGB" and img.size == (400, 200)
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[:, :180] - (220, 20, 20)).max() < 30
    assert np.abs(arr[:, 220:] - (20, 20, 220)).max() < 30
    assert load_image(path).size == (4000, 2000)  # None: full size


def test_max_side_keeps_exif_orientation_and_shrinks_other_formats(tmp_path):
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # rotate 90 CW on display: the red left half ends on top
    _halves_jpeg(tmp_path / "o.jpg", 1600, 800, exif=exif.tobytes())
    img = load_image(tmp_path / "o.jpg", max_side=100)
    assert img.size == (50, 100)
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[:40] - (220, 20, 20)).max() < 40 and np.abs(arr[60:] - (20, 20, 220)).max() < 40
    Image.fromarray(_rgb_array(w=300, h=120)).save(tmp_path / "p.png")  # no draft for PNG: resized after
    assert load_image(tmp_path / "p.png", max_side=60).size == (60, 24)
    assert load_image(tmp_path / "p.png", max_side=1000).size == (300, 120)  # never enlarged


def test_decompression_bomb_is_unreadable_with_a_clear_reason(tmp_path, monkeypatch):
    Image.fromarray(_rgb_array(w=100, h=100)).save(tmp_path / "bomb.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels > 2 x the limit
    for max_side in (None, 8):  # the pixel check comes before any draft decoding
        with pytest.raises(UnreadableImage, match="bomb.jpg.*too many pixels to decode safely"):
            load_image(tmp_path / "bomb.jpg", max_side=max_side)


def _flat(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(_rgb_array()).save(folder / n)
    return folder


def test_flat_folders_report_non_images_and_subfolders(tmp_path):
    from competition.data import list_images
    query = _flat(tmp_path / "test" / "test_data" / "query", ["b.jpg", "a.png"])
    (query / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (query / "thumbs").mkdir()
    with pytest.warns(UserWarning, match=r"query: 1 non-image files and 1 subfolders ignored .*\.DS_Store.*thumbs"):
        assert [p.name for p in list_images(query)] == ["a.png", "b.jpg"]
    reference = _flat(tmp_path / "test" / "test_data" / "reference", ["r.jpg"])
    (reference / "nested").mkdir()
    with pytest.warns(UserWarning) as caught:
        index = scan_test(tmp_path)
    assert [str(w.message).split(": ")[0] for w in caught] == [str(query), str(reference)]  # one per folder
    assert "reference: 1 subfolders ignored" in str(caught[1].message)
    assert index.query_names == ["a", "b"] and index.reference_names == ["r"]
    nested = _flat(tmp_path / "train" / "train_data" / "c1" / "more", ["x.jpg"]).parent
    _flat(nested, ["s.jpg"])
    with pytest.warns(UserWarning, match=r"1 subfolders ignored \(e\.g\. .*c1/more\)"):
        assert scan_train(tmp_path).ids == ["c1/s.jpg"]


def test_a_folder_without_images_or_with_colliding_names_is_refused(tmp_path):
    from competition.cli import UserError
    from competition.data import list_images
    query = tmp_path / "test" / "test_data" / "query"
    query.mkdir(parents=True)
    _flat(tmp_path / "test" / "test_data" / "reference", ["r.jpg"])
    with pytest.raises(DataError, match=r"query: no images"):
        scan_test(tmp_path)
    (query / ".DS_Store").write_bytes(b"x")
    with pytest.warns(UserWarning, match="DS_Store"), \
            pytest.raises(DataError, match=r"query: no images \(only 1 other entries, e\.g\. \['\.DS_Store'\]\)"):
        scan_test(tmp_path)
    with pytest.warns(UserWarning, match="DS_Store"):
        assert list_images(query) == []  # a plain listing may be empty: its caller decides
    (query / ".DS_Store").unlink()
    _flat(query, ["abc.jpg", "abc.png"])
    with pytest.raises(UserError, match=r"query: two images share the name 'abc' \(abc\.jpg, abc\.png\); .*rename"):
        list_images(query)


@pytest.mark.parametrize("text,match", [
    ("split,name,class\nquery,a,1\nquery,b,2,extra,more\n", r"labels\.csv:3: 5 fields, the header has 3"),
    ("split,name,class\nquery,a\n", r"labels\.csv:2: 2 fields, the header has 3"),
    ("", r"labels\.csv: empty file; expected the header split,name,class"),
    (b"split,name,class\nquery,caf\xe9,1\n", r"labels\.csv: not UTF-8 text"),
])
def test_malformed_labels_are_named_with_their_line(tmp_path, text, match):
    (tmp_path / "test").mkdir()
    path = tmp_path / "test" / "labels.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=match):
        read_labels(tmp_path)


def test_labels_accept_a_bom_blank_lines_any_column_order_and_extra_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffname,note,class,split\r\na b,,x,query\r\n\r\n\"c,d\",hi,y,reference\r\n".encode())
    assert read_labels(path) == {"query": {"a b": "x"}, "reference": {"c,d": "y"}}
