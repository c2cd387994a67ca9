"""MIMIC-IV ICU stays as hourly multimodal time series: the first ``hours`` hours from ICU admission.

Reads the published CSV layout (``hosp/`` and ``icu/``, each table ``.csv.gz`` or ``.csv``). Channels
and their items, units, sanity ranges and hourly aggregation are the table in
:mod:`condi_models.data.mimic_items`. ``icu/chartevents`` (vitals, GCS) is read when present and
its absence is logged, not fatal: those channels are then wholly unobserved.

Cohort, for both tasks: every ICU stay whose stay lasted at least the observation window
(``icustays.los`` in hours >= ``hours``, and >= 48 h for ``ihm48``), so the grid never runs past
discharge or death and the amount of data cannot give the label away; stays with no observed
value at all in the window are dropped. Labels:

- ``ihm48``: in-hospital death of the stay's admission (``admissions.hospital_expire_flag``);
- ``los3``: ICU length of stay above 3 days (``icustays.los > 3``), which needs ``hours < 72``.

Event rows are matched to stays by ``stay_id``, except lab results, which have no stay and are
matched by ``subject_id`` and time. A row whose ids, time or value cannot be parsed is dropped and
counted per table; a value outside its variable's sanity range is dropped and counted per variable
(:class:`MimicLoadStats`, returned by :func:`load_mimic_with_stats`). A missing table or column is
an error that names the file and the column.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality, SkippedRecord
from condi_models.data.mimic_items import MODALITY_ORDER, VARIABLES, Source, Variable

log = logging.getLogger(__name__)

Task = Literal["ihm48", "los3"]
CLASSES: dict[str, tuple[str, str]] = {"ihm48": ("survived", "died"), "los3": ("los<=3d", "los>3d")}
# Rows per chunk when streaming event tables: full MIMIC-IV chartevents has ~300 M rows.
CHUNK_ROWS = 2_000_000
IHM_MIN_HOURS = 48


class MimicFormatError(ValueError):
    """A MIMIC-IV table that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class MimicLoadStats:
    """What loading kept and dropped, in counts only (no patient data)."""

    stays_in_table: int
    stays_kept: int
    excluded: Mapping[str, int]  # reason -> stays left out by the cohort rules
    skipped: int  # stays whose row could not be used (see ClinicalDataset.skipped)
    out_of_range: Mapping[str, int]  # variable -> values outside the sanity range, dropped
    # table -> rows dropped as unparseable: any row with bad ids; rows of needed items with a bad time or value
    malformed_rows: Mapping[str, int]
    values_used: Mapping[str, int]  # variable -> values (or infusion pieces) placed on the grid
    absent_tables: tuple[str, ...]  # optional tables not found (chartevents in the demo)
    unobserved_modalities: tuple[str, ...]  # modalities without a single observed entry


@dataclass(frozen=True)
class _Stays:
    """The cohort, sorted by stay_id, with times in seconds since the epoch."""

    stay_id: np.ndarray  # (N,) int64
    subject_id: np.ndarray  # (N,) int64
    intime: np.ndarray  # (N,) float64 seconds
    label: np.ndarray  # (N,) int64


@dataclass
class _Events:
    """Values placed on the grid: one entry per (stay, variable, hour) contribution."""

    stay: list[np.ndarray]
    var: list[np.ndarray]
    hour: list[np.ndarray]
    value: list[np.ndarray]

    def add(self, stay: np.ndarray, var: int, hour: np.ndarray, value: np.ndarray) -> None:
        self.stay.append(stay.astype(np.int64, copy=False))
        self.var.append(np.full(len(stay), var, dtype=np.int64))
        self.hour.append(hour.astype(np.int64, copy=False))
        self.value.append(value.astype(np.float64, copy=False))


# Columns each table must have; only these are read.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "icustays": ("subject_id", "hadm_id", "stay_id", "intime", "los"),
    "admissions": ("hadm_id", "hospital_expire_flag"),
    "labevents": ("subject_id", "itemid", "charttime", "valuenum"),
    "chartevents": ("stay_id", "itemid", "charttime", "valuenum"),
    "outputevents": ("stay_id", "itemid", "charttime", "value"),
    "inputevents": ("stay_id", "itemid", "starttime", "endtime", "amount", "amountuom"),
}
_MODULE: dict[str, str] = {
    "icustays": "icu", "admissions": "hosp", "labevents": "hosp",
    "chartevents": "icu", "outputevents": "icu", "inputevents": "icu",
}


def table_path(root: Path, table: str) -> Path | None:
    """``root/<hosp|icu>/<table>.csv.gz``, else the plain ``.csv``, else None."""
    base = Path(root) / _MODULE[table]
    for suffix in (".csv.gz", ".csv"):
        path = base / f"{table}{suffix}"
        if path.is_file():
            return path
    return None


def _require(root: Path, table: str) -> Path:
    path = table_path(root, table)
    if path is None:
        where = Path(root) / _MODULE[table] / table
        raise MimicFormatError(f"{where}.csv.gz (or .csv): required MIMIC-IV table not found")
    return path


def _read(path: Path, table: str, chunked: bool) -> Iterator[pd.DataFrame]:
    """The table's needed columns, whole or in chunks, after checking that each one exists."""
    columns = _COLUMNS[table]
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in columns if c not in header]
    if missing:
        raise MimicFormatError(f"{path}: required column {missing[0]!r} is missing (needs {', '.join(columns)})")
    # Inferred dtypes keep clean numeric columns fast; a column with garbage comes back as text
    # and is coerced row by row below.
    reader = pd.read_csv(path, usecols=list(columns), low_memory=False, chunksize=CHUNK_ROWS if chunked else None)
    if isinstance(reader, pd.DataFrame):
        yield reader
    else:
        with reader:
            yield from reader


def _numbers(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Float values (NaN where unusable) and a mask of cells that held text that is not a number."""
    values = pd.to_numeric(col, errors="coerce")
    bad = (values.isna() & col.notna()).to_numpy()
    return values.to_numpy(dtype=np.float64, na_value=np.nan), bad


def _seconds(col: pd.Series) -> np.ndarray:
    """Seconds since the epoch as float64, NaN where the cell is empty or not a timestamp."""
    if not (pd.api.types.is_string_dtype(col) or col.dtype == object):
        col = col.astype("string")  # an all-numeric column must not be read as epoch offsets
    ts = pd.to_datetime(col, format="ISO8601", errors="coerce")
    nat = ts.isna().to_numpy()
    out = ts.to_numpy().astype("datetime64[s]").astype(np.int64).astype(np.float64)
    out[nat] = np.nan
    return out


def _ids(col: pd.Series) -> np.ndarray:
    """Integer ids as float64 (exact below 2**53), NaN where unusable."""
    values, _ = _numbers(col)
    return np.where(values == np.floor(values), values, np.nan)


def _load_stays(
    root: Path, task: Task, min_hours: float
) -> tuple[_Stays, int, dict[str, int], list[SkippedRecord], int]:
    path = _require(root, "icustays")
    df = next(_read(path, "icustays", chunked=False))
    n_table = len(df)
    stay_id, subject_id, hadm_id = _ids(df["stay_id"]), _ids(df["subject_id"]), _ids(df["hadm_id"])
    intime = _seconds(df["intime"])
    los, _ = _numbers(df["los"])
    skipped: list[SkippedRecord] = []

    def name(i: int) -> str:
        return f"mimic/{int(stay_id[i])}" if np.isfinite(stay_id[i]) else f"{path.name}:row{i + 2}"

    ok = np.ones(n_table, dtype=bool)
    for bad, reason in (
        (~np.isfinite(stay_id) | ~np.isfinite(subject_id), "unparseable stay_id or subject_id"),
        (~np.isfinite(intime), "unparseable intime"),
        (~np.isfinite(los) | (los < 0), "missing or negative los"),
    ):
        for i in np.flatnonzero(bad & ok):
            skipped.append(SkippedRecord(name(int(i)), f"{path.name}: {reason}"))
        ok &= ~bad
    dup = pd.Series(stay_id).duplicated(keep="first").to_numpy() & ok
    for i in np.flatnonzero(dup):
        skipped.append(SkippedRecord(name(int(i)), f"{path.name}: duplicate stay_id"))
    ok &= ~dup
    malformed = int((~ok).sum())

    if task == "ihm48":
        label = _mortality(root, hadm_id)
        no_label = ok & (label < 0)
        for i in np.flatnonzero(no_label):
            skipped.append(SkippedRecord(name(int(i)), "no admissions row with a 0/1 hospital_expire_flag"))
        ok &= ~no_label
    else:
        label = (los > 3.0).astype(np.int64)

    excluded: dict[str, int] = {}
    short = ok & (los * 24.0 < min_hours)
    excluded[f"ICU stay shorter than {min_hours:g} h"] = int(short.sum())
    keep = np.flatnonzero(ok & ~short)
    keep = keep[np.argsort(stay_id[keep], kind="stable")]
    stays = _Stays(
        stay_id=stay_id[keep].astype(np.int64),
        subject_id=subject_id[keep].astype(np.int64),
        intime=intime[keep],
        label=label[keep].astype(np.int64),
    )
    return stays, n_table, excluded, skipped, malformed


def _mortality(root: Path, hadm_id: np.ndarray) -> np.ndarray:
    """hospital_expire_flag per stay's admission; -1 where the admission or its flag is unusable."""
    df = next(_read(_require(root, "admissions"), "admissions", chunked=False))
    adm_id = _ids(df["hadm_id"])
    flag, _ = _numbers(df["hospital_expire_flag"])
    good = np.isfinite(adm_id) & np.isin(flag, (0.0, 1.0))
    by_id = pd.Series(flag[good], index=adm_id[good])
    by_id = by_id[~by_id.index.duplicated(keep="first")]
    out = by_id.reindex(hadm_id).to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(out), out, -1).astype(np.int64)


def _point_hours(t: np.ndarray, intime: np.ndarray, hours: int) -> tuple[np.ndarray, np.ndarray]:
    """Hour index from ICU admission and whether it falls inside the window."""
    rel = (t - intime) / 3600.0
    inside = (rel >= 0) & (rel < hours)
    return np.floor(np.where(inside, rel, 0.0)).astype(np.int64), inside


def _in_range(var: Variable, values: np.ndarray, out_of_range: dict[str, int]) -> np.ndarray:
    ok = (values >= var.low) & (values <= var.high)
    out_of_range[var.name] += int((~ok).sum())
    return ok


def _values_for(var: Variable, itemid: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``var`` and their values in the variable's unit."""
    rows = np.isin(itemid, var.itemids)
    vals = value[rows]
    if var.fahrenheit_itemids:
        fahrenheit = np.isin(itemid[rows], var.fahrenheit_itemids)
        vals = np.where(fahrenheit, (vals - 32.0) * (5.0 / 9.0), vals)
    return rows, vals


def _read_point_events(
    path: Path,
    table: Source,
    stays: _Stays,
    hours: int,
    variables: tuple[tuple[int, Variable], ...],
    events: _Events,
    out_of_range: dict[str, int],
) -> int:
    """Charted values (chartevents, outputevents, labevents) onto the grid; returns malformed rows."""
    wanted = np.unique(np.concatenate([np.asarray(v.itemids, dtype=np.float64) for _, v in variables]))
    by_subject = table == "labevents"
    key_col = "subject_id" if by_subject else "stay_id"
    value_col = "valuenum" if table != "outputevents" else "value"
    stay_keys = pd.DataFrame({"key": stays.subject_id if by_subject else stays.stay_id,
                              "stay": np.arange(len(stays.stay_id))})
    malformed = 0
    for chunk in _read(path, table, chunked=True):
        itemid = _ids(chunk["itemid"])
        key = _ids(chunk[key_col])
        malformed += int((~np.isfinite(itemid) | ~np.isfinite(key)).sum())
        rows = np.isin(itemid, wanted) & np.isin(key, stay_keys["key"].to_numpy())
        if not rows.any():
            continue
        sub = chunk.loc[rows]
        t = _seconds(sub["charttime"])
        value, bad_value = _numbers(sub[value_col])
        bad = ~np.isfinite(t) | bad_value
        malformed += int(bad.sum())
        good = ~bad & np.isfinite(value)
        # Labs carry no stay: pair each result with every stay of its patient, keep those in the window.
        pairs = pd.DataFrame({"key": key[rows][good].astype(np.int64), "row": np.flatnonzero(good)}).merge(
            stay_keys, on="key", how="inner"
        )
        row, stay = pairs["row"].to_numpy(), pairs["stay"].to_numpy()
        hour, inside = _point_hours(t[row], stays.intime[stay], hours)
        row, stay, hour = row[inside], stay[inside], hour[inside]
        ids = itemid[rows][row]
        vals = value[row]
        for var_idx, var in variables:
            sel, converted = _values_for(var, ids, vals)
            ok = _in_range(var, converted, out_of_range)
            events.add(stay[sel][ok], var_idx, hour[sel][ok], converted[ok])
    return malformed


def _read_inputevents(
    path: Path,
    stays: _Stays,
    hours: int,
    variables: tuple[tuple[int, Variable], ...],
    events: _Events,
    out_of_range: dict[str, int],
) -> int:
    """Infusions onto the grid, each shared out over the hours it overlaps; returns malformed rows."""
    stay_index = pd.Series(np.arange(len(stays.stay_id)), index=stays.stay_id)
    malformed = 0
    for chunk in _read(path, "inputevents", chunked=True):
        itemid, key = _ids(chunk["itemid"]), _ids(chunk["stay_id"])
        malformed += int((~np.isfinite(itemid) | ~np.isfinite(key)).sum())
        stay = stay_index.reindex(key).to_numpy(dtype=np.float64, na_value=np.nan)
        rows = np.isfinite(stay) & np.isfinite(itemid)
        if not rows.any():
            continue
        sub = chunk.loc[rows]
        stay = stay[rows].astype(np.int64)
        start = (_seconds(sub["starttime"]) - stays.intime[stay]) / 3600.0
        end = (_seconds(sub["endtime"]) - stays.intime[stay]) / 3600.0
        amount, bad_amount = _numbers(sub["amount"])
        bad = ~np.isfinite(start) | ~np.isfinite(end) | (end < start) | bad_amount
        malformed += int(bad.sum())
        # An instantaneous entry (a bolus) falls in the hour it starts; an interval must overlap.
        overlaps = (start < hours) & ((end > 0) | ((end == start) & (start >= 0)))
        good = ~bad & np.isfinite(amount) & overlaps
        unit = sub["amountuom"].astype("string").str.lower().to_numpy(dtype=object, na_value="")
        ids = itemid[rows]
        for var_idx, var in variables:
            sel = good & (np.isin(ids, var.itemids) if var.itemids else True)
            if var.aggregation == "sum":
                sel &= unit == var.unit.lower()
            idx = np.flatnonzero(sel)
            ok = _in_range(var, amount[idx], out_of_range)
            idx = idx[ok]
            piece_row, hour, share = _split_hours(start[idx], end[idx], hours)
            value = amount[idx][piece_row] * share if var.aggregation == "sum" else np.ones(len(hour))
            events.add(stay[idx][piece_row], var_idx, hour, value)
    return malformed


def _split_hours(start: np.ndarray, end: np.ndarray, hours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For intervals in hours from admission: (interval index, hour, share of the interval) per piece."""
    first = np.floor(np.clip(start, 0.0, None)).astype(np.int64)
    last = np.where(end > start, np.ceil(end).astype(np.int64) - 1, first)
    last = np.minimum(last, hours - 1)
    count = np.maximum(last - first + 1, 0)
    piece_row = np.repeat(np.arange(len(start)), count)
    offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    hour = first[piece_row] + offsets
    s, e = start[piece_row], end[piece_row]
    duration = e - s
    overlap = np.minimum(e, hour + 1.0) - np.maximum(s, hour.astype(np.float64))
    share = np.where(duration > 0, overlap / np.where(duration > 0, duration, 1.0), 1.0)
    return piece_row, hour, share


def _grid(events: _Events, n: int, hours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, observed, values used per variable) from the collected contributions."""
    f = len(VARIABLES)
    x = np.zeros((n, f, hours), dtype=np.float32)
    observed = np.zeros((n, f, hours), dtype=bool)
    if not events.stay:
        return x, observed, np.zeros(f, dtype=np.int64)
    stay, var = np.concatenate(events.stay), np.concatenate(events.var)
    hour, value = np.concatenate(events.hour), np.concatenate(events.value)
    flat = (stay * f + var) * hours + hour
    cells, inverse = np.unique(flat, return_inverse=True)
    total = np.bincount(inverse, weights=value)
    count = np.bincount(inverse)
    cell_var = (cells // hours) % f
    how = np.array([v.aggregation for v in VARIABLES])[cell_var]
    result = np.where(how == "mean", total / count, total)
    result = np.where(how == "active", 1.0, result)
    x.reshape(-1)[cells] = result.astype(np.float32)
    observed.reshape(-1)[cells] = True
    return x, observed, np.bincount(var, minlength=f)


def dataset_info(task: Task = "ihm48", hours: int = 48) -> DatasetInfo:
    """The MIMIC-IV dataset's modalities, channels and classes (independent of the data)."""
    modalities = tuple(
        Modality(m, tuple(v.name for v in VARIABLES if v.modality == m)) for m in MODALITY_ORDER
    )
    return DatasetInfo(
        name="mimic_iv",
        modalities=modalities,
        sampling_rate_hz=1.0 / 3600.0,
        length=hours,
        classes=CLASSES[task],
        task=task,
    )


def load_mimic_with_stats(
    root: Path, *, task: Task = "ihm48", hours: int = 48
) -> tuple[ClinicalDataset, MimicLoadStats]:
    """Load ICU stays as an (N, F, hours) hourly dataset, with counts of what was dropped and why."""
    if task not in CLASSES:
        raise ValueError(f"unknown MIMIC-IV task {task!r}; expected one of {', '.join(CLASSES)}")
    if hours < 1:
        raise ValueError(f"hours must be at least 1, got {hours}")
    if task == "los3" and hours >= 72:
        raise ValueError(f"los3 predicts a stay beyond 72 h, so its window must be shorter; got hours={hours}")
    root = Path(root)
    info = dataset_info(task, hours)
    if tuple(v.name for v in VARIABLES) != info.channel_names:
        raise RuntimeError("mimic_items.VARIABLES must list channels grouped in MODALITY_ORDER")
    min_hours = max(hours, IHM_MIN_HOURS) if task == "ihm48" else hours
    stays, n_table, excluded, skipped, bad_stay_rows = _load_stays(root, task, min_hours)

    events = _Events([], [], [], [])
    out_of_range = {v.name: 0 for v in VARIABLES}
    malformed = {"icustays": bad_stay_rows}
    absent: list[str] = []
    for table in ("chartevents", "labevents", "outputevents", "inputevents"):
        variables = tuple((i, v) for i, v in enumerate(VARIABLES) if v.source == table)
        if table == "chartevents":
            path = table_path(root, table)
            if path is None:
                absent.append("icu/chartevents")
                log.warning("icu/chartevents not found under %s: vitals and neuro channels are unobserved", root)
                continue
        else:
            path = _require(root, table)
        if table == "inputevents":
            malformed[table] = _read_inputevents(path, stays, hours, variables, events, out_of_range)
        else:
            malformed[table] = _read_point_events(path, table, stays, hours, variables, events, out_of_range)

    n = len(stays.stay_id)
    x, observed, used = _grid(events, n, hours)
    # "active" channels are observed by definition, so they do not count as data of the stay.
    measured = np.array([v.aggregation != "active" for v in VARIABLES])
    observed[:, ~measured, :] = True
    has_data = observed[:, measured, :].any(axis=(1, 2))
    excluded["no measured value in the window"] = int((~has_data).sum())
    keep = np.flatnonzero(has_data)

    dataset = ClinicalDataset(
        info=info,
        x=x[keep],
        observed=observed[keep],
        y=stays.label[keep],
        sample_ids=tuple(f"mimic/{s}" for s in stays.stay_id[keep]),
        patient_ids=tuple(str(s) for s in stays.subject_id[keep]),
        skipped=tuple(skipped),
    )
    fractions = dataset.observed_fraction_by_modality()
    stats = MimicLoadStats(
        stays_in_table=n_table,
        stays_kept=len(dataset),
        excluded=excluded,
        skipped=len(skipped),
        out_of_range=out_of_range,
        malformed_rows=malformed,
        values_used={v.name: int(c) for v, c in zip(VARIABLES, used)},
        absent_tables=tuple(absent),
        unobserved_modalities=tuple(m for m, frac in fractions.items() if frac == 0.0),
    )
    _log_stats(stats, fractions, dataset.class_counts())
    return dataset, stats


def _log_stats(stats: MimicLoadStats, fractions: dict[str, float], classes: dict[str, int]) -> None:
    log.info(
        "MIMIC-IV: %d of %d ICU stays kept (%d unusable rows; excluded: %s); classes %s",
        stats.stays_kept, stats.stays_in_table, stats.skipped,
        ", ".join(f"{k}: {v}" for k, v in stats.excluded.items()), classes,
    )
    log.info("MIMIC-IV observed fraction by modality: %s",
             ", ".join(f"{m} {f:.3f}" for m, f in fractions.items()))
    dropped = {k: v for k, v in stats.out_of_range.items() if v}
    if dropped:
        log.info("MIMIC-IV values outside sanity ranges, dropped: %s",
                 ", ".join(f"{k} {v}" for k, v in dropped.items()))
    bad = {k: v for k, v in stats.malformed_rows.items() if v}
    if bad:
        log.warning("MIMIC-IV malformed rows dropped: %s", ", ".join(f"{k} {v}" for k, v in bad.items()))
    if stats.unobserved_modalities:
        log.warning("MIMIC-IV modalities with no observed entry: %s", ", ".join(stats.unobserved_modalities))


def load_mimic(root: Path, *, task: Task = "ihm48", hours: int = 48) -> ClinicalDataset:
    """Load ICU stays as an (N, F, hours) hourly dataset (see :func:`load_mimic_with_stats`)."""
    dataset, _ = load_mimic_with_stats(root, task=task, hours=hours)
    return dataset
