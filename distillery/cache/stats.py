"""Exact per-dimension feature statistics, mergeable across batches, shards and writers.

Each image shard's writer keeps (count, mean, M2) per dimension in float64 and stores them with the
shard; the store merges them in shard order (Chan et al.'s pairwise update), so the dataset mean and std
are exact over the whole cache and identical however the shards were split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def mean_and_m2(values: torch.Tensor) -> torch.Tensor:
    """[2, D] float64, on the values' device: the mean and the M2 of the rows of `values` [..., D]."""
    rows = values.detach().to(torch.float64).reshape(-1, values.shape[-1])
    mean = rows.mean(0)
    return torch.stack([mean, ((rows - mean) ** 2).sum(0)])


@dataclass
class Moments:
    count: float
    mean: np.ndarray  # [D] float64
    m2: np.ndarray  # [D] float64, sum of squared deviations from the mean

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0.0, np.zeros(dim), np.zeros(dim))

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        """Moments of the rows of `values` [..., D]."""
        count = values.numel() // values.shape[-1]
        if count == 0:
            return cls.empty(values.shape[-1])
        mean, m2 = mean_and_m2(values).cpu().numpy()
        return cls(float(count), mean, m2)

    def merge(self, other: Moments) -> Moments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per dimension."""
        return np.sqrt(self.m2 / max(self.count, 1.0))

    def to_array(self) -> np.ndarray:
        """[3, D] float64: count (broadcast), mean, M2, the layout of the store's partial-stats arrays."""
        return np.stack([np.full_like(self.mean, self.count), self.mean, self.m2])

    @classmethod
    def from_array(cls, array: np.ndarray) -> Moments:
        return cls(float(array[0, 0]), np.asarray(array[1], np.float64), np.asarray(array[2], np.float64))
