import json
import warnings

import numpy as np
import pytest
from _rerank_data import clustered

from rerank import RerankParams, alpha_query_expansion, database_augmentation, k_reciprocal, rerank, search


def test_params_round_trip_json():
    p = RerankParams(dba_n=5, dba_alpha=2.0, aqe_n=3, use_kreciprocal=True, k1=15, lambda_value=0.2)
    back = RerankParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    assert RerankParams.from_dict({}) == RerankParams()
    with pytest.raises(ValueError, match="unknown"):
        RerankParams.from_dict({"k3": 1})


def test_defaults_are_plain_search():
    x = clustered(400, d=16, seed=1)
    q, r = x[:40], x[40:]
    s, i = rerank(q, r, RerankParams(), top_k=25)
    s2, i2 = search(q, r, 25)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2)


def test_composition_order_dba_then_aqe_then_kreciprocal():
    x = clustered(600, d=16, seed=2)
    q, r = x[:100], x[100:]
    p = RerankParams(dba_n=3, aqe_n=2, use_kreciprocal=True, k1=10, k2=3)
    scores, idx = rerank(q, r, p, top_k=50)
    r2 = database_augmentation(r, 3, 3.0)
    q2 = alpha_query_expansion(q, r2, 2, 3.0)
    dist, idx2 = k_reciprocal(q2, r2, 10, 3, 0.3, top_k=50)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(scores, -dist)                 # higher is better
    assert np.all(np.diff(scores, axis=1) <= 1e-7)


def test_plain_search_after_expansion_scores_descending():
    x = clustered(300, d=16, seed=3)
    s, i = rerank(x[:30], x[30:], RerankParams(dba_n=4, aqe_n=2), top_k=10_000)
    assert i.shape == (30, 270)                                # top_k clamped to nr
    assert np.all(np.diff(s, axis=1) <= 1e-6)


@pytest.mark.parametrize("field,value", [("dba_n", -1), ("aqe_n", -2), ("aqe_alpha", -1.0),
                                         ("lambda_value", 2.0)])
def test_bad_params_rejected(field, value):
    x = clustered(100, d=8, seed=4)
    with pytest.raises(ValueError, match=field):
        rerank(x[:10], x[10:], RerankParams(**{field: value}))


def test_cuda_request_falls_back_with_warning():
    import faiss
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    x = clustered(100, d=8, seed=5)
    with pytest.warns(RuntimeWarning):
        _, i = rerank(x[:10], x[10:], RerankParams(), top_k=5, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(i, rerank(x[:10], x[10:], top_k=5)[1])


def test_parameters_too_large_for_the_set_are_clamped_with_one_warning():
    """A tuned recipe (k1 = 33, ...) on 2 queries + 4 references: ranked, not refused."""
    x = clustered(6, d=8, seed=6)
    q, r = x[:2], x[2:]
    p = RerankParams(dba_n=10, aqe_n=7, use_kreciprocal=True, k1=33, k2=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores, idx = rerank(q, r, p, top_k=1000)
    assert len(caught) == 1
    message = str(caught[0].message)
    for note in ("k1 33 -> 5", "k2 6 -> 5", "dba_n 10 -> 4", "aqe_n 7 -> 4", "2 queries + 4 references"):
        assert note in message
    r2 = database_augmentation(r, 4, 3.0)
    dist, idx2 = k_reciprocal(alpha_query_expansion(q, r2, 4, 3.0), r2, 5, 5, 0.3)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(scores, -dist)
    with pytest.raises(ValueError, match="k1 must be <= 5"):  # k_reciprocal keeps its contract
        k_reciprocal(q, r, 33, 5)


def test_fit_params_to_set_touches_only_what_the_set_cannot_take():
    from rerank.pipeline import fit_params_to_set
    p = RerankParams(dba_n=4, aqe_n=2, use_kreciprocal=True, k1=9, k2=3)
    assert fit_params_to_set(p, 5, 5) == (p, [])
    off = RerankParams(use_kreciprocal=False, k1=40)  # k1 unused: left alone, no note
    assert fit_params_to_set(off, 1, 3) == (off, [])
    fitted, notes = fit_params_to_set(p, 1, 3)
    assert fitted == RerankParams(dba_n=3, aqe_n=2, use_kreciprocal=True, k1=3, k2=3) and notes == ["dba_n 4 -> 3",
                                                                                                   "k1 9 -> 3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing clamped: no warning
        x = clustered(10, d=8, seed=7)
        rerank(x[:5], x[5:], p)
