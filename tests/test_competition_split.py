"""The held-out class split's guarantees."""
from pathlib import Path

import pytest

from competition.data import ScanReport, TrainIndex
from competition.split import HeldoutSplit, make_split, split_labels


def _index(sizes):
    ids, labels = [], []
    for c, n in sizes.items():
        for i in range(n):
            ids.append(f"{c}/s{i}.jpg")
            labels.append(c)
    return TrainIndex(Path("/nowhere"), [Path(i) for i in ids], ids, labels, sorted(sizes), ScanReport())


SIZES = {f"c{i:02d}": (1 if i % 7 == 0 else 2 + i % 5) for i in range(30)}


def test_deterministic_and_seed_dependent():
    index = _index(SIZES)
    a, b = make_split(index, 0.3, seed=1), make_split(index, 0.3, seed=1)
    assert a == b and a.hash == b.hash
    assert make_split(index, 0.3, seed=2).hash != a.hash


def test_disjoint_and_complete():
    index = _index(SIZES)
    s = make_split(index, 8, seed=0)
    assert len(s.heldout_classes) == 8
    assert not set(s.train_classes) & set(s.heldout_classes)
    assert set(s.train_classes) | set(s.heldout_classes) == set(SIZES)
    assert not set(s.query_ids) & set(s.reference_ids)
    held_images = {i for i, c in zip(index.ids, index.labels) if c in s.heldout_classes}
    assert set(s.query_ids) | set(s.reference_ids) == held_images


def test_every_heldout_class_has_query_and_reference_and_singletons_stay():
    index = _index(SIZES)
    for seed in range(5):
        s = make_split(index, 0.5, seed=seed)
        assert set(split_labels(s.query_ids)) == set(s.heldout_classes)
        assert set(split_labels(s.reference_ids)) == set(s.heldout_classes)
        singletons = {c for c, n in SIZES.items() if n == 1}
        assert singletons <= set(s.train_classes)


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    s = make_split(_index(SIZES), 0.3, seed=3)
    s.save(tmp_path / "split.json")
    assert HeldoutSplit.load(tmp_path / "split.json") == s
    text = (tmp_path / "split.json").read_text().replace('"seed": 3', '"seed": 4')
    (tmp_path / "split.json").write_text(text)
    with pytest.raises(ValueError, match="split.json.*hash"):
        HeldoutSplit.load(tmp_path / "split.json")


def test_impossible_requests_are_refused():
    index = _index({"a": 1, "b": 1, "c": 3})
    with pytest.raises(ValueError, match="2\\+ images"):
        make_split(index, 2)
    with pytest.raises(ValueError, match="query_fraction"):
        make_split(index, 1, query_fraction=1.0)
