"""Sample-weighted federated averaging with per-group weights.

Each parameter tensor belongs to a weight group, either whole (``"all"``, ``"modality/3"``) or
row by row along its first axis (one group per row, e.g. the rows of W_mod). A silo reports one
weight per group: the sample count for ``"all"``, the count of samples in which the modality is
observed for ``"modality/m"``. The new global value of each entry is the weighted mean over the
silos with a positive weight for its group; an entry no silo trained keeps its global value.

Secure aggregation delivers the same sums in another form: each silo contributes one flat vector
(:class:`SecureLayout`) of weighted, clipped deltas from the global state followed by its group
weights, and the coordinator, which only ever sees the sum of those vectors, turns it back into
per-entry numerators and denominators. Both rules end in :func:`_weighted_mean`, so this is the one
place the averaging rule is written down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

GroupSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class ParameterGroups:
    """Which weight group each named parameter (or each of its rows) belongs to."""

    assignment: Mapping[str, GroupSpec]

    def group_names(self) -> tuple[str, ...]:
        """Every group name, sorted."""
        names: set[str] = set()
        for spec in self.assignment.values():
            names.update((spec,) if isinstance(spec, str) else spec)
        return tuple(sorted(names))

    def weight_array(self, name: str, shape: tuple[int, ...], weights: Mapping[str, float]) -> np.ndarray:
        """The weights of parameter ``name`` as an array broadcastable to ``shape``."""
        spec = self.assignment[name]
        if isinstance(spec, str):
            return np.asarray(float(weights.get(spec, 0.0)), dtype=np.float64)
        if len(spec) != shape[0]:
            raise ValueError(f"parameter {name}: {len(spec)} row groups for {shape[0]} rows")
        rows = np.array([float(weights.get(g, 0.0)) for g in spec], dtype=np.float64)
        return rows.reshape((shape[0],) + (1,) * (len(shape) - 1))


@dataclass(frozen=True)
class SiloUpdate:
    """What one silo contributes to a round: its trained parameters and its group weights."""

    params: Mapping[str, np.ndarray]
    weights: Mapping[str, float]


def weighted_sums(
    updates: Sequence[SiloUpdate], groups: ParameterGroups
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per parameter, the sum of weight x value and the sum of weights over ``updates``."""
    num: dict[str, np.ndarray] = {}
    den: dict[str, np.ndarray] = {}
    for u in updates:
        bad = [g for g, w in u.weights.items() if not np.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"group weights must be finite and >= 0; bad: {bad}")
        for name in groups.assignment:
            value = np.asarray(u.params[name], dtype=np.float64)
            w = groups.weight_array(name, value.shape, u.weights)
            num[name] = num.get(name, 0.0) + w * value
            den[name] = den.get(name, 0.0) + np.broadcast_to(w, value.shape)
    return num, den


def fedavg(
    global_params: Mapping[str, np.ndarray], updates: Sequence[SiloUpdate], groups: ParameterGroups
) -> dict[str, np.ndarray]:
    """The new global parameters: per-entry weighted mean, the old value where no silo has weight."""
    if not updates:
        raise ValueError("fedavg needs at least one silo update")
    missing = [n for n in groups.assignment if n not in global_params]
    if missing:
        raise ValueError(f"parameters without a global value: {missing}")
    num, den = weighted_sums(updates, groups)
    return _weighted_mean(global_params, num, den, groups)


def _weighted_mean(
    global_params: Mapping[str, np.ndarray],
    num: Mapping[str, np.ndarray],
    den: Mapping[str, np.ndarray],
    groups: ParameterGroups,
) -> dict[str, np.ndarray]:
    out = {}
    for name, old in global_params.items():
        if name not in groups.assignment:
            out[name] = old
            continue
        safe = np.where(den[name] > 0, den[name], 1.0)
        out[name] = np.where(den[name] > 0, num[name] / safe, old).astype(old.dtype)
    return out


@dataclass(frozen=True)
class SecureContribution:
    """One silo's vector for the secure sum, and how many delta entries clipping changed."""

    vector: np.ndarray
    clipped: int


@dataclass(frozen=True)
class SecureLayout:
    """The flat vector a silo feeds into secure aggregation, and how the coordinator reads its sum.

    Layout: for each grouped parameter in sorted name order, ``w * clip(theta_u - theta_global)``
    flattened (``w`` the silo's weight of the entry's group), then one weight per group in
    :meth:`ParameterGroups.group_names` order. Weights are sample counts divided by ``weight_unit``
    and capped at 1, and deltas are clipped to ``clip_bound``, so every entry lies in
    ``[-clip_bound, clip_bound]`` as the fixed-point ring requires (``clip_bound >= 1``).
    """

    groups: ParameterGroups
    shapes: Mapping[str, tuple[int, ...]]
    clip_bound: float
    weight_unit: float

    def __post_init__(self) -> None:
        missing = [n for n in self.groups.assignment if n not in self.shapes]
        if missing:
            raise ValueError(f"SecureLayout: no shape for grouped parameters {missing}")
        if not self.clip_bound >= 1.0:
            raise ValueError(f"SecureLayout: clip_bound must be >= 1 (weights go up to 1), got {self.clip_bound}")
        if not self.weight_unit > 0:
            raise ValueError(f"SecureLayout: weight_unit must be > 0, got {self.weight_unit}")

    def _names(self) -> tuple[str, ...]:
        return tuple(sorted(self.groups.assignment))

    @property
    def vector_length(self) -> int:
        """Entries of one silo's vector: every grouped parameter entry plus one per group."""
        return sum(int(np.prod(self.shapes[n])) for n in self._names()) + len(self.groups.group_names())

    def ring_weights(self, counts: Mapping[str, float]) -> dict[str, float]:
        """Sample counts per group as the weights that travel in the vector (capped at 1)."""
        bad = [g for g, w in counts.items() if not np.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"group weights must be finite and >= 0; bad: {bad}")
        return {g: min(1.0, float(counts.get(g, 0.0)) / self.weight_unit) for g in self.groups.group_names()}

    def contribution(
        self, global_params: Mapping[str, np.ndarray], update: SiloUpdate
    ) -> SecureContribution:
        """The silo's vector for ``update`` trained from ``global_params``; clipping is counted."""
        weights = self.ring_weights(update.weights)
        parts: list[np.ndarray] = []
        clipped = 0
        for name in self._names():
            shape = self.shapes[name]
            delta = np.asarray(update.params[name], dtype=np.float64) - np.asarray(
                global_params[name], dtype=np.float64
            )
            if delta.shape != shape:
                raise ValueError(f"parameter {name}: shape {delta.shape}, the layout expects {shape}")
            if not np.all(np.isfinite(delta)):
                raise ValueError(f"parameter {name}: the update has non-finite entries")
            clipped += int(np.count_nonzero(np.abs(delta) > self.clip_bound))
            delta = np.clip(delta, -self.clip_bound, self.clip_bound)
            w = self.groups.weight_array(name, shape, weights)
            parts.append((w * delta).ravel())
        parts.append(np.array([weights[g] for g in self.groups.group_names()], dtype=np.float64))
        return SecureContribution(vector=np.concatenate(parts), clipped=clipped)

    def check_total(self, total: np.ndarray, silos: int, resolution: float) -> None:
        """Refuse a summed vector that ``silos`` honest contributions cannot give.

        Each silo's weights lie in [0, 1] and each of its entries within clip_bound x its weight of
        that entry's group, so the sum's group weights lie in [0, silos] and each entry within
        clip_bound x its group's summed weight; ``resolution`` is the rounding of one silo's entry
        (2^-frac_bits), allowed once per silo. A silo that skipped clipping or capping, or sent
        made-up values, is caught here, and :class:`ValueError` says what was out of bounds.
        """
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.vector_length,):
            raise ValueError(f"summed vector has shape {total.shape}, the layout gives ({self.vector_length},)")
        slack = silos * resolution
        names = self.groups.group_names()
        weights = dict(zip(names, total[len(total) - len(names) :].tolist()))
        bad = {g: round(w, 6) for g, w in weights.items() if not -slack <= w <= silos + slack}
        if bad:
            raise ValueError(f"summed group weights outside [0, {silos}] for {silos} silos: {bad}")
        offset = 0
        for name in self._names():
            shape = self.shapes[name]
            size = int(np.prod(shape))
            limit = self.clip_bound * np.broadcast_to(self.groups.weight_array(name, shape, weights), shape) + slack
            entries = np.abs(total[offset : offset + size].reshape(shape))
            if np.any(entries > limit):
                worst = float(np.max(entries - limit))
                raise ValueError(
                    f"summed update of {name}: {int(np.sum(entries > limit))} entries exceed clip_bound x their "
                    f"group's summed weight (by up to {worst:.4g}); a contribution was not clipped"
                )
            offset += size

    def average(self, global_params: Mapping[str, np.ndarray], total: np.ndarray) -> dict[str, np.ndarray]:
        """The new global parameters from the summed vectors alone (the secure counterpart of fedavg)."""
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.vector_length,):
            raise ValueError(f"summed vector has shape {total.shape}, the layout gives ({self.vector_length},)")
        names = self._names()
        n_groups = len(self.groups.group_names())
        weight_sums = dict(zip(self.groups.group_names(), total[len(total) - n_groups :].tolist()))
        # Quantization noise can leave a tiny positive weight sum for a group nobody trained.
        resolution = 1.0 / self.weight_unit / 2
        weight_sums = {g: (w if w > resolution else 0.0) for g, w in weight_sums.items()}
        num: dict[str, np.ndarray] = {}
        den: dict[str, np.ndarray] = {}
        offset = 0
        for name in names:
            shape = self.shapes[name]
            size = int(np.prod(shape))
            old = np.asarray(global_params[name], dtype=np.float64)
            w = np.broadcast_to(self.groups.weight_array(name, shape, weight_sums), shape)
            num[name] = w * old + total[offset : offset + size].reshape(shape)
            den[name] = w
            offset += size
        return _weighted_mean(global_params, num, den, self.groups)
