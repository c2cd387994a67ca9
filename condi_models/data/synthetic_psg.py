"""Synthetic polysomnography in the Sleep-EDF cassette format, for tests and benchmarks.

Stage sequences come from a first-order Markov chain over 30 s epochs whose transition matrix
was estimated from real expert hypnograms. Signals are simulated at the cassette's native rates
(``CASSETTE_RATES``: EEG/EOG at 100 Hz, airflow and EMG at 1 Hz) with stage-specific activity:

- EEG: two channels mix the same latent band-limited oscillators (delta 0.5-2 Hz, theta 4-7 Hz,
  alpha 8-12 Hz, beta 15-30 Hz) and the same transient events with channel-specific gains, plus
  independent noise, so one channel predicts the other. W: alpha that comes in eyes-closed
  bursts; N1: theta; N2: sleep spindles (12-15 Hz, 0.5-2 s) and K-complexes; N3: high-amplitude
  delta; REM: theta with sawtooth-wave bursts.
- EOG horizontal: AC-coupled saccades (decaying steps) and blinks while awake with eyes open,
  slow rolling movements in N1, bursts of rapid eye movements in REM, frontal delta leaking in.
- Resp oro-nasal: breathing at 0.22-0.28 Hz sampled at 1 Hz; rate and depth vary least in N3
  and most in W and REM.
- EMG submental: like the cassette's EMG channel, the rms envelope of the chin EMG sampled at
  1 Hz (not broadband EMG): high in W with movement bursts, atonia in REM with brief twitches.

Units are microvolts, as in the cassette files (airflow in the same nominal unit).
``generate_psg`` brings every channel to one rate with the loader's resampling, so it yields what
``load_sleep_edf`` yields from files written by ``write_synthetic_cassette`` (untrimmed).
"""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import edfio
import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import lfilter, sawtooth

from condi_models.data.dataset import ClinicalDataset
from condi_models.data.sleep_edf import (
    CASSETTE_RATES,
    CHANNELS,
    CLASSES,
    EPOCH_SECONDS,
    epoch_length,
    read_hypnogram,
    resample_channel,
    sleep_edf_info,
    sleep_period,
    stage_epochs,
)

W, N1, N2, N3, REM = range(5)


def _row_normalised(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum(axis=1, keepdims=True)


# Per-epoch stage transitions (rows: from W, N1, N2, N3, REM; columns: to), estimated with
# estimate_transitions from the 20 expert hypnograms of Sleep-EDF Expanded cassette nights
# SC4001-SC4092 (shared/data/sleep-edf), each trimmed to 30 min of wake around sleep, rounded to
# 4 decimals. Recompute with:
#   python -c "from pathlib import Path; from condi_models.data.synthetic_psg import estimate_transitions;
#   print(estimate_transitions(sorted(Path('../shared/data/sleep-edf/sleep-cassette').glob('*-Hypnogram.edf'))))"
STAGE_TRANSITIONS = _row_normalised(
    np.array(
        [
            [0.9307, 0.0630, 0.0019, 0.0003, 0.0041],
            [0.0545, 0.6483, 0.2410, 0.0006, 0.0557],
            [0.0102, 0.0233, 0.9052, 0.0461, 0.0151],
            [0.0046, 0.0062, 0.1219, 0.8666, 0.0007],
            [0.0144, 0.0353, 0.0160, 0.0003, 0.9339],
        ]
    )
)

_FS = CASSETTE_RATES["EEG Fpz-Cz"]
_EPOCH = epoch_length(_FS)

# Amplitudes in microvolts rms of the latent EEG rhythms per stage (rows W, N1, N2, N3, REM;
# columns delta, theta, alpha, beta). W alpha is the eyes-closed level.
_RHYTHM_BANDS = ((0.5, 2.0), (4.0, 7.0), (8.0, 12.0), (15.0, 30.0))
_RHYTHM_UV = np.array(
    [
        [6.0, 5.0, 14.0, 5.0],
        [10.0, 13.0, 3.0, 3.0],
        [18.0, 9.0, 2.0, 2.5],
        [48.0, 8.0, 1.5, 2.0],
        [9.0, 12.0, 3.0, 4.0],
    ]
)
# Channel gains on the latent rhythms: delta is strongest frontally, alpha occipitally.
_RHYTHM_GAIN = {"EEG Fpz-Cz": np.array([1.0, 0.9, 0.45, 1.0]), "EEG Pz-Oz": np.array([0.7, 0.8, 1.0, 0.7])}
_EEG_NOISE_UV = 3.0
# Unit-variance split of each rhythm into the part common to both derivations and a local part.
_COMMON_SHARE = 0.85
_LOCAL_SHARE = float(np.sqrt(1.0 - _COMMON_SHARE**2))
_ALPHA_EYES_OPEN = 0.25  # alpha attenuation with eyes open (Berger effect)

# Event rates per second by stage (W, N1, N2, N3, REM).
_SPINDLE_RATE = np.array([0.0, 0.005, 0.05, 0.02, 0.0])
_KCOMPLEX_RATE = np.array([0.0, 0.0, 0.03, 0.01, 0.0])
_SAWTOOTH_RATE = np.array([0.0, 0.0, 0.0, 0.0, 0.05])
_SACCADE_RATE = np.array([0.5, 0.0, 0.0, 0.0, 0.4])  # W: only with eyes open
_BLINK_RATE = np.array([0.3, 0.0, 0.0, 0.0, 0.0])  # W: only with eyes open
_ROLLING_EOG_UV = np.array([5.0, 60.0, 4.0, 0.0, 0.0])
_EOG_DELTA_LEAK = 0.3
_EOG_NOISE_UV = 4.0
_EOG_TIME_CONSTANT_S = 1.5  # AC coupling turns a gaze step into a decaying deflection

_BREATH_HZ = np.array([0.28, 0.26, 0.24, 0.23, 0.27])
_BREATH_RATE_JITTER = np.array([0.12, 0.08, 0.04, 0.025, 0.12])
_BREATH_UV = np.array([100.0, 90.0, 85.0, 90.0, 80.0])
_BREATH_DEPTH_JITTER = np.array([0.25, 0.15, 0.08, 0.05, 0.25])

_EMG_RMS_UV = np.array([25.0, 14.0, 10.0, 8.0, 3.0])
_EMG_MOVEMENT_RATE = np.array([0.01, 0.005, 0.0, 0.0, 0.0])
_EMG_TWITCH_RATE = np.array([0.0, 0.0, 0.0, 0.0, 0.03])

_STAGE_TEXT = {
    "W": "Sleep stage W",
    "N1": "Sleep stage 1",
    "N2": "Sleep stage 2",
    "N3": "Sleep stage 3",
    "REM": "Sleep stage R",
    None: "Sleep stage ?",
}
_NIGHT_NAME = re.compile(r"^SC4\d{3}$")
_DEFAULT_START = datetime.datetime(1989, 4, 24, 22, 0, 0)


def estimate_transitions(hypnogram_paths: Iterable[Path], *, trim_wake_minutes: float = 30.0) -> np.ndarray:
    """Maximum-likelihood 5x5 per-epoch stage transition matrix (rows: from, columns: to).

    Each night is trimmed like the loader trims it; transitions touching an unlabelled epoch
    (unknown stage, movement time) are not counted. Raises ValueError when a stage is never left
    from, since its row would be undefined.
    """
    counts = np.zeros((len(CLASSES), len(CLASSES)))
    for path in hypnogram_paths:
        stages = stage_epochs(read_hypnogram(path), source=str(path))
        kept = sleep_period(stages, trim_wake_minutes)
        night = stages[kept.start : kept.stop]
        for a, b in itertools.pairwise(night):
            if a is not None and b is not None:
                counts[CLASSES.index(a), CLASSES.index(b)] += 1
    empty = [CLASSES[i] for i in np.flatnonzero(counts.sum(axis=1) == 0)]
    if empty:
        raise ValueError(f"no transitions out of stage(s) {empty} in the given hypnograms")
    return _row_normalised(counts)


def _check_transitions(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (5, 5) or np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("transitions must be a 5x5 non-negative matrix whose rows sum to 1")
    return p


def markov_stages(rng: np.random.Generator, n_epochs: int, transitions: np.ndarray) -> list[str]:
    """A stage sequence of ``n_epochs`` epochs that starts awake (lights off) and follows the chain."""
    cumulative = np.cumsum(_check_transitions(transitions), axis=1)
    u = rng.random(n_epochs)
    state = W
    out = []
    for i in range(n_epochs):
        if i:
            state = min(int(np.searchsorted(cumulative[state], u[i], side="right")), len(CLASSES) - 1)
        out.append(CLASSES[state])
    return out


def _band_noise(rng: np.random.Generator, n: int, fs: float, lo: float, hi: float) -> np.ndarray:
    """Gaussian noise restricted to [lo, hi] Hz, unit standard deviation.

    Drawn directly in the frequency domain (independent complex Gaussian bins inside the band),
    which is white noise band-pass filtered without the forward transform.
    """
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    band = (freqs >= lo) & (freqs <= hi)
    spectrum = np.zeros(len(freqs), dtype=np.complex128)
    spectrum[band] = rng.standard_normal(band.sum()) + 1j * rng.standard_normal(band.sum())
    x = np.fft.irfft(spectrum, n)
    return x / x.std()


def _ar1(rng: np.random.Generator, n: int, coefficient: float) -> np.ndarray:
    """Stationary AR(1) noise with unit variance."""
    return lfilter([np.sqrt(1.0 - coefficient**2)], [1.0, -coefficient], rng.standard_normal(n))


def _per_sample(values: np.ndarray, repeat: int, smooth: int) -> np.ndarray:
    """Piecewise-constant values repeated ``repeat`` times each, edges softened over ``smooth`` samples."""
    return uniform_filter1d(np.repeat(values.astype(np.float64), repeat), size=smooth, mode="nearest")


def _event_times(rng: np.random.Generator, rate_per_second: np.ndarray) -> np.ndarray:
    """Onsets (s) of a Poisson process whose rate is constant within each second."""
    counts = rng.poisson(rate_per_second)
    seconds = np.repeat(np.arange(len(rate_per_second), dtype=np.float64), counts)
    return seconds + rng.random(len(seconds))


def _place(out: np.ndarray, fs: float, onset_s: float, piece: np.ndarray) -> None:
    """Adds ``piece`` to ``out`` starting at ``onset_s``, clipped at the end of ``out``."""
    i = round(onset_s * fs)
    piece = piece[: max(0, len(out) - i)]
    out[i : i + len(piece)] += piece


def _hann_burst(t: np.ndarray, duration: float) -> np.ndarray:
    """A raised-cosine window over [0, duration], zero after."""
    return np.where(t < duration, np.sin(np.pi * np.clip(t / duration, 0.0, 1.0)) ** 2, 0.0)


def _spindle(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    f, duration, amp = rng.uniform(12.0, 15.0), rng.uniform(0.5, 2.0), rng.uniform(15.0, 35.0)
    return amp * _hann_burst(t, duration) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))


def _kcomplex(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    amp = rng.uniform(60.0, 110.0)  # sharp negative wave, then a slower positive one
    return -amp * np.exp(-(((t - 0.25) / 0.08) ** 2)) + 0.5 * amp * np.exp(-(((t - 0.6) / 0.15) ** 2))


def _sawtooth_burst(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    f, duration, amp = rng.uniform(2.0, 5.0), rng.uniform(1.0, 3.0), rng.uniform(15.0, 30.0)
    return amp * _hann_burst(t, duration) * sawtooth(2 * np.pi * f * t, width=0.2)


# EEG transients: per-second rates by stage, the span (s) each waveform is drawn over, and the
# share that reaches (Fpz-Cz, Pz-Oz, EOG horizontal).
_TRANSIENTS = (
    (_SPINDLE_RATE, 2.0, _spindle, (1.0, 0.6, 0.1)),
    (_KCOMPLEX_RATE, 1.2, _kcomplex, (1.0, 0.5, 0.3)),
    (_SAWTOOTH_RATE, 3.0, _sawtooth_burst, (1.0, 0.8, 0.1)),
)


def _eyes_closed(rng: np.random.Generator, n_seconds: int) -> np.ndarray:
    """Per-second eyes-closed state of a relaxed awake subject (runs of a few seconds each)."""
    closed = np.empty(n_seconds, dtype=bool)
    state = True
    flips = rng.random(n_seconds)
    for i in range(n_seconds):
        closed[i] = state
        state = state != (flips[i] < (1 / 8 if state else 1 / 6))
    return closed


def simulate_signals(stages: Sequence[str | None], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Signals for one night at the cassette's native rates, in microvolts, keyed by channel name.

    ``stages`` gives the stage of each 30 s epoch; unlabelled epochs (None) are simulated as wake.
    """
    stage = np.array([W if s is None else CLASSES.index(s) for s in stages], dtype=np.int64)
    n_seconds = len(stage) * round(EPOCH_SECONDS)
    n = len(stage) * _EPOCH
    per_second = np.repeat(stage, round(EPOCH_SECONDS))
    closed = _eyes_closed(rng, n_seconds)
    awake_open = (per_second == W) & ~closed

    # Rhythms per band: a latent oscillator common to both EEG channels plus a local one per
    # channel, under one stage envelope; W alpha follows the eyes.
    envelopes, common = [], []
    for b, (lo, hi) in enumerate(_RHYTHM_BANDS):
        envelope = _per_sample(_RHYTHM_UV[stage, b], _EPOCH, round(2 * _FS))
        if b == 2:
            gate = np.where(awake_open, _ALPHA_EYES_OPEN, 1.0)
            envelope *= _per_sample(gate, round(_FS), round(0.3 * _FS))
        envelopes.append(envelope)
        common.append(_band_noise(rng, n, _FS, lo, hi))

    transients = np.zeros((3, n))  # Fpz-Cz, Pz-Oz, EOG
    for rates, span, shape, gains in _TRANSIENTS:
        t = np.arange(round(span * _FS)) / _FS
        for onset in _event_times(rng, rates[per_second]):
            piece = shape(rng, t)
            for row, gain in enumerate(gains):
                _place(transients[row], _FS, onset, gain * piece)

    signals = {}
    for row, channel in enumerate(("EEG Fpz-Cz", "EEG Pz-Oz")):
        mix = sum(
            g * env * (_COMMON_SHARE * c + _LOCAL_SHARE * _band_noise(rng, n, _FS, lo, hi))
            for g, env, c, (lo, hi) in zip(_RHYTHM_GAIN[channel], envelopes, common, _RHYTHM_BANDS)
        )
        signals[channel] = mix + transients[row] + _EEG_NOISE_UV * _band_noise(rng, n, _FS, 0.3, 40.0)

    eog = transients[2] + _EOG_DELTA_LEAK * envelopes[0] * common[0]
    rolling = _per_sample(_ROLLING_EOG_UV[stage], _EPOCH, round(3 * _FS))
    eog += rolling * _band_noise(rng, n, _FS, 0.2, 0.6)
    eyes_open_rate = np.where(per_second == W, awake_open, 1.0)
    t = np.arange(round(4 * _EOG_TIME_CONSTANT_S * _FS)) / _FS
    gaze_step = (1 - np.exp(-t / 0.02)) * np.exp(-t / _EOG_TIME_CONSTANT_S)
    for onset in _event_times(rng, _SACCADE_RATE[per_second] * eyes_open_rate):
        size = rng.uniform(60, 200) if per_second[int(onset)] == REM else rng.uniform(30, 120)
        _place(eog, _FS, onset, rng.choice((-1.0, 1.0)) * size * gaze_step)
    t = np.arange(round(0.4 * _FS)) / _FS
    blink = np.exp(-(((t - 0.15) / 0.07) ** 2))
    for onset in _event_times(rng, _BLINK_RATE[per_second] * eyes_open_rate):
        _place(eog, _FS, onset, rng.uniform(20, 60) * blink)
    signals["EOG horizontal"] = eog + _EOG_NOISE_UV * _band_noise(rng, n, _FS, 0.3, 40.0)

    # 1 Hz channels: one value per second, stage effects softened over a few seconds.
    rate = uniform_filter1d(_BREATH_HZ[per_second], 10, mode="nearest")
    rate = rate * (1.0 + _BREATH_RATE_JITTER[per_second] * _ar1(rng, n_seconds, 0.9))
    phase = 2 * np.pi * np.cumsum(np.clip(rate, 0.1, 0.45)) + rng.uniform(0, 2 * np.pi)
    depth = _BREATH_UV[per_second] * np.clip(
        1.0 + _BREATH_DEPTH_JITTER[per_second] * _ar1(rng, n_seconds, 0.8), 0.2, None
    )
    signals["Resp oro-nasal"] = depth * np.sin(phase) + 2.0 * rng.standard_normal(n_seconds)

    emg = uniform_filter1d(_EMG_RMS_UV[per_second], 5, mode="nearest") * np.exp(0.2 * _ar1(rng, n_seconds, 0.7))
    for onset in _event_times(rng, _EMG_MOVEMENT_RATE[per_second]):
        i = int(onset)
        emg[i : i + rng.integers(1, 4)] *= rng.uniform(2, 4)
    for onset in _event_times(rng, _EMG_TWITCH_RATE[per_second]):
        emg[int(onset)] += rng.uniform(5, 15)
    signals["EMG submental"] = emg
    return {c: signals[c] for c in CHANNELS}


def _night(seed: int, night: int, n_epochs: int, transitions: np.ndarray) -> tuple[list[str], dict[str, np.ndarray]]:
    """Stages and native-rate signals of synthetic night ``night``; depends only on (seed, night)."""
    rng = np.random.default_rng([seed, night])
    stages = markov_stages(rng, n_epochs, transitions)
    return stages, simulate_signals(stages, rng)


def generate_psg(
    n_nights: int,
    *,
    seed: int,
    epochs_per_night: int = 120,
    fs: float = 100.0,
    transitions: np.ndarray | None = None,
) -> ClinicalDataset:
    """Synthetic cassette-like nights as 30 s epochs, every channel at ``fs``.

    Two consecutive nights share a subject (patient id ``synpsg/subject-<night // 2>``); sample
    ids are ``synpsg/<night>/<epoch>``. The same seed gives the same dataset; each night depends
    only on (seed, night), so a larger ``n_nights`` extends a smaller one.
    """
    if n_nights < 0 or epochs_per_night < 1:
        raise ValueError(f"need n_nights >= 0 and epochs_per_night >= 1, got {n_nights}, {epochs_per_night}")
    p = STAGE_TRANSITIONS if transitions is None else _check_transitions(transitions)
    info = sleep_edf_info(fs, name="synthetic_psg")
    length = info.length
    xs, ys, sample_ids, patient_ids = [], [], [], []
    for night in range(n_nights):
        stages, native = _night(seed, night, epochs_per_night, p)
        x = np.empty((epochs_per_night, len(CHANNELS), length), dtype=np.float32)
        for ci, channel in enumerate(CHANNELS):
            y = resample_channel(native[channel], CASSETTE_RATES[channel], fs)
            x[:, ci, :] = y[: epochs_per_night * length].reshape(epochs_per_night, length)
        xs.append(x)
        ys.extend(CLASSES.index(s) for s in stages)
        sample_ids.extend(f"synpsg/{night}/{e}" for e in range(epochs_per_night))
        patient_ids.extend([f"synpsg/subject-{night // 2}"] * epochs_per_night)
    x = np.concatenate(xs) if xs else np.zeros((0, len(CHANNELS), length), dtype=np.float32)
    return ClinicalDataset(
        info=info,
        x=x,
        observed=np.ones(x.shape, dtype=bool),
        y=np.asarray(ys, dtype=np.int64),
        sample_ids=tuple(sample_ids),
        patient_ids=tuple(patient_ids),
    )


def write_cassette_night(
    out_dir: Path,
    name: str,
    signals: dict[str, np.ndarray],
    rates: dict[str, float],
    hypnogram: list[tuple[float, float, str | None]],
    *,
    start: datetime.datetime = _DEFAULT_START,
) -> tuple[Path, Path]:
    """Writes ``<name>E0-PSG.edf`` and ``<name>EC-Hypnogram.edf`` as in the cassette study.

    ``name`` is ``SC4ssN`` (subject ss, night N). The PSG is EDF with one 30 s data record per
    epoch and each channel at its own rate, in microvolts; the hypnogram is an EDF+ annotation
    file with "Sleep stage W/1/2/3/R/?" annotations (onset and duration in seconds, stage None
    written as "?"). Both start at ``start``. Returns (PSG path, hypnogram path).
    """
    if not _NIGHT_NAME.match(name):
        raise ValueError(f"night name {name!r} must look like SC4ssN (e.g. SC4001)")
    if not signals:
        raise ValueError(f"{name}: no signals to write")
    edf_signals = []
    for channel, data in signals.items():
        if channel not in rates:
            raise ValueError(f"{name}: no sampling rate given for channel {channel!r}")
        seconds = len(data) / rates[channel]
        if abs(seconds / EPOCH_SECONDS - round(seconds / EPOCH_SECONDS)) > 1e-9 or seconds <= 0:
            raise ValueError(f"{name}: channel {channel!r} lasts {seconds} s, not a positive multiple of 30 s")
        edf_signals.append(
            edfio.EdfSignal(np.asarray(data, dtype=np.float64), rates[channel], label=channel, physical_dimension="uV")
        )
    durations = {len(d) / rates[c] for c, d in signals.items()}
    if len(durations) != 1:
        raise ValueError(f"{name}: channels differ in duration ({sorted(durations)} s)")
    for onset, _duration, stage in hypnogram:
        if stage not in _STAGE_TEXT:
            raise ValueError(f"{name}: hypnogram stage {stage!r} at {onset} s is not one of {CLASSES} or None")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recording = edfio.Recording(startdate=start.date())
    psg_path = out_dir / f"{name}E0-PSG.edf"
    hyp_path = out_dir / f"{name}EC-Hypnogram.edf"
    edfio.Edf(edf_signals, recording=recording, starttime=start.time(), data_record_duration=EPOCH_SECONDS).write(
        psg_path
    )
    annotations = [edfio.EdfAnnotation(float(o), float(d), _STAGE_TEXT[s]) for o, d, s in hypnogram]
    edfio.Edf([], recording=recording, starttime=start.time(), annotations=annotations).write(hyp_path)
    return psg_path, hyp_path


def stages_to_hypnogram(stages: Sequence[str | None]) -> list[tuple[float, float, str | None]]:
    """Per-epoch stages as hypnogram annotations, one per run of equal stages (onsets in seconds)."""
    out: list[tuple[float, float, str | None]] = []
    for i, s in enumerate(stages):
        if i and stages[i - 1] == s:
            onset, duration, _ = out[-1]
            out[-1] = (onset, duration + EPOCH_SECONDS, s)
        else:
            out.append((i * EPOCH_SECONDS, EPOCH_SECONDS, s))
    return out


def write_synthetic_cassette(
    out_dir: Path,
    n_nights: int,
    seed: int,
    *,
    epochs_per_night: int = 120,
    transitions: np.ndarray | None = None,
) -> list[tuple[Path, Path]]:
    """Writes ``n_nights`` synthetic nights (the ones ``generate_psg`` makes) as cassette EDF files.

    Night i is subject i // 2, night i % 2 + 1 (``SC4ssN``); channels at their native rates.
    Returns the (PSG, hypnogram) paths.
    """
    if not 0 <= n_nights <= 200:
        raise ValueError(f"n_nights must be within 0..200 (two-digit subject numbers), got {n_nights}")
    p = STAGE_TRANSITIONS if transitions is None else _check_transitions(transitions)
    paths = []
    for night in range(n_nights):
        stages, native = _night(seed, night, epochs_per_night, p)
        paths.append(
            write_cassette_night(
                out_dir, f"SC4{night // 2:02d}{night % 2 + 1}", native, CASSETTE_RATES, stages_to_hypnogram(stages)
            )
        )
    return paths
