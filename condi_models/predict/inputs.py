"""Reading one input of any kind onto a checkpoint's channels and time grid.

- a WFDB record path (``.../00001_lr``, ``.hea`` optional): a 12-lead ECG in the checkpoint's lead
  order; NaN samples are missing. A record at an integer multiple of the checkpoint's rate is
  decimated with an anti-aliasing FIR; any other rate is refused.
- a Sleep-EDF PSG file (``*.edf``): every channel resampled to the checkpoint's rate and cut into
  30 s epochs from the start of the recording, or, when the cassette hypnogram of the night lies
  beside it (``SC4ssNE0-PSG.edf`` pairs with ``SC4ssN??-Hypnogram.edf``), its labelled epochs.
- ``mimic:<root>#<stay_id>``: the first ``length`` hours of a MIMIC-IV ICU stay (``root`` holds
  ``hosp/`` and ``icu/``), through the MIMIC loader and its cohort rules.

Whatever cannot be used raises InputError naming the input and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wfdb
from scipy.ndimage import maximum_filter1d

from condi_models.data import mimic, ptbxl, sleep_edf
from condi_models.data.dataset import ClinicalDataset, DatasetInfo

_MIMIC_INPUT = re.compile(r"^mimic:(?P<root>.+)#(?P<stay>\d+)$")
_HOURLY_HZ = 1.0 / 3600.0


class InputError(ValueError):
    """An input that cannot be used; the message names it and says what was expected."""


@dataclass(frozen=True)
class LoadedRecord:
    """One input on the checkpoint's channels and time grid, before any simulated missingness.

    ``values`` is (S, F, T): S segments (1, or one per PSG epoch) of T steps, NaN where unobserved.
    ``segment_index`` numbers the segments (the epoch index for PSG), ``reference`` is the
    hypnogram's stage per epoch when one was paired.
    """

    name: str
    source: str
    kind: str
    values: np.ndarray
    segment_index: np.ndarray
    units: tuple[str, ...]
    segment_seconds: float
    reference: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()


def input_kind(text: str) -> str:
    """'mimic' for ``mimic:<root>#<stay_id>``, 'psg' for an ``.edf`` file, else 'wfdb'."""
    if text.startswith("mimic:"):
        return "mimic"
    if text.lower().endswith(".edf"):
        return "psg"
    return "wfdb"


def _require_channels(text: str, kind: str, have: Sequence[str], info: DatasetInfo) -> None:
    if {c.upper() for c in have} != {c.upper() for c in info.channel_names}:
        raise InputError(
            f"{text}: a {kind} input holds the channels {list(have)}, but the checkpoint "
            f"({info.name}) expects {list(info.channel_names)}"
        )


def decimation_factor(text: str, native_hz: float, target_hz: float) -> int:
    """k where ``native_hz`` = k * ``target_hz`` for a whole k >= 1, else InputError naming ``text``."""
    ratio = native_hz / target_hz if native_hz > 0 and target_hz > 0 else 0.0
    k = round(ratio)
    if k < 1 or abs(ratio - k) > 1e-6:
        raise InputError(
            f"{text}: sampled at {native_hz:g} Hz, but the checkpoint expects {target_hz:g} Hz; only a whole "
            "multiple of that rate can be decimated"
        )
    return k


def decimate_with_gaps(signal: np.ndarray, factor: int, native_hz: float) -> np.ndarray:
    """(F, T) with NaN gaps to (F, ceil(T / factor)) at ``native_hz / factor``, NaN where a gap was.

    Gaps are bridged linearly before the anti-aliasing filter so NaN does not spread through it;
    an output sample is observed only when every source sample within half an output step of it was.
    """
    missing = np.isnan(signal)
    steps = np.arange(signal.shape[1])
    filled = np.zeros_like(signal, dtype=np.float64)
    for f in range(signal.shape[0]):
        ok = ~missing[f]
        if ok.any():
            filled[f] = np.interp(steps, steps[ok], signal[f, ok])
    out = np.stack([sleep_edf.resample_channel(row, native_hz, native_hz / factor) for row in filled])
    near_gap = (
        maximum_filter1d(missing.astype(np.uint8), size=2 * (factor // 2) + 1, axis=1, mode="nearest") > 0
    )
    gap = near_gap[:, ::factor]
    out = out[:, : gap.shape[1]]
    out[gap] = np.nan
    return out


def load_wfdb(text: str, info: DatasetInfo) -> LoadedRecord:
    """A WFDB 12-lead ECG record, in the checkpoint's lead order and rate (mV, NaN where missing)."""
    if {c.upper() for c in info.channel_names} != {c.upper() for c in ptbxl.PTBXL_LEADS}:
        raise InputError(
            f"{text}: a WFDB record is read as a 12-lead ECG ({', '.join(ptbxl.PTBXL_LEADS)}), "
            f"but the checkpoint ({info.name}) expects the channels {list(info.channel_names)}"
        )
    path = Path(text)
    if path.suffix.lower() in (".hea", ".dat"):
        path = path.with_suffix("")
    if not path.with_suffix(".hea").is_file():
        raise InputError(
            f"{text}: not a WFDB record ({path.with_suffix('.hea')} not found), "
            "an .edf file or mimic:<root>#<stay_id>"
        )
    try:
        header = wfdb.rdheader(str(path))
    # wfdb raises many unrelated exception types on a malformed header; all mean this record is unusable.
    except Exception as exc:
        raise InputError(f"{text}: unreadable WFDB header ({type(exc).__name__}: {exc})") from exc
    fs = float(header.fs or 0.0)
    factor = decimation_factor(text, fs, info.sampling_rate_hz)
    try:
        signal = ptbxl.read_signal(path, fs, int(header.sig_len or 0))
    except ptbxl.RecordError as exc:
        raise InputError(f"{text}: {exc}") from exc
    notes = []
    if factor > 1:
        signal = decimate_with_gaps(signal, factor, fs)
        notes.append(f"decimated from {fs:g} Hz to {info.sampling_rate_hz:g} Hz")
    upper = [c.upper() for c in ptbxl.PTBXL_LEADS]
    order = [upper.index(c.upper()) for c in info.channel_names]
    return LoadedRecord(
        name=path.name,
        source=text,
        kind="wfdb",
        values=signal[order][None].astype(np.float32),
        segment_index=np.zeros(1, dtype=np.int64),
        units=("mV",) * len(order),
        segment_seconds=signal.shape[1] / info.sampling_rate_hz,
        notes=tuple(notes),
    )


def paired_hypnogram(psg_path: Path) -> Path | None:
    """The cassette hypnogram of the night beside ``psg_path`` (same first seven characters), if any."""
    if not sleep_edf.PSG_NAME.match(psg_path.name):
        return None
    found = sorted(
        p
        for p in psg_path.parent.glob(f"{psg_path.name[:7]}*-Hypnogram.edf")
        if sleep_edf.HYPNOGRAM_NAME.match(p.name)
    )
    if len(found) > 1:
        raise InputError(f"{psg_path}: several hypnograms pair with it ({', '.join(p.name for p in found)})")
    return found[0] if found else None


def _epochs_at(psg: Any, starts_s: np.ndarray, rate: float) -> np.ndarray:
    """30 s epochs from ``starts_s`` (seconds into the PSG), channels of ``sleep_edf.CHANNELS`` at ``rate``.

    Each channel is resampled whole, so epochs at any offset line up with the output grid.
    """
    duration = psg.num_data_records * psg.data_record_duration
    length = sleep_edf.epoch_length(rate)
    first = np.round(starts_s * rate).astype(np.int64)
    take = first[:, None] + np.arange(length)[None, :]
    out = np.empty((len(starts_s), len(sleep_edf.CHANNELS), length), dtype=np.float32)
    for ci, name in enumerate(sleep_edf.CHANNELS):
        signal = psg.get_signal(name)
        scale = sleep_edf.VOLT_TO_MICROVOLT.get(signal.physical_dimension.strip(), 1.0)
        y = sleep_edf.resample_channel(
            signal.get_data_slice(0.0, duration) * scale, signal.sampling_frequency, rate
        )
        # Rounding a start to the output grid may reach one sample past the end; repeat the last one.
        out[:, ci, :] = y[np.minimum(take, len(y) - 1)]
    return out


def _psg_epochs(
    path: Path, hypnogram: Path | None, rate: float
) -> tuple[Any, list[int], np.ndarray, list[str] | None]:
    """The PSG, its epoch numbers, their starts in PSG seconds and the hypnogram's stages (None without one).

    Without a hypnogram, every whole epoch from the recording's start; with one, its labelled
    epochs that lie inside the recording (numbered from the hypnogram's start).
    """
    psg = sleep_edf.open_psg(path)
    duration = psg.num_data_records * psg.data_record_duration
    if hypnogram is None:
        n = math.floor(duration / sleep_edf.EPOCH_SECONDS + 1e-9)
        return psg, list(range(n)), np.arange(n) * sleep_edf.EPOCH_SECONDS, None
    stages = sleep_edf.stage_epochs(sleep_edf.read_hypnogram(hypnogram), source=hypnogram.name)
    offset = sleep_edf.start_offset_s(psg, hypnogram)
    epochs = [
        k
        for k, stage in enumerate(stages)
        if stage is not None
        and 0.0 <= k * sleep_edf.EPOCH_SECONDS + offset <= duration - sleep_edf.EPOCH_SECONDS + 1e-9
    ]
    starts = np.array([k * sleep_edf.EPOCH_SECONDS + offset for k in epochs], dtype=np.float64)
    return psg, epochs, starts, [str(stages[k]) for k in epochs]


def load_psg(text: str, info: DatasetInfo) -> LoadedRecord:
    """A Sleep-EDF PSG as 30 s epochs at the checkpoint's rate (labelled epochs when a hypnogram pairs)."""
    _require_channels(text, "Sleep-EDF PSG", sleep_edf.CHANNELS, info)
    path = Path(text)
    if not path.is_file():
        raise InputError(f"{text}: EDF file not found")
    rate = info.sampling_rate_hz
    try:
        sleep_edf.epoch_length(rate)
    except ValueError as exc:
        raise InputError(f"{text}: the checkpoint's rate does not fit 30 s epochs ({exc})") from exc
    hypnogram = paired_hypnogram(path)
    try:
        psg, epochs, starts, reference = _psg_epochs(path, hypnogram, rate)
        if not epochs:
            where = f"labelled in {hypnogram.name} inside the recording" if hypnogram else "in the recording"
            raise InputError(f"{text}: no whole {sleep_edf.EPOCH_SECONDS:g} s epoch {where}")
        x = _epochs_at(psg, starts, rate)
        dims = [psg.get_signal(c).physical_dimension.strip() for c in sleep_edf.CHANNELS]
    except sleep_edf.NightError as exc:
        raise InputError(f"{text}: {exc.reason}") from exc
    except sleep_edf.HypnogramError as exc:
        raise InputError(f"{text}: its hypnogram cannot be used ({exc})") from exc
    except OSError as exc:
        raise InputError(f"{text}: cannot be read ({exc})") from exc
    units = ["uV" if d in sleep_edf.VOLT_TO_MICROVOLT else d for d in dims]
    order = [sleep_edf.CHANNELS.index(c) for c in info.channel_names]
    source = f"labelled in {hypnogram.name}" if hypnogram else "from the recording start"
    return LoadedRecord(
        name=path.stem,
        source=text,
        kind="psg",
        values=x[:, order, :],
        segment_index=np.asarray(epochs, dtype=np.int64),
        units=tuple(units[i] for i in order),
        segment_seconds=sleep_edf.EPOCH_SECONDS,
        reference=None if reference is None else tuple(reference),
        notes=(f"{len(epochs)} epochs {source}",),
    )


def load_mimic_stay(
    text: str, info: DatasetInfo, cache: dict[tuple[Path, str, int], ClinicalDataset]
) -> LoadedRecord:
    """The first ``info.length`` hours of one MIMIC-IV stay; ``cache`` keeps each root's load for reuse."""
    m = _MIMIC_INPUT.match(text)
    if m is None:
        raise InputError(
            f"{text}: a MIMIC stay is written mimic:<root>#<stay_id>, with hosp/ and icu/ under root"
        )
    if info.task not in mimic.CLASSES:
        raise InputError(
            f"{text}: the checkpoint ({info.name}, task {info.task!r}) is not a MIMIC-IV model; "
            f"expected a task among {list(mimic.CLASSES)}"
        )
    _require_channels(text, "MIMIC-IV", mimic.dataset_info(info.task, info.length).channel_names, info)
    if not math.isclose(info.sampling_rate_hz, _HOURLY_HZ, rel_tol=1e-6):
        raise InputError(
            f"{text}: MIMIC stays are hourly, but the checkpoint expects {info.sampling_rate_hz:g} Hz"
        )
    root = Path(m["root"])
    key = (root.resolve(), info.task, info.length)
    if key not in cache:
        if not (root / "hosp").is_dir() or not (root / "icu").is_dir():
            raise InputError(f"{text}: {root} must hold the MIMIC-IV hosp/ and icu/ folders")
        try:
            cache[key] = mimic.load_mimic(root, task=info.task, hours=info.length)
        except (ValueError, OSError) as exc:
            raise InputError(f"{text}: MIMIC-IV tables under {root} cannot be read ({exc})") from exc
    dataset = cache[key]
    sample_id = f"mimic/{int(m['stay'])}"
    if sample_id not in dataset.sample_ids:
        min_hours = max(info.length, mimic.IHM_MIN_HOURS) if info.task == "ihm48" else info.length
        raise InputError(
            f"{text}: stay {m['stay']} is not among the {len(dataset)} stays the MIMIC loader keeps under "
            f"{root} (a stay must last at least {min_hours} h and have a measured value in its first "
            f"{info.length} h)"
        )
    i = dataset.sample_ids.index(sample_id)
    values = np.where(dataset.observed[i], dataset.x[i], np.nan).astype(np.float32)
    units = {v.name: v.unit for v in mimic.VARIABLES}
    return LoadedRecord(
        name=f"mimic-{int(m['stay'])}",
        source=text,
        kind="mimic",
        values=values[None],
        segment_index=np.zeros(1, dtype=np.int64),
        units=tuple(units.get(c, "") for c in info.channel_names),
        segment_seconds=info.length * 3600.0,
        notes=(f"first {info.length} h of the ICU stay",),
    )


LIST_SUFFIXES = (".txt", ".list", ".lst")


def _records_under(folder: Path) -> list[str]:
    """WFDB records (by header) and PSG files under ``folder``, at any depth, in path order."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.name.lower()
        psg = name.endswith(".edf") and not name.endswith("-hypnogram.edf")
        if path.is_file() and (name.endswith(".hea") or psg):
            found.append(str(path))
    return found


def expand_inputs(items: Sequence[str]) -> list[str]:
    """The inputs ``items`` name: a folder stands for the records under it, a list file for its lines.

    A folder gives its WFDB records (one per ``.hea``) and its PSG ``.edf`` files (hypnograms
    excepted) at any depth, in path order. A list file (``.txt``, ``.list`` or ``.lst``) gives one
    input per line as written (a relative path is from the current directory, as on the command
    line), blank lines and ``#`` comments skipped. Anything else is one input as it is. ValueError
    names a folder without records.
    """
    out: list[str] = []
    for item in items:
        path = Path(item)
        if item.startswith("mimic:") or not path.exists():
            out.append(item)
        elif path.is_dir():
            found = _records_under(path)
            if not found:
                raise ValueError(f"{item}: a folder without WFDB records (.hea) or PSG files (.edf)")
            out.extend(found)
        elif path.suffix.lower() in LIST_SUFFIXES:
            lines = (line.strip() for line in path.read_text().splitlines())
            out.extend(line for line in lines if line and not line.startswith("#"))
        else:
            out.append(item)
    return out


def load_record(
    text: str, info: DatasetInfo, mimic_cache: dict[tuple[Path, str, int], ClinicalDataset] | None = None
) -> LoadedRecord:
    """Read one input of any kind onto the checkpoint's layout; InputError names it when it cannot."""
    kind = input_kind(text)
    if kind == "mimic":
        return load_mimic_stay(text, info, {} if mimic_cache is None else mimic_cache)
    if kind == "psg":
        return load_psg(text, info)
    return load_wfdb(text, info)
