"""Re-ranking for image retrieval: exact/approximate kNN, alpha-QE, DBA, k-reciprocal.

All functions take float32 ``(n, d)`` L2-normalised descriptors (other float
dtypes are converted, non-unit rows are normalised with a warning) and return
rankings best first.  See :func:`rerank` for the composed pipeline.
"""

from .device import resolve_device
from .expansion import alpha_query_expansion, database_augmentation
from .kreciprocal import k_reciprocal
from .pipeline import RerankParams, rerank
from .search import search

__all__ = [
    "RerankParams",
    "alpha_query_expansion",
    "database_augmentation",
    "k_reciprocal",
    "rerank",
    "resolve_device",
    "search",
]
