"""Per-channel standardization fitted on observed training entries only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def mean_std_from_moments(
    count: np.ndarray, total: np.ndarray, sq: np.ndarray, min_std: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and deviation (float64) of entries given their count, sum and sum of
    squares; a channel with no entries gets 0 / 1, one with fewer than two or no spread std 1."""
    count = np.asarray(count, dtype=np.float64)
    safe = np.maximum(count, 1.0)
    mean = np.where(count > 0, np.asarray(total, dtype=np.float64) / safe, 0.0)
    std = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64) / safe - mean**2, 0.0))
    return mean, np.where((count > 1) & (std > min_std), std, 1.0)


@dataclass(frozen=True)
class ChannelNormalizer:
    """Per-channel mean and standard deviation, shape (F,), and the observed entries behind them."""

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray | None = None

    @classmethod
    def fit(cls, x: np.ndarray, observed: np.ndarray, min_std: float = 1e-6) -> ChannelNormalizer:
        """Statistics of the observed entries of (N, F, L) training arrays; unseen channels get 0 / 1."""
        count = observed.sum(axis=(0, 2)).astype(np.float64)
        total = np.where(observed, x, 0.0).sum(axis=(0, 2), dtype=np.float64)
        safe = np.maximum(count, 1.0)
        mean = total / safe
        sq = np.where(observed, (x - mean[None, :, None]) ** 2, 0.0).sum(axis=(0, 2), dtype=np.float64)
        std = np.sqrt(sq / safe)
        mean = np.where(count > 0, mean, 0.0)
        std = np.where((count > 1) & (std > min_std), std, 1.0)
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32), count=count)

    @classmethod
    def pool(cls, parts: list[ChannelNormalizer], min_std: float = 1e-6) -> ChannelNormalizer:
        """The statistics of the union of the parts' data, from their counts, means and deviations.

        This is how a federation gets global statistics without pooling records: each silo
        contributes only its per-channel (count, mean, std).
        """
        if not parts or any(p.count is None for p in parts):
            raise ValueError("pooling needs at least one normalizer, each with per-channel counts")
        counts = np.stack([p.count for p in parts]).astype(np.float64)
        means = np.stack([p.mean for p in parts]).astype(np.float64)
        var = np.stack([p.std for p in parts]).astype(np.float64) ** 2
        total = counts.sum(axis=0)
        mean, std = mean_std_from_moments(
            total, (counts * means).sum(axis=0), (counts * (var + means**2)).sum(axis=0), min_std
        )
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32), count=total)

    def apply(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """Standardize observed entries; unobserved ones stay 0.0."""
        z = (x - self.mean[None, :, None]) / self.std[None, :, None]
        return np.where(observed, z, np.float32(0.0)).astype(np.float32)

    def invert(self, z: np.ndarray) -> np.ndarray:
        """Back to source units (every entry, imputed ones included)."""
        return (z * self.std[None, :, None] + self.mean[None, :, None]).astype(np.float32)
