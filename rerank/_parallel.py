"""Run independent blocks of NumPy work on several threads.

NumPy, SciPy and faiss release the GIL inside their kernels, so threads run blocks in
parallel. While they do, the BLAS and OpenMP pools are held to one thread each (through
``threadpoolctl``; a GEMM per thread instead of one GEMM over all), and put back after.
The number of threads is the number the BLAS pool had: ``OPENBLAS_NUM_THREADS=1`` (or
``OMP_NUM_THREADS=1``) keeps all of rerank on one thread. The limits are process-wide:
while blocks run, BLAS calls of other threads (say, parallel tuning trials) get one
thread too.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from threadpoolctl import threadpool_info, threadpool_limits
from tqdm.auto import tqdm

__all__ = ["blas_threads", "run_blocks"]

T = TypeVar("T")
R = TypeVar("R")


def blas_threads() -> int:
    """Threads of the loaded BLAS pools (the smallest, at least 1)."""
    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return max(1, min(counts, default=1))


def run_blocks(work: Callable[[T], R], blocks: Iterable[T], workers: int, desc: str = "",
               progress: bool = False) -> Iterator[R]:
    """``work(block)`` for every block on ``workers`` threads; yields the results in order."""
    blocks = list(blocks)
    bar = tqdm(total=len(blocks), desc=desc, disable=not progress, leave=False)
    if workers <= 1 or len(blocks) <= 1:
        for block in blocks:
            yield work(block)
            bar.update()
        bar.close()
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(threadpool_limits(limits=1))
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers))
        for result in pool.map(work, blocks):
            yield result
            bar.update()
    bar.close()
