"""The one in-memory shape every data source produces.

A dataset is N samples of F feature channels over L time steps. Each channel belongs to one
modality. Unobserved entries hold 0.0 and are marked False in ``observed``: no training code
ever sees a value where the mask says there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Modality:
    """A named group of channels that is observed or lost together (a lead, an EEG, a lab panel)."""

    name: str
    channels: tuple[str, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds: its modalities and channels, time grid and classes."""

    name: str
    modalities: tuple[Modality, ...]
    sampling_rate_hz: float
    length: int
    classes: tuple[str, ...]
    task: str

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c for m in self.modalities for c in m.channels)

    @property
    def n_features(self) -> int:
        return sum(len(m.channels) for m in self.modalities)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    @cached_property
    def channel_modality(self) -> np.ndarray:
        """Modality index of each of the F channels, shape (F,), int64."""
        return np.concatenate([np.full(len(m.channels), i, dtype=np.int64) for i, m in enumerate(self.modalities)])


@dataclass(frozen=True)
class SkippedRecord:
    """A record that could not be read; reported and counted, never fatal."""

    record: str
    reason: str


@dataclass(frozen=True)
class Sample:
    """One sample as a training loop or a report sees it."""

    x: np.ndarray  # (F, L) float32, 0.0 where unobserved
    observed: np.ndarray  # (F, L) bool
    channel_modality: np.ndarray  # (F,) int64
    label: int
    labels_multi: np.ndarray | None  # (C,) bool, or None when the task is single-label only
    sample_id: str
    patient_id: str


@dataclass
class ClinicalDataset:
    """N samples in arrays, with the identities that splits and masks are keyed on."""

    info: DatasetInfo
    x: np.ndarray  # (N, F, L) float32
    observed: np.ndarray  # (N, F, L) bool, the natural observation mask
    y: np.ndarray  # (N,) int64 single label
    sample_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    y_multi: np.ndarray | None = None  # (N, C) bool multi-label view
    folds: np.ndarray | None = None  # (N,) int64, a source-defined fold (PTB-XL strat_fold)
    skipped: tuple[SkippedRecord, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        n, f, length = self.x.shape
        if self.x.dtype != np.float32:
            raise ValueError(f"x must be float32, got {self.x.dtype}")
        if self.observed.shape != self.x.shape or self.observed.dtype != np.bool_:
            raise ValueError("observed must be a bool array shaped like x")
        if f != self.info.n_features or length != self.info.length:
            raise ValueError(
                f"x has {f} channels x {length} steps; info says {self.info.n_features} x {self.info.length}"
            )
        if self.y.shape != (n,) or len(self.sample_ids) != n or len(self.patient_ids) != n:
            raise ValueError("y, sample_ids and patient_ids must each have one entry per sample")
        if len(set(self.sample_ids)) != n:
            raise ValueError("sample ids must be unique")
        if np.any(self.x[~self.observed] != 0.0):
            raise ValueError("unobserved entries must hold 0.0")
        if n and (self.y.min() < 0 or self.y.max() >= len(self.info.classes)):
            raise ValueError("labels must index info.classes")

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Sample:
        return Sample(
            x=self.x[i],
            observed=self.observed[i],
            channel_modality=self.info.channel_modality,
            label=int(self.y[i]),
            labels_multi=None if self.y_multi is None else self.y_multi[i],
            sample_id=self.sample_ids[i],
            patient_id=self.patient_ids[i],
        )

    def subset(self, indices: np.ndarray | list[int]) -> ClinicalDataset:
        """The samples at ``indices``, in that order (skipped records are kept for reporting)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ClinicalDataset(
            info=self.info,
            x=self.x[idx],
            observed=self.observed[idx],
            y=self.y[idx],
            sample_ids=tuple(self.sample_ids[i] for i in idx),
            patient_ids=tuple(self.patient_ids[i] for i in idx),
            y_multi=None if self.y_multi is None else self.y_multi[idx],
            folds=None if self.folds is None else self.folds[idx],
            skipped=self.skipped,
        )

    def class_counts(self) -> dict[str, int]:
        """Samples per class name, every class listed."""
        counts = np.bincount(self.y, minlength=len(self.info.classes))
        return {c: int(n) for c, n in zip(self.info.classes, counts)}

    def observed_fraction_by_modality(self, observed: np.ndarray | None = None) -> dict[str, float]:
        """Fraction of entries observed in each modality (under ``observed``, default the natural mask)."""
        mask = self.observed if observed is None else observed
        out = {}
        for i, m in enumerate(self.info.modalities):
            sel = self.info.channel_modality == i
            out[m.name] = float(mask[:, sel, :].mean()) if len(self) else 0.0
        return out
