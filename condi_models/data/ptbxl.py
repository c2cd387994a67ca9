"""PTB-XL 12-lead ECGs as a ClinicalDataset with the five diagnostic superclasses.

Each of the 12 leads is its own modality, in the standard order I, II, III, aVR, aVL, aVF, V1..V6.

Labels. A statement in ``scp_codes`` counts when its row in ``scp_statements.csv`` has
``diagnostic == 1``; its ``diagnostic_class`` is one of NORM, MI, STTC, CD, HYP.

- ``y_multi`` marks every superclass that has at least one diagnostic statement, whatever its
  likelihood (PTB-XL writes 0 for "likelihood unknown", so 0 is not "absent").
- ``y`` (single label) is the superclass of the diagnostic statement with the highest likelihood.
  Ties between superclasses are broken by the fixed priority MI > CD > HYP > STTC > NORM:
  abnormal beats normal; MI first because it is the acute finding that changes management and its
  Q waves and ST-T changes would otherwise be read as CD or STTC; a conduction disturbance next
  because a bundle-branch block itself reshapes QRS and repolarisation and makes voltage criteria
  for hypertrophy unreliable; hypertrophy before STTC because LV strain produces secondary ST-T
  changes; STTC last among the abnormal classes as the least specific finding.
- Records with no diagnostic statement are dropped and reported in ``skipped`` as "unlabeled: ...".

A record that cannot be read (missing or truncated signal file, bad header, wrong leads, rate or
length) is skipped with a reason and never stops the load. Missing or malformed tables are fatal.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import wfdb

from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality, SkippedRecord

logger = logging.getLogger(__name__)

PTBXL_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
TIE_PRIORITY: tuple[str, ...] = ("MI", "CD", "HYP", "STTC", "NORM")

DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
RECORD_SECONDS = 10
_RATES = {"records100": 100, "records500": 500}
_FILENAME_COLUMN = {"records100": "filename_lr", "records500": "filename_hr"}
_DATABASE_COLUMNS = ("ecg_id", "patient_id", "scp_codes", "strat_fold")
_STATEMENT_COLUMNS = ("diagnostic", "diagnostic_class")
_LEAD_INDEX = {name.upper(): i for i, name in enumerate(PTBXL_LEADS)}


class RecordError(ValueError):
    """A single record is unusable; the loader reports it and goes on."""


@dataclass(frozen=True)
class RecordLabel:
    """The single label and the multi-label view of one record."""

    label: int
    multi: np.ndarray  # (C,) bool


def _read_table(path: Path, required: tuple[str, ...], **kwargs: object) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"PTB-XL table not found: {path}")
    table = pd.read_csv(path, **kwargs)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; expected at least {list(required)}")
    return table


def diagnostic_superclass_map(statements: pd.DataFrame) -> dict[str, str]:
    """SCP statement code -> diagnostic superclass, for the statements with ``diagnostic == 1``."""
    diagnostic = statements[statements["diagnostic"] == 1]
    unknown = sorted(set(diagnostic["diagnostic_class"].dropna()) - set(SUPERCLASSES))
    if unknown:
        raise ValueError(f"{STATEMENTS_CSV}: diagnostic_class has unknown value(s) {unknown}; "
                         f"expected one of {list(SUPERCLASSES)}")
    return {str(code): str(cls) for code, cls in diagnostic["diagnostic_class"].dropna().items()}


def parse_scp_codes(text: str) -> dict[str, float]:
    """The ``scp_codes`` cell, a Python dict literal of statement -> likelihood, parsed without eval."""
    try:
        codes = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise RecordError(f"scp_codes is not a dict literal: {exc}") from exc
    if not isinstance(codes, dict):
        raise RecordError(f"scp_codes is a {type(codes).__name__}, expected a dict")
    try:
        return {str(k): float(v) for k, v in codes.items()}
    except (TypeError, ValueError) as exc:
        raise RecordError(f"scp_codes has a non-numeric likelihood: {exc}") from exc


def superclass_label(codes: dict[str, float], code_class: dict[str, str]) -> RecordLabel | None:
    """Apply the module's labelling rule; None when no statement is diagnostic."""
    diagnostic = [(code_class[code], likelihood) for code, likelihood in codes.items() if code in code_class]
    if not diagnostic:
        return None
    multi = np.zeros(len(SUPERCLASSES), dtype=bool)
    for cls, _ in diagnostic:
        multi[SUPERCLASSES.index(cls)] = True
    best = max(likelihood for _, likelihood in diagnostic)
    top = {cls for cls, likelihood in diagnostic if likelihood == best}
    chosen = next(cls for cls in TIE_PRIORITY if cls in top)
    return RecordLabel(label=SUPERCLASSES.index(chosen), multi=multi)


def read_signal(path: Path, fs: int, length: int) -> np.ndarray:
    """The record's (12, length) signal in mV in standard lead order; NaN where a sample is missing."""
    if not path.with_suffix(".hea").is_file():
        raise RecordError("missing signal file (no .hea header)")
    try:
        signal, fields = wfdb.rdsamp(str(path))
    # wfdb raises many unrelated exception types on malformed headers and short data files; any of
    # them means this one record is unusable, which must not abort the whole load.
    except Exception as exc:
        raise RecordError(f"unreadable record ({type(exc).__name__}: {exc})") from exc
    names = [str(n) for n in fields["sig_name"]]
    if len(names) != len(PTBXL_LEADS):
        raise RecordError(f"has {len(names)} leads {names}, expected 12")
    order = [_LEAD_INDEX.get(n.upper()) for n in names]
    if None in order or len(set(order)) != len(PTBXL_LEADS):
        raise RecordError(f"lead names {names} do not match the 12 standard leads {list(PTBXL_LEADS)}")
    if float(fields["fs"]) != fs:
        raise RecordError(f"sampling rate {fields['fs']} Hz, expected {fs} Hz")
    if signal.shape != (length, len(PTBXL_LEADS)):
        raise RecordError(f"signal shape {signal.shape}, expected ({length}, 12)")
    bad_units = sorted({u for u in fields["units"] if u != "mV"})
    if bad_units:
        raise RecordError(f"units {bad_units}, expected mV")
    out = np.empty((len(PTBXL_LEADS), length), dtype=np.float64)
    out[order] = signal.T
    return out


def ptbxl_info(resolution: Literal["records100", "records500"] = "records100") -> DatasetInfo:
    """PTB-XL's layout at ``resolution``: one modality per lead, 10 s records, the five superclasses."""
    fs = _RATES[resolution]
    return DatasetInfo(
        name="ptbxl",
        modalities=tuple(Modality(name=lead, channels=(lead,)) for lead in PTBXL_LEADS),
        sampling_rate_hz=float(fs),
        length=fs * RECORD_SECONDS,
        classes=SUPERCLASSES,
        task="superclass",
    )


def load_ptbxl(
    root: Path,
    *,
    resolution: Literal["records100", "records500"] = "records100",
    max_records: int | None = None,
) -> ClinicalDataset:
    """Load PTB-XL from ``root`` (the folder holding the two csv tables and the records folders).

    ``resolution`` picks the 100 Hz (``filename_lr``) or 500 Hz (``filename_hr``) signals; a row
    whose signal file is absent is skipped. ``max_records`` stops once that many records are kept
    (rows are visited in ``ecg_id`` order). Raises FileNotFoundError/ValueError naming the file and
    column when a table is missing or lacks a required column.
    """
    if resolution not in _RATES:
        raise ValueError(f"resolution must be one of {list(_RATES)}, got {resolution!r}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    root = Path(root)
    filename_col = _FILENAME_COLUMN[resolution]
    database = _read_table(root / DATABASE_CSV, (*_DATABASE_COLUMNS, filename_col))
    statements = _read_table(root / STATEMENTS_CSV, _STATEMENT_COLUMNS, index_col=0)
    code_class = diagnostic_superclass_map(statements)
    fs = _RATES[resolution]
    length = fs * RECORD_SECONDS

    signals: list[np.ndarray] = []
    labels: list[RecordLabel] = []
    sample_ids: list[str] = []
    patient_ids: list[str] = []
    folds: list[int] = []
    skipped: list[SkippedRecord] = []
    for row in database.sort_values("ecg_id").itertuples(index=False):
        if max_records is not None and len(signals) >= max_records:
            break
        relpath = str(getattr(row, filename_col))
        try:
            ecg_id = int(row.ecg_id)
            if pd.isna(row.patient_id) or pd.isna(row.strat_fold):
                raise RecordError("patient_id or strat_fold is empty")
            label = superclass_label(parse_scp_codes(str(row.scp_codes)), code_class)
            if label is None:
                raise RecordError(f"unlabeled: no diagnostic statement in scp_codes (ecg_id {ecg_id})")
            signal = read_signal(root / relpath, fs, length)
        except RecordError as exc:
            skipped.append(SkippedRecord(record=relpath, reason=str(exc)))
            continue
        signals.append(signal)
        labels.append(label)
        sample_ids.append(f"ptbxl/{ecg_id}")
        patient_ids.append(str(int(row.patient_id)))
        folds.append(int(row.strat_fold))

    x = np.stack(signals) if signals else np.zeros((0, len(PTBXL_LEADS), length))
    observed = ~np.isnan(x)
    x = np.where(observed, x, 0.0).astype(np.float32)
    info = ptbxl_info(resolution)
    n_unlabeled = sum(s.reason.startswith("unlabeled") for s in skipped)
    logger.info(
        "PTB-XL %s: kept %d records (%d Hz x %d), skipped %d (%d unlabeled, %d unreadable or absent)",
        resolution, len(signals), fs, length, len(skipped), n_unlabeled, len(skipped) - n_unlabeled,
    )
    return ClinicalDataset(
        info=info,
        x=x,
        observed=observed,
        y=np.array([lab.label for lab in labels], dtype=np.int64),
        sample_ids=tuple(sample_ids),
        patient_ids=tuple(patient_ids),
        y_multi=np.stack([lab.multi for lab in labels]) if labels else np.zeros((0, len(SUPERCLASSES)), bool),
        folds=np.array(folds, dtype=np.int64),
        skipped=tuple(skipped),
    )
