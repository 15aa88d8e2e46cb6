"""rerank.graph: the exact neighbour lists of queries and references, and their reuse."""

import numpy as np
import pytest
from _rerank_data import clustered

from rerank import diffusion, k_reciprocal, neighbour_graph
from rerank._topk import TopK


def _exact(x):
    """float64 squared distances (n, n)."""
    x64 = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    return sq[:, None] + sq[None, :] - 2.0 * x64 @ x64.T


def test_topk_by_rows_and_columns_equals_a_sort():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((300, 700)).astype(np.float32)
    want = np.sort(scores, axis=1)[:, ::-1][:, :25]
    by_rows = TopK(300, 25, spare=13)
    by_cols = TopK(300, 25, spare=0)
    for c0 in range(0, 700, 97):              # tiles of different widths, both orientations
        tile = scores[:, c0:c0 + 97]
        by_rows.add_rows(0, tile, c0)
        by_cols.add_columns(0, np.ascontiguousarray(tile.T), c0)
    for val, ids in (by_rows.sorted(), by_cols.sorted()):
        np.testing.assert_array_equal(val, want)
        np.testing.assert_array_equal(np.take_along_axis(scores, ids.astype(np.int64), axis=1), want)


def _assert_nearest(got, d2, bound):
    """``got`` (rows, k) are the rows' nearest by ``d2`` (float64 (rows, n)): ascending up to float32
    rounding, and exactly the nearest ``bound`` as a set (the float64 re-check at a boundary)."""
    at = np.take_along_axis(d2, got, axis=1)
    assert np.all(np.diff(at, axis=1) >= -1e-5)
    want = np.argsort(d2, axis=1, kind="stable")[:, :bound]
    assert all(set(a) == set(b) for a, b in zip(got[:, :bound].tolist(), want.tolist()))


@pytest.mark.parametrize("query_depth", [None, 120])   # 120: deep query lists (whole query rows)
def test_lists_match_brute_force(query_depth):
    x = clustered(900, d=24, n_clusters=40, seed=2)
    nq = 200
    g = neighbour_graph(x[:nq], x[nq:], depth=12, query_depth=query_depth, ref_depth=60, gemm_block=150,
                        workers=2)
    d2 = _exact(x)
    _assert_nearest(g.neighbours(12, [12]), d2, 12)
    qd = query_depth or 12
    _assert_nearest(g.query_neighbours(qd, qd), d2[:nq], qd)
    # the 60 nearest references, unordered (no float64 re-check: up to float32 rounding)
    got = np.take_along_axis(d2[:nq, nq:], g.ref_idx.astype(np.int64), axis=1)
    assert all(len(set(row)) == 60 for row in g.ref_idx.tolist())
    np.testing.assert_allclose(np.sort(got, axis=1), np.sort(d2[:nq, nq:], axis=1)[:, :60], atol=1e-5)
    np.testing.assert_allclose(g.rowmax, d2.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(d2[np.arange(len(x)), g.far], d2.max(axis=1), rtol=1e-6)


def test_threads_and_blocks_do_not_change_the_graph():
    x = clustered(700, d=16, seed=3)
    a = neighbour_graph(x[:150], x[150:], depth=9, ref_depth=40, workers=1)
    b = neighbour_graph(x[:150], x[150:], depth=9, ref_depth=40, workers=2, gemm_block=64)
    np.testing.assert_array_equal(a.neighbours(9, [9]), b.neighbours(9, [9]))
    np.testing.assert_array_equal(np.sort(a.ref_idx, axis=1), np.sort(b.ref_idx, axis=1))
    np.testing.assert_array_equal(a.far, b.far)


def test_a_prepared_graph_gives_the_same_result():
    x = clustered(800, d=16, n_clusters=30, seed=4)
    q, r = x[:150], x[150:]
    exact = neighbour_graph(q, r, depth=21, ref_depth=80)
    deeper = neighbour_graph(q, r, depth=60, query_depth=101, ref_depth=200)
    want = k_reciprocal(q, r, k1=20, k2=6, top_k=80)
    for g in (exact, deeper):
        got = k_reciprocal(q, r, k1=20, k2=6, top_k=80, graph=g)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    want = diffusion(q, r, k=15, truncate=100, top_k=80)
    got = diffusion(q, r, k=15, truncate=100, top_k=80, graph=deeper)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_a_graph_of_other_descriptors_or_too_shallow_is_refused():
    x = clustered(300, d=16, seed=5)
    q, r = x[:50], x[50:]
    g = neighbour_graph(q, r, depth=10, ref_depth=30)
    with pytest.raises(ValueError, match="graph was built for 50 queries"):
        k_reciprocal(q[:40], r, k1=5, k2=2, top_k=10, graph=g)
    other = q.copy()
    other[0] = other[1]                      # row 0 is among the sampled rows
    with pytest.raises(ValueError, match="other descriptors"):
        k_reciprocal(other, r, k1=5, k2=2, top_k=10, graph=g)
    with pytest.raises(ValueError, match=r"k_reciprocal needs a graph with depth >= 21, this one has 10"):
        k_reciprocal(q, r, k1=20, k2=6, top_k=10, graph=g)
    with pytest.raises(ValueError, match=r"needs a graph with ref_depth >= 40"):
        k_reciprocal(q, r, k1=5, k2=2, top_k=40, graph=g)
    with pytest.raises(ValueError, match=r"diffusion needs a graph with query_depth >= 21"):
        diffusion(q, r, k=5, truncate=20, top_k=10, graph=g)


@pytest.mark.parametrize("kw,match", [({"depth": 0}, "depth"), ({"depth": 2.5}, "depth"),
                                      ({"ref_depth": 0}, "ref_depth"), ({"query_depth": -1}, "query_depth"),
                                      ({"workers": 0}, "workers")])
def test_bad_graph_params(kw, match):
    x = clustered(60, d=8, seed=6)
    with pytest.raises(ValueError, match=match):
        neighbour_graph(x[:10], x[10:], **{"depth": 5, **kw})
