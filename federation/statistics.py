"""The federation's data statistics, summed once before round 0: channel moments and class counts.

Every silo of a run should scale its inputs the same way and weigh classes by the federation's
class balance, not by its own (issue 12, items 3 and 4). So before the first round each connected
silo sends sums over its training split, and the coordinator pools them:

- per channel, the number of entries that stay visible after any simulated hiding, their sum
  and their sum of squares: the pooled normalizer, exactly;
- per class, the number of training records: the pooled class counts.

In plain aggregation a silo sends these sums in a metrics report; in secure aggregation they go
through the secure sum (a vector laid out by :class:`StatisticsLayout`), so the coordinator learns
only the totals. They are summed once, over the silos connected when the run starts, and then
fixed for the run: summing the same static figures again over another set of silos would single
out a silo by difference. The pooled result (:class:`PooledStatistics`) travels to silos in every
training and evaluation task's round settings and is kept in the coordinator's checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from condi_models.data.dataset import DatasetInfo
from condi_models.data.normalize import ChannelNormalizer, mean_std_from_moments
from federation.secagg.quantize import QuantConfig

# Sums of squares of raw signals are large (a channel's 10^6 entries at 10^2 give 10^10), so the
# ring keeps fewer fraction bits than the metrics vector: 2^42 x 2^8 leaves 2^13 silos of headroom
# in 64 bits.
STATISTICS_CLIP = float(2**42)
STATISTICS_QUANT = QuantConfig(clip_bound=STATISTICS_CLIP, frac_bits=8, ring_bits=64)


class StatisticsError(ValueError):
    """Statistics that cannot be used or sent; the message names the field."""


@dataclass(frozen=True)
class StatisticsLayout:
    """Where each sum sits in a silo's statistics vector."""

    n_features: int
    n_classes: int

    @classmethod
    def of(cls, info: DatasetInfo) -> StatisticsLayout:
        """The layout for a run's data layout."""
        return cls(n_features=info.n_features, n_classes=len(info.classes))

    @property
    def vector_length(self) -> int:
        """Count, sum and sum of squares per channel, then one count per class."""
        return 3 * self.n_features + self.n_classes


@dataclass(frozen=True)
class SiloStatistics:
    """One silo's sums over its training split."""

    channel_count: np.ndarray  # (F,) visible entries per channel
    channel_sum: np.ndarray  # (F,)
    channel_sq_sum: np.ndarray  # (F,)
    class_counts: np.ndarray  # (C,) training records per class

    @classmethod
    def of(cls, normalizer: ChannelNormalizer, labels: np.ndarray, n_classes: int) -> SiloStatistics:
        """The sums behind a fitted normalizer (its counts, means and deviations) and the labels."""
        if normalizer.count is None:
            raise StatisticsError("the normalizer has no per-channel counts")
        count = np.asarray(normalizer.count, dtype=np.float64)
        mean = np.asarray(normalizer.mean, dtype=np.float64)
        std = np.asarray(normalizer.std, dtype=np.float64)
        # A channel with fewer than two entries has std set to 1 by the fit; its spread is 0.
        var = np.where(count > 1, std**2, 0.0)
        return cls(
            channel_count=count,
            channel_sum=count * mean,
            channel_sq_sum=count * (var + mean**2),
            class_counts=np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64),
        )

    @classmethod
    def from_vector(cls, layout: StatisticsLayout, vector: np.ndarray) -> SiloStatistics:
        """The sums a statistics vector (or the secure sum of several) holds; counts are rounded."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (layout.vector_length,):
            raise StatisticsError(f"statistics sum: expected {layout.vector_length} entries, got {vector.shape}")
        f = layout.n_features
        return cls(np.rint(vector[:f]), vector[f : 2 * f], vector[2 * f : 3 * f], np.rint(vector[3 * f :]))

    def to_dict(self) -> dict[str, list[float]]:
        """The JSON form of a plain report."""
        return {
            "channel_count": self.channel_count.tolist(),
            "channel_sum": self.channel_sum.tolist(),
            "channel_sq_sum": self.channel_sq_sum.tolist(),
            "class_counts": self.class_counts.tolist(),
        }

    def to_vector(self, layout: StatisticsLayout) -> np.ndarray:
        """The float64 vector a silo contributes to the secure sum; refuses what would be clipped."""
        vector = np.concatenate([self.channel_count, self.channel_sum, self.channel_sq_sum, self.class_counts])
        if vector.shape != (layout.vector_length,):
            raise StatisticsError(
                f"statistics vector: {vector.size} entries, the layout of {layout.n_features} channels and "
                f"{layout.n_classes} classes has {layout.vector_length}"
            )
        if not np.all(np.isfinite(vector)):
            raise StatisticsError("statistics vector: NaN or infinite sums; refusing to send them")
        big = int(np.sum(np.abs(vector) > STATISTICS_CLIP))
        if big:
            raise StatisticsError(
                f"statistics vector: {big} sums exceed the secure-sum bound {STATISTICS_CLIP:g}; "
                "they would be clipped"
            )
        return vector


def check_statistics_report(data: Any, layout: StatisticsLayout, where: str, *, max_records: int) -> SiloStatistics:
    """A silo's plain statistics report, checked: shapes from the run's layout, finite values, whole
    non-negative counts, at most ``max_records`` records, and sums a real data set could have."""
    if not isinstance(data, Mapping):
        raise StatisticsError(f"{where}: expected an object")
    wanted = {"channel_count": layout.n_features, "channel_sum": layout.n_features,
              "channel_sq_sum": layout.n_features, "class_counts": layout.n_classes}
    unknown = sorted(set(data) - set(wanted))
    if unknown:
        raise StatisticsError(f"{where}: unknown keys {unknown}")
    arrays = {}
    for key, size in wanted.items():
        value = data.get(key)
        arr = np.asarray(value, dtype=np.float64) if isinstance(value, list) and len(value) == size else None
        if arr is None or arr.shape != (size,) or not np.all(np.isfinite(arr)):
            raise StatisticsError(f"{where}.{key}: expected {size} finite numbers")
        arrays[key] = arr
    sums = SiloStatistics(**arrays)
    _check_sums(sums, where, max_records)
    return sums


def _check_sums(sums: SiloStatistics, where: str, max_records: int) -> None:
    """Whole non-negative counts, 1 to ``max_records`` records, sums a real data set could have."""
    for key in ("channel_count", "class_counts"):
        arr = getattr(sums, key)
        if np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise StatisticsError(f"{where}.{key}: expected whole numbers >= 0")
    records = float(sums.class_counts.sum())
    if not 1 <= records <= max_records:
        raise StatisticsError(f"{where}.class_counts: {records:g} records, expected 1 to {max_records}")
    count, total, sq = sums.channel_count, sums.channel_sum, sums.channel_sq_sum
    # Cauchy-Schwarz: sum^2 <= count * sum of squares holds for any real entries.
    if np.any(sq < 0) or np.any(total**2 > count * sq * (1 + 1e-9) + 1e-9):
        raise StatisticsError(f"{where}: channel sums no data set could have (sum^2 > count x sum of squares)")


@dataclass(frozen=True)
class PooledStatistics:
    """The federation's statistics, fixed for the run: the pooled normalizer and class counts."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_count: tuple[float, ...]
    class_counts: tuple[int, ...]
    silos: int

    @classmethod
    def from_sums(
        cls, count: np.ndarray, total: np.ndarray, sq: np.ndarray, class_counts: np.ndarray, silos: int
    ) -> PooledStatistics:
        """Mean and deviation per channel from the summed moments; unseen channels get 0 / 1."""
        count = np.maximum(np.asarray(count, dtype=np.float64), 0.0)
        mean, std = mean_std_from_moments(count, total, sq)
        return cls(
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            channel_count=tuple(float(round(v)) for v in count),
            class_counts=tuple(int(round(max(v, 0.0))) for v in class_counts),
            silos=silos,
        )

    @classmethod
    def pool(cls, parts: Sequence[SiloStatistics]) -> PooledStatistics:
        """The statistics of the silos' plain reports together."""
        if not parts:
            raise StatisticsError("no silo reported statistics")
        return cls.from_sums(
            sum(p.channel_count for p in parts),
            sum(p.channel_sum for p in parts),
            sum(p.channel_sq_sum for p in parts),
            sum(p.class_counts for p in parts),
            len(parts),
        )

    @classmethod
    def from_total(
        cls, layout: StatisticsLayout, total: np.ndarray, silos: int, *, max_records: int
    ) -> PooledStatistics:
        """The statistics from the unmasked secure sum of ``silos`` statistics vectors, each of at
        most ``max_records`` records; only the sum exists, so it is checked as a report would be."""
        sums = SiloStatistics.from_vector(layout, total)
        _check_sums(sums, "the summed statistics", silos * max_records)
        return cls.from_sums(sums.channel_count, sums.channel_sum, sums.channel_sq_sum, sums.class_counts, silos)

    @property
    def normalizer(self) -> ChannelNormalizer:
        """The pooled normalizer every silo scales its data with."""
        return ChannelNormalizer(
            mean=np.asarray(self.mean, dtype=np.float32),
            std=np.asarray(self.std, dtype=np.float32),
            count=np.asarray(self.channel_count, dtype=np.float64),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, in round settings and the coordinator's checkpoint."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_count": list(self.channel_count),
            "class_counts": list(self.class_counts),
            "silos": self.silos,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> PooledStatistics:
        """Parse and check the JSON form; ``where`` names the document in errors."""
        if not isinstance(data, Mapping) or sorted(data) != sorted(
            ("mean", "std", "channel_count", "class_counts", "silos")
        ):
            raise StatisticsError(f"{where}: expected an object with mean, std, channel_count, class_counts, silos")
        lists = {}
        for key in ("mean", "std", "channel_count", "class_counts"):
            value = data[key]
            if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                raise StatisticsError(f"{where}.{key}: expected a list of finite numbers")
            lists[key] = value
        if not len(lists["mean"]) == len(lists["std"]) == len(lists["channel_count"]):
            raise StatisticsError(f"{where}: mean, std and channel_count must have one entry per channel")
        if any(v <= 0 for v in lists["std"]) or any(v < 0 for v in lists["channel_count"]):
            raise StatisticsError(f"{where}: std must be > 0 and channel counts >= 0")
        if any(v < 0 or v != int(v) for v in lists["class_counts"]):
            raise StatisticsError(f"{where}.class_counts: expected whole numbers >= 0")
        silos = data["silos"]
        if not isinstance(silos, int) or isinstance(silos, bool) or silos < 1:
            raise StatisticsError(f"{where}.silos: expected a positive whole number")
        return cls(
            mean=tuple(float(v) for v in lists["mean"]),
            std=tuple(float(v) for v in lists["std"]),
            channel_count=tuple(float(v) for v in lists["channel_count"]),
            class_counts=tuple(int(v) for v in lists["class_counts"]),
            silos=silos,
        )

    def check_layout(self, n_features: int, n_classes: int, where: str) -> None:
        """Refuse statistics of another data layout."""
        if len(self.mean) != n_features or len(self.class_counts) != n_classes:
            raise StatisticsError(
                f"{where}: statistics of {len(self.mean)} channels and {len(self.class_counts)} classes, "
                f"the run's layout has {n_features} and {n_classes}"
            )
