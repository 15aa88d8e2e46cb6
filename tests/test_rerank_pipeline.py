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
