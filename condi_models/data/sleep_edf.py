"""Sleep-EDF Expanded, cassette study: whole-night PSG files and expert hypnograms as 30 s epochs.

Layout: ``SC4ssNE0-PSG.edf`` holds the signals of night N of subject ss; its hypnogram is
``SC4ssN??-Hypnogram.edf`` (the last two letters differ from the PSG's, so the two are paired by
their first seven characters, e.g. ``SC4001E``). Hypnograms are EDF+ annotation files whose
onsets and durations are in seconds from the start of the hypnogram file; one annotation may
span many 30 s epochs.

Signals are read with edfio, each channel at its own native rate (EEG/EOG at 100 Hz, the
oro-nasal airflow and the submental EMG envelope at 1 Hz in the cassette files). mne's EDF
reader returns all channels on one grid at the highest rate, bringing slower channels up with a
whole-night FFT resample that treats the night as periodic; instead every channel is brought
from its native rate to the requested rate here with a polyphase FIR (``scipy.signal.
resample_poly``), which interpolates band-limited 1 Hz channels properly (no sample-and-hold
steps) and low-pass filters before any downsampling. Only the part of the night that is kept
(plus a margin for the filter) is read and resampled. Annotations are read with
``mne.read_annotations``.

Values are in physical units: voltages in microvolts (the cassette headers say uV), other
dimensions as recorded. Every sample is fully observed.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import edfio
import mne
import numpy as np
from scipy.signal import resample_poly

from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality, SkippedRecord

log = logging.getLogger(__name__)

CHANNELS = ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "Resp oro-nasal", "EMG submental")
# Native rates of these channels in the cassette recordings.
CASSETTE_RATES = {
    "EEG Fpz-Cz": 100.0,
    "EEG Pz-Oz": 100.0,
    "EOG horizontal": 100.0,
    "Resp oro-nasal": 1.0,
    "EMG submental": 1.0,
}
CLASSES = ("W", "N1", "N2", "N3", "REM")
EPOCH_SECONDS = 30.0

# R&K stages 3 and 4 are merged into AASM N3; unknown stage and movement time carry no label.
_STAGE_TEXT: dict[str, str | None] = {
    "Sleep stage W": "W",
    "Sleep stage 1": "N1",
    "Sleep stage 2": "N2",
    "Sleep stage 3": "N3",
    "Sleep stage 4": "N3",
    "Sleep stage R": "REM",
    "Sleep stage ?": None,
    "Movement time": None,
}
VOLT_TO_MICROVOLT = {"uV": 1.0, "µV": 1.0, "mV": 1e3, "V": 1e6, "nV": 1e-3}
PSG_NAME = re.compile(r"^SC4(\d{2})(\d)[A-Z0-9]{2}-PSG\.edf$")
HYPNOGRAM_NAME = re.compile(r"^SC4(\d{2})(\d)[A-Z0-9]{2}-Hypnogram\.edf$")
# Input margin (seconds) read around the kept epochs so that the resampling filter has settled
# inside them: its FIR reaches 10 samples of the slower of the two rates each side, 10 s for a
# 1 Hz channel (or a 1 Hz output).
_RESAMPLE_MARGIN_S = 30.0


class HypnogramError(ValueError):
    """A hypnogram that cannot be turned into 30 s epochs."""


def sleep_edf_info(resample_hz: float, name: str = "sleep_edf") -> DatasetInfo:
    """The dataset description shared by the cassette loader and the synthetic PSG generator."""
    return DatasetInfo(
        name=name,
        modalities=tuple(Modality(name=c, channels=(c,)) for c in CHANNELS),
        sampling_rate_hz=float(resample_hz),
        length=epoch_length(resample_hz),
        classes=CLASSES,
        task="sleep_stage",
    )


def epoch_length(rate_hz: float) -> int:
    """Samples in one 30 s epoch at ``rate_hz``; the rate must give a whole number of them."""
    n = EPOCH_SECONDS * rate_hz
    if rate_hz <= 0 or abs(n - round(n)) > 1e-9:
        raise ValueError(f"sampling rate {rate_hz} Hz must be positive and give whole samples per 30 s epoch")
    return round(n)


def read_hypnogram(path: Path) -> list[tuple[float, float, str | None]]:
    """Stage annotations of an EDF+ hypnogram as (onset s, duration s, stage).

    Onsets are seconds from the start of the hypnogram file. The stage is one of W, N1, N2, N3
    (R&K stages 3 and 4), REM, or None for "Sleep stage ?" and "Movement time". Raises
    HypnogramError naming the file for an unreadable file or an annotation that is not a stage.
    """
    path = Path(path)
    try:
        check_edf_size(path)
    except (ValueError, OSError) as exc:
        raise HypnogramError(str(exc)) from exc
    try:
        annotations = mne.read_annotations(path)
    except Exception as exc:  # mne raises many types for malformed EDF+; all mean "unreadable"
        raise HypnogramError(f"{path}: not a readable EDF+ hypnogram ({type(exc).__name__}: {exc})") from exc
    out = []
    for onset, duration, text in zip(annotations.onset, annotations.duration, annotations.description):
        if text not in _STAGE_TEXT:
            raise HypnogramError(
                f"{path}: annotation {text!r} at {onset} s is not a sleep stage; expected one of {sorted(_STAGE_TEXT)}"
            )
        if not (math.isfinite(onset) and math.isfinite(duration)) or duration < 0:
            raise HypnogramError(f"{path}: annotation {text!r} has onset {onset} s, duration {duration} s")
        out.append((float(onset), float(duration), _STAGE_TEXT[text]))
    if not out:
        raise HypnogramError(f"{path}: no sleep stage annotations")
    return out


def stage_epochs(hypnogram: Sequence[tuple[float, float, str | None]], source: str = "hypnogram") -> list[str | None]:
    """The stage of every 30 s epoch from the hypnogram's start (None where unlabelled).

    An annotation covering several epochs labels each of them. Onsets and durations must lie on
    the 30 s grid; ``source`` names the hypnogram in the error otherwise.
    """

    def whole_epochs(seconds: float, what: str) -> int:
        k = seconds / EPOCH_SECONDS
        if abs(k - round(k)) > 1e-6:
            raise HypnogramError(f"{source}: {what} {seconds} s is not a multiple of {EPOCH_SECONDS:g} s")
        return round(k)

    spans = [(whole_epochs(on, "onset"), whole_epochs(dur, "duration"), st) for on, dur, st in hypnogram]
    n = max((start + count for start, count, _ in spans), default=0)
    stages: list[str | None] = [None] * n
    covered = np.zeros(n, dtype=bool)
    for start, count, stage in spans:
        if covered[start : start + count].any():
            raise HypnogramError(f"{source}: annotations overlap at {start * EPOCH_SECONDS:g} s")
        covered[start : start + count] = True
        stages[start : start + count] = [stage] * count
    return stages


def sleep_period(stages: Sequence[str | None], trim_wake_minutes: float) -> range:
    """Epochs kept by wake trimming: from ``trim_wake_minutes`` before the first sleep epoch to as
    long after the last one (all of them when ``trim_wake_minutes`` is infinite); empty without sleep."""
    if trim_wake_minutes < 0:
        raise ValueError(f"trim_wake_minutes must be >= 0, got {trim_wake_minutes}")
    asleep = [i for i, s in enumerate(stages) if s is not None and s != "W"]
    if not asleep:
        return range(0)
    if math.isinf(trim_wake_minutes):
        return range(len(stages))
    margin = math.floor(trim_wake_minutes * 60.0 / EPOCH_SECONDS + 1e-9)
    return range(max(0, asleep[0] - margin), min(len(stages), asleep[-1] + margin + 1))


def resample_channel(x: np.ndarray, native_hz: float, target_hz: float) -> np.ndarray:
    """``x`` sampled at ``native_hz`` brought to ``target_hz`` with a polyphase anti-aliasing FIR.

    Output sample j lies at the time of input sample j * native_hz / target_hz, so the first
    samples of input and output coincide. Beyond its ends the signal is taken to continue the
    line through its first and last samples (rather than zero), which keeps an offset signal
    such as the EMG envelope from dipping at the edges.
    """
    ratio = Fraction(target_hz).limit_denominator(10_000) / Fraction(native_hz).limit_denominator(10_000)
    if ratio == 1:
        return np.asarray(x, dtype=np.float64)
    return resample_poly(np.asarray(x, dtype=np.float64), ratio.numerator, ratio.denominator, padtype="line")


def _find_pairs(folder: Path) -> tuple[list[tuple[str, Path, Path]], list[SkippedRecord]]:
    psgs: dict[str, list[Path]] = {}
    hypnograms: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if PSG_NAME.match(path.name):
            psgs.setdefault(path.name[:7], []).append(path)
        elif HYPNOGRAM_NAME.match(path.name):
            hypnograms.setdefault(path.name[:7], []).append(path)
    pairs, skipped = [], []
    for key in sorted(set(psgs) | set(hypnograms)):
        ps, hs = psgs.get(key, []), hypnograms.get(key, [])
        names = ", ".join(p.name for p in ps + hs)
        if len(ps) == 1 and len(hs) == 1:
            pairs.append((key, ps[0], hs[0]))
        elif not hs:
            skipped.append(SkippedRecord(names, f"no {key}??-Hypnogram.edf next to it"))
        elif not ps:
            skipped.append(SkippedRecord(names, f"no {key}?-PSG.edf next to it"))
        else:
            skipped.append(SkippedRecord(names, f"night {key} is ambiguous: several PSG or hypnogram files"))
    return pairs, skipped


def start_offset_s(psg: edfio.Edf, hyp_path: Path) -> float:
    """Seconds from the PSG start to the hypnogram start (zero in the published recordings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # edfio warns when the legacy and EDF+ date fields differ
        try:
            hypnogram = edfio.read_edf(hyp_path)
        except Exception as exc:  # a header edfio cannot parse, whatever the exception type
            raise HypnogramError(f"{hyp_path.name}: unreadable EDF+ header ({type(exc).__name__}: {exc})") from exc
        try:
            return (hypnogram.startdatetime - psg.startdatetime).total_seconds()
        except edfio.AnonymizedDateError:
            day = datetime.date(2000, 1, 1)
            delta = (
                datetime.datetime.combine(day, hypnogram.starttime) - datetime.datetime.combine(day, psg.starttime)
            ).total_seconds()
            # Without dates, the two starts are taken to be within half a day of each other.
            return (delta + 43200.0) % 86400.0 - 43200.0


def check_edf_size(path: Path) -> None:
    """Raises ValueError unless the file holds exactly the data its EDF header declares.

    Readers pad or cut a truncated file without failing, so a night cut short (an interrupted
    copy, a full disk) is caught here from the fixed-layout header: header size, number of data
    records and samples per record of every signal.
    """
    with Path(path).open("rb") as f:
        fixed = f.read(256)
        if len(fixed) < 256:
            raise ValueError(f"{path}: {len(fixed)} bytes, shorter than the 256-byte EDF header")
        try:
            header_bytes = int(fixed[184:192].decode("ascii"))
            records = int(fixed[236:244].decode("ascii"))
            n_signals = int(fixed[252:256].decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: not an EDF file (header fields are not numbers)") from exc
        if n_signals < 0 or header_bytes != 256 * (n_signals + 1):
            raise ValueError(f"{path}: header declares {header_bytes} bytes for {n_signals} signals")
        f.seek(256 + 216 * n_signals)
        field = f.read(8 * n_signals)
    try:
        samples = [int(field[8 * i : 8 * i + 8].decode("ascii")) for i in range(n_signals)]
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: samples-per-record fields are not numbers (header cut short?)") from exc
    expected = header_bytes + records * 2 * sum(samples)
    size = Path(path).stat().st_size
    if records >= 0 and size != expected:
        raise ValueError(
            f"{path}: {size} bytes, but its header declares {records} data records ({expected} bytes); "
            "truncated or corrupt"
        )


class NightError(Exception):
    """A night that cannot be used: which file is at fault and why."""

    def __init__(self, record: str, reason: str) -> None:
        super().__init__(f"{record}: {reason}")
        self.record = record
        self.reason = reason


def open_psg(path: Path) -> edfio.Edf:
    """The PSG with its signals loaded lazily and all five channels present, or NightError."""
    try:
        check_edf_size(path)
    except (ValueError, OSError) as exc:
        raise NightError(path.name, str(exc)) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # edfio's own truncation warnings; size is checked above
            psg = edfio.read_edf(path, lazy_load_data=True)
    except Exception as exc:  # edfio raises many types for a malformed header; all mean "unreadable"
        raise NightError(path.name, f"not a readable EDF file ({type(exc).__name__}: {exc})") from exc
    if not psg.is_continuous:
        raise NightError(path.name, "EDF+D recording with gaps; epochs need a continuous recording")
    missing = [c for c in CHANNELS if c not in psg.labels]
    if missing:
        raise NightError(path.name, f"missing channel(s) {missing}; it has {list(psg.labels)}")
    for name in CHANNELS:
        rate = psg.get_signal(name).sampling_frequency
        if rate <= 0 or abs(rate * EPOCH_SECONDS - round(rate * EPOCH_SECONDS)) > 1e-9:
            raise NightError(path.name, f"channel {name!r} at {rate} Hz has no whole number of samples per 30 s")
    return psg


def _load_night(
    key: str, psg_path: Path, hyp_path: Path, resample_hz: float, trim_wake_minutes: float
) -> tuple[np.ndarray, list[int], list[int]]:
    """Epoch signals (E, F, L), epoch indices and class indices of one night, or NightError."""
    try:
        stages = stage_epochs(read_hypnogram(hyp_path), source=hyp_path.name)
    except HypnogramError as exc:
        raise NightError(hyp_path.name, str(exc)) from exc
    kept = sleep_period(stages, trim_wake_minutes)
    if not kept:
        raise NightError(hyp_path.name, "no sleep epochs (stages 1-4 or R)")
    psg = open_psg(psg_path)
    try:
        offset = start_offset_s(psg, hyp_path)
    except HypnogramError as exc:
        raise NightError(hyp_path.name, str(exc)) from exc
    duration = psg.num_data_records * psg.data_record_duration

    def inside(k: int) -> bool:
        start = k * EPOCH_SECONDS + offset
        return start >= 0.0 and start + EPOCH_SECONDS <= duration + 1e-9

    epochs = [k for k in kept if stages[k] is not None and inside(k)]
    outside = sum(1 for k in kept if stages[k] is not None) - len(epochs)
    if outside:
        log.info("%s: %d labelled epochs fall outside the recording and are left out", key, outside)
    if not epochs:
        raise NightError(psg_path.name, f"no labelled epoch lies inside the {duration:g} s recording")

    length = epoch_length(resample_hz)
    first = epochs[0] * EPOCH_SECONDS + offset
    last = epochs[-1] * EPOCH_SECONDS + offset + EPOCH_SECONDS
    # The window starts on the 30 s grid of the PSG, where every channel (and the output grid)
    # has a sample, so that input and output samples line up exactly.
    w0 = max(0.0, math.floor((first - _RESAMPLE_MARGIN_S) / EPOCH_SECONDS) * EPOCH_SECONDS)
    w1 = min(duration, last + _RESAMPLE_MARGIN_S)
    starts = np.array([round((k * EPOCH_SECONDS + offset - w0) * resample_hz) for k in epochs])
    take = starts[:, None] + np.arange(length)[None, :]
    out = np.empty((len(epochs), len(CHANNELS), length), dtype=np.float32)
    for ci, name in enumerate(CHANNELS):
        signal = psg.get_signal(name)
        scale = VOLT_TO_MICROVOLT.get(signal.physical_dimension.strip(), 1.0)
        y = resample_channel(signal.get_data_slice(w0, w1) * scale, signal.sampling_frequency, resample_hz)
        out[:, ci, :] = y[take]
    return out, epochs, [CLASSES.index(stages[k]) for k in epochs]


def load_sleep_edf(
    root: Path,
    *,
    resample_hz: float = 100.0,
    trim_wake_minutes: float = 30.0,
    max_nights: int | None = None,
) -> ClinicalDataset:
    """The cassette nights under ``root`` (or ``root/sleep-cassette``) as labelled 30 s epochs.

    Nights are taken in name order; ``max_nights`` keeps the first ones. Each kept epoch carries
    the five channels of ``CHANNELS`` resampled to ``resample_hz``; sample ids are
    ``sleep_edf/<night>/<epoch index from the hypnogram start>``, patient ids
    ``sleep_edf/subject-<ss>``. A night that cannot be read is reported in ``skipped``.
    """
    root = Path(root)
    folder = root / "sleep-cassette" if (root / "sleep-cassette").is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"Sleep-EDF folder {folder} does not exist")
    epoch_length(resample_hz)  # a rate without whole samples per epoch fails before any file is read
    pairs, skipped = _find_pairs(folder)
    if not pairs:
        raise FileNotFoundError(
            f"no SC4ssN?0-PSG.edf / SC4ssN??-Hypnogram.edf pairs in {folder}"
            + (f" ({len(skipped)} unpaired files)" if skipped else "")
        )
    if max_nights is not None:
        pairs = pairs[:max_nights]

    xs, ys, sample_ids, patient_ids = [], [], [], []
    for key, psg_path, hyp_path in pairs:
        try:
            x, epochs, labels = _load_night(key, psg_path, hyp_path, resample_hz, trim_wake_minutes)
        except NightError as exc:
            skipped.append(SkippedRecord(exc.record, exc.reason))
            log.warning("skipped %s", exc)
            continue
        except OSError as exc:
            skipped.append(SkippedRecord(psg_path.name, f"cannot be read ({exc})"))
            log.warning("skipped %s: %s", psg_path.name, exc)
            continue
        subject = key[3:5]
        xs.append(x)
        ys.extend(labels)
        sample_ids.extend(f"sleep_edf/{key}/{k}" for k in epochs)
        patient_ids.extend([f"sleep_edf/subject-{subject}"] * len(epochs))
        log.info("%s: %d epochs", key, len(epochs))

    info = sleep_edf_info(resample_hz)
    x = np.concatenate(xs) if xs else np.zeros((0, info.n_features, info.length), dtype=np.float32)
    return ClinicalDataset(
        info=info,
        x=x,
        observed=np.ones(x.shape, dtype=bool),
        y=np.asarray(ys, dtype=np.int64),
        sample_ids=tuple(sample_ids),
        patient_ids=tuple(patient_ids),
        skipped=tuple(skipped),
    )
