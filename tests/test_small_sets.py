"""Inference on a set smaller than the tuned parameters assume: ranked, with one warning, never refused."""
import numpy as np
import pytest
from _image_data import train_paths

from ensemble.members import open_member
from ensemble.model import Ensemble
from ensemble.postprocess import PostProcessing
from rerank import RerankParams


def test_a_tuned_bundle_ranks_two_queries_against_four_references(ens_env):
    members = [open_member(ens_env.make_run(name, dim=8, seed=seed), extractor=ens_env.extractor)
               for name, seed in (("a", 1), ("b", 2))]
    tuned = RerankParams(dba_n=10, aqe_n=10, use_kreciprocal=True, k1=33, k2=6)
    ens = Ensemble(members, post=PostProcessing(rerank=tuned))
    images = train_paths(ens_env.data)[:6]
    with pytest.warns(UserWarning, match=r"k1 33 -> 5, k2 6 -> 5 for 2 queries \+ 4 references"):
        ranking = ens.rank(images[:2], images[2:], top_k=1000)
    assert ranking.indices.shape == (2, 4)
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in ranking.indices)
    assert np.all(np.diff(ranking.scores, axis=1) <= 1e-6)
