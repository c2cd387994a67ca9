"""The ``data:`` section of every config, and the one function that turns it into a dataset.

Each source is a config class tagged by ``source:``; :func:`load_source` dispatches on it. Paths
in configs are relative to the working directory (the examples are run from the repository root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from condi_models.configfile import StrictModel, resolve_path
from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality


class DataSourceError(ValueError):
    """A data source that cannot be read; the message names the config key or the file."""


class PtbxlSource(StrictModel):
    """PTB-XL through wfdb: ptbxl_database.csv, scp_statements.csv and the record folders."""

    source: Literal["ptbxl"]
    path: str
    resolution: Literal["records100", "records500"] = "records100"
    max_records: int | None = Field(default=None, ge=1)


class MimicSource(StrictModel):
    """MIMIC-IV hosp/ and icu/ tables (csv or csv.gz); chartevents used when present."""

    source: Literal["mimic"]
    path: str
    task: Literal["ihm48", "los3"] = "ihm48"
    hours: int = Field(default=48, ge=1)


class SleepEdfSource(StrictModel):
    """Sleep-EDF cassette PSG + hypnogram EDF pairs through mne."""

    source: Literal["sleep_edf"]
    path: str
    resample_hz: float = Field(default=100.0, gt=0)
    trim_wake_minutes: float = Field(default=30.0, ge=0)
    max_nights: int | None = Field(default=None, ge=1)


class SyntheticEcgSource(StrictModel):
    """Synthetic 12-lead ECG from a cardiac dipole, PTB-XL layout and classes."""

    source: Literal["synthetic_ecg"]
    n_records: int = Field(default=600, ge=1)
    seed: int = 0
    fs: float = Field(default=100.0, gt=0)
    seconds: float = Field(default=10.0, gt=0)
    records_per_patient: int = Field(default=1, ge=1)


class SyntheticPsgSource(StrictModel):
    """Synthetic 5-channel PSG epochs, Sleep-EDF layout and stages."""

    source: Literal["synthetic_psg"]
    n_nights: int = Field(default=4, ge=1)
    epochs_per_night: int = Field(default=120, ge=1)
    seed: int = 0
    fs: float = Field(default=100.0, gt=0)


class SyntheticIcuSource(StrictModel):
    """Synthetic ICU stays written in MIMIC-IV table layout and read back by the MIMIC loader."""

    source: Literal["synthetic_icu"]
    n_stays: int = Field(default=300, ge=1)
    seed: int = 0
    task: Literal["ihm48", "los3"] = "ihm48"
    hours: int = Field(default=48, ge=1)


DataSource = Annotated[
    PtbxlSource | MimicSource | SleepEdfSource | SyntheticEcgSource | SyntheticPsgSource | SyntheticIcuSource,
    Field(discriminator="source"),
]


def _existing_dir(value: str, base_dir: Path, origin: str) -> Path:
    path = resolve_path(value, base_dir)
    if not path.is_dir():
        raise DataSourceError(f"{origin}: data.path: folder {path} does not exist")
    return path


def load_source(cfg: DataSource, *, base_dir: Path | None = None, origin: str = "config") -> ClinicalDataset:
    """Read or generate the dataset that ``cfg`` describes. ``origin`` names the config in errors."""
    base = Path.cwd() if base_dir is None else base_dir
    # Loaders are imported where used: each pulls in its own heavy library (wfdb, mne, pandas).
    if isinstance(cfg, PtbxlSource):
        from condi_models.data.ptbxl import load_ptbxl

        root = _existing_dir(cfg.path, base, origin)
        return load_ptbxl(root, resolution=cfg.resolution, max_records=cfg.max_records)
    if isinstance(cfg, MimicSource):
        from condi_models.data.mimic import load_mimic

        return load_mimic(_existing_dir(cfg.path, base, origin), task=cfg.task, hours=cfg.hours)
    if isinstance(cfg, SleepEdfSource):
        from condi_models.data.sleep_edf import load_sleep_edf

        return load_sleep_edf(
            _existing_dir(cfg.path, base, origin),
            resample_hz=cfg.resample_hz,
            trim_wake_minutes=cfg.trim_wake_minutes,
            max_nights=cfg.max_nights,
        )
    if isinstance(cfg, SyntheticEcgSource):
        from condi_models.data.synthetic_ecg import generate_ecg

        return generate_ecg(
            cfg.n_records,
            seed=cfg.seed,
            fs=cfg.fs,
            seconds=cfg.seconds,
            records_per_patient=cfg.records_per_patient,
        )
    if isinstance(cfg, SyntheticPsgSource):
        from condi_models.data.synthetic_psg import generate_psg

        return generate_psg(cfg.n_nights, seed=cfg.seed, epochs_per_night=cfg.epochs_per_night, fs=cfg.fs)
    if isinstance(cfg, SyntheticIcuSource):
        from condi_models.data.synthetic_icu import generate_icu

        return generate_icu(cfg.n_stays, seed=cfg.seed, task=cfg.task, hours=cfg.hours)
    raise DataSourceError(f"{origin}: data.source: unknown source {cfg!r}")


class LayoutModality(StrictModel):
    """One modality of the federation's data layout: its name and its channels, in order."""

    name: str = Field(min_length=1)
    channels: list[str] = Field(min_length=1)


class DataLayout(StrictModel):
    """The data layout every silo must bring (federation.yaml ``layout:``).

    ``silo-agent check --config site.yaml --layout`` prints this section for a site's data. With it
    the coordinator builds the initial model before any silo joins, and a silo whose data differs is
    refused; without it the first silo to join fixes the layout (within ``layout_limits``).
    """

    task: str = Field(min_length=1)
    classes: list[str] = Field(min_length=2)
    sampling_rate_hz: float = Field(gt=0)
    length: int = Field(ge=1, description="steps per record")
    modalities: list[LayoutModality] = Field(min_length=1)

    @classmethod
    def of(cls, info: DatasetInfo) -> DataLayout:
        """The section that describes ``info``."""
        return cls(
            task=info.task,
            classes=list(info.classes),
            sampling_rate_hz=info.sampling_rate_hz,
            length=info.length,
            modalities=[LayoutModality(name=m.name, channels=list(m.channels)) for m in info.modalities],
        )

    def to_info(self, name: str) -> DatasetInfo:
        """The layout as the model code sees it, named ``name``."""
        return DatasetInfo(
            name=name,
            modalities=tuple(Modality(m.name, tuple(m.channels)) for m in self.modalities),
            sampling_rate_hz=float(self.sampling_rate_hz),
            length=self.length,
            classes=tuple(self.classes),
            task=self.task,
        )


def source_layout(cfg: DataSource) -> DatasetInfo:
    """The layout (modalities, channels, time grid, classes, task) of ``cfg``'s data, without
    reading any record: what federation.yaml's ``layout:`` pins for silos holding such data."""
    if isinstance(cfg, PtbxlSource):
        from condi_models.data.ptbxl import ptbxl_info

        return ptbxl_info(cfg.resolution)
    if isinstance(cfg, MimicSource | SyntheticIcuSource):
        from condi_models.data.mimic import dataset_info

        return dataset_info(cfg.task, cfg.hours)
    if isinstance(cfg, SleepEdfSource | SyntheticPsgSource):
        from condi_models.data.sleep_edf import sleep_edf_info

        rate = cfg.resample_hz if isinstance(cfg, SleepEdfSource) else cfg.fs
        return sleep_edf_info(rate, name=cfg.source)
    if isinstance(cfg, SyntheticEcgSource):
        from condi_models.data.synthetic_ecg import synthetic_ecg_info

        return synthetic_ecg_info(cfg.fs, cfg.seconds)
    raise DataSourceError(f"data.source: unknown source {cfg!r}")


def source_details(cfg: DataSource, *, base_dir: Path | None = None, origin: str = "config") -> dict:
    """Source-specific counts for a preflight report (MIMIC-IV: stays and both tasks' label balance)."""
    if not isinstance(cfg, MimicSource):
        return {}
    from condi_models.data.mimic import load_mimic_with_stats

    root = _existing_dir(cfg.path, Path.cwd() if base_dir is None else base_dir, origin)
    details: dict = {"label_balance": {}, "stays_kept": {}}
    for task in ("ihm48", "los3"):
        try:
            ds, stats = load_mimic_with_stats(root, task=task, hours=cfg.hours)
        except ValueError as err:
            details["label_balance"][task] = f"not available: {err}"
            continue
        details["stays_in_table"] = stats.stays_in_table
        details["stays_kept"][task] = stats.stays_kept
        details["label_balance"][task] = ds.class_counts()
        if task == cfg.task:
            details["excluded"] = dict(stats.excluded)
            details["out_of_range_values"] = {k: v for k, v in stats.out_of_range.items() if v}
            details["malformed_rows"] = {k: v for k, v in stats.malformed_rows.items() if v}
            details["absent_tables"] = list(stats.absent_tables)
    return details
