"""Patient-disjoint splits and partitions of a dataset across silos.

One patient's records always land on one side of a split and in one silo: records of the same
patient are near-duplicates, and leaking them across a split inflates every metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Split:
    """Sample indices of a train / validation / test split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _patient_groups(patient_ids: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Patients in first-seen order and the sample indices of each."""
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        if pid not in members:
            members[pid] = []
            order.append(pid)
        members[pid].append(i)
    return order, {p: np.asarray(idx, dtype=np.int64) for p, idx in members.items()}


def split_by_patient(patient_ids: Sequence[str], fractions: tuple[float, float, float], seed: int) -> Split:
    """Shuffle patients with ``seed`` and cut them into train/val/test by ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order, members = _patient_groups(patient_ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(order))
    n = len(order)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
    idx = [
        np.sort(np.concatenate([members[order[p]] for p in part])) if len(part) else np.zeros(0, np.int64)
        for part in parts
    ]
    return Split(*idx)


def patient_folds(patient_ids: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """A fold number 1..``n_folds`` per sample, whole patients at a time, for sources without folds.

    Patients are shuffled with ``seed`` and dealt round-robin, so fold sizes differ by at most one
    patient; the same ``seed`` gives the same folds whatever the run's seed, as cross-validation needs.
    """
    order, members = _patient_groups(patient_ids)
    if not 2 <= n_folds <= len(order):
        raise ValueError(f"n_folds must be between 2 and the {len(order)} patients, got {n_folds}")
    folds = np.zeros(len(patient_ids), dtype=np.int64)
    for rank, p in enumerate(np.random.default_rng(seed).permutation(len(order))):
        folds[members[order[p]]] = rank % n_folds + 1
    return folds


def split_by_folds(folds: np.ndarray, train: Sequence[int], val: Sequence[int], test: Sequence[int]) -> Split:
    """Split by a source-defined fold number (PTB-XL's strat_fold is patient-disjoint by design)."""
    sets = [set(train), set(val), set(test)]
    if sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]:
        raise ValueError(f"folds overlap between splits: train={train} val={val} test={test}")
    return Split(*(np.flatnonzero(np.isin(folds, sorted(s))) for s in sets))


def partition_silos(
    labels: np.ndarray,
    patient_ids: Sequence[str],
    n_silos: int,
    *,
    scheme: Literal["iid", "dirichlet"] = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Assign every sample to one of ``n_silos`` silos, whole patients at a time.

    ``dirichlet``: for each class, its patients are shuffled and cut among the silos in
    proportions drawn from Dirichlet(alpha), so each patient goes to exactly one silo (sampling
    without replacement). A patient's class is the most frequent label among its samples.
    Draws that leave a silo empty are redrawn (from the same seeded stream).
    ``iid``: patients shuffled and dealt out round-robin.
    Returns the sorted sample indices of each silo.
    """
    labels = np.asarray(labels)
    if len(labels) != len(patient_ids):
        raise ValueError("labels and patient_ids must have one entry per sample")
    order, members = _patient_groups(patient_ids)
    if len(order) < n_silos:
        raise ValueError(f"cannot give {n_silos} silos at least one patient each: only {len(order)} patients")
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"partition scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    if scheme == "dirichlet" and alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)

    def collect(assign: np.ndarray) -> list[np.ndarray]:
        out = []
        for k in range(n_silos):
            pats = [order[p] for p in np.flatnonzero(assign == k)]
            idx = np.concatenate([members[p] for p in pats]) if pats else np.zeros(0, np.int64)
            out.append(np.sort(idx))
        return out

    if scheme == "iid":
        assign = np.empty(len(order), dtype=np.int64)
        assign[rng.permutation(len(order))] = np.arange(len(order)) % n_silos
        return collect(assign)

    patient_label = np.array([np.bincount(labels[members[p]]).argmax() for p in order], dtype=np.int64)
    for _ in range(max_attempts):
        assign = np.empty(len(order), dtype=np.int64)
        for c in np.unique(patient_label):
            pats = rng.permutation(np.flatnonzero(patient_label == c))
            props = rng.dirichlet(np.full(n_silos, alpha))
            cuts = (np.cumsum(props)[:-1] * len(pats)).astype(int)
            for k, chunk in enumerate(np.split(pats, cuts)):
                assign[chunk] = k
        if len(np.unique(assign)) == n_silos:
            return collect(assign)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) partition of {len(order)} patients gave all {n_silos} silos "
        f"a patient in {max_attempts} draws; raise alpha or lower the silo count"
    )
