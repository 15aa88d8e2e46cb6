"""rerank on faiss-gpu, checked on the CPU: a fake faiss-gpu keeps faiss' GPU limits.

The fake (fixture ``fake_gpu``) wraps CPU indexes and, like faiss' GPU indexes,
refuses ``k`` (and IVF ``nprobe``) above its selection limit (faiss'
``GPU_MAX_SELECTION_K``, 2048) and a ``StandardGpuResources`` used from a thread
other than the one that made it.  Every GPU result is compared with the CPU run.
"""

import importlib
import threading
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
from _rerank_data import clustered

import rerank.device as device_mod
from rerank import alpha_query_expansion, database_augmentation, diffusion, k_reciprocal, neighbour_graph, search

search_mod = importlib.import_module("rerank.search")   # (``rerank.search`` the attribute is the function)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a one-GPU fake faiss-gpu; returns its record (resources made, k searched)."""
    state = SimpleNamespace(max_k=2048, resources=[], searched_k=[])

    class FakeGpuResources:
        def __init__(self):
            self.thread = threading.get_ident()
            state.resources.append(self)

        def check_thread(self):
            if threading.get_ident() != self.thread:
                raise RuntimeError("StandardGpuResources used from a thread other than its creator's")

    class FakeGpuIndex:
        def __init__(self, res, index):
            self.res, self.index = res, faiss.clone_index(index)   # faiss copies to the GPU

        @property
        def ntotal(self):
            return self.index.ntotal

        def add(self, x):
            self.res.check_thread()
            self.index.add(x)

        def search(self, x, k):
            self.res.check_thread()
            if not 0 < k <= state.max_k:
                raise RuntimeError(f"GPU index only supports min/max-K selection up to "
                                   f"{state.max_k} (requested {k})")
            nprobe = getattr(self.index, "nprobe", 1)
            if not 0 < nprobe <= state.max_k:
                raise RuntimeError(f"GPU IVF index only supports nprobe selection up to "
                                   f"{state.max_k} (requested {nprobe})")
            state.searched_k.append(k)
            return self.index.search(x, k)

    def index_cpu_to_gpu(res, device, index, options=None):
        res.check_thread()
        if device != 0:
            raise RuntimeError(f"invalid device {device}")
        return FakeGpuIndex(res, index)

    def set_limit(k):
        """A faiss build with another limit, and rerank told about it."""
        state.max_k = k
        monkeypatch.setattr(device_mod, "FAISS_GPU_MAX_K", k, raising=False)

    monkeypatch.setattr(faiss, "StandardGpuResources", FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(device_mod, "_visible_gpus", lambda: 1)
    # fresh resources for this test (none left from another test's fake)
    monkeypatch.setattr(device_mod, "_THREAD", threading.local(), raising=False)
    monkeypatch.setattr(search_mod, "_GPU_RES", None, raising=False)
    state.set_limit = set_limit
    return state


def assert_same_ranking(q, r, got, want, atol=1e-5):
    """``got`` equals ``want`` (scores, ids): the same scores, each id carrying its own
    score (so ids can differ only between equal scores), and ids almost all equal."""
    (gs, gi), (ws, wi) = got, want
    assert gs.shape == ws.shape and gi.dtype == np.int64
    np.testing.assert_allclose(gs, ws, atol=atol, rtol=0)
    exact = q.astype(np.float64) @ r.astype(np.float64).T
    np.testing.assert_allclose(np.take_along_axis(exact, gi, axis=1), ws, atol=atol, rtol=0)
    assert (gi == wi).mean() > 0.99


def test_full_ranking_on_gpu_equals_cpu(fake_gpu, monkeypatch):
    x = clustered(3050, d=16, seed=4)
    q, r = x[:40], x[40:]          # 3,010 references: k above the 2048 limit
    monkeypatch.setattr(search_mod, "_MERGE_ENTRIES", 3 * 3010 + 5, raising=False)   # 3 rows a merge
    cpu = search(q, r, len(r))
    gpu = search(q, r, len(r), device="cuda", batch_size=16)
    assert_same_ranking(q, r, gpu, cpu)
    assert all(sorted(row) == list(range(len(r))) for row in gpu[1].tolist())
    assert fake_gpu.searched_k and max(fake_gpu.searched_k) <= 2048


def test_shallow_search_on_gpu_uses_one_index(fake_gpu):
    x = clustered(3050, d=16, seed=5)
    q, r = x[:40], x[40:]
    gpu = search(q, r, 100, device="cuda")
    assert_same_ranking(q, r, gpu, search(q, r, 100))
    assert fake_gpu.searched_k == [100]


def test_deep_dba_and_aqe_on_gpu_equal_cpu(fake_gpu):
    fake_gpu.set_limit(64)
    x = clustered(700, d=16, seed=6)
    q, r = x[:50], x[50:]
    dba = database_augmentation(r, 100, device="cuda")
    np.testing.assert_allclose(dba, database_augmentation(r, 100), atol=1e-5)
    aqe = alpha_query_expansion(q, dba, 100, alpha=1.0, device="cuda")
    np.testing.assert_allclose(aqe, alpha_query_expansion(q, dba, 100, alpha=1.0), atol=1e-5)
    assert fake_gpu.searched_k and max(fake_gpu.searched_k) <= 64


def test_kreciprocal_on_gpu_equals_cpu(fake_gpu):
    fake_gpu.set_limit(32)           # neighbour lists of k1 + 9 = 39 > 32
    x = clustered(500, d=16, seed=7)
    q, r = x[:60], x[60:]
    gd, gi = k_reciprocal(q, r, k1=30, k2=6, top_k=50, device="cuda")
    cd, ci = k_reciprocal(q, r, k1=30, k2=6, top_k=50)
    np.testing.assert_allclose(gd, cd, atol=1e-5)
    assert (gi == ci).mean() > 0.99
    assert fake_gpu.searched_k and max(fake_gpu.searched_k) <= 32


def test_graph_and_diffusion_on_gpu_equal_cpu(fake_gpu):
    fake_gpu.set_limit(32)           # lists of 20 + 9, queries 50 + 9 deep, 40 references: some sharded
    x = clustered(500, d=16, seed=10)
    q, r = x[:60], x[60:]
    gpu = neighbour_graph(q, r, depth=21, query_depth=51, ref_depth=40, device="cuda")
    cpu = neighbour_graph(q, r, depth=21, query_depth=51, ref_depth=40)
    assert (gpu.neighbours(21, [21]) == cpu.neighbours(21, [21])).mean() > 0.99
    assert (gpu.query_neighbours(51, 51) == cpu.query_neighbours(51, 51)).mean() > 0.99
    np.testing.assert_allclose(np.sort(gpu.ref_ip, axis=1), np.sort(cpu.ref_ip, axis=1), atol=1e-5)
    np.testing.assert_allclose(gpu.rowmax, cpu.rowmax, rtol=1e-6)
    gs, gi = diffusion(q, r, k=20, truncate=50, top_k=40, device="cuda")
    cs, ci = diffusion(q, r, k=20, truncate=50, top_k=40)
    np.testing.assert_allclose(gs, cs, atol=1e-5)
    assert (gi == ci).mean() > 0.99
    assert fake_gpu.searched_k and max(fake_gpu.searched_k) <= 32


def test_ivf_on_gpu_above_the_limit_equals_cpu(fake_gpu):
    fake_gpu.set_limit(64)
    x = clustered(3100, d=16, seed=8)
    q, r = x[:30], x[30:]            # 3,070 refs -> 76 IVF cells
    deep = search(q, r, 100, device="cuda", index="ivf", nprobe=8)        # k above the limit
    assert_same_ranking(q, r, deep, search(q, r, 100, index="ivf", nprobe=8))
    assert fake_gpu.searched_k and max(fake_gpu.searched_k) <= 64
    fake_gpu.searched_k.clear()
    with pytest.warns(RuntimeWarning, match="nprobe 70 exceeds"):       # nprobe cannot be split
        wide = search(q, r, 10, device="cuda", index="ivf", nprobe=70)
    assert_same_ranking(q, r, wide, search(q, r, 10, index="ivf", nprobe=70))
    assert fake_gpu.searched_k == []


def test_each_thread_gets_its_own_gpu_resources(fake_gpu):
    x = clustered(2600, d=16, seed=9)
    q, r = x[:100], x[100:]
    search(q, r, 10)
    assert fake_gpu.resources == []                  # the CPU makes none, nor does import
    want = search(q, r, 2200)
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results, errors, idents = {}, [], set()

    def work(t):
        try:
            idents.add(threading.get_ident())
            barrier.wait(timeout=30)
            rows = slice(25 * t, 25 * t + 25)
            search(q[rows], r, 10, device="cuda")                   # one index ...
            results[t] = (rows, search(q[rows], r, 2200, device="cuda"))   # ... and shards
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(fake_gpu.resources) == n_threads          # one per thread, reused within it
    assert {res.thread for res in fake_gpu.resources} == idents
    for rows, got in results.values():
        assert_same_ranking(q[rows], r, got, (want[0][rows], want[1][rows]))
