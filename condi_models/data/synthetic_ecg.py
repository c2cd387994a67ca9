"""Synthetic 12-lead ECGs with the PTB-XL layout and its five diagnostic superclasses.

Physiology. The heart is a single 3-D current dipole (the vectorcardiogram, VCG) in Frank
coordinates: x to the patient's left, y inferior, z posterior, in mV. Each beat is a sum of
Gaussian waves (P in two atrial parts, septal q, R, S, an ST plateau, T in two parts), each with
its own time offset from the R peak, width and 3-D amplitude vector. Beat times follow an RR series
with heart-rate variability (a Mayer-wave and a respiratory component plus jitter); T and ST move
with the RR interval as QT does (Bazett). The surface leads I, II and V1..V6 are projections of the
dipole through the Dower matrix (Dower et al., Clin. Cardiol. 1980); baseline wander and white
noise are then added to each of those eight leads independently. III, aVR, aVL and aVF are computed
from the noisy I and II as an ECG machine does, so Einthoven's and Goldberger's laws hold exactly
(up to float32 rounding) in the final signal, noise included.

Classes (patient traits: class, territory or subtype, electrical axis, body habitus, base heart
rate; record traits: heart-rate variability, wave jitter, wander, noise):

- NORM: normal conduction and repolarisation.
- MI: loss of depolarisation forces towards an anterior or inferior territory, which gives wide
  pathological Q waves and smaller R there; either acute-looking ST elevation or, more often, an
  evolved pattern with T inversion in that territory.
- STTC: ST depression and T-wave flattening or inversion, sometimes a long QT.
- CD: right or left bundle-branch block, left anterior fascicular block, non-specific
  intraventricular delay (wide QRS) or first-degree AV block (long PR), the blocks sometimes with
  a long PR as well.
- HYP: high QRS voltage directed left and posterior, a slightly wide QRS, often an LV strain
  pattern (ST depression and T inversion opposite the QRS) and sometimes left-atrial P widening.

Amplitude, axis and heart rate vary per patient, and noise per record, so the classes overlap
(a tall normal patient against a mild HYP, a flat T against a mild STTC).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality
from condi_models.data.ptbxl import PTBXL_LEADS, SUPERCLASSES

logger = logging.getLogger(__name__)

DEFAULT_CLASS_WEIGHTS: tuple[float, ...] = (0.44, 0.16, 0.16, 0.12, 0.12)
N_FOLDS = 10

# Dower transform, Frank (x, y, z) -> I, II, V1..V6 (rows), from Dower et al. 1980.
_DOWER = np.array(
    [
        [0.632, -0.235, 0.059],
        [0.235, 1.066, -0.132],
        [-0.515, 0.157, -0.917],
        [0.044, 0.164, -1.387],
        [0.882, 0.098, -1.277],
        [1.213, 0.127, -0.601],
        [1.125, 0.127, -0.086],
        [0.831, 0.076, 0.230],
    ]
)
# anterior wall faces V1..V4 (-z, a little right); inferior wall faces II, III, aVF (+y)
_TERRITORY = {
    "anterior": np.array([-0.25, 0.0, -1.0]) / np.linalg.norm([-0.25, 0.0, -1.0]),
    "inferior": np.array([0.0, 1.0, 0.15]) / np.linalg.norm([0.0, 1.0, 0.15]),
}
_CD_SUBTYPES = ("RBBB", "LBBB", "LAFB", "IVCD", "AVB1")
_CD_WEIGHTS = (0.3, 0.2, 0.2, 0.15, 0.15)


@dataclass
class _Wave:
    """One Gaussian component of a beat: offset from the R peak (s), width (s), vector (mV)."""

    offset: float
    width: float
    vector: np.ndarray
    rr_scaled: bool = False  # repolarisation waves move with the RR interval


@dataclass(frozen=True)
class _Patient:
    """Traits shared by all records of one synthetic patient."""

    label: int
    subtype: str
    rotation: np.ndarray  # (3, 3) electrical axis / heart position
    habitus: float  # overall voltage scale
    chest_gain: float  # precordial voltage scale (chest wall)
    heart_rate: float  # beats per minute


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _rotation(alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Rotations about z (frontal axis), y (horizontal plane) and x (tilt), in radians."""
    ca, sa, cb, sb, cg, sg = np.cos(alpha), np.sin(alpha), np.cos(beta), np.sin(beta), np.cos(gamma), np.sin(gamma)
    rz = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cg, -sg], [0.0, sg, cg]])
    return rz @ ry @ rx


def _make_patient(rng: np.random.Generator, weights: np.ndarray) -> _Patient:
    label = int(rng.choice(len(SUPERCLASSES), p=weights))
    cls = SUPERCLASSES[label]
    if cls == "MI":
        subtype = str(rng.choice(list(_TERRITORY)))
    elif cls == "CD":
        subtype = str(rng.choice(_CD_SUBTYPES, p=_CD_WEIGHTS))
    else:
        subtype = cls
    angles = np.deg2rad(rng.normal(0.0, [22.0, 15.0, 8.0]))
    return _Patient(
        label=label,
        subtype=subtype,
        rotation=_rotation(*angles),
        habitus=float(rng.lognormal(0.0, 0.22)),
        # centred above 1 because the Dower matrix gives smaller chest-lead voltages than PTB-XL shows
        chest_gain=float(rng.lognormal(np.log(1.2), 0.12)),
        heart_rate=float(np.clip(rng.normal(72.0, 12.0), 45.0, 120.0)),
    )


def _normal_beat(rng: np.random.Generator) -> dict[str, _Wave]:
    """A normal beat with per-record jitter of every wave.

    The main QRS is two waves, Ra (left, inferior) then Rb (left, posterior), so the QRS vector
    turns as the real QRS loop does and the mid-precordial leads see an RS complex.
    """

    def vec(*v: float, sd: float = 0.12) -> np.ndarray:
        return np.array(v) * rng.lognormal(0.0, sd)

    pr = rng.uniform(0.13, 0.19)
    qrs = rng.uniform(0.9, 1.1)
    return {
        "P1": _Wave(-pr - 0.005, 0.018, vec(0.02, 0.08, -0.04)),
        "P2": _Wave(-pr + 0.025, 0.020, vec(0.07, 0.05, 0.04)),
        "q": _Wave(-0.028, 0.008, vec(-0.12, 0.02, -0.12, sd=0.3)),
        "Ra": _Wave(-0.008, 0.010 * qrs, vec(0.75, 0.3, -0.15, sd=0.15) + rng.normal(0, 0.08, 3)),
        "Rb": _Wave(0.010, 0.011 * qrs, vec(0.8, 0.1, 0.9, sd=0.15) + rng.normal(0, 0.08, 3)),
        "S": _Wave(0.032, 0.009, vec(-0.25, -0.25, 0.35, sd=0.3)),
        "ST": _Wave(0.12, 0.045, np.zeros(3), rr_scaled=True),
        "T1": _Wave(0.23, 0.045, vec(0.22, 0.15, -0.12, sd=0.2), rr_scaled=True),
        "T2": _Wave(0.275, 0.03, vec(0.18, 0.12, -0.1, sd=0.2), rr_scaled=True),
    }


_MAIN_QRS = ("Ra", "Rb")


def _qrs_axis(beat: dict[str, _Wave]) -> np.ndarray:
    """Unit vector of the mean main QRS force."""
    return _unit(sum(beat[name].vector for name in _MAIN_QRS))


def _set_pr(beat: dict[str, _Wave], pr: float) -> None:
    beat["P1"].offset, beat["P2"].offset = -pr - 0.005, -pr + 0.025


def _scale_t(beat: dict[str, _Wave], factor: float) -> None:
    for name in ("T1", "T2"):
        beat[name].vector = beat[name].vector * factor


def _point_t(beat: dict[str, _Wave], direction: np.ndarray, size: float) -> None:
    """Replace T with a wave of ``size`` mV along ``direction`` (secondary repolarisation)."""
    beat["T1"].vector = direction * size * 0.55
    beat["T2"].vector = direction * size * 0.45


def _widen_qrs(beat: dict[str, _Wave], factor: float) -> None:
    """Slower ventricular conduction: the main QRS waves last longer and spread apart."""
    for name in _MAIN_QRS:
        beat[name].width *= factor
        beat[name].offset *= factor
    beat["S"].offset *= factor


def _myocardial_infarction(beat: dict[str, _Wave], u: np.ndarray, rng: np.random.Generator) -> None:
    """Necrosis facing ``u``: wide Q away from it, lost R towards it, then acute or evolved ST-T."""
    beat["Qmi"] = _Wave(-0.024, 0.013, -u * rng.uniform(0.25, 0.7))
    loss = rng.uniform(0.4, 0.9)
    for name in _MAIN_QRS:
        v = beat[name].vector
        beat[name].vector = v - max(float(v @ u), 0.0) * loss * u
    if rng.random() < 0.35:
        beat["ST"].vector = u * rng.uniform(0.08, 0.25)
        for name in ("T1", "T2"):
            beat[name].vector = beat[name].vector + u * 0.1
    else:
        beat["ST"].vector = u * rng.uniform(0.0, 0.06)
        for name in ("T1", "T2"):
            t = beat[name].vector
            beat[name].vector = t - (1.0 + rng.uniform(0.5, 1.5)) * max(float(t @ u), 0.0) * u - 0.08 * u


def _hypertrophy(beat: dict[str, _Wave], rng: np.random.Generator) -> None:
    """LV hypertrophy: large left-posterior QRS forces, often strain, sometimes left-atrial P."""
    gain = rng.uniform(1.3, 2.0)
    beat["Ra"].vector = beat["Ra"].vector * gain
    beat["Rb"].vector = beat["Rb"].vector * gain + np.array([0.15, 0.0, rng.uniform(0.2, 0.6)])
    beat["S"].vector = beat["S"].vector * rng.uniform(1.0, 1.8)
    _widen_qrs(beat, rng.uniform(1.05, 1.25))
    if rng.random() < 0.65:
        axis = _qrs_axis(beat)
        beat["ST"].vector = -axis * rng.uniform(0.03, 0.15)
        _point_t(beat, -axis, rng.uniform(0.05, 0.35))
    if rng.random() < 0.4:
        beat["P2"].width *= 1.4
        beat["P2"].vector = beat["P2"].vector * 1.3


def _conduction_disturbance(beat: dict[str, _Wave], kind: str, rng: np.random.Generator) -> None:
    """Bundle-branch and fascicular blocks, intraventricular delay, first-degree AV block."""
    if kind == "RBBB":
        # late, slow right-ventricular activation: R' in V1, broad S in I and V6, T opposite
        terminal = np.array([-0.45, 0.05, -0.55]) * rng.uniform(0.6, 1.3)
        beat["Rp"] = _Wave(0.055, 0.02 * rng.uniform(0.8, 1.2), terminal)
        beat["S"].width *= 1.6
        for name in ("T1", "T2"):
            beat[name].vector = beat[name].vector - 0.2 * terminal
    elif kind == "LBBB":
        # no septal q, one slow leftward-posterior sweep, repolarisation discordant to it
        size = float(np.linalg.norm(sum(beat[name].vector for name in _MAIN_QRS))) * rng.uniform(0.9, 1.3)
        beat["q"].vector = np.zeros(3)
        beat["S"].vector = np.zeros(3)
        beat["Ra"].vector = _unit(np.array([1.0, 0.35, 0.6])) * size * 0.6
        beat["Rb"].vector = _unit(np.array([0.8, 0.2, 1.2])) * size * 0.6
        _widen_qrs(beat, rng.uniform(2.0, 2.6))
        axis = _qrs_axis(beat)
        beat["ST"].vector = -axis * rng.uniform(0.05, 0.15)
        _point_t(beat, -axis, rng.uniform(0.2, 0.5))
    elif kind == "LAFB":
        # left axis deviation: the main forces turn superior
        for name in _MAIN_QRS:
            v = beat[name].vector
            beat[name].vector = np.array([v[0], -abs(v[1]) - rng.uniform(0.2, 0.5), v[2]])
        beat["q"].vector = np.array([-0.05, 0.12, -0.05])
        _widen_qrs(beat, 1.1)
    elif kind == "IVCD":
        _widen_qrs(beat, rng.uniform(1.5, 1.9))
        beat["S"].width *= 1.5
    if kind == "AVB1" or rng.random() < 0.25:
        _set_pr(beat, rng.uniform(0.22, 0.34))


def _apply_class(beat: dict[str, _Wave], patient: _Patient, rng: np.random.Generator) -> None:
    """Class-specific morphology, applied to a normal beat in place."""
    kind = patient.subtype
    if kind in _TERRITORY:
        _myocardial_infarction(beat, _TERRITORY[kind], rng)
    elif kind == "STTC":
        beat["ST"].vector = -_qrs_axis(beat) * rng.uniform(0.03, 0.18)
        _scale_t(beat, rng.uniform(-0.8, 0.35))
        if rng.random() < 0.3:
            for name in ("ST", "T1", "T2"):
                beat[name].offset *= rng.uniform(1.1, 1.3)
    elif kind == "HYP":
        _hypertrophy(beat, rng)
    elif kind in _CD_SUBTYPES:
        _conduction_disturbance(beat, kind, rng)


def _beat_times(rng: np.random.Generator, heart_rate: float, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """R-peak times (s) covering the window with margin, and the RR interval before each beat."""
    rr0 = 60.0 / (heart_rate * rng.lognormal(0.0, 0.05))
    n = int(np.ceil((seconds + 2.0) / rr0 * 1.2)) + 3
    nominal = np.arange(n) * rr0
    modulation = (
        rng.uniform(0.01, 0.05) * np.sin(2 * np.pi * rng.uniform(0.08, 0.12) * nominal + rng.uniform(0, 2 * np.pi))
        + rng.uniform(0.01, 0.04) * np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * nominal + rng.uniform(0, 2 * np.pi))
    )
    rr = np.clip(rr0 * (1.0 + modulation) + rng.normal(0.0, 0.01, n), 0.3, 2.0)
    times = -rr0 - rng.uniform(0.0, rr0) + np.cumsum(rr)
    keep = times < seconds + 0.8
    return times[keep], rr[keep]


def _dipole(beat: dict[str, _Wave], times: np.ndarray, rr: np.ndarray, length: int, fs: float,
            rng: np.random.Generator) -> np.ndarray:
    """The (3, length) dipole: every wave of every beat summed on the sample grid."""
    waves = list(beat.values())
    offset = np.array([w.offset for w in waves])
    # a Gaussian anti-alias kernel folded in analytically keeps peaks honest at 100 Hz
    width = np.sqrt(np.array([w.width for w in waves]) ** 2 + (0.3 / fs) ** 2)
    gain = np.array([w.width for w in waves]) / width
    vectors = np.stack([w.vector for w in waves]) * gain[:, None]  # (W, 3)
    scaled = np.array([w.rr_scaled for w in waves])[:, None]
    qt_factor = np.sqrt(rr)[None, :]  # Bazett: repolarisation timing grows with sqrt(RR)
    rel_centers = np.where(scaled, offset[:, None] * qt_factor, offset[:, None])  # (W, B)
    widths = np.where(scaled, width[:, None] * qt_factor, width[:, None])
    # each beat is evaluated only on its own support (+-5 widths), then added onto the record
    first = float((rel_centers - 5 * widths).min())
    span = int(np.ceil((float((rel_centers + 5 * widths).max()) - first) * fs)) + 2
    idx = np.floor((times + first) * fs).astype(np.int64)[:, None] + np.arange(span)  # (B, K)
    z = (idx[None] / fs - (times[None, :] + rel_centers)[:, :, None]) / widths[:, :, None]
    beat_gain = 1.0 + rng.normal(0.0, 0.03, times.shape)  # beat-to-beat amplitude (respiration)
    g = np.exp(-0.5 * z * z) * beat_gain[None, :, None]  # (W, B, K)
    contrib = np.einsum("wbk,wd->dbk", g, vectors)
    inside = (idx >= 0) & (idx < length)
    return np.stack([np.bincount(idx[inside], weights=c[inside], minlength=length) for c in contrib])


def _wander_and_noise(rng: np.random.Generator, t: np.ndarray, n_leads: int) -> np.ndarray:
    """(n_leads, L): slow baseline wander (respiration and drift) plus white noise, in mV."""
    level = rng.lognormal(np.log(0.04), 0.5)
    freqs = rng.uniform(0.05, 0.5, (n_leads, 2))
    phases = rng.uniform(0.0, 2 * np.pi, (n_leads, 2))
    amps = rng.uniform(0.0, level, (n_leads, 2))
    wander = np.einsum("nk,nkl->nl", amps, np.sin(2 * np.pi * freqs[:, :, None] * t + phases[:, :, None]))
    sigma = rng.uniform(0.005, 0.025)
    return wander + rng.normal(0.0, sigma, (n_leads, t.size))


def _record(patient: _Patient, rng: np.random.Generator, t: np.ndarray, fs: float, seconds: float) -> np.ndarray:
    """One (12, L) float32 record in standard lead order."""
    beat = _normal_beat(rng)
    _apply_class(beat, patient, rng)
    for w in beat.values():
        w.vector = patient.rotation @ w.vector * patient.habitus
    times, rr = _beat_times(rng, patient.heart_rate, seconds)
    surface = _DOWER @ _dipole(beat, times, rr, t.size, fs, rng)  # (8, L): I, II, V1..V6
    surface[2:] *= patient.chest_gain
    surface = (surface + _wander_and_noise(rng, t, surface.shape[0])).astype(np.float32)
    lead_i, lead_ii = surface[0], surface[1]
    limb = np.stack(
        [lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2]
    )
    return np.concatenate([limb, surface[2:]])


def synthetic_ecg_info(fs: float = 100.0, seconds: float = 10.0) -> DatasetInfo:
    """The DatasetInfo of generated records: PTB-XL's leads, classes and task."""
    return DatasetInfo(
        name="synthetic_ecg",
        modalities=tuple(Modality(name=lead, channels=(lead,)) for lead in PTBXL_LEADS),
        sampling_rate_hz=float(fs),
        length=round(fs * seconds),
        classes=SUPERCLASSES,
        task="superclass",
    )


def generate_ecg(
    n_records: int,
    *,
    seed: int,
    fs: float = 100.0,
    seconds: float = 10.0,
    class_weights: Sequence[float] | None = None,
    records_per_patient: int = 1,
) -> ClinicalDataset:
    """Generate ``n_records`` synthetic 12-lead ECGs in mV, laid out like PTB-XL.

    Record i belongs to patient ``i // records_per_patient``; patient traits (class included) come
    from a generator seeded by (seed, patient) and the record's own variation from one seeded by
    (seed, i), so a record never depends on ``n_records``. ``class_weights`` are the probabilities
    of NORM, MI, STTC, CD, HYP (default roughly as in PTB-XL). Folds are 1..10, one per patient,
    assigned round-robin. Every entry is observed.
    """
    if n_records < 0:
        raise ValueError(f"n_records must be >= 0, got {n_records}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if records_per_patient < 1:
        raise ValueError(f"records_per_patient must be >= 1, got {records_per_patient}")
    if fs <= 0 or seconds <= 0 or round(fs * seconds) < 1:
        raise ValueError(f"fs ({fs}) and seconds ({seconds}) must be positive and give at least one sample")
    weights = np.asarray(DEFAULT_CLASS_WEIGHTS if class_weights is None else class_weights, dtype=np.float64)
    if weights.shape != (len(SUPERCLASSES),) or np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError(
            f"class_weights must be {len(SUPERCLASSES)} non-negative numbers for {list(SUPERCLASSES)} "
            f"with a positive sum, got {list(weights)}"
        )
    weights = weights / weights.sum()
    info = synthetic_ecg_info(fs, seconds)
    t = np.arange(info.length) / fs

    x = np.empty((n_records, info.n_features, info.length), dtype=np.float32)
    y = np.empty(n_records, dtype=np.int64)
    for p in range(-(-n_records // records_per_patient)):
        patient = _make_patient(np.random.default_rng([seed, 1, p]), weights)
        for i in range(p * records_per_patient, min((p + 1) * records_per_patient, n_records)):
            x[i] = _record(patient, np.random.default_rng([seed, 0, i]), t, fs, seconds)
            y[i] = patient.label
    patients = np.arange(n_records) // records_per_patient
    logger.info("synthetic ECG: %d records, %d patients, seed %d", n_records, len(set(patients)), seed)
    return ClinicalDataset(
        info=info,
        x=x,
        observed=np.ones(x.shape, dtype=bool),
        y=y,
        sample_ids=tuple(f"synecg/{i}" for i in range(n_records)),
        patient_ids=tuple(f"synecg-p{p}" for p in patients),
        y_multi=np.eye(len(SUPERCLASSES), dtype=bool)[y],
        folds=(patients % N_FOLDS + 1).astype(np.int64),
    )
