"""Bad-input handling, shared by every public function through rerank._checks."""

import warnings

import numpy as np
import pytest
from _rerank_data import clustered

from rerank import RerankParams, alpha_query_expansion, database_augmentation, k_reciprocal, rerank, search

X = clustered(80, d=8, seed=0)
Q, R = X[:20], X[20:]

PAIR_FUNCS = {
    "search": lambda q, r: search(q, r, 5),
    "aqe": lambda q, r: alpha_query_expansion(q, r, 2),
    "kreciprocal": lambda q, r: k_reciprocal(q, r, k1=5, k2=2, top_k=5),
    "rerank": lambda q, r: rerank(q, r, RerankParams(dba_n=2, aqe_n=2, use_kreciprocal=True,
                                                     k1=5, k2=2), top_k=5),
}


@pytest.fixture(params=sorted(PAIR_FUNCS))
def func(request):
    return PAIR_FUNCS[request.param]


def test_nan_in_query_names_argument_and_rows(func):
    q = Q.copy()
    q[[1, 4, 7], 0] = np.nan
    with pytest.raises(ValueError, match=r"query_desc contains NaN or inf .* in 3 of 20 rows"):
        func(q, R)


def test_inf_in_ref_names_argument(func):
    r = R.copy()
    r[5, 2] = np.inf
    with pytest.raises(ValueError, match=r"ref_desc contains NaN or inf .* in 1 of 60 rows"):
        func(Q, r)


def test_float64_overflow_is_inf(func):
    q = Q.astype(np.float64)
    q[0, 0] = 1e300
    with pytest.raises(ValueError, match="query_desc contains NaN or inf"):
        func(q, R)


def test_zero_rows_rejected(func):
    r = R.copy()
    r[[0, 3]] = 0
    with pytest.raises(ValueError, match="ref_desc has 2 all-zero rows"):
        func(Q, r)


@pytest.mark.parametrize("q", [np.zeros((0, 8), np.float32), np.zeros((5, 0), np.float32),
                               np.ones(8, np.float32)])
def test_empty_or_not_2d(func, q):
    with pytest.raises(ValueError, match="query_desc"):
        func(q, R)


def test_mismatched_dimension(func):
    with pytest.raises(ValueError, match="dimension mismatch"):
        func(Q[:, :6] / np.linalg.norm(Q[:, :6], axis=1, keepdims=True), R)


def test_non_numeric_dtype(func):
    with pytest.raises(TypeError, match="query_desc"):
        func(Q.astype(object), R)


def test_non_unit_rows_warn_and_are_normalised(func):
    with pytest.warns(UserWarning, match="query_desc: 20 of 20 rows are not unit length"):
        a = func(Q * 3.0, R)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = func(Q, R)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_accepted(func, dtype):
    q = Q.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # float16 rounding stays within the unit-norm tolerance
        out = func(q, R.astype(dtype))
    out = out if isinstance(out, tuple) else (out,)
    assert out[0].dtype == np.float32
    ref = func(q.astype(np.float32), R.astype(dtype).astype(np.float32))
    ref = ref if isinstance(ref, tuple) else (ref,)
    np.testing.assert_allclose(out[0], ref[0], atol=1e-5)


def test_dba_validates_its_single_argument():
    r = R.copy()
    r[2, 1] = np.nan
    with pytest.raises(ValueError, match="ref_desc contains NaN or inf .* in 1 of 60 rows"):
        database_augmentation(r, 3)
    with pytest.raises(ValueError, match="ref_desc is empty"):
        database_augmentation(np.zeros((0, 4)), 3)
