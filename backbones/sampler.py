"""P x K class-balanced batch sampler (P classes, K images each), seedable, resumable, DDP-aware.

The batches of an epoch are a deterministic function of (seed, epoch): a run
resumed at an epoch boundary sees exactly the batches an uninterrupted run sees.
With ``world_size`` > 1 every rank builds the same global list and takes the
disjoint slice ``batches[rank::world_size]`` (all ranks get the same count).
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class PKSampler(Sampler[list[int]]):
    """Yields batches (lists of dataset indices) of ``p`` classes x ``k`` images."""

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, batches_per_epoch: int | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size == 0:
            raise ValueError("PKSampler: no training images")
        self.by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        if p > len(self.by_class):
            log.warning("PKSampler: P=%d > %d classes; using P=%d", p, len(self.by_class), len(self.by_class))
            p = len(self.by_class)
        if p < 1 or k < 1:
            raise ValueError(f"PKSampler: P and K must be >= 1, got P={p}, K={k}")
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        total = batches_per_epoch or max(1, len(self.labels) // (self.p * self.k))
        self.global_batches = max(self.world_size, total - total % self.world_size)
        self.epoch = 0
        self.rng = np.random.default_rng([self.seed, self.epoch])

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (resets the RNG to (seed, epoch))."""
        self.epoch = int(epoch)
        self.rng = np.random.default_rng([self.seed, self.epoch])

    def _global_batches(self) -> list[list[int]]:
        rng = self.rng
        queues = [list(rng.permutation(ix)) for ix in self.by_class]
        batches = []
        for _ in range(self.global_batches):
            batch: list[int] = []
            for c in rng.choice(len(self.by_class), size=self.p, replace=False):
                for _ in range(self.k):
                    if not queues[c]:
                        queues[c] = list(rng.permutation(self.by_class[c]))
                    batch.append(int(queues[c].pop()))
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        self.rng = np.random.default_rng([self.seed, self.epoch])
        yield from self._global_batches()[self.rank::self.world_size]

    def __len__(self) -> int:
        return self.global_batches // self.world_size

    def state_dict(self) -> dict:
        """Plain-python state (loadable with ``torch.load(weights_only=True)``)."""
        return {"seed": self.seed, "epoch": self.epoch, "p": self.p, "k": self.k,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if (state["p"], state["k"]) != (self.p, self.k):
            raise ValueError(f"sampler state is for P={state['p']} K={state['k']}, not P={self.p} K={self.k}")
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))
        self.rng.bit_generator.state = state["rng"]
