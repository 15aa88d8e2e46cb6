"""tuning.folds, tuning.choice, tuning.space: the class-fold objective, the final choice, the sized space."""
import numpy as np
import optuna
import pytest
from _tuning_data import make_heldout

from competition.metrics import mean_average_precision, recall_at_k
from ensemble.postprocess import PostProcessing
from rerank.pipeline import RerankParams
from tuning.choice import Candidate, candidates, choose, paired_difference
from tuning.folds import FoldScores, class_sizes, fold_problem, make_folds, scored_classes
from tuning.objective import rank
from tuning.space import SearchSpace, boundary_notes, fit_space, sized_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_every_scored_class_is_in_exactly_one_fold_or_the_check_set():
    h = make_heldout(n_classes=20)
    folds = make_folds(h, n_folds=3, check_share=0.25, seed=1)
    everything = folds.fold_classes + list(folds.check)
    assert sorted(everything) == sorted(scored_classes(h).tolist()) and len(set(everything)) == len(everything)
    assert len(folds.folds) == 3 and len(folds.check) == 5                    # round(0.25 * 20)
    sizes = [sum(int(np.sum(h.query_labels == c)) for c in f) for f in folds.folds]
    assert max(sizes) - min(sizes) <= 3                                       # balanced by query count
    assert make_folds(h, 3, 0.25, seed=1) == folds and make_folds(h, 3, 0.25, seed=2) != folds
    few = make_folds(make_heldout(n_classes=3), n_folds=5, check_share=0.25)  # fewer classes than folds
    assert len(few.check) == 1 and len(few.folds) == 2 and all(len(f) == 1 for f in few.folds)
    with pytest.raises(Exception, match="at least 2 held-out classes"):
        make_folds(make_heldout(n_classes=1))


def test_fold_queries_meet_every_reference_and_distractors_relevant_to_none():
    h = make_heldout(n_classes=12)
    folds = make_folds(h, n_folds=2, check_share=0.25)
    n_ref, n_train = len(h.reference_labels), len(h.train[0])
    p = fold_problem(h, folds, distractors=n_ref, seed=0)
    assert set(p.data.query_labels) == set(folds.fold_classes) and p.rate == 1.0
    assert len(p.data.reference_labels) == 2 * n_ref <= n_ref + n_train
    assert set(p.data.reference_labels[:n_ref]) == set(h.reference_labels)   # check classes' references too
    assert not set(p.data.reference_labels[n_ref:]) & set(h.query_labels)     # distractors: relevant to no query
    for q, fold in zip(p.data.query_labels, p.query_fold):
        assert q in folds.folds[fold]
    full = fold_problem(h, folds, distractors=n_ref, seed=0, with_check=True)
    assert set(full.data.query_labels[full.query_fold < 0]) == set(folds.check)
    assert len(full.data.query_labels) == len(h.query_labels)


def test_fold_scores_are_per_fold_map_and_their_mean_against_the_metrics_module():
    h = make_heldout(n_classes=12)
    folds = make_folds(h, n_folds=3, check_share=0.25)
    p = fold_problem(h, folds, distractors=40, seed=0, with_check=True)
    idx = rank(p.data, PostProcessing(), k=1000)
    s = p.score(idx, k=1000)
    for f in range(3):
        rows = p.query_fold == f
        assert s.fold_maps[f] == pytest.approx(mean_average_precision(idx[rows], p.data.query_labels[rows],
                                                                      p.data.reference_labels, k=1000))
    check = p.query_fold < 0
    assert s.check_map == pytest.approx(mean_average_precision(idx[check], p.data.query_labels[check],
                                                               p.data.reference_labels, k=1000))
    assert s.recall_at_1 == pytest.approx(recall_at_k(idx[~check], p.data.query_labels[~check],
                                                      p.data.reference_labels, 1))
    assert s.value == pytest.approx(np.mean(s.fold_maps)) and s.spread == pytest.approx(np.std(s.fold_maps))


def test_a_large_split_is_sampled_by_whole_classes_with_the_same_distractor_density():
    h = make_heldout(n_classes=40, nr_per=10, n_train_classes=40)
    folds = make_folds(h, n_folds=2, check_share=0.25)
    whole = fold_problem(h, folds, distractors=400, seed=0)
    total = len(whole.data.query_labels) + len(whole.data.reference_labels)
    small = fold_problem(h, folds, distractors=400, seed=0, max_images=total // 2)
    assert 0.4 < small.rate < 0.6
    assert len(small.data.query_labels) + len(small.data.reference_labels) == pytest.approx(total / 2, rel=0.15)
    for c in set(small.data.query_labels):          # a kept class keeps all its queries and references
        assert np.sum(small.data.query_labels == c) == np.sum(h.query_labels == c)
        assert np.sum(small.data.reference_labels == c) == np.sum(h.reference_labels == c)
    distractors = lambda p: np.sum([str(x).startswith("\0") for x in p.data.reference_labels])  # noqa: E731
    assert distractors(small) / len(small.data.reference_labels) == pytest.approx(
        distractors(whole) / len(whole.data.reference_labels), abs=0.05)
    again = fold_problem(h, folds, distractors=400, seed=0, max_images=total // 2)
    assert again.data.query_labels.tolist() == small.data.query_labels.tolist()


def _candidate(trial, value, fold_maps, ap):
    scores = FoldScores(np.asarray(fold_maps, float), 0.5, np.asarray(ap, float), 0.9, 0.9)
    return Candidate(trial, {}, PostProcessing(rerank=RerankParams(dba_n=trial)), value, scores)


def test_the_final_choice_follows_its_rule_and_says_when_trials_are_tied():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, 200)
    steady = _candidate(1, 0.80, [0.70, 0.70, 0.70], base + 0.02)
    shaky = _candidate(2, 0.82, [0.60, 0.72, 0.84], base + 0.04)     # higher mean, larger spread
    lucky = _candidate(3, 0.85, [0.65, 0.65, 0.65], base)             # best in the study, worst re-scored
    by_mean = choose([steady, shaky, lucky], spread_weight=0.0)
    assert by_mean.chosen is shaky and [c.trial for c in by_mean.ranked] == [2, 1, 3]
    by_robust = choose([steady, shaky, lucky], spread_weight=1.0)
    assert by_robust.chosen is steady
    assert by_mean.differences[3][0] == pytest.approx(0.04) and by_mean.indistinguishable == []
    assert "beats each" in by_mean.summary()
    noisy = [_candidate(t, 0.8, [0.7, 0.7, 0.7], base + rng.normal(0, 0.05, 200)) for t in range(4)]
    tied = choose(noisy)
    assert sorted(tied.indistinguishable) == sorted(c.trial for c in tied.ranked[1:])
    assert "indistinguishable" in tied.summary()
    mean, se = paired_difference([1.0, 0.5, 0.2], [0.5, 0.5, 0.1])
    assert mean == pytest.approx(0.2) and se == pytest.approx(np.std([0.5, 0.0, 0.1], ddof=1) / np.sqrt(3))


def test_candidates_are_the_best_distinct_trials():
    study = optuna.create_study(direction="maximize")
    for value, n in ((0.5, 1), (0.9, 2), (0.9, 2), (0.7, 3), (0.8, 4)):
        study.enqueue_trial({"dba_n": n})
        study.optimize(lambda t: (t.suggest_int("dba_n", 0, 10), value)[1], n_trials=1)
    decode = lambda p: PostProcessing(rerank=RerankParams(dba_n=p["dba_n"]))  # noqa: E731
    got = candidates(study, 3, decode)
    assert [(n, v) for n, _, _, v in got] == [(1, 0.9), (4, 0.8), (3, 0.7)]   # trial 2 repeats trial 1


def test_the_space_follows_the_class_sizes_and_notes_a_best_on_its_edge():
    space = sized_space(SearchSpace(), images_per_class=72, references_per_class=54)
    assert space.k1_range == (12, 72) and space.k2_range == (1, 14) and space.max_dba_n == space.max_aqe_n == 18
    assert space.diffusion_k_range == (24, 144)
    small = sized_space(SearchSpace(), images_per_class=8, references_per_class=6)
    assert small.k1_range == (2, 20) and small.k2_range == (1, 6)             # the textbook k1, k2 inside
    assert small.max_dba_n == 3 and small.diffusion_k_range == (5, 20)
    assert fit_space(space, 10, 20).k1_range == (12, 29) and fit_space(space, 10, 20).max_dba_n == 18
    best = [{"k1": 70, "dba_n": 5}, {"k1": 72, "dba_n": 9}, {"k1": 40}]
    notes = boundary_notes(best, space)
    assert len(notes) == 1 and "k1 sits at the top of its range [12, 72] in 2 of the 3" in notes[0]
    assert boundary_notes([{"dba_n": 0}, {"dba_n": 0}], space) == []        # DBA off is no edge
    h = make_heldout(n_classes=6, nq_per=3, nr_per=10)
    assert class_sizes(h) == (13.0, 10.0)


def _separable(n_classes=8, per=6, d=16):
    """A held-out set every post-processing solves perfectly (one direction per class)."""
    from tuning.heldout import HeldoutSet
    eye = np.eye(d, dtype=np.float32)
    ql, rl, tl = (np.repeat(np.arange(n), k) for n, k in ((n_classes, 2), (n_classes, per), (d - n_classes, 4)))
    tl = tl + n_classes
    sets = [eye[lab] for lab in (ql, rl, tl)]
    names = np.array([f"c{i:02d}" for i in range(d)])
    return HeldoutSet(["a"], [sets[0]], [sets[1]], [sets[2]], names[ql], names[rl])


def test_a_too_small_or_saturated_folds_study_still_warns():
    from tuning.search import SearchConfig, run_search
    small = run_search(make_heldout(n_classes=5, nq_per=2), SearchConfig(n_trials=3))
    assert any("fewer than 20" in w for w in small.warnings)
    perfect = run_search(_separable(), SearchConfig(n_trials=3, distractors=0))
    assert any("every one of the 3 completed trials scored mAP@1000 1.0" in w for w in perfect.warnings)


def test_the_study_chooses_among_its_best_trials_re_scored_on_the_whole_split(tuning_heldout):
    from tuning.search import SearchConfig, run_search
    r = run_search(tuning_heldout, SearchConfig(n_trials=8, seed=2, final_top=4))
    rows = r.final["candidates"]
    assert 1 <= len(rows) <= 4 and sum(c["chosen"] for c in rows) == 1
    chosen = next(c for c in rows if c["chosen"])
    assert chosen["trial"] == r.best_trial and chosen["robust"] == max(c["robust"] for c in rows)
    assert r.best_value == pytest.approx(r.study.trials[r.best_trial].value)
    assert r.check_best["map_at_k"] == pytest.approx(chosen["check"])
    assert len(r.folds) == 3 and sorted(c for f in r.folds for c in f) == sorted(r.search_classes)
    one = run_search(tuning_heldout, SearchConfig(n_trials=8, seed=2, final_top=1))
    assert one.best_trial == max(one.study.trials, key=lambda t: t.value if t.value is not None else -1).number
