"""Descriptor cache: incremental extraction, unreadable bookkeeping, chunking."""
import json
import os
import shutil

import numpy as np
import pytest
from _image_data import train_paths as _paths

from ensemble.cache import DescriptorCache, cached_describe


def _cache(env, folder="c", fp="fp1", settings=None, chunk_rows=8192):
    run = env.make_run("r")
    extract = lambda ps: env.extractor(run, ps)  # noqa: E731
    return DescriptorCache(env.root / folder, fp, settings or {"flip": False}, chunk_rows), extract


def test_cache_extracts_only_new_or_changed_images(ens_env):
    paths = _paths(ens_env.data)
    cache, extract = _cache(ens_env)
    first = cache.get(paths, extract)
    assert (first.extracted, first.reused) == (len(paths), 0) and first.ok.all()
    direct, _ = extract(paths)
    assert first.desc.dtype == np.float32 and np.allclose(first.desc, direct, atol=2e-3)

    n_images = len(ens_env.extractor.images)
    again = DescriptorCache(ens_env.root / "c", "fp1", {"flip": False}).get(paths, extract)
    assert again.extracted == 0 and again.reused == len(paths)
    assert np.array_equal(again.desc, first.desc)
    assert len(ens_env.extractor.images) == n_images  # no extractor call at all

    # touch one (new mtime), replace another with different pixels
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    shutil.copyfile(paths[-1], paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    res = cache.get(paths, extract)
    assert res.extracted == 2 and sorted(ens_env.extractor.images[n_images:]) == sorted(map(str, paths[:2]))
    assert np.allclose(res.desc[1], res.desc[-1], atol=2e-3)  # the replaced image got its new descriptor

    # add one, remove one
    new = paths[0].parent / "new.jpg"
    shutil.copyfile(paths[5], new)
    n_images = len(ens_env.extractor.images)
    asked = [new] + paths[1:]  # paths[0] no longer asked for
    res = cache.get(asked, extract)
    assert (res.extracted, res.dropped) == (1, 1) and ens_env.extractor.images[n_images:] == [str(new)]
    assert np.allclose(res.desc[0], res.desc[5], atol=2e-3)  # order as asked
    manifest = json.loads((ens_env.root / "c" / "manifest.json").read_text())
    assert len(manifest["entries"]) == len(asked)


def test_unreadable_images_are_recorded_and_not_retried_until_changed(ens_env):
    paths = _paths(ens_env.data)
    paths[2].write_bytes(b"not an image")
    cache, extract = _cache(ens_env)
    with pytest.warns(UserWarning):
        res = cache.get(paths, extract)
    assert not res.ok[2] and res.ok.sum() == len(paths) - 1 and len(res.desc) == len(paths) - 1
    assert res.unreadable == [str(paths[2])]
    n_images = len(ens_env.extractor.images)
    with pytest.warns(UserWarning, match="unreadable"):
        res = cache.get(paths, extract)
    assert res.extracted == 0 and len(ens_env.extractor.images) == n_images and not res.ok[2]
    shutil.copyfile(paths[3], paths[2])  # fixed: new size/mtime -> retried
    res = cache.get(paths, extract)
    assert res.extracted == 1 and res.ok.all()


def test_chunks_are_bounded_and_compacted(ens_env):
    paths = _paths(ens_env.data)  # 24 images
    cache, extract = _cache(ens_env, chunk_rows=5)
    full = cache.get(paths, extract)
    chunks = sorted((ens_env.root / "c").glob("chunk_*.npy"))
    assert len(chunks) == 5 and all(len(np.load(c)) <= 5 for c in chunks)
    assert all(np.load(c).dtype == np.float16 for c in chunks)
    few = cache.get(paths[::6], extract)  # 4 left: dead rows outnumber live ones -> compacted
    assert few.extracted == 0 and np.array_equal(few.desc, full.desc[::6])
    assert len(list((ens_env.root / "c").glob("chunk_*.npy"))) == 1


def test_other_weights_or_tta_invalidate_the_cache(ens_env):
    paths = _paths(ens_env.data)[:5]
    cache, extract = _cache(ens_env)
    cache.get(paths, extract)
    run = ens_env.make_run("r")
    res = cached_describe(ens_env.root / "c", paths, lambda ps: ens_env.extractor(run, ps),
                          fingerprint="fp2", settings={"flip": False})
    assert res.extracted == 5
    res = cached_describe(ens_env.root / "c", paths, lambda ps: ens_env.extractor(run, ps),
                          fingerprint="fp2", settings={"flip": True})
    assert res.extracted == 5
    res = cached_describe(ens_env.root / "c", paths, lambda ps: ens_env.extractor(run, ps),
                          fingerprint="fp2", settings={"flip": True})
    assert res.extracted == 0
