"""Synthetic ICU stays written as MIMIC-IV tables, so tests and demos run the real loader end to end.

Each stay follows a latent severity trajectory (a per-stay level and drift plus slow noise), and
organ-specific latents derived from it drive the measurements:

- circulation: mean blood pressure falls as severity rises; heart rate rises when pressure falls
  (baroreflex), so the two anti-correlate within a stay; sustained hypotension starts a
  norepinephrine infusion and saline boluses;
- respiration: hypoxia (falling SpO2) raises the respiratory rate;
- kidneys: creatinine, BUN and potassium rise and urine output falls; lactate rises and pH and
  base excess fall with severity;
- labs are drawn every 6 to 24 h (sooner when sicker), vitals are charted about hourly at
  irregular minutes, GCS and temperature every few hours.

Outcomes follow the trajectory: death is more likely the higher the severity at 48 h, and the
ICU stay is longer the sicker the first two days were, so both loader tasks are learnable. The
same seed gives byte-identical files (gzip headers carry no timestamp).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from condi_models.data.dataset import ClinicalDataset
from condi_models.data.mimic import Task, load_mimic

# (label, abbreviation, linksto, category, unitname) of the ICU items the generator writes.
_D_ITEMS: dict[int, tuple[str, str, str, str, str]] = {
    220045: ("Heart Rate", "HR", "chartevents", "Routine Vital Signs", "bpm"),
    220050: ("Arterial Blood Pressure systolic", "ABPs", "chartevents", "Routine Vital Signs", "mmHg"),
    220051: ("Arterial Blood Pressure diastolic", "ABPd", "chartevents", "Routine Vital Signs", "mmHg"),
    220052: ("Arterial Blood Pressure mean", "ABPm", "chartevents", "Routine Vital Signs", "mmHg"),
    220179: ("Non Invasive Blood Pressure systolic", "NBPs", "chartevents", "Routine Vital Signs", "mmHg"),
    220180: ("Non Invasive Blood Pressure diastolic", "NBPd", "chartevents", "Routine Vital Signs", "mmHg"),
    220181: ("Non Invasive Blood Pressure mean", "NBPm", "chartevents", "Routine Vital Signs", "mmHg"),
    220210: ("Respiratory Rate", "RR", "chartevents", "Respiratory", "insp/min"),
    220277: ("O2 saturation pulseoxymetry", "SpO2", "chartevents", "Respiratory", "%"),
    223761: ("Temperature Fahrenheit", "Temperature F", "chartevents", "Routine Vital Signs", "°F"),
    223762: ("Temperature Celsius", "Temperature C", "chartevents", "Routine Vital Signs", "°C"),
    220739: ("GCS - Eye Opening", "Eye Opening", "chartevents", "Neurological", ""),
    223900: ("GCS - Verbal Response", "Verbal Response", "chartevents", "Neurological", ""),
    223901: ("GCS - Motor Response", "Motor Response", "chartevents", "Neurological", ""),
    226559: ("Foley", "Foley", "outputevents", "Output", "mL"),
    225158: ("NaCl 0.9%", "NaCl 0.9%", "inputevents", "Fluids/Intake", "mL"),
    225828: ("LR", "LR", "inputevents", "Fluids/Intake", "mL"),
    226089: ("Piggyback", "Piggyback", "inputevents", "Fluids/Intake", "mL"),
    225798: ("Vancomycin", "Vancomycin", "inputevents", "Antibiotics", "dose"),
    221906: ("Norepinephrine", "Norepinephrine", "inputevents", "Medications", "mg"),
}

# (itemid, label, category, unit, decimals) of the lab items, grouped as they are drawn.
_CHEMISTRY = (
    (50983, "Sodium", "Chemistry", "mEq/L", 0),
    (50971, "Potassium", "Chemistry", "mEq/L", 1),
    (50902, "Chloride", "Chemistry", "mEq/L", 0),
    (50882, "Bicarbonate", "Chemistry", "mEq/L", 0),
    (50912, "Creatinine", "Chemistry", "mg/dL", 1),
    (51006, "Urea Nitrogen", "Chemistry", "mg/dL", 0),
    (50931, "Glucose", "Chemistry", "mg/dL", 0),
    (50868, "Anion Gap", "Chemistry", "mEq/L", 0),
    (50893, "Calcium, Total", "Chemistry", "mg/dL", 1),
    (50960, "Magnesium", "Chemistry", "mg/dL", 1),
    (50970, "Phosphate", "Chemistry", "mg/dL", 1),
)
_HEMATOLOGY = (
    (51222, "Hemoglobin", "Hematology", "g/dL", 1),
    (51221, "Hematocrit", "Hematology", "%", 1),
    (51301, "White Blood Cells", "Hematology", "K/uL", 1),
    (51265, "Platelet Count", "Hematology", "K/uL", 0),
    (51237, "INR(PT)", "Hematology", "", 1),
    (51274, "PT", "Hematology", "sec", 1),
)
_BLOOD_GAS = (
    (50820, "pH", "Blood Gas", "units", 2),
    (50821, "pO2", "Blood Gas", "mm Hg", 0),
    (50818, "pCO2", "Blood Gas", "mm Hg", 0),
    (50813, "Lactate", "Blood Gas", "mmol/L", 1),
    (50802, "Base Excess", "Blood Gas", "mEq/L", 0),
)

_STEP_H = 1.0 / 6.0  # resolution of the latent trajectories (10 min)
_CARE_UNITS = (
    "Medical Intensive Care Unit (MICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Medical/Surgical Intensive Care Unit (MICU/SICU)",
)


@dataclass
class _Table:
    """Columns of one table collected as arrays, one batch of rows at a time."""

    columns: tuple[str, ...]
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **cols: object) -> None:
        n = max((len(v) for v in cols.values() if isinstance(v, np.ndarray)), default=1)
        if set(cols) != set(self.columns):
            raise KeyError(f"rows need exactly {self.columns}, got {tuple(cols)}")
        for name, value in cols.items():
            arr = value if isinstance(value, np.ndarray) else np.full(n, value, dtype=object)
            self.parts.setdefault(name, []).append(arr)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {c: np.concatenate(self.parts[c]) if c in self.parts else np.array([]) for c in self.columns}
        )


@dataclass(frozen=True)
class _Course:
    """One stay's latent trajectories on a 10-minute grid, and its outcome."""

    t: np.ndarray  # hours from ICU admission
    severity: np.ndarray
    circulation: np.ndarray
    respiration: np.ndarray
    kidney: np.ndarray
    died: bool
    los_days: float

    def at(self, latent: np.ndarray, hours: np.ndarray) -> np.ndarray:
        return np.interp(hours, self.t, latent)


def _slow_noise(rng: np.random.Generator, n: int, sd: float, tau_h: float) -> np.ndarray:
    """An Ornstein-Uhlenbeck path with stationary sd ``sd`` and time constant ``tau_h`` hours."""
    a = np.exp(-_STEP_H / tau_h)
    shocks = rng.normal(0.0, sd * np.sqrt(1.0 - a * a), n)
    out = np.empty(n)
    out[0] = rng.normal(0.0, sd)
    for i in range(1, n):
        out[i] = a * out[i - 1] + shocks[i]
    return out


def _course(rng: np.random.Generator, horizon_h: float) -> _Course:
    n = int(np.ceil(max(horizon_h, 48.0) / _STEP_H)) + 1
    t = np.arange(n) * _STEP_H
    level = rng.normal(0.0, 0.8)
    drift_per_h = rng.normal(0.0, 0.6) / 24.0
    severity = level + drift_per_h * t + _slow_noise(rng, n, 0.25, 6.0)
    circulation = 0.8 * severity + _slow_noise(rng, n, 0.5, 3.0)
    respiration = 0.6 * severity + _slow_noise(rng, n, 0.5, 4.0)
    kidney = 0.7 * severity + _slow_noise(rng, n, 0.3, 12.0)
    at48 = float(np.interp(48.0, t, severity))
    died = bool(rng.random() < 1.0 / (1.0 + np.exp(-(-2.6 + 1.6 * at48))))
    mean48 = float(severity[t <= 48.0].mean())
    los_days = float(np.exp(rng.normal(np.log(2.6) + 0.4 * mean48, 0.55)))
    return _Course(t, severity, circulation, respiration, kidney, died, los_days)


def _jitter_times(rng: np.random.Generator, end_h: float, per_hour: tuple[float, float, float]) -> np.ndarray:
    """Irregular charting: per hour 0, 1 or 2 entries with the given probabilities, at random minutes."""
    hours = np.arange(int(np.floor(end_h)))
    counts = rng.choice(3, size=len(hours), p=per_hour)
    base = np.repeat(hours, counts).astype(np.float64)
    times = base + np.round(rng.random(len(base)) * 59.0) / 60.0
    return np.sort(times[times < end_h])


def _every(rng: np.random.Generator, end_h: float, gap_h: float) -> np.ndarray:
    """Scheduled checks every ``gap_h`` hours, each a few minutes early or late."""
    times = np.arange(rng.random() * gap_h, end_h, gap_h)
    times = np.round((times + rng.normal(0.0, 10.0 / 60.0, len(times))) * 60.0) / 60.0
    return np.sort(times[(times >= 0) & (times < end_h)])


@dataclass
class _Writer:
    """All tables of the synthetic database, filled stay by stay."""

    rng: np.random.Generator
    horizon_h: float
    chart: _Table = field(default_factory=lambda: _Table(
        ("subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
         "valuenum", "valueuom", "warning")))
    lab: _Table = field(default_factory=lambda: _Table(
        ("labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "charttime", "storetime", "value",
         "valuenum", "valueuom", "flag", "priority")))
    inputs: _Table = field(default_factory=lambda: _Table(
        ("subject_id", "hadm_id", "stay_id", "caregiver_id", "starttime", "endtime", "storetime", "itemid",
         "amount", "amountuom", "rate", "rateuom", "orderid", "ordercategoryname", "statusdescription",
         "patientweight")))
    outputs: _Table = field(default_factory=lambda: _Table(
        ("subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
         "valueuom")))
    n_specimens: int = 0
    n_lab_rows: int = 0

    def stay(self, ids: tuple[int, int, int], intime_s: int, course: _Course, weight: float) -> None:
        end_h = min(course.los_days * 24.0, self.horizon_h)
        self._vitals(ids, intime_s, course, end_h)
        self._labs(ids, intime_s, course, end_h)
        self._fluids(ids, intime_s, course, end_h, weight)

    def _chart_rows(self, ids: tuple[int, int, int], intime_s: int, times: np.ndarray, itemid: int,
                    values: np.ndarray, unit: str) -> None:
        subject, hadm, stay = ids
        charted = intime_s + np.round(times * 3600.0).astype(np.int64)
        self.chart.add(subject_id=subject, hadm_id=hadm, stay_id=stay, caregiver_id=1000 + stay % 97,
                       charttime=charted, storetime=charted + 120, itemid=itemid,
                       value=np.array([f"{v:g}" for v in values], dtype=object), valuenum=values,
                       valueuom=unit, warning=0)

    def _vitals(self, ids: tuple[int, int, int], intime_s: int, course: _Course, end_h: float) -> None:
        rng = self.rng
        times = _jitter_times(rng, end_h, (0.1, 0.75, 0.15))
        n = len(times)
        mbp = 82.0 - 11.0 * course.at(course.circulation, times) + rng.normal(0, 4, n)
        pulse = 45.0 + rng.normal(0, 5, n)
        # Baroreflex: the heart speeds up as the measured pressure falls below its usual level.
        hr = 78.0 + 0.9 * (82.0 - mbp) + 5.0 * course.at(course.severity, times) + rng.normal(0, 4, n)
        spo2 = np.clip(97.5 - 3.0 * course.at(course.respiration, times) - np.abs(rng.normal(0, 1, n)), 70, 100)
        rr = 15.0 + 0.8 * (97.0 - spo2) + 1.5 * course.at(course.respiration, times) + rng.normal(0, 2, n)
        arterial = rng.random() < 0.4
        bp_items = (220050, 220051, 220052) if arterial else (220179, 220180, 220181)
        for itemid, values in zip(bp_items, (mbp + 2 * pulse / 3, mbp - pulse / 3, mbp)):
            self._chart_rows(ids, intime_s, times, itemid, np.round(values), "mmHg")
        self._chart_rows(ids, intime_s, times, 220045, np.round(np.clip(hr, 30, 220)), "bpm")
        self._chart_rows(ids, intime_s, times, 220277, np.round(spo2), "%")
        self._chart_rows(ids, intime_s, times, 220210, np.round(np.clip(rr, 4, 60)), "insp/min")

        temp_times = _every(rng, end_h, 4.0)
        temp_c = 37.0 + 0.4 * course.at(course.severity, temp_times) + rng.normal(0, 0.3, len(temp_times))
        fahrenheit = rng.random(len(temp_times)) < 0.6
        if fahrenheit.any():
            self._chart_rows(ids, intime_s, temp_times[fahrenheit], 223761,
                             np.round(temp_c[fahrenheit] * 9 / 5 + 32, 1), "°F")
        if (~fahrenheit).any():
            self._chart_rows(ids, intime_s, temp_times[~fahrenheit], 223762, np.round(temp_c[~fahrenheit], 1), "°C")

        gcs_times = _every(rng, end_h, 4.0)
        depressed = np.maximum(course.at(course.severity, gcs_times), 0.0)
        for itemid, top in ((220739, 4), (223900, 5), (223901, 6)):
            score = np.clip(np.round(top - 1.2 * depressed + rng.normal(0, 0.4, len(gcs_times))), 1, top)
            self._chart_rows(ids, intime_s, gcs_times, itemid, score, "")

    def _labs(self, ids: tuple[int, int, int], intime_s: int, course: _Course, end_h: float) -> None:
        rng = self.rng
        # A draw in the emergency department before ICU admission, then every 6-24 h, sooner when sicker.
        draws = [-1.0 - 5.0 * rng.random(), rng.random() * 2.0]
        while True:
            sick = max(float(course.at(course.severity, np.array([draws[-1]]))[0]), 0.0)
            nxt = draws[-1] + rng.uniform(6.0, 24.0) / (1.0 + 0.5 * sick)
            if nxt >= end_h:
                break
            draws.append(nxt)
        for when in np.round(np.array(draws) * 60.0) / 60.0:
            at = np.array([max(when, 0.0)])
            s = float(course.at(course.severity, at)[0])
            k = float(course.at(course.kidney, at)[0])
            r = float(course.at(course.respiration, at)[0])
            na, cl, hco3 = 139 + rng.normal(0, 3), 103 + rng.normal(0, 3), 24 - 2.5 * s + rng.normal(0, 1.5)
            creat = 0.9 * np.exp(0.4 * k) * np.exp(rng.normal(0, 0.08))
            panels = []
            if rng.random() < 0.9:
                panels.append((_CHEMISTRY, (
                    na, 4.1 + 0.25 * k + rng.normal(0, 0.3), cl, hco3, creat,
                    18 * np.exp(0.45 * k) * np.exp(rng.normal(0, 0.1)), 130 + 25 * s + rng.normal(0, 20),
                    na - cl - hco3, 8.6 + rng.normal(0, 0.4), 2.0 + rng.normal(0, 0.2),
                    3.5 + 0.5 * k + rng.normal(0, 0.4))))
            if rng.random() < 0.85:
                hb = 10.5 - 0.5 * s + rng.normal(0, 0.6)
                inr = 1.2 + 0.15 * max(s, 0.0) + abs(rng.normal(0, 0.08))
                panels.append((_HEMATOLOGY, (
                    hb, 3.0 * hb + rng.normal(0, 1), 10 + 3 * s + abs(rng.normal(0, 2)),
                    210 - 35 * s + rng.normal(0, 25), inr, 11.5 * inr + rng.normal(0, 0.5))))
            if rng.random() < 0.3 + 0.5 / (1.0 + np.exp(-2.0 * s)):
                lactate = 1.1 * np.exp(0.5 * s) * np.exp(rng.normal(0, 0.15))
                panels.append((_BLOOD_GAS, (
                    7.40 - 0.04 * s + rng.normal(0, 0.02), 95 - 12 * r + rng.normal(0, 10),
                    40 + rng.normal(0, 4), lactate, -3.0 * s + rng.normal(0, 1.5))))
            for items, values in panels:
                self._lab_rows(ids, intime_s, when, items, values)

    def _lab_rows(self, ids: tuple[int, int, int], intime_s: int, when: float,
                  items: tuple[tuple[int, str, str, str, int], ...], values: tuple[float, ...]) -> None:
        subject, hadm, _ = ids
        self.n_specimens += 1
        rounded = np.array([round(float(v), d) for (_, _, _, _, d), v in zip(items, values)])
        drawn = intime_s + int(round(when * 3600.0))
        first_id = self.n_lab_rows + 1
        self.n_lab_rows += len(items)
        self.lab.add(
            labevent_id=np.arange(first_id, first_id + len(items)), subject_id=subject, hadm_id=hadm,
            specimen_id=self.n_specimens, itemid=np.array([i[0] for i in items]), charttime=drawn,
            storetime=drawn + 2400, value=np.array([f"{v:g}" for v in rounded], dtype=object), valuenum=rounded,
            valueuom=np.array([i[3] for i in items], dtype=object), flag="", priority="STAT",
        )

    def _fluids(self, ids: tuple[int, int, int], intime_s: int, course: _Course, end_h: float,
                weight: float) -> None:
        rng = self.rng
        subject, hadm, stay = ids

        def infuse(start_h: np.ndarray, end_h_: np.ndarray, itemid: int, amount: np.ndarray, amountuom: str,
                   rate: np.ndarray | str, rateuom: str, category: str, status: str) -> None:
            start = intime_s + np.round(start_h * 3600.0).astype(np.int64)
            stop = intime_s + np.round(end_h_ * 3600.0).astype(np.int64)
            self.inputs.add(subject_id=subject, hadm_id=hadm, stay_id=stay, caregiver_id=2000 + stay % 89,
                            starttime=start, endtime=stop, storetime=start, itemid=itemid, amount=amount,
                            amountuom=amountuom, rate=rate, rateuom=rateuom, orderid=stay * 100 + itemid % 100,
                            ordercategoryname=category, statusdescription=status, patientweight=weight)

        # Maintenance LR in 1 L bags at a steady rate.
        rate = float(rng.uniform(75.0, 125.0))
        bag_h = 1000.0 / rate
        starts = np.arange(rng.uniform(0.0, 3.0), end_h, bag_h)
        stops = np.minimum(starts + bag_h, end_h)
        infuse(starts, stops, 225828, np.round((stops - starts) * rate, 1), "ml", np.full(len(starts), rate),
               "mL/hour", "02-Fluids (Crystalloids)", "FinishedRunning")

        # Hourly pressure decides treatment; each infusion hour starts at a per-stay minute offset.
        offset = float(rng.integers(5, 55)) / 60.0
        hours = np.arange(offset, end_h - 1.0, 1.0)
        pressure = 82.0 - 11.0 * course.at(course.circulation, hours + 0.5)
        pressor = hours[pressure < 65.0]
        if len(pressor):
            dose = np.round(0.05 + 0.02 * (65.0 - pressure[pressure < 65.0]), 3)  # mcg/kg/min
            infuse(pressor, pressor + 1.0, 221906, np.round(dose * weight * 60.0 / 1000.0, 4), "mg", dose,
                   "mcg/kg/min", "01-Drips", "ChangeDose/Rate")
        bolus = hours[(pressure < 70.0) & (rng.random(len(hours)) < 0.3)]
        if len(bolus):
            infuse(bolus, bolus + 0.5, 225158, np.full(len(bolus), 500.0), "ml", np.full(len(bolus), 1000.0),
                   "mL/hour", "03-IV Fluid Bolus", "FinishedRunning")
        # Antibiotics: a 100 mL piggyback carrier (volume) and the drug itself (a dose, not a volume).
        doses = np.arange(rng.uniform(0.0, 4.0), end_h - 0.5, 12.0)
        if len(doses):
            infuse(doses, doses + 0.5, 226089, np.full(len(doses), 100.0), "ml", np.full(len(doses), 200.0),
                   "mL/hour", "08-Antibiotics (IV)", "FinishedRunning")
            infuse(doses, doses + 0.5, 225798, np.full(len(doses), 1.0), "dose", "", "",
                   "08-Antibiotics (IV)", "FinishedRunning")

        # Hourly Foley output charted near the end of each hour, some hours not charted.
        ends = np.arange(1.0, end_h)
        ends = ends[rng.random(len(ends)) < 0.9]
        ends = ends - np.round(rng.uniform(0.0, 10.0, len(ends))) / 60.0
        kidney = course.at(course.kidney, ends)
        urine = np.round(np.maximum(70.0 * np.exp(-0.6 * kidney) + rng.normal(0, 15, len(ends)), 0.0))
        charted = intime_s + np.round(ends * 3600.0).astype(np.int64)
        self.outputs.add(subject_id=subject, hadm_id=hadm, stay_id=stay, caregiver_id=3000 + stay % 83,
                         charttime=charted, storetime=charted + 300, itemid=226559, value=urine, valueuom="ml")


def _timestamps(seconds: pd.Series) -> pd.Series:
    """Epoch seconds as MIMIC-IV writes times, ``YYYY-MM-DD HH:MM:SS``; empty stays empty."""
    values = pd.to_numeric(seconds, errors="coerce")
    known = values.notna().to_numpy()
    out = np.full(len(values), "", dtype=object)
    if known.any():
        stamps = values.to_numpy()[known].astype(np.int64).astype("datetime64[s]")
        out[known] = np.char.replace(np.datetime_as_string(stamps, unit="s"), "T", " ")
    return pd.Series(out, index=seconds.index, dtype=object)


def _write(frame: pd.DataFrame, path: Path, time_columns: tuple[str, ...], gzip: bool) -> None:
    for col in time_columns:
        frame[col] = _timestamps(frame[col])
    target = path.with_name(path.name + (".csv.gz" if gzip else ".csv"))
    compression: dict[str, object] | None = {"method": "gzip", "mtime": 0} if gzip else None
    frame.to_csv(target, index=False, compression=compression)


def write_synthetic_mimic(out_dir: Path, n_stays: int, *, seed: int, hours: int = 72, gzip: bool = True) -> Path:
    """Write ``n_stays`` synthetic ICU stays as MIMIC-IV ``hosp/`` and ``icu/`` tables under ``out_dir``.

    ``hours`` is how much of each stay is charted (the whole stay when shorter). About one stay in
    ten is a readmission of the patient of the stay before it. Returns ``out_dir``, ready for ``load_mimic``.
    """
    if n_stays < 1:
        raise ValueError(f"n_stays must be at least 1, got {n_stays}")
    if hours < 1:
        raise ValueError(f"hours must be at least 1, got {hours}")
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    writer = _Writer(rng, float(hours))
    courses = [_course(rng, float(hours)) for _ in range(n_stays)]

    # A survivor's stay may be followed by a readmission of the same patient (another stay).
    subject_of = np.arange(n_stays)
    for j in range(1, n_stays):
        if rng.random() < 0.1 and subject_of[j - 1] == j - 1 and not courses[j - 1].died:
            subject_of[j] = j - 1

    stays = _Table(("subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime",
                    "los"))
    admissions = _Table(("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                         "admission_location", "discharge_location", "hospital_expire_flag"))
    patients = _Table(("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"))
    next_free_s: dict[int, int] = {}
    death_of: dict[int, int] = {}
    for j, course in enumerate(courses):
        subject, hadm, stay = 10_000_000 + int(subject_of[j]), 20_000_000 + j, 30_000_000 + j
        if subject_of[j] == j:
            year = int(rng.integers(2110, 2190))
            next_free_s[subject] = int(np.datetime64(f"{year}-01-01", "s").astype(np.int64))
            patients.add(subject_id=subject, gender="F" if rng.random() < 0.45 else "M",
                         anchor_age=int(rng.integers(18, 90)), anchor_year=year,
                         anchor_year_group=f"{year} - {year + 2}", dod=np.nan)
        admit_s = next_free_s[subject] + int(rng.integers(1, 200)) * 86400 + int(rng.integers(0, 86400))
        intime_s = admit_s + int(rng.integers(2 * 3600, 48 * 3600))
        los_s = int(round(course.los_days * 86400.0))
        outtime_s = intime_s + los_s
        in_icu_death = rng.random() < 0.7
        death_s = outtime_s if in_icu_death else outtime_s + int(rng.integers(86400, 5 * 86400))
        disch_s = death_s if course.died else outtime_s + int(rng.integers(86400, 10 * 86400))
        next_free_s[subject] = disch_s
        weight = float(np.round(rng.normal(80.0, 15.0), 1))
        unit = _CARE_UNITS[int(rng.integers(len(_CARE_UNITS)))]
        stays.add(subject_id=subject, hadm_id=hadm, stay_id=stay, first_careunit=unit, last_careunit=unit,
                  intime=intime_s, outtime=outtime_s, los=round(los_s / 86400.0, 6))
        admissions.add(subject_id=subject, hadm_id=hadm, admittime=admit_s, dischtime=disch_s,
                       deathtime=death_s if course.died else np.nan, admission_type="EW EMER.",
                       admission_location="EMERGENCY ROOM", discharge_location="DIED" if course.died else "HOME",
                       hospital_expire_flag=int(course.died))
        if course.died:
            death_of[subject] = death_s
        writer.stay((subject, hadm, stay), intime_s, course, weight)

    (out_dir / "hosp").mkdir(parents=True, exist_ok=True)
    (out_dir / "icu").mkdir(parents=True, exist_ok=True)
    patient_frame = patients.frame()
    patient_frame["dod"] = _timestamps(patient_frame["subject_id"].map(death_of)).str.slice(0, 10)
    _write(patient_frame, out_dir / "hosp" / "patients", (), gzip)
    _write(admissions.frame(), out_dir / "hosp" / "admissions", ("admittime", "dischtime", "deathtime"), gzip)
    _write(_d_labitems(), out_dir / "hosp" / "d_labitems", (), gzip)
    _write(writer.lab.frame(), out_dir / "hosp" / "labevents", ("charttime", "storetime"), gzip)
    _write(stays.frame(), out_dir / "icu" / "icustays", ("intime", "outtime"), gzip)
    _write(_d_items(), out_dir / "icu" / "d_items", (), gzip)
    _write(writer.chart.frame(), out_dir / "icu" / "chartevents", ("charttime", "storetime"), gzip)
    _write(writer.inputs.frame(), out_dir / "icu" / "inputevents", ("starttime", "endtime", "storetime"), gzip)
    _write(writer.outputs.frame(), out_dir / "icu" / "outputevents", ("charttime", "storetime"), gzip)
    return out_dir


def _d_items() -> pd.DataFrame:
    rows = [(i, label, abbr, links, cat, unit, "Numeric" if links == "chartevents" else "Solution", "", "")
            for i, (label, abbr, links, cat, unit) in sorted(_D_ITEMS.items())]
    return pd.DataFrame(rows, columns=["itemid", "label", "abbreviation", "linksto", "category", "unitname",
                                       "param_type", "lownormalvalue", "highnormalvalue"])


def _d_labitems() -> pd.DataFrame:
    rows = sorted((i, label, "Blood", cat) for i, label, cat, _, _ in (*_CHEMISTRY, *_HEMATOLOGY, *_BLOOD_GAS))
    return pd.DataFrame(rows, columns=["itemid", "label", "fluid", "category"])


def generate_icu(n_stays: int, *, seed: int, task: Task = "ihm48", hours: int = 48) -> ClinicalDataset:
    """Synthetic ICU dataset read through the real MIMIC-IV loader (written to a temporary directory).

    ``n_stays`` stays are written; the loader's cohort rules keep those that lasted the window
    (about two in three for 48 h).
    """
    with tempfile.TemporaryDirectory(prefix="condi-synthetic-icu-") as tmp:
        root = write_synthetic_mimic(Path(tmp), n_stays, seed=seed, hours=hours, gzip=False)
        return load_mimic(root, task=task, hours=hours)

