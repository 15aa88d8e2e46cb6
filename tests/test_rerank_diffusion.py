"""rerank.diffusion against its dense float64 definition (tests/_rerank_data.dense_diffusion).

Tolerance: the conjugate gradient stops at a residual of 1e-8, so f is within
1e-8 / (1 - alpha) = 1e-6 of the exact solution at alpha 0.99 (plus float32 dot
products in the affinities); rankings are compared up to swaps of references whose
dense f differ by at most ATOL, and of unreached references (f = 0) whose inner
products differ by at most 1e-6.
"""

import json
import warnings

import numpy as np
import pytest
from _rerank_data import clustered, dense_diffusion, dense_diffusion_ranking

from rerank import (
    DEFAULT_TRUNCATE,
    RerankParams,
    alpha_query_expansion,
    database_augmentation,
    diffusion,
    rerank,
    search,
)
from rerank.pipeline import fit_params_to_set

ATOL = 2e-6


def assert_ranks_like_dense(scores, idx, q, r, f, top_k):
    """``idx`` ranks the references as the dense ``f`` (nq, nr) does, up to near-ties (see above)."""
    nq = len(q)
    assert scores.shape == idx.shape == (nq, top_k)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert all(len(set(row)) == top_k for row in idx.tolist())
    ip = q.astype(np.float64) @ r.astype(np.float64).T
    f_at = np.take_along_axis(f, idx, axis=1)
    ip_at = np.take_along_axis(ip, idx, axis=1)
    np.testing.assert_allclose(scores, f_at, atol=ATOL, rtol=1e-5)      # the scores are f
    assert np.all(np.diff(f_at, axis=1) <= ATOL)                       # ordered by f ...
    unreached = (f_at[:, 1:] == 0) & (f_at[:, :-1] == 0)
    assert np.all(np.diff(ip_at, axis=1)[unreached] <= 1e-6)           # ... then by inner product
    dense = dense_diffusion_ranking(q, r, f)
    for row in range(nq):                                              # nothing better left out
        left_out = np.setdiff1d(dense[row, :top_k], idx[row])
        assert np.all(f[row, left_out] <= f_at[row, -1] + ATOL)
        last_zero = f_at[row] == 0
        if left_out.size and last_zero.any():
            zero_out = left_out[f[row, left_out] == 0]
            assert np.all(ip[row, zero_out] <= ip_at[row, last_zero].min() + 1e-6)


@pytest.fixture(scope="module")
def small_set():
    x = clustered(700, d=24, n_clusters=30, seed=11, noise=0.9)
    return x[:150], x[150:]


@pytest.mark.parametrize("truncate", [None, 80])
def test_matches_the_dense_definition(small_set, truncate):
    q, r = small_set
    f = dense_diffusion(q, r, k=12, alpha=0.99, gamma=3.0, truncate=truncate)
    scores, idx = diffusion(q, r, k=12, truncate=truncate, top_k=120, progress=False)
    assert_ranks_like_dense(scores, idx, q, r, f, 120)


def test_truncate_near_the_set_size():
    x = clustered(120, d=16, n_clusters=8, seed=10)
    q, r = x[:20], x[20:]
    whole = diffusion(q, r, k=8, truncate=None, top_k=50)
    np.testing.assert_array_equal(diffusion(q, r, k=8, truncate=119, top_k=50)[1], whole[1])   # N - 1
    np.testing.assert_array_equal(diffusion(q, r, k=8, truncate=10_000, top_k=50)[1], whole[1])
    f = dense_diffusion(q, r, k=8, truncate=118)                                              # N - 2
    assert_ranks_like_dense(*diffusion(q, r, k=8, truncate=118, top_k=50), q, r, f, 50)


def test_other_parameters_match_the_dense_definition():
    x = clustered(400, d=16, n_clusters=20, seed=12)
    q, r = x[:60], x[60:]
    f = dense_diffusion(q, r, k=7, alpha=0.8, gamma=1.0, truncate=50)
    scores, idx = diffusion(q, r, k=7, alpha=0.8, gamma=1.0, truncate=50, top_k=340)   # a full ranking
    assert_ranks_like_dense(scores, idx, q, r, f, 340)


def _plain_order(q, r, top_k):
    ip = q.astype(np.float64) @ r.astype(np.float64).T
    return np.argsort(-ip, axis=1, kind="stable")[:, :top_k]


def test_an_isolated_query_gets_its_plain_search_ranking():
    rng = np.random.default_rng(1013)
    r = clustered(400, d=64, n_clusters=5, seed=13, noise=0.3)     # tight clusters of ~80
    q = rng.standard_normal((3, 64)).astype(np.float32)            # random directions: nobody's neighbour
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, idx = diffusion(q, r, k=10, top_k=50)
    f = dense_diffusion(q, r, k=10)
    assert np.all(f == 0)                                           # the definition agrees: isolated
    assert np.all(scores == 0)
    np.testing.assert_array_equal(idx, _plain_order(q, r, 50))


def test_alpha_zero_ranks_like_plain_search(small_set):
    q, r = small_set
    scores, idx = diffusion(q, r, k=12, alpha=0.0, top_k=40)
    assert np.all(scores == 0)
    np.testing.assert_array_equal(idx, _plain_order(q, r, 40))
    np.testing.assert_array_equal(idx, search(q, r, 40)[1])


def test_top_k_is_clamped_to_the_references():
    x = clustered(60, d=8, seed=14)
    scores, idx = diffusion(x[:10], x[10:], k=5, top_k=1000)
    assert idx.shape == (10, 50)
    assert all(sorted(row) == list(range(50)) for row in idx.tolist())


@pytest.mark.parametrize("kw,match", [({"k": 0}, "k must be >= 1"), ({"k": 60}, "k must be <= 59"),
                                      ({"k": 2.5}, "k must be an integer"), ({"alpha": 1.0}, "alpha"),
                                      ({"alpha": -0.1}, "alpha"), ({"gamma": 0.0}, "gamma"),
                                      ({"gamma": float("nan")}, "gamma"), ({"truncate": 0}, "truncate"),
                                      ({"truncate": 3.5}, "truncate"), ({"top_k": 0}, "top_k")])
def test_bad_params(kw, match):
    x = clustered(60, d=8, seed=15)
    with pytest.raises(ValueError, match=match):
        diffusion(x[:10], x[10:], **{"k": 5, **kw})


def test_pipeline_applies_diffusion_after_dba_and_aqe():
    x = clustered(500, d=16, n_clusters=25, seed=16)
    q, r = x[:80], x[80:]
    p = RerankParams(dba_n=3, aqe_n=2, use_diffusion=True, diffusion_k=10, diffusion_alpha=0.9,
                     diffusion_gamma=2.0)
    scores, idx = rerank(q, r, p, top_k=60)
    r2 = database_augmentation(r, 3, 3.0)
    want = diffusion(alpha_query_expansion(q, r2, 2, 3.0), r2, k=10, alpha=0.9, gamma=2.0, top_k=60,
                     truncate=DEFAULT_TRUNCATE)
    np.testing.assert_array_equal(idx, want[1])
    np.testing.assert_array_equal(scores, want[0])                  # higher is better already


def test_pipeline_params_for_diffusion():
    with pytest.raises(ValueError, match="use_kreciprocal and use_diffusion"):
        x = clustered(40, d=8, seed=17)
        rerank(x[:10], x[10:], RerankParams(use_kreciprocal=True, use_diffusion=True))
    with pytest.raises(ValueError, match="alpha"):
        rerank(x[:10], x[10:], RerankParams(use_diffusion=True, diffusion_alpha=1.5))
    old = {k: v for k, v in RerankParams().to_dict().items() if not k.startswith(("use_diffusion", "diffusion"))}
    assert RerankParams.from_dict(old) == RerankParams()           # recipes saved before diffusion
    p = RerankParams(use_diffusion=True, diffusion_k=33)
    assert RerankParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    fitted, notes = fit_params_to_set(p, 4, 10)
    assert fitted.diffusion_k == 13 and notes == ["diffusion_k 33 -> 13"]
    assert fit_params_to_set(RerankParams(diffusion_k=33), 4, 10) == (RerankParams(diffusion_k=33), [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rerank(x[:4], x[4:14], p, top_k=5)
    assert len(caught) == 1 and "diffusion_k 33 -> 13" in str(caught[0].message)
