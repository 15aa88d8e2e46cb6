"""Sparse k-reciprocal vs the dense float64 reference (bench/dense_kreciprocal.py)."""

import os
import sys

import numpy as np
import pytest
from _rerank_data import clustered

from rerank import k_reciprocal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from dense_kreciprocal import dense_k_reciprocal  # noqa: E402  (the single dense reference)


def assert_matches_dense(dist, idx, dense, top):
    """Same top-``top`` as the dense result; orders may differ only inside exact ties."""
    nq = dense.shape[0]
    assert dist.shape == idx.shape == (nq, top)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    assert all(len(np.unique(row)) == top for row in idx)
    assert np.all(np.diff(dist, axis=1) >= -1e-7)                     # ascending
    dense_idx = np.argsort(dense, axis=1, kind="stable")[:, :top]
    dense_sorted = np.take_along_axis(dense, dense_idx, axis=1)
    np.testing.assert_allclose(dist, dense_sorted, atol=1e-4, rtol=0)
    at_sparse = np.take_along_axis(dense, idx, axis=1)
    np.testing.assert_allclose(at_sparse, dist, atol=1e-4, rtol=0)    # right distance per index
    diff = idx != dense_idx
    # an index may differ only where the dense distances are equal within 1e-6
    assert np.all(np.abs(at_sparse[diff] - dense_sorted[diff]) < 1e-6)
    # and nothing from the dense top set is missing unless it ties with the boundary
    for i in range(nq):
        missing = np.setdiff1d(dense_idx[i], idx[i])
        if missing.size:
            assert np.all(np.abs(dense[i, missing] - dense_sorted[i, -1]) < 1e-6)


@pytest.fixture(scope="module")
def data_2500():
    x = clustered(2500, d=64, n_clusters=60, seed=0)
    return x[:500], x[500:]


@pytest.fixture(scope="module")
def dense_default(data_2500):
    return dense_k_reciprocal(*data_2500, k1=20, k2=6, lambda_value=0.3)


def test_default_params_match_dense(data_2500, dense_default):
    q, r = data_2500
    dist, idx = k_reciprocal(q, r, top_k=100, progress=False)
    assert_matches_dense(dist, idx, dense_default, 100)


def test_faiss_search_path_matches_fused_path(data_2500):
    q, r = data_2500
    a = k_reciprocal(q[:100], r, top_k=50, fused=True)
    b = k_reciprocal(q[:100], r, top_k=50, fused=False)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert (a[1] == b[1]).mean() > 0.99


def test_odd_block_sizes(data_2500):
    q, r = data_2500
    q = q[:50]   # the result depends on all N images: compare with a dense run on the same 50
    dist, idx = k_reciprocal(q, r, top_k=100, query_block=7, gemm_block=333)
    dense50 = dense_k_reciprocal(q, r)
    assert_matches_dense(dist, idx, dense50, 100)


@pytest.mark.parametrize("k1,k2,lam", [(10, 1, 0.0), (7, 3, 1.0), (5, 2, 0.5), (30, 10, 0.3)])
def test_param_combinations_match_dense(k1, k2, lam):
    x = clustered(1200, d=32, n_clusters=40, seed=k1)
    q, r = x[:250], x[250:]
    dense = dense_k_reciprocal(q, r, k1=k1, k2=k2, lambda_value=lam)
    dist, idx = k_reciprocal(q, r, k1=k1, k2=k2, lambda_value=lam, top_k=100)
    assert_matches_dense(dist, idx, dense, 100)


def test_lambda_one_is_normalised_original_distance():
    x = clustered(400, d=16, seed=9)
    q, r = x[:50], x[50:]
    dist, idx = k_reciprocal(q, r, lambda_value=1.0, top_k=20)
    d2 = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    orig = (d2 / d2.max(axis=1, keepdims=True))[:, 50:]
    np.testing.assert_allclose(dist, np.sort(orig, axis=1)[:, :20], atol=1e-5)


def test_top_k_clamped_to_references():
    x = clustered(120, d=16, seed=10)
    dist, idx = k_reciprocal(x[:20], x[20:], k1=5, k2=2, top_k=10_000)
    assert idx.shape == (20, 100)
    assert all(sorted(row) == list(range(100)) for row in idx)


@pytest.mark.parametrize("kw,match", [({"k1": 0}, "k1"), ({"k1": 120}, "k1"), ({"k2": 0}, "k2"),
                                      ({"k2": 500}, "k2"), ({"lambda_value": 1.5}, "lambda"),
                                      ({"top_k": 0}, "top_k"), ({"k1": 2.5}, "k1")])
def test_bad_params(kw, match):
    x = clustered(120, d=16, seed=11)
    with pytest.raises(ValueError, match=match):
        k_reciprocal(x[:20], x[20:], **{"k1": 5, "k2": 2, **kw})


def test_k1_equal_n_minus_1_is_allowed():
    x = clustered(40, d=8, seed=12)
    dense = dense_k_reciprocal(x[:10], x[10:], k1=39, k2=3)
    dist, idx = k_reciprocal(x[:10], x[10:], k1=39, k2=3, top_k=30)
    assert_matches_dense(dist, idx, dense, 30)


def test_triple_budget_blocking_gives_same_result(data_2500, monkeypatch):
    import rerank.kreciprocal as kr
    q, r = data_2500
    a = k_reciprocal(q[:120], r, top_k=80)
    monkeypatch.setattr(kr, "_TRIPLE_BUDGET", 1000)   # forces one query per block
    b = k_reciprocal(q[:120], r, top_k=80)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-7)
