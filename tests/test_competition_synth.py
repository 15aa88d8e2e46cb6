"""Tests for the embedded synthetic dataset generator (competition.synth)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from competition.cli import run_command
from competition.synth import SynthConfig, generate, main

SMALL = dict(train_classes=4, test_classes=3, images_per_class=2, queries_per_class=1,
             references_per_class=2, size=32)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "d"
    summary = generate(out, SynthConfig(seed=3, **SMALL))
    classes = {r["class"]: r for r in csv.DictReader(open(out / "classes.csv"))}
    assert list(next(csv.reader(open(out / "classes.csv")))) == ["class", "description", "in"]
    train = {c for c, r in classes.items() if r["in"] == "train"}
    test = {c for c, r in classes.items() if r["in"] == "test"}
    assert len(train) == 4 and len(test) == 3 and not train & test
    assert all(c.startswith("c") for c in classes)
    # train layout: train/train_data/<class>/s<k>.jpg, only train classes
    tdirs = {p.name for p in (out / "train" / "train_data").iterdir()}
    assert tdirs == train
    for c in train:
        names = sorted(p.name for p in (out / "train" / "train_data" / c).iterdir())
        assert names == ["s0.jpg", "s1.jpg"]
    # labels.csv: every listed name exists, classes are test classes
    with open(out / "test" / "labels.csv") as f:
        assert f.readline().strip() == "split,name,class"
    rows = list(csv.DictReader(open(out / "test" / "labels.csv")))
    assert {r["split"] for r in rows} == {"query", "reference"}
    for r in rows:
        p = out / "test" / "test_data" / r["split"] / f"{r['name']}.jpg"
        assert p.is_file()
        assert r["class"] in test
        assert len(r["name"]) == 12 and int(r["name"], 16) >= 0
    listed = {(r["split"], r["name"]) for r in rows}
    on_disk = {(p.parent.name, p.stem) for p in (out / "test" / "test_data").rglob("*.jpg")}
    assert listed == on_disk and len(listed) == len(rows)
    for c in test:
        assert sum(r["split"] == "query" and r["class"] == c for r in rows) >= 1
        assert sum(r["split"] == "reference" and r["class"] == c for r in rows) >= 1
    assert summary["queries"] == 3 and summary["references"] == 6 and summary["images"] == 8 + 9
    with Image.open(p) as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"


def test_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, SynthConfig(seed=7, **SMALL))
    generate(b, SynthConfig(seed=7, **SMALL))
    generate(c, SynthConfig(seed=8, **SMALL))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert set(fa) != set(fc)  # different hex names and class split
    assert sorted(fa.values()) != sorted(fc.values())


def test_workers_give_same_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", SynthConfig(seed=1, **SMALL))
    generate(tmp_path / "b", SynthConfig(seed=1, workers=2, **SMALL))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_refuses_non_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(out, SynthConfig(**SMALL))
    assert run_command(main, ["--out", str(out), "--size", "32"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    generate(out, SynthConfig(overwrite=True, **SMALL))
    assert (out / "test" / "labels.csv").is_file() and (out / "keep.txt").is_file()


def test_overwrite_removes_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "d"
    generate(out, SynthConfig(seed=1, **SMALL))
    generate(out, SynthConfig(seed=2, overwrite=True, **SMALL))
    fresh = tmp_path / "fresh"
    generate(fresh, SynthConfig(seed=2, **SMALL))
    assert _files(out) == _files(fresh)


def test_cli_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--seed", "5", "--train-classes", "2", "--test-classes", "2",
                 "--images-per-class", "1", "--queries-per-class", "1", "--references-per-class", "1",
                 "--size", "32"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "wrote 6 images" in line
    assert (out / "classes.csv").is_file()


def test_rejects_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "x", SynthConfig(test_classes=0))
    with pytest.raises(ValueError):
        generate(tmp_path / "y", SynthConfig(size=8))
