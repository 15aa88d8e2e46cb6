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

