import numpy as np
import pytest
from _rerank_data import clustered

from rerank import alpha_query_expansion, database_augmentation


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _aqe_numpy(q, r, n, alpha, include_query=True):
    s = q.astype(np.float64) @ r.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :n]
    w = np.maximum(np.take_along_axis(s, idx, axis=1), 0) ** alpha
    out = np.einsum("qn,qnd->qd", w, r.astype(np.float64)[idx])
    if include_query:
        out += q
    return _l2n(out)


def test_aqe_n0_is_identity():
    x = clustered(300, d=32)
    out = alpha_query_expansion(x[:40], x[40:], 0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x[:40])


@pytest.mark.parametrize("n,alpha", [(1, 3.0), (5, 3.0), (10, 0.0), (4, 1.5)])
def test_aqe_matches_formula(n, alpha):
    x = clustered(500, d=32, seed=4)
    q, r = x[:60], x[60:]
    out = alpha_query_expansion(q, r, n, alpha, batch_size=7)
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, _aqe_numpy(q, r, n, alpha), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_aqe_negative_similarities_get_zero_weight():
    r = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    q = np.array([[0.6, 0.8]], dtype=np.float32)
    out = alpha_query_expansion(q, r, 2, 1.0)
    np.testing.assert_allclose(out, _l2n(q + 0.6 * r[:1]), atol=1e-6)


@pytest.mark.parametrize("n,alpha", [(2, 3.0), (6, 3.0), (5, 0.5)])
def test_dba_matches_formula_with_self_included(n, alpha):
    r = clustered(400, d=32, seed=5)
    out = database_augmentation(r, n, alpha)
    # top-n among the references includes the reference itself (sim 1, weight 1)
    np.testing.assert_allclose(out, _aqe_numpy(r, r, n, alpha, include_query=False), atol=1e-5)


def test_dba_n0_and_n1_are_identity():
    r = clustered(100, d=16, seed=6)
    np.testing.assert_array_equal(database_augmentation(r, 0), r)
    np.testing.assert_array_equal(database_augmentation(r, 1), r)


def test_n_clamped_to_number_of_references():
    x = clustered(30, d=8, seed=7)
    q, r = x[:5], x[5:]
    np.testing.assert_allclose(alpha_query_expansion(q, r, 1000, 2.0),
                               alpha_query_expansion(q, r, len(r), 2.0), atol=1e-6)


def test_bad_expansion_params():
    x = clustered(30, d=8)
    with pytest.raises(ValueError, match="n must be"):
        alpha_query_expansion(x[:5], x[5:], -1)
    with pytest.raises(ValueError, match="alpha"):
        alpha_query_expansion(x[:5], x[5:], 2, alpha=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        database_augmentation(x, -2)
