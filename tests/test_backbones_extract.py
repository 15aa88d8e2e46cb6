"""backbones.extract: shape, input order, unit norm, unreadable images, TTA, exact ranking."""
from __future__ import annotations

import numpy as np
import pytest

from backbones.extract import extract_descriptors, search_scores
from backbones.model import build_model

CONFIG = {"image_size": 32}


@pytest.fixture(scope="module")
def backbones_model():
    return build_model("mobilenetv3_small_050", embedding_dim=16, announce=False).eval()


def _paths(root):
    return sorted((root / "test" / "test_data" / "reference").iterdir())


def test_shape_order_and_unit_norm(image_dataset, backbones_model):
    paths = _paths(image_dataset)[::-1]  # any order: output follows the input
    desc, ok = extract_descriptors(backbones_model, paths, config=CONFIG, batch_size=5, progress=False)
    assert desc.shape == (len(paths), 16) and desc.dtype == np.float32 and ok.all()
    assert np.allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    for i in (0, 5, len(paths) - 1):
        one, _ = extract_descriptors(backbones_model, [paths[i]], config=CONFIG, progress=False)
        assert np.allclose(one[0], desc[i], atol=1e-5)


def test_unreadable_images_are_skipped_named_and_masked(image_dataset, backbones_model, tmp_path):
    bad1, bad2 = tmp_path / "broken.jpg", tmp_path / "empty.png"
    bad1.write_bytes(b"\xff\xd8garbage")
    bad2.write_bytes(b"")
    good = _paths(image_dataset)[:4]
    paths = [good[0], bad1, good[1], good[2], bad2, good[3]]
    with pytest.warns(UserWarning, match=r"broken\.jpg|empty\.png") as rec:
        desc, ok = extract_descriptors(backbones_model, paths, config=CONFIG, batch_size=2, progress=False)
    assert sum("broken.jpg" in str(w.message) for w in rec) == 1
    assert sum("empty.png" in str(w.message) for w in rec) == 1
    assert ok.tolist() == [True, False, True, True, False, True]
    ref, _ = extract_descriptors(backbones_model, good, config=CONFIG, progress=False)
    assert desc.shape == (4, 16) and np.allclose(desc, ref, atol=1e-5)


def test_flip_and_multiscale_tta(image_dataset, backbones_model):
    paths = _paths(image_dataset)[:3]
    desc, ok = extract_descriptors(backbones_model, paths, config=CONFIG, flip=True, scales=(1.0, 1.5),
                                   progress=False)
    plain, _ = extract_descriptors(backbones_model, paths, config=CONFIG, progress=False)
    assert desc.shape == (3, 16) and np.allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(desc, plain)


def test_exact_cosine_retrieval_scores():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(50, 8)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    queries = refs[[3, 17]] + 0.01
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    labels = list(range(50))
    s = search_scores(queries, [3, 17], refs, labels)
    assert s["map_at_k"] == 1.0 and s["recall_at_1"] == 1.0


def test_channels_last_weights_get_channels_last_batches(image_dataset, backbones_model, tmp_path):
    import copy

    import torch

    from backbones.model import input_memory_format

    paths = _paths(image_dataset)[:4]
    plain, _ = extract_descriptors(backbones_model, paths, config=CONFIG, progress=False)
    assert input_memory_format(backbones_model) == torch.contiguous_format
    model = copy.deepcopy(backbones_model).to(memory_format=torch.channels_last)
    assert input_memory_format(model) == torch.channels_last
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                         and not args[0].is_contiguous()))
    desc, _ = extract_descriptors(model, paths, config=CONFIG, batch_size=2, progress=False)
    assert seen == [True, True] and np.allclose(desc, plain, atol=1e-5)
