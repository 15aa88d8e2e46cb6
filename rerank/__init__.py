"""Re-ranking for image retrieval: exact/approximate kNN, alpha-QE, DBA, k-reciprocal, diffusion.

All functions take float32 ``(n, d)`` L2-normalised descriptors (other float
dtypes are converted, non-unit rows are normalised with a warning) and return
rankings best first.  See :func:`rerank` for the composed pipeline.

The two re-rankers share one contract: ``k_reciprocal(query_desc, ref_desc, ...)``
and ``diffusion(query_desc, ref_desc, k=50, alpha=0.99, gamma=3.0, top_k=1000,
truncate=DEFAULT_TRUNCATE, device="cpu", progress=None, graph=None)`` return
``(scores, indices)``, both ``(nq, top_k)``, ``indices`` int64 into ``ref_desc`` best
first (k-reciprocal's scores are distances, smaller is better; diffusion's are
diffusion values, higher is better). Both treat queries and references as one set
of ``N = nq + nr`` images and start from its exact kNN graph, which
``neighbour_graph(query_desc, ref_desc, depth, ...)`` computes once: pass it as
``graph=`` to skip that pass (tuning: many trials on the same descriptors); the
result is the same as without it.
"""

from .device import resolve_device
from .diffusion import DEFAULT_TRUNCATE, diffusion
from .expansion import alpha_query_expansion, database_augmentation
from .graph import NeighbourGraph, neighbour_graph
from .kreciprocal import k_reciprocal
from .pipeline import RerankParams, rerank
from .search import search

__all__ = [
    "DEFAULT_TRUNCATE",
    "NeighbourGraph",
    "RerankParams",
    "alpha_query_expansion",
    "database_augmentation",
    "diffusion",
    "k_reciprocal",
    "neighbour_graph",
    "rerank",
    "resolve_device",
    "search",
]
