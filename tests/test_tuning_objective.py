"""tuning.objective: evaluate, the whitening cache, parameter decoding; tuning.search.split_halves."""
import numpy as np
import optuna
import pytest

from competition.metrics import mean_average_precision, recall_at_k
from ensemble.postprocess import PostProcessing, ensemble_descriptors, fit_whitening_for
from rerank.pipeline import RerankParams, rerank
from tuning.objective import (
    SearchSpace,
    WhiteningCache,
    default_params,
    evaluate,
    max_whiten_dim,
    post_from_params,
    suggest_postprocessing,
)
from tuning.search import split_halves


def test_evaluate_matches_the_shared_inference_path(tuning_heldout):
    h = tuning_heldout
    post = PostProcessing(weights=[0.7, 0.3], whiten=True, whiten_dim=20, whiten_power=0.5,
                          rerank=RerankParams(dba_n=3, aqe_n=2))
    w = fit_whitening_for(h.train, post)
    q, r = ensemble_descriptors(h.query, post, w), ensemble_descriptors(h.reference, post, w)
    _, idx = rerank(q, r, post.rerank, top_k=1000)
    got = evaluate(h, post, k=1000)
    assert got["map_at_k"] == pytest.approx(mean_average_precision(idx, h.query_labels, h.reference_labels, k=1000))
    assert got["recall_at_1"] == pytest.approx(recall_at_k(idx, h.query_labels, h.reference_labels, 1))
    assert evaluate(h, post, whitening=w) == got
    # some post-processing clearly helps on this fixture
    assert evaluate(h, PostProcessing(whiten=True))["map_at_k"] > evaluate(h, PostProcessing())["map_at_k"] + 0.05


def test_whitening_cache_refits_only_for_new_weights_or_shrinkage(tuning_heldout):
    cache = WhiteningCache(tuning_heldout.train, maxsize=2)
    assert cache.get(PostProcessing()) is None
    a = cache.get(PostProcessing(weights=[0.5, 0.5], whiten=True, whiten_dim=10, whiten_power=0.2))
    b = cache.get(PostProcessing(weights=[1.0, 1.0], whiten=True, whiten_dim=30, whiten_power=0.9))
    assert a is b and (cache.hits, cache.misses) == (1, 1)
    c = cache.get(PostProcessing(weights=[0.2, 1.0], whiten=True))
    d = cache.get(PostProcessing(weights=[0.2, 1.0], whiten=True, whiten_shrinkage=0.5))
    assert c is not a and d is not c and cache.misses == 3
    assert len(cache._fits) == 2  # LRU bound


def test_default_params_decode_to_untuned_defaults():
    space = SearchSpace()
    post = post_from_params(default_params(["a", "b"], space), ["a", "b"], space)
    base = PostProcessing(whiten_shrinkage=space.whiten_shrinkage)
    assert post.rerank == RerankParams()
    assert not post.whiten and post.weights[0] == post.weights[1]
    assert (post.whiten, post.whiten_dim, post.rerank) == (base.whiten, base.whiten_dim, base.rerank)
    assert "weight_a" not in default_params(["a"], space)
    assert "kreciprocal" not in default_params(["a", "b"], SearchSpace(kreciprocal=False))


def test_suggested_params_round_trip_through_the_decoder(tuning_heldout):
    space = SearchSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    max_dim = max_whiten_dim(tuning_heldout)
    assert max_dim == 64
    for _ in range(20):
        trial = study.ask()
        post = suggest_postprocessing(trial, tuning_heldout.member_names, max_dim, space)
        assert post == post_from_params(trial.params, tuning_heldout.member_names, space)
        if post.whiten:
            assert 16 <= post.whiten_dim <= max_dim and 0 <= post.whiten_power <= 1
        study.tell(trial, 0.0)
    no_kr = SearchSpace(kreciprocal=False)
    trial = study.ask()
    assert not suggest_postprocessing(trial, ["a", "b"], max_dim, no_kr).rerank.use_kreciprocal
    assert "kreciprocal" not in trial.params


def test_split_halves_are_disjoint_self_contained_and_seeded(tuning_heldout):
    s, c, s_cls, c_cls = split_halves(tuning_heldout, seed=4)
    assert len(s_cls) == len(c_cls) == 6 and not set(s_cls) & set(c_cls)
    assert set(s.query_labels) == set(s.reference_labels) == set(s_cls)
    assert set(c.query_labels) == set(c.reference_labels) == set(c_cls)
    assert len(s.query_labels) + len(c.query_labels) == len(tuning_heldout.query_labels)
    assert split_halves(tuning_heldout, seed=4)[2] == s_cls
    assert split_halves(tuning_heldout, seed=5)[2] != s_cls
    # integer labels work too
    h = tuning_heldout.subset_classes(["c00", "c01", "c02"])
    h.query_labels = np.array([int(x[1:]) for x in h.query_labels])
    h.reference_labels = np.array([int(x[1:]) for x in h.reference_labels])
    s2, c2, *_ = split_halves(h)
    assert len(s2.query_labels) + len(c2.query_labels) == len(h.query_labels)


def test_gallery_problems_rank_each_half_against_every_reference_and_distractors(tuning_heldout):
    from tuning.search import SearchConfig, tuning_problems

    h = tuning_heldout
    n_ref, n_train = len(h.reference_labels), len(h.train[0])
    search, check, s_cls, c_cls = tuning_problems(h, SearchConfig(objective="gallery", distractors="references"))
    for problem, classes in ((search, s_cls), (check, c_cls)):
        assert set(problem.query_labels) == set(classes)
        assert len(problem.reference_labels) == 2 * n_ref                 # every reference + as many distractors
        assert set(problem.reference_labels[:n_ref]) == set(h.reference_labels)
        distractors = problem.reference_labels[n_ref:]
        assert not set(distractors) & set(h.query_labels) and len(set(distractors)) == n_ref
        for m in range(len(h.member_names)):                                  # the distractors are train images
            rows = {tuple(r) for r in np.round(h.train[m], 6)}
            assert all(tuple(r) in rows for r in np.round(problem.reference[m][n_ref:], 6))
    for objective in ("gallery", "folds"):
        assert len(tuning_problems(h, SearchConfig(objective=objective, distractors="all"))[0].reference_labels) \
            == n_ref + n_train
        assert len(tuning_problems(h, SearchConfig(objective=objective, distractors=0))[0].reference_labels) == n_ref
    assert not set(s_cls) & set(c_cls)
    halves = tuning_problems(h, SearchConfig(objective="halves"))[0]
    assert set(halves.reference_labels) == set(s_cls)
    assert halves.reference_labels.tolist() == split_halves(h)[0].reference_labels.tolist()
    # a gallery is harder than a self-contained half: the score cannot be higher
    post = PostProcessing()
    assert evaluate(search, post)["map_at_k"] <= evaluate(halves, post)["map_at_k"] + 1e-9


def test_a_saturated_study_warns_and_says_what_to_change(tuning_heldout):
    from tuning.search import split_warnings

    big = tuning_heldout
    assert not [w for w in split_warnings(big, [0.7, 0.8]) if "saturates" in w]
    saturated = [w for w in split_warnings(big, [0.5, 0.985]) if "saturates" in w]
    assert saturated and "--distractors all" in saturated[0] and "0.985" in saturated[0]


def test_cached_whitening_from_scaled_moments_is_the_direct_fit(tuning_heldout):
    """The cache's fit for any weights (one pass over the train rows, then scaled moments) whitens like a
    direct fit on the weighted concatenation."""
    from ensemble.combine import concatenate

    cache = WhiteningCache(tuning_heldout.train)
    for weights in ([1.0, 1.0], [0.9, 0.15], [0.05, 1.0]):
        post = PostProcessing(weights=weights, whiten=True, whiten_shrinkage=0.1)
        direct, cached = fit_whitening_for(tuning_heldout.train, post), cache.get(post)
        x = concatenate(tuning_heldout.query, weights)
        for dim, power in ((None, 1.0), (20, 0.5)):
            assert np.allclose(cached.apply(x, power=power, dim=dim), direct.apply(x, power=power, dim=dim),
                               atol=1e-4)
        assert np.allclose(cached.eigenvalues, direct.eigenvalues, rtol=1e-5, atol=1e-9)  # float32 weighting
