"""The beat template: what each ECG lead looked like at the same point of its other beats.

An ECG is quasi-periodic. Where a lead is missing for a stretch (a detached electrode), the same
lead's beats outside the gap carry the morphology the gap lost: its own P, QRS and T shapes, which
no linear combination of the other leads at the same instant reproduces. The template holds, for
every (lead, instant) of a record, the mean of that lead's observed values at the same offset from
the R peak in the record's other beats, with the lead's slow baseline removed (so the template
carries shape, not the other beats' wander). The imputer's Gaussian prior takes it as one more
conditioning variable per channel (``condi_models.nn.prior``), so the regression of a missing entry
uses the other leads at the same instant and the lead's own template together.

R peaks are found on the record's observed leads jointly: the mean absolute slope over the leads
observed at each instant, smoothed over 50 ms, peaks at least 300 ms apart (up to 200 beats per
minute) and above a third of the record's high slope level. Leads observed nowhere near a beat
simply have no template there. Everything is a deterministic function of the observed entries of
one record; entries that are not observed are never read. The template is computed on whole
records before they are cut into windows, so beats outside a window still reach it.

Measured on the shared PTB-XL sample (validation folds 3-4, trained on folds 5-8, 80 % of a lead's
time steps hidden in up to three blocks; the prior's conditional mean alone): MAE 0.192 across
leads alone, 0.176 with a template of the raw signal, 0.149 with the baseline removed over 1.5 s;
a template built inside 2.5 s windows only reached 0.178, which is why it is built per record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import find_peaks

# Shortest beat-to-beat interval looked for (200 beats per minute), slope smoothing window and the
# baseline window, in seconds.
MIN_BEAT_INTERVAL_S = 0.3
SLOPE_SMOOTHING_S = 0.05
BASELINE_WINDOW_S = 1.5
# A peak of the smoothed slope counts as a beat above this fraction of the record's 99th percentile.
PEAK_HEIGHT_FRACTION = 0.35

# Channel names that mark a dataset as an ECG (12-lead names, any case), where the template pays.
ECG_LEADS = frozenset({"I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"})


@dataclass(frozen=True)
class BeatTemplate:
    """(N, F, L) template values (0.0 where unavailable) and where they are available."""

    values: np.ndarray
    available: np.ndarray


def is_ecg(channel_names: tuple[str, ...]) -> bool:
    """Whether the channels are ECG leads (every name one of the 12 standard leads)."""
    return bool(channel_names) and all(name.upper() in ECG_LEADS for name in channel_names)


def _masked_moving_mean(x: np.ndarray, observed: np.ndarray, size: int) -> np.ndarray:
    """Moving mean over ``size`` steps of the observed entries along the last axis (0 where none)."""
    weight = uniform_filter1d(observed.astype(np.float64), size, axis=-1, mode="constant")
    total = uniform_filter1d(np.where(observed, x, 0.0).astype(np.float64), size, axis=-1, mode="constant")
    # uniform_filter1d's running sums leave rounding residue of order 1e-17 where no entry lies.
    present = weight > 0.5 / size
    return np.where(present, total / np.where(present, weight, 1.0), 0.0)


def r_peaks(x: np.ndarray, observed: np.ndarray, sampling_rate_hz: float) -> np.ndarray:
    """Indices of the R peaks of one (F, L) record, found on its observed leads jointly."""
    both = observed[:, 1:] & observed[:, :-1]
    count = both.sum(axis=0)
    slope = np.where(both, np.abs(np.diff(x, axis=1)), 0.0).sum(axis=0) / np.maximum(count, 1)
    slope = uniform_filter1d(slope, max(1, round(SLOPE_SMOOTHING_S * sampling_rate_hz)), mode="constant")
    positive = slope[slope > 0]
    if positive.size == 0:
        return np.zeros(0, dtype=np.int64)
    peaks, _ = find_peaks(
        slope,
        distance=max(1, round(MIN_BEAT_INTERVAL_S * sampling_rate_hz)),
        height=PEAK_HEIGHT_FRACTION * np.percentile(positive, 99),
    )
    return peaks.astype(np.int64) + 1


def _record_template(
    x: np.ndarray, observed: np.ndarray, shape: np.ndarray, sampling_rate_hz: float
) -> tuple[np.ndarray, np.ndarray]:
    """Template values and availability of one (F, L) record; ``shape`` is its baseline-free signal."""
    length = x.shape[1]
    peaks = r_peaks(x, observed, sampling_rate_hz)
    total = np.zeros(x.shape)
    count = np.zeros(x.shape)
    if peaks.size >= 2:
        t = np.arange(length)
        nearest = np.abs(t[:, None] - peaks[None, :]).argmin(axis=1)
        offset = t - peaks[nearest]
        for beat, peak in enumerate(peaks):
            src = peak + offset
            usable = (src >= 0) & (src < length) & (nearest != beat)
            src = np.clip(src, 0, length - 1)
            take = usable[None, :] & observed[:, src]
            total += np.where(take, shape[:, src], 0.0)
            count += take
    available = count > 0
    return np.where(available, total / np.maximum(count, 1), 0.0).astype(np.float32), available


def beat_template(x: np.ndarray, observed: np.ndarray, sampling_rate_hz: float) -> BeatTemplate:
    """The beat template of (N, F, L) records (see the module docstring); unobserved entries unread."""
    if x.shape != observed.shape or x.ndim != 3:
        raise ValueError(
            f"beat_template needs (N, F, L) values and a mask of the same shape, got {x.shape} and {observed.shape}"
        )
    if not sampling_rate_hz > 0:
        raise ValueError(f"beat_template needs a positive sampling rate, got {sampling_rate_hz}")
    width = max(1, round(BASELINE_WINDOW_S * sampling_rate_hz))
    baseline = _masked_moving_mean(x, observed, width)
    shape = np.where(observed, x - baseline, 0.0)
    values = np.zeros(x.shape, dtype=np.float32)
    available = np.zeros(x.shape, dtype=bool)
    for i in range(x.shape[0]):
        values[i], available[i] = _record_template(x[i], observed[i], shape[i], sampling_rate_hz)
    return BeatTemplate(values=values, available=available)
