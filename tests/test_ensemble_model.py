"""Ensemble at inference: descriptors, unreadable queries/references, one real end-to-end run."""
import warnings

import numpy as np
import pytest
from _image_data import train_paths

from ensemble.combine import concatenate
from ensemble.members import open_member
from ensemble.model import Ensemble
from ensemble.postprocess import PostProcessing


def _ensemble(env, **kw):
    a = open_member(env.make_run("a", dim=8, seed=1), extractor=env.extractor)
    b = open_member(env.make_run("b", dim=5, seed=2), extractor=env.extractor)
    return Ensemble([a, b], **kw)


def _paths(env, ids):
    return [env.data / "train" / "train_data" / i for i in ids]


def test_describe_is_the_weighted_concatenation(ens_env):
    ens = _ensemble(ens_env, weights=[3.0, 1.0])
    paths = _paths(ens_env, ens_env.split.query_ids)
    desc, ok = ens.describe(paths)
    per_member = [m.describe(paths)[0] for m in ens.members]
    assert ok.all() and desc.shape == (len(paths), 13) and ens.output_dim() == 13
    assert np.allclose(desc, concatenate(per_member, [3.0, 1.0]), atol=1e-6)


def test_whitening_is_fitted_on_train_images_and_required(ens_env):
    with pytest.raises(ValueError, match="whitening"):
        _ensemble(ens_env, post=PostProcessing(whiten=True))
    ens = _ensemble(ens_env)
    ens.post = PostProcessing(whiten=True, whiten_dim=4)
    train = [p for p in train_paths(ens_env.data)
             if p.parent.name in ens_env.split.train_classes]
    ens.fit_whitening(train)
    desc, _ = ens.describe(_paths(ens_env, ens_env.split.query_ids))
    assert desc.shape[1] == 4 == ens.output_dim()
    assert np.allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)


def test_every_query_is_answered_and_unreadable_references_are_excluded(ens_env):
    ens = _ensemble(ens_env)
    queries = _paths(ens_env, ens_env.split.query_ids)
    refs = _paths(ens_env, ens_env.split.reference_ids)
    queries[0].write_bytes(b"broken")
    refs[1].write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranking = ens.rank(queries, refs, top_k=100)
    assert ranking.indices.shape == (len(queries), len(refs) - 1)
    assert ranking.unreadable_queries == [str(queries[0])]
    assert ranking.unreadable_references == [str(refs[1])]
    assert not (ranking.indices == 1).any() and (ranking.indices >= 0).all()
    for row in ranking.indices:
        assert sorted(row.tolist()) == [i for i in range(len(refs)) if i != 1]
    assert np.all(np.diff(ranking.scores, axis=1) <= 1e-6)


def test_end_to_end_with_a_real_tiny_backbone(ens_env, capsys):
    """train (1 step) -> python -m ensemble.build (the run's own split.json) -> refit -> load -> rank."""
    torch = pytest.importorskip("torch")
    train_mod = pytest.importorskip("backbones.train")
    from ensemble.build import main
    from ensemble.bundle import Bundle

    torch.manual_seed(0)
    split_path = ens_env.root / "split.json"
    ens_env.split.save(split_path)
    run = ens_env.root / "real_run"
    cfg = train_mod.TrainConfig(data=str(ens_env.data), out=str(run), arch="mobilenetv3_small_050", image_size=32,
                                classes_per_batch=2, images_per_class=2, epochs=1, embedding_dim=16, workers=0,
                                progress=False, split=str(split_path), device="cpu", val_batch_size=16, max_steps=1)
    train_mod.train(cfg)
    member = open_member(run)
    assert member.split_hash == ens_env.split.hash and member.dim == 16
    assert set(member.train_classes) == set(ens_env.split.train_classes)
    capsys.readouterr()
    assert main(["--members", str(run), "--data", str(ens_env.data), "--out", str(ens_env.root / "B"),
                 "--device", "cpu", "--batch-size", "16", "--no-progress"]) == 0
    n_train = 4 * len(ens_env.split.train_classes)
    assert f"{n_train} train / " in capsys.readouterr().out
    bundle = Bundle.load(ens_env.root / "B")
    bundle.set_postprocessing(PostProcessing(whiten=True, whiten_dim=8))
    loaded = Bundle.load(ens_env.root / "B")
    ens = loaded.ensemble(device="cpu")
    queries = _paths(ens_env, ens_env.split.query_ids)
    ranking = ens.rank(queries, _paths(ens_env, ens_env.split.reference_ids), top_k=5)
    assert ranking.indices.shape == (len(queries), min(5, len(ens_env.split.reference_ids)))
    # inference reproduces the member descriptors tuning saw (float16 storage aside)
    member_desc, ok = ens.member_descriptors(queries)
    assert ok.all() and np.allclose(member_desc[0], loaded.set_descriptors("query")[0], atol=2e-3)


def test_descriptors_are_normalised_where_read_and_where_whitened_only(ens_env, monkeypatch):
    """The package invariant: unit rows in, unit rows out; a member's rows are normalised once when read
    from a file, the whitening once after it changes the norms, and no step in between does it again."""
    import ensemble.combine as combine_mod
    from ensemble import cache, members, model, whitening
    from ensemble.members import FileMember
    from ensemble.postprocess import fit_whitening_for
    paths = _paths(ens_env, ens_env.split.query_ids + ens_env.split.reference_ids)
    files = []
    for name, d in (("a", 6), ("b", 3)):
        np.save(ens_env.root / f"{name}.npy", np.random.default_rng(d).normal(size=(len(paths), d)))
        (ens_env.root / f"{name}.txt").write_text("".join(f"{p.parent.name}/{p.name}\n" for p in paths))
        files.append(FileMember.from_file(ens_env.root / f"{name}.npy"))
    post = PostProcessing(whiten=True, whiten_power=0.5)
    ens = Ensemble(files, post=post, whitening=fit_whitening_for([m.describe(paths)[0] for m in files], post))
    calls = []
    real = combine_mod.l2_normalize
    for module in (members, model, whitening, cache, combine_mod):
        monkeypatch.setattr(module, "l2_normalize", lambda x, *a, **kw: (calls.append(len(x)), real(x, *a, **kw))[1])
    desc, ok = ens.describe(paths)
    assert calls == [len(paths)] * 3  # member a, member b, the whitening
    assert ok.all() and np.allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)


def test_a_chosen_diffusion_survives_the_checkpoint_format_and_ranks_as_rerank_diffusion(ens_env):
    from rerank import diffusion
    from rerank.pipeline import RerankParams

    chosen = PostProcessing(rerank=RerankParams(use_diffusion=True, diffusion_k=4, diffusion_alpha=0.9,
                                                diffusion_gamma=2.0))
    post = PostProcessing.from_dict(chosen.to_dict())          # as a bundle writes and reads it
    assert post == chosen and post.rerank.use_diffusion and not post.rerank.use_kreciprocal
    ens = _ensemble(ens_env, post=post)
    queries, refs = _paths(ens_env, ens_env.split.query_ids), _paths(ens_env, ens_env.split.reference_ids)
    ranking = ens.rank(queries, refs, top_k=5)
    query_desc, reference_desc = ens.describe(queries)[0], ens.describe(refs)[0]
    _, expected = diffusion(query_desc, reference_desc, k=4, alpha=0.9, gamma=2.0, top_k=5)
    plain = np.argsort(-(query_desc @ reference_desc.T), axis=1)[:, :5]
    assert np.array_equal(ranking.indices, expected)
    assert not np.array_equal(ranking.indices, plain)     # the re-ranker was applied, not a plain search
