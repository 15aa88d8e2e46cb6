"""tuning.heldout: the held-out set a study works on, taken from a bundle's cached descriptors."""
import numpy as np

from ensemble.build import BuildOptions, build_bundle
from ensemble.members import open_member
from tuning.heldout import heldout_set


def _build(env, **opt):
    members = [open_member(env.make_run(n, dim=d, seed=s), extractor=env.extractor, cache_dir=env.root / "cache")
               for n, d, s in (("a", 8, 1), ("b", 5, 2))]
    bundle, _summary = build_bundle(members, env.data, env.split, env.root / "B", BuildOptions(progress=False, **opt))
    return bundle


def test_heldout_set_shapes_and_labels(ens_env):
    bundle = _build(ens_env, max_train_images=10)
    hs = heldout_set(bundle)
    split = ens_env.split
    assert hs.member_names == ["a", "b"]
    assert [q.shape for q in hs.query] == [(len(split.query_ids), 8), (len(split.query_ids), 5)]
    assert [r.shape for r in hs.reference] == [(len(split.reference_ids), 8), (len(split.reference_ids), 5)]
    assert [t.shape for t in hs.train] == [(10, 8), (10, 5)]
    assert hs.query_labels.tolist() == [i.split("/")[0] for i in split.query_ids]
    assert set(hs.reference_labels) == set(split.heldout_classes)
    assert not set(c.split("/")[0] for c in bundle.ids["train"]) & set(split.heldout_classes)
    assert np.allclose(np.linalg.norm(hs.query[0], axis=1), 1.0, atol=1e-6)


def test_the_gallery_objective_ranks_each_half_against_every_reference_and_distractors(tuning_heldout):
    from tuning.search import SearchConfig, split_halves, tuning_problems
    hs = tuning_heldout
    n_ref, n_train = len(hs.reference_labels), len(hs.train[0])
    search, check, search_classes, check_classes = tuning_problems(hs, SearchConfig(seed=0))
    assert set(search.query_labels) == set(search_classes) and set(check.query_labels) == set(check_classes)
    assert not set(search_classes) & set(check_classes)
    for part in (search, check):   # one gallery: every held-out reference + n_ref train-class distractors
        assert len(part.reference_labels) == n_ref + min(n_ref, n_train)
        assert part.reference_labels[:n_ref].tolist() == hs.reference_labels.tolist()
        extra = part.reference_labels[n_ref:]
        assert not set(extra) & set(hs.query_labels)            # relevant to no query
        rows = part.reference[0][n_ref:]                         # each one a train-class descriptor
        assert all(np.any(np.all(np.isclose(hs.train[0], r), axis=1)) for r in rows)
    every = tuning_problems(hs, SearchConfig(seed=0, distractors="all"))[0]
    assert len(every.reference_labels) == n_ref + n_train
    halves = tuning_problems(hs, SearchConfig(seed=0, objective="halves"))[0]
    assert halves.reference_labels.tolist() == split_halves(hs)[0].reference_labels.tolist()
    assert set(halves.reference_labels) == set(search_classes)
