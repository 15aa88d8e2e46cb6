import warnings

import numpy as np
import pytest
from _rerank_data import clustered

from rerank import resolve_device, search


def _brute(q, r, k):
    s = q.astype(np.float64) @ r.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def test_search_matches_bruteforce():
    x = clustered(700, d=32, seed=1)
    q, r = x[:100], x[100:]
    scores, idx = search(q, r, 10, batch_size=17)
    bs, bi = _brute(q, r, 10)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert scores.shape == idx.shape == (100, 10)
    np.testing.assert_allclose(scores, bs, atol=1e-5)
    # indices equal except for float32 near-ties
    s64 = q.astype(np.float64) @ r.astype(np.float64).T
    got = np.take_along_axis(s64, idx, axis=1)
    np.testing.assert_allclose(got, bs, atol=1e-5)
    assert (idx == bi).mean() > 0.99


def test_search_clamps_k():
    x = clustered(60, d=16, seed=2)
    scores, idx = search(x[:10], x[10:], 500)
    assert idx.shape == (10, 50)
    assert all(len(set(row)) == 50 for row in idx)


@pytest.mark.parametrize("kind,kw", [("hnsw", {"ef_search": 64}), ("ivf", {"nprobe": 8})])
def test_approximate_indices_have_high_recall(kind, kw):
    x = clustered(3000, d=32, seed=3)
    q, r = x[:200], x[200:]
    _, exact = search(q, r, 10)
    _, approx = search(q, r, 10, index=kind, **kw)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact, approx)])
    assert recall > 0.8


def test_unknown_index_kind():
    x = clustered(50, d=8)
    with pytest.raises(ValueError, match="index"):
        search(x[:5], x[5:], 3, index="lsh")


def test_device_resolution(monkeypatch):
    import rerank.device as device_mod

    assert resolve_device("cpu") == "cpu"
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    monkeypatch.setattr(device_mod, "_visible_gpus", lambda: 2)   # a machine with two GPUs
    assert (resolve_device("auto"), resolve_device("cuda"), resolve_device("CUDA:1")) == ("cuda:0", "cuda:0", "cuda:1")
    with pytest.raises(ValueError, match="only 2 GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(device_mod, "_visible_gpus", lambda: 0)   # none
    assert resolve_device("auto") == "cpu"
    with pytest.warns(RuntimeWarning, match="no CUDA GPU is visible"):
        assert resolve_device("cuda:1") == "cpu"


def test_gpu_asked_without_faiss_gpu_searches_on_the_cpu(monkeypatch):
    import importlib

    import rerank.device as device_mod
    search_mod = importlib.import_module("rerank.search")   # (``rerank.search`` the attribute is the function)

    monkeypatch.setattr(device_mod, "_visible_gpus", lambda: 1)      # torch sees a GPU ...
    monkeypatch.setattr(search_mod, "faiss_gpu_count", lambda: 0)   # ... but faiss is the CPU build
    x = clustered(50, d=8)
    with pytest.warns(RuntimeWarning, match="no GPU support"):
        _, idx = search(x[:5], x[5:], 3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(idx, search(x[:5], x[5:], 3)[1])
