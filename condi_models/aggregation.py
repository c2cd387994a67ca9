"""Sample-weighted federated averaging with per-group weights.

Each parameter tensor belongs to a weight group, either whole (``"all"``, ``"modality/3"``) or
row by row along its first axis (one group per row, e.g. the rows of W_mod). A silo reports one
weight per group: the sample count for ``"all"``, the count of samples in which the modality is
observed for ``"modality/m"``. The new global value of each entry is the weighted mean over the
silos with a positive weight for its group; an entry no silo trained keeps its global value.

The same sums are what secure aggregation delivers (sum of weight x parameter and sum of
weights), so this is the one place the averaging rule is written down.
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
    out = {}
    for name, old in global_params.items():
        if name not in groups.assignment:
            out[name] = old
            continue
        safe = np.where(den[name] > 0, den[name], 1.0)
        out[name] = np.where(den[name] > 0, num[name] / safe, old).astype(old.dtype)
    return out
