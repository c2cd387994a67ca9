"""What a site's data looks like, as a JSON-ready summary and as text for an operator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from condi_models.data.dataset import ClinicalDataset
from condi_models.data.missingness import MissingView

MAX_SKIPPED_LISTED = 20


@dataclass(frozen=True)
class DataSummary:
    """Counts and observed fractions of a dataset, never any record's values."""

    dataset: str
    task: str
    records: int
    patients: int
    skipped_records: int
    skipped: list[dict[str, str]]
    modalities: dict[str, list[str]]
    sampling_rate_hz: float
    length: int
    classes: dict[str, int]
    natural_observed_fraction: dict[str, float]
    simulated_observed_fraction: dict[str, float] | None
    simulated_affected_fraction: float | None
    simulated_hidden_fraction: float | None
    source_details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        """A short human-readable report."""
        lines = [
            f"dataset {self.dataset} ({self.task}): {self.records} records from {self.patients} patients, "
            f"{self.skipped_records} skipped",
            f"grid: {self.length} steps at {self.sampling_rate_hz:g} Hz; "
            f"{len(self.modalities)} modalities, {sum(len(c) for c in self.modalities.values())} channels",
            "classes: " + ", ".join(f"{k}={v}" for k, v in self.classes.items()),
            "observed fraction per modality (natural"
            + (" -> with simulated missingness)" if self.simulated_observed_fraction else ")"),
        ]
        for name, frac in self.natural_observed_fraction.items():
            sim = self.simulated_observed_fraction
            extra = f" -> {sim[name]:.3f}" if sim else ""
            lines.append(f"  {name:<24} {frac:.3f}{extra}")
        if self.simulated_affected_fraction is not None:
            lines.append(
                f"simulated: {self.simulated_affected_fraction:.1%} of samples affected, "
                f"{self.simulated_hidden_fraction:.1%} of observed entries hidden"
            )
        for key, value in self.source_details.items():
            lines.append(f"{key.replace('_', ' ')}: {value}")
        for s in self.skipped:
            lines.append(f"skipped {s['record']}: {s['reason']}")
        if self.skipped_records > len(self.skipped):
            lines.append(f"... and {self.skipped_records - len(self.skipped)} more skipped")
        return "\n".join(lines)


def summarize(
    dataset: ClinicalDataset, view: MissingView | None = None, source_details: dict | None = None
) -> DataSummary:
    """Summarize ``dataset`` and, when given, the simulated missingness applied to it."""
    natural_total = int(dataset.observed.sum())
    return DataSummary(
        dataset=dataset.info.name,
        task=dataset.info.task,
        records=len(dataset),
        patients=len(set(dataset.patient_ids)),
        skipped_records=len(dataset.skipped),
        skipped=[{"record": s.record, "reason": s.reason} for s in dataset.skipped[:MAX_SKIPPED_LISTED]],
        modalities={m.name: list(m.channels) for m in dataset.info.modalities},
        sampling_rate_hz=dataset.info.sampling_rate_hz,
        length=dataset.info.length,
        classes=dataset.class_counts(),
        natural_observed_fraction=dataset.observed_fraction_by_modality(),
        simulated_observed_fraction=None if view is None else dataset.observed_fraction_by_modality(view.data.observed),
        simulated_affected_fraction=None if view is None else float(np.mean(view.affected)) if len(dataset) else 0.0,
        simulated_hidden_fraction=None
        if view is None
        else float(view.hidden.sum() / natural_total)
        if natural_total
        else 0.0,
        source_details=source_details or {},
    )
