"""``condi predict``: apply a trained checkpoint to clinical records, imputing missing parts and classifying.

Inputs (kinds told apart by their form):

- a WFDB record path (``.../00001_lr``, ``.hea`` optional): a 12-lead ECG in the checkpoint's lead
  order; NaN samples are missing. A record at an integer multiple of the checkpoint's rate is
  decimated with an anti-aliasing FIR; any other rate is refused.
- a Sleep-EDF PSG file (``*.edf``): every channel resampled to the checkpoint's rate and cut into
  30 s epochs from the start of the recording, or, when the cassette hypnogram of the night lies
  beside it (``SC4ssNE0-PSG.edf`` pairs with ``SC4ssN??-Hypnogram.edf``), its labelled epochs. Each
  epoch is predicted on its own (a stage per epoch).
- ``mimic:<root>#<stay_id>``: the first ``length`` hours of a MIMIC-IV ICU stay (``root`` holds
  ``hosp/`` and ``icu/``), through the MIMIC loader and its cohort rules.

A record (an epoch, for PSG) longer than the model's input length L is cut into consecutive windows
of L, the last one aligned to the record's end. Where two windows overlap, each step is taken from
the window in which it lies nearer the centre (the overlap is split at its middle): there the
imputer saw context on both sides, and every stitched value stays a value one window produced,
with no blend of two sample medians. Class probabilities are the mean over a record's windows
(over an epoch's windows for PSG; never across epochs).

Values are standardized with the checkpoint's normalizer before the model and brought back to
source units after; observed entries of the outputs are the input values exactly. ``--hide``
simulates missingness first (through :mod:`condi_models.data.missingness`) so that imputation can
be looked at against the truth on a complete record.

Per record, ``DIR/<record>/`` receives ``imputed.npz`` (plain arrays, no pickle), ``prediction.json``
and ``record.png``; ``DIR/summary.json`` lists every record, failed ones with their reason. A record
that cannot be read is reported and the others go on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt
import numpy as np
import torch
import wfdb
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.ndimage import maximum_filter1d

from condi_models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from condi_models.data import mimic, ptbxl, sleep_edf
from condi_models.data.dataset import ClinicalDataset, DatasetInfo
from condi_models.data.missingness import MissingnessSpec, simulate_missingness
from condi_models.nn.model import CondIModel, SamplingOptions, resolve_device

log = logging.getLogger(__name__)

HIDE_PATTERNS = ("points", "blocks", "drop")
# Consecutive PSG epochs drawn in record.png: a whole night would be one black smear.
PLOT_EPOCHS = 2
_MIMIC_INPUT = re.compile(r"^mimic:(?P<root>.+)#(?P<stay>\d+)$")
_HOURLY_HZ = 1.0 / 3600.0


class InputError(ValueError):
    """An input that cannot be used; the message names it and says what was expected."""


# ---- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HideSpec:
    """Simulated missingness for demonstration: ``pattern`` over a ``fraction`` of each channel's steps.

    ``drop`` removes the listed channels whole. ``channels`` None means every channel.
    """

    pattern: str
    fraction: float = 0.0
    channels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.pattern not in HIDE_PATTERNS:
            raise ValueError(f"hide pattern must be one of {list(HIDE_PATTERNS)}, got {self.pattern!r}")
        if self.pattern != "drop" and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"hide fraction must lie strictly between 0 and 1, got {self.fraction}")
        if self.pattern == "drop" and not self.channels:
            raise ValueError(
                "hide 'drop' needs a list of channels: dropping every channel leaves nothing observed"
            )

    @classmethod
    def parse(cls, text: str, channels: Sequence[str] | None = None) -> HideSpec:
        """``points:0.3``, ``blocks:0.5`` or ``drop``, optionally limited to ``channels``."""
        pattern, _, value = text.partition(":")
        if pattern == "drop" and not value:
            return cls("drop", 1.0, tuple(channels) if channels else None)
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(
                f"--hide {text!r}: expected points:<fraction>, blocks:<fraction> or drop (e.g. blocks:0.5)"
            ) from None
        return cls(pattern, fraction, tuple(channels) if channels else None)

    def describe(self) -> str:
        where = ", ".join(self.channels) if self.channels else "every channel"
        if self.pattern == "drop":
            return f"dropped {where}"
        return f"{self.pattern} {self.fraction:.0%} of {where}"


@dataclass(frozen=True)
class PredictOptions:
    """How to predict: sampler settings, seed, simulated missingness, device and window batch size."""

    n_samples: int = 5
    steps: int = 10
    method: str = "ddim"
    seed: int = 0
    hide: HideSpec | None = None
    quantiles: tuple[float, float] = (0.05, 0.95)
    batch_size: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        self.sampling()  # validates sampler fields with SamplingOptions' own messages
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        lo, hi = self.quantiles
        if not 0.0 < lo < 0.5 < hi < 1.0:
            raise ValueError(
                f"quantiles must be a lower level below 0.5 and an upper above, got {self.quantiles}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            n_samples=self.n_samples, method=self.method, steps=self.steps, quantiles=self.quantiles
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.n_samples,
            "steps": self.steps,
            "method": self.method,
            "seed": self.seed,
            "quantiles": list(self.quantiles),
            "hide": None if self.hide is None else self.hide.describe(),
        }


# ---- reading inputs -------------------------------------------------------------------------------


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


# ---- simulated missingness, windows ----------------------------------------------------------------


def hidden_channels(info: DatasetInfo, hide: HideSpec) -> np.ndarray:
    """(F,) bool: the checkpoint's channels ``hide`` applies to (names matched ignoring case)."""
    upper = [c.upper() for c in info.channel_names]
    if hide.channels is None:
        return np.ones(len(upper), dtype=bool)
    unknown = [c for c in hide.channels if c.upper() not in upper]
    if unknown:
        raise ValueError(
            f"--hide-channels {unknown}: not channels of the checkpoint {list(info.channel_names)}"
        )
    return np.isin(upper, [c.upper() for c in hide.channels])


def hide_entries(record: LoadedRecord, info: DatasetInfo, hide: HideSpec, seed: int) -> np.ndarray:
    """The observed mask (S, F, T) after ``hide``; the same seed and record name give the same mask."""
    values = record.values
    observed = ~np.isnan(values)
    s, _, length = values.shape
    selected = hidden_channels(info, hide)
    dataset = ClinicalDataset(
        info=replace(info, length=length),
        x=np.where(observed, values, np.float32(0.0)).astype(np.float32),
        observed=observed,
        y=np.zeros(s, dtype=np.int64),
        sample_ids=tuple(f"{record.name}/{k}" for k in record.segment_index),
        patient_ids=(record.name,) * s,
    )
    drop = hide.pattern == "drop"
    spec = MissingnessSpec(
        ps=1.0,
        pw=0.0 if drop else hide.fraction,
        modality_prob=1.0,
        p_drop=1.0 if drop else 0.0,
        pattern="points" if drop else hide.pattern,
        seed=seed,
    )
    removed = observed & ~simulate_missingness(dataset, spec).data.observed
    removed[:, ~selected, :] = False
    return observed & ~removed


def window_starts(total: int, window: int) -> np.ndarray:
    """Starts of consecutive windows of ``window`` steps over ``total``; the last one ends at ``total``."""
    if window > total:
        raise ValueError(f"{total} steps are fewer than the model's input length of {window}")
    starts = list(range(0, total - window + 1, window))
    if starts[-1] + window < total:
        starts.append(total - window)
    return np.asarray(starts, dtype=np.int64)


def stitch_bounds(starts: np.ndarray, window: int, total: int) -> list[tuple[int, int]]:
    """The steps [lo, hi) each window supplies: an overlap is split at its middle (nearer centre wins)."""
    bounds = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else (int(start) + int(starts[i - 1]) + window) // 2
        hi = total if i == len(starts) - 1 else (int(starts[i + 1]) + int(start) + window) // 2
        bounds.append((lo, hi))
    return bounds


# ---- running the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentPrediction:
    """Class probabilities of one segment (the record, or one PSG epoch), mean over its windows."""

    index: int
    probabilities: tuple[float, ...]
    predicted: str
    n_windows: int
    reference: str | None = None


@dataclass(frozen=True)
class RecordResult:
    """What became of one input: its predictions and output folder, or why it failed."""

    input: str
    name: str
    kind: str | None = None
    out_dir: Path | None = None
    segments: tuple[SegmentPrediction, ...] = ()
    imputed: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _ModelOutput:
    window_segment: np.ndarray  # (W,) segment of each window
    window_start: np.ndarray  # (W,)
    probs: np.ndarray  # (W, C)
    median: np.ndarray | None  # (S, F, T) standardized, stitched
    lower: np.ndarray | None
    upper: np.ndarray | None


def _seed_for(seed: int, name: str) -> int:
    """A sampler seed from the run seed and the record's name, so a record's output ignores its neighbours."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _run_model(
    model: CondIModel,
    z: np.ndarray,
    observed: np.ndarray,
    opts: PredictOptions,
    seed: int,
    device: torch.device,
) -> _ModelOutput:
    s, total = z.shape[0], z.shape[2]
    window = model.cfg.length
    starts = window_starts(total, window)
    bounds = stitch_bounds(starts, window, total)
    plan = [(seg, int(a), b) for seg in range(s) for a, b in zip(starts, bounds)]
    imputes = model.spec.impute_for_classification
    median = np.zeros(z.shape, dtype=np.float32) if imputes else None
    lower = np.zeros(z.shape, dtype=np.float32) if imputes else None
    upper = np.zeros(z.shape, dtype=np.float32) if imputes else None
    generator = torch.Generator().manual_seed(seed)
    sampling = opts.sampling()
    probs = []
    for lo in range(0, len(plan), opts.batch_size):
        chunk = plan[lo : lo + opts.batch_size]
        x = torch.from_numpy(np.stack([z[seg, :, a : a + window] for seg, a, _ in chunk])).to(device)
        m = torch.from_numpy(np.stack([observed[seg, :, a : a + window] for seg, a, _ in chunk])).to(device)
        pred = model.predict(x, m, sampling, generator)
        probs.append(torch.softmax(pred.logits.float(), dim=1).cpu().numpy())
        if pred.imputation is None or median is None or lower is None or upper is None:
            continue
        med = pred.imputation.median.cpu().numpy()
        qs = pred.imputation.quantiles.cpu().numpy()
        for j, (seg, a, (keep_lo, keep_hi)) in enumerate(chunk):
            part = slice(keep_lo - a, keep_hi - a)
            median[seg, :, keep_lo:keep_hi] = med[j, :, part]
            lower[seg, :, keep_lo:keep_hi] = qs[0, j, :, part]
            upper[seg, :, keep_lo:keep_hi] = qs[-1, j, :, part]
    return _ModelOutput(
        window_segment=np.array([seg for seg, _, _ in plan], dtype=np.int64),
        window_start=np.array([a for _, a, _ in plan], dtype=np.int64),
        probs=np.concatenate(probs) if probs else np.zeros((0, model.cfg.n_classes), np.float32),
        median=median,
        lower=lower,
        upper=upper,
    )


def _check_checkpoint(checkpoint: Checkpoint) -> None:
    info, cfg = checkpoint.info, checkpoint.model.cfg
    if cfg.n_features != info.n_features or checkpoint.normalizer.mean.shape != (info.n_features,):
        raise CheckpointError(
            f"checkpoint is inconsistent: model has {cfg.n_features} channels, dataset description "
            f"{info.n_features}, normalizer {checkpoint.normalizer.mean.shape[0]}"
        )
    if cfg.n_classes != len(info.classes):
        raise CheckpointError(
            f"checkpoint is inconsistent: model has {cfg.n_classes} classes, {len(info.classes)} named"
        )


# ---- writing outputs ------------------------------------------------------------------------------


@dataclass
class _RecordArrays:
    """A record's outputs in source units, all (S, F, T)."""

    observed: np.ndarray
    seen: np.ndarray  # the input as the model saw it, NaN where not observed
    x_hat: np.ndarray | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    truth: np.ndarray | None = None
    hidden: np.ndarray | None = None


def _imputation_error(arrays: _RecordArrays, channels: Sequence[str]) -> dict[str, Any] | None:
    if arrays.hidden is None or arrays.truth is None or arrays.x_hat is None or not arrays.hidden.any():
        return None
    err = np.where(arrays.hidden, arrays.x_hat - arrays.truth, 0.0).astype(np.float64)
    n = arrays.hidden.sum()
    per_channel = {}
    for f, name in enumerate(channels):
        k = arrays.hidden[:, f].sum()
        if k:
            per_channel[name] = float(np.abs(err[:, f]).sum() / k)
    return {
        "hidden_entries": int(n),
        "mae": float(np.abs(err).sum() / n),
        "rmse": float(np.sqrt((err**2).sum() / n)),
        "mae_by_channel": per_channel,
        "units": "source units of each channel",
    }


def _write_npz(
    path: Path, record: LoadedRecord, info: DatasetInfo, arrays: _RecordArrays, quantiles: Sequence[float]
) -> None:
    out: dict[str, np.ndarray] = {
        "observed": arrays.observed,
        "input": arrays.seen,
        "channel_names": np.array(info.channel_names, dtype=str),
        "units": np.array(record.units, dtype=str),
        "sampling_rate_hz": np.float64(info.sampling_rate_hz),
        "segment_index": record.segment_index,
        "segment_start_s": record.segment_index.astype(np.float64)
        * (record.segment_seconds if record.kind == "psg" else 0.0),
        "quantile_levels": np.asarray(quantiles, dtype=np.float64),
    }
    if arrays.x_hat is not None and arrays.lower is not None and arrays.upper is not None:
        out.update(x_hat=arrays.x_hat, median=arrays.x_hat, lower=arrays.lower, upper=arrays.upper)
    if arrays.hidden is not None and arrays.truth is not None:
        out.update(hidden=arrays.hidden, truth=arrays.truth)
    np.savez_compressed(path, **out)


def _time_axis(n: int, rate: float, offset_s: float) -> tuple[np.ndarray, str]:
    seconds = offset_s + np.arange(n) / rate
    if seconds[-1] - seconds[0] >= 3 * 3600:
        return seconds / 3600.0, "hours"
    return seconds, "seconds"


def _grid(n_channels: int) -> tuple[int, int]:
    cols = 1 if n_channels <= 6 else 2 if n_channels <= 16 else 3
    return math.ceil(n_channels / cols), cols


def _draw_channel(ax: Any, t: np.ndarray, view: _RecordArrays, f: int, colour: str) -> None:
    """One channel of a (F, T) view: gaps shaded, band and median in them, truth dashed, observed on top."""
    missing = ~view.observed[f]
    ax.fill_between(
        t, 0, 1, where=missing, step="mid", color="0.88", linewidth=0, transform=ax.get_xaxis_transform()
    )
    # One step either side of a gap, so the imputed line joins the observed trace around it.
    near = maximum_filter1d(missing.astype(np.uint8), size=3) > 0
    if view.x_hat is not None and view.lower is not None and view.upper is not None and missing.any():
        ax.fill_between(t, view.lower[f], view.upper[f], where=near, color=colour, alpha=0.25, linewidth=0)
        ax.plot(t, np.where(near, view.x_hat[f], np.nan), color=colour, linewidth=0.9)
    if view.truth is not None and view.hidden is not None and view.hidden[f].any():
        hidden = maximum_filter1d(view.hidden[f].astype(np.uint8), size=3) > 0
        ax.plot(t, np.where(hidden, view.truth[f], np.nan), color="tab:green", linestyle="--", linewidth=0.8)
    # Sparse series (hourly ICU data) need markers: isolated observations draw no line.
    ax.plot(
        t, view.seen[f], color="black", linewidth=0.7, marker="." if len(t) <= 200 else None, markersize=3
    )
    # Scale to the data (observed and hidden truth), so a wild imputation runs off the panel rather
    # than flattening the trace a reader came to see.
    known = view.seen[f] if view.truth is None else view.truth[f]
    known = known[np.isfinite(known)]
    if known.size:
        lo, hi = float(known.min()), float(known.max())
        pad = 0.15 * (hi - lo) if hi > lo else max(1.0, abs(hi)) * 0.5
        ax.set_ylim(lo - pad, hi + pad)


def _shown_segments(record: LoadedRecord, observed: np.ndarray) -> list[int]:
    """Segments drawn: up to PLOT_EPOCHS consecutive epochs from the first with a gap (PSG), else all."""
    if record.kind != "psg":
        return [0]
    gappy = np.flatnonzero(~observed.all(axis=(1, 2)))
    shown = [int(gappy[0]) if gappy.size else 0]
    index = record.segment_index
    while (
        len(shown) < PLOT_EPOCHS
        and shown[-1] + 1 < len(index)
        and index[shown[-1] + 1] == index[shown[-1]] + 1
    ):
        shown.append(shown[-1] + 1)
    return shown


def _flat_view(arrays: _RecordArrays, shown: Sequence[int]) -> _RecordArrays:
    """Consecutive segments joined along time: (S, F, T) arrays become (F, len(shown) * T)."""

    def join(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[s] for s in shown], axis=-1)

    def join_optional(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else join(a)

    return _RecordArrays(
        observed=join(arrays.observed),
        seen=join(arrays.seen),
        x_hat=join_optional(arrays.x_hat),
        lower=join_optional(arrays.lower),
        upper=join_optional(arrays.upper),
        truth=join_optional(arrays.truth),
        hidden=join_optional(arrays.hidden),
    )


def _plot_record(
    path: Path,
    record: LoadedRecord,
    info: DatasetInfo,
    arrays: _RecordArrays,
    segments: Sequence[SegmentPrediction],
    title: str,
) -> None:
    """One panel per channel in a grid; for PSG a stage strip over the night above a stretch of epochs."""
    channels = info.channel_names
    psg = record.kind == "psg"
    shown = _shown_segments(record, arrays.observed)
    view = _flat_view(arrays, shown)
    offset = float(record.segment_index[shown[0]]) * record.segment_seconds if psg else 0.0
    t, unit = _time_axis(view.observed.shape[1], info.sampling_rate_hz, offset)
    rows, cols = _grid(len(channels))
    strip = 1 if psg else 0
    fig = plt.figure(figsize=(7.5 * cols if cols > 1 else 13, 1.45 * (rows + strip) + 1.4))
    gs = fig.add_gridspec(
        rows + strip, cols, height_ratios=[1.3] * strip + [1.0] * rows, hspace=0.5, wspace=0.12
    )
    colour = "tab:blue"
    if psg:
        _draw_stages(fig.add_subplot(gs[0, :]), record, segments, info, shown)
    first_ax = None
    for f, name in enumerate(channels):
        row, col = f % rows, f // rows
        ax = fig.add_subplot(gs[strip + row, col], sharex=first_ax)
        first_ax = first_ax or ax
        _draw_channel(ax, t, view, f, colour)
        for k in range(1, len(shown)):
            ax.axvline(t[k * arrays.observed.shape[2]], color="tab:orange", linewidth=1.0, linestyle=":")
        ax.set_title(
            f"{name} ({record.units[f]})" if record.units[f] else name, fontsize=8, loc="left", pad=2
        )
        ax.tick_params(labelsize=7)
        ax.margins(x=0)
        if row == rows - 1 or f == len(channels) - 1:
            ax.set_xlabel(f"time ({unit})", fontsize=8)
        else:
            ax.tick_params(labelbottom=False)
    handles: list[Any] = [
        Line2D([], [], color="black", linewidth=1, label="observed"),
        Patch(color="0.88", label="missing"),
    ]
    if arrays.x_hat is not None:
        handles += [
            Line2D([], [], color=colour, linewidth=1.2, label="imputed median"),
            Patch(color=colour, alpha=0.25, label="quantile band"),
        ]
    if arrays.truth is not None:
        handles.append(Line2D([], [], color="tab:green", linestyle="--", label="hidden truth"))
    height = fig.get_figheight()
    top = 1.0 - 1.15 / height
    fig.legend(
        handles=handles,
        loc="upper right",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.99, 1.0 - 0.5 / height),
    )
    fig.suptitle(title, x=0.01, y=0.995, ha="left", va="top", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.45 / fig.get_figheight() + 0.02, top=top)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw_stages(
    ax: Any,
    record: LoadedRecord,
    segments: Sequence[SegmentPrediction],
    info: DatasetInfo,
    shown: Sequence[int],
) -> None:
    """Predicted stage per epoch over the whole night (and the hypnogram's), the drawn epochs marked."""
    classes = list(info.classes)
    level = {c: len(classes) - 1 - i for i, c in enumerate(classes)}
    night_s = (record.segment_index[-1] + 1) * record.segment_seconds
    scale, unit = (3600.0, "hours") if night_s >= 2 * 3600 else (60.0, "minutes")
    starts = record.segment_index * record.segment_seconds / scale
    step = record.segment_seconds / scale
    # Steps drawn to each epoch's end, so the last epoch shows too.
    edges = np.append(starts, starts[-1] + step)
    ax.stairs(
        [level[s.predicted] for s in segments],
        edges,
        baseline=None,
        color="tab:blue",
        linewidth=1.4,
        label="predicted",
    )
    if record.reference is not None:
        ax.stairs(
            [level[c] for c in record.reference],
            edges,
            baseline=None,
            color="0.3",
            linestyle="--",
            linewidth=1.0,
            label="hypnogram",
        )
    ax.axvspan(
        starts[shown[0]], starts[shown[-1]] + step, color="tab:orange", alpha=0.25, label="epochs drawn below"
    )
    ax.set_yticks(range(len(classes)), classes[::-1], fontsize=7)
    ax.set_ylim(-0.5, len(classes) - 0.5)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(f"time ({unit})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("stage per 30 s epoch", fontsize=8, loc="left", pad=2)
    ax.legend(
        fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False, borderaxespad=0.1
    )


# ---- one record, many records -------------------------------------------------------------------


def _probabilities(classes: Sequence[str], p: Sequence[float]) -> dict[str, float]:
    return {c: round(float(v), 6) for c, v in zip(classes, p)}


def _title(
    record: LoadedRecord,
    info: DatasetInfo,
    segments: Sequence[SegmentPrediction],
    variant: str,
    opts: PredictOptions,
    imputed: bool,
) -> str:
    if record.kind == "psg":
        counts = {c: sum(s.predicted == c for s in segments) for c in info.classes}
        head = f"{record.name}: {len(segments)} epochs; predicted stages " + ", ".join(
            f"{c} {n}" for c, n in counts.items()
        )
    else:
        seg = segments[0]
        probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(info.classes, seg.probabilities))
        head = f"{record.name}: predicted {seg.predicted} (probabilities {probs})"
    how = f"model {variant}"
    if imputed:
        sampler = opts.method.upper() + (f"-{opts.steps}" if opts.method == "ddim" else "")
        how += f"; {opts.n_samples} samples, {sampler}"
        how += f", band {opts.quantiles[0]:g}-{opts.quantiles[1]:g} quantiles, seed {opts.seed}"
    else:
        how += " (classifies the observed data; no imputation)"
    if opts.hide is not None:
        how += f"; hidden for demonstration: {opts.hide.describe()}"
    return f"{head}\n{how}"


def predict_record(
    checkpoint: Checkpoint,
    record: LoadedRecord,
    out_dir: Path,
    opts: PredictOptions,
    device: torch.device,
    provenance: dict[str, Any] | None = None,
) -> RecordResult:
    """Impute and classify one loaded record; write imputed.npz, prediction.json, record.png there."""
    info, model = checkpoint.info, checkpoint.model
    values = record.values
    if values.shape[2] < model.cfg.length:
        raise InputError(
            f"{record.source}: {values.shape[2]} steps per {'epoch' if record.kind == 'psg' else 'record'}, "
            f"fewer than the model's input length of {model.cfg.length}"
        )
    original = ~np.isnan(values)
    observed = original if opts.hide is None else hide_entries(record, info, opts.hide, opts.seed)
    z = checkpoint.normalizer.apply(np.where(observed, values, np.float32(0.0)), observed)
    out = _run_model(model, z, observed, opts, _seed_for(opts.seed, record.name), device)

    seen = np.where(observed, values, np.float32(np.nan)).astype(np.float32)
    arrays = _RecordArrays(observed=observed, seen=seen)
    if out.median is not None and out.lower is not None and out.upper is not None:
        norm = checkpoint.normalizer
        arrays.x_hat = np.where(observed, values, norm.invert(out.median)).astype(np.float32)
        arrays.lower = np.where(observed, values, norm.invert(out.lower)).astype(np.float32)
        arrays.upper = np.where(observed, values, norm.invert(out.upper)).astype(np.float32)
    if opts.hide is not None:
        arrays.hidden = original & ~observed
        arrays.truth = values

    segments = []
    for s in range(values.shape[0]):
        mean = out.probs[out.window_segment == s].mean(axis=0)
        segments.append(
            SegmentPrediction(
                index=int(record.segment_index[s]),
                probabilities=tuple(float(p) for p in mean),
                predicted=info.classes[int(np.argmax(mean))],
                n_windows=int((out.window_segment == s).sum()),
                reference=None if record.reference is None else record.reference[s],
            )
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    imputed = arrays.x_hat is not None
    _write_npz(out_dir / "imputed.npz", record, info, arrays, opts.quantiles)
    doc: dict[str, Any] = {
        "record": record.name,
        "input": record.source,
        "kind": record.kind,
        "dataset": info.name,
        "task": info.task,
        "classes": list(info.classes),
        "variant": model.cfg.variant.value,
        "imputed": imputed,
        "options": opts.to_dict(),
        "sampling_rate_hz": info.sampling_rate_hz,
        "window_length": model.cfg.length,
        "notes": list(record.notes),
        **(provenance or {}),
    }
    if record.kind == "psg":
        doc["epochs"] = [
            {
                "epoch": seg.index,
                "start_s": seg.index * record.segment_seconds,
                "predicted": seg.predicted,
                "probabilities": _probabilities(info.classes, seg.probabilities),
                "windows": seg.n_windows,
                **({"hypnogram": seg.reference} if seg.reference is not None else {}),
            }
            for seg in segments
        ]
        doc["stage_counts"] = {c: sum(s.predicted == c for s in segments) for c in info.classes}
    else:
        doc["prediction"] = {
            "predicted": segments[0].predicted,
            "probabilities": _probabilities(info.classes, segments[0].probabilities),
        }
        doc["windows"] = [
            {"start": int(a), "probabilities": _probabilities(info.classes, p)}
            for a, p in zip(out.window_start, out.probs)
        ]
    error = _imputation_error(arrays, info.channel_names)
    if error is not None:
        doc["imputation_error_on_hidden"] = error
    (out_dir / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")
    title = _title(record, info, segments, model.cfg.variant.value, opts, imputed)
    _plot_record(out_dir / "record.png", record, info, arrays, segments, title)
    return RecordResult(
        input=record.source,
        name=record.name,
        kind=record.kind,
        out_dir=out_dir,
        segments=tuple(segments),
        imputed=imputed,
    )


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    taken.add(candidate)
    return candidate


def _summary_entry(result: RecordResult, classes: Sequence[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"input": result.input, "record": result.name, "kind": result.kind}
    if not result.ok:
        return {**entry, "status": "error", "error": result.error}
    entry.update(status="ok", out_dir=str(result.out_dir), imputed=result.imputed)
    if result.kind == "psg":
        entry["epochs"] = len(result.segments)
        entry["stage_counts"] = {c: sum(s.predicted == c for s in result.segments) for c in classes}
    else:
        seg = result.segments[0]
        entry.update(predicted=seg.predicted, probabilities=_probabilities(classes, seg.probabilities))
    return entry


def predict_records(
    checkpoint: Checkpoint | str | Path,
    inputs: Sequence[str],
    out_dir: str | Path,
    options: PredictOptions | None = None,
) -> list[RecordResult]:
    """Impute and classify every input with ``checkpoint`` (a loaded one, or the path of one).

    Writes ``out_dir/<record>/{imputed.npz, prediction.json, record.png}`` per record and
    ``out_dir/summary.json``. An input that cannot be read or does not fit the checkpoint gets a
    RecordResult with ``error`` set (and a summary entry); the others go on.
    """
    opts = options or PredictOptions()
    provenance: dict[str, Any] = {}
    if not isinstance(checkpoint, Checkpoint):
        provenance["checkpoint"] = str(checkpoint)
        checkpoint = load_checkpoint(Path(checkpoint))
    _check_checkpoint(checkpoint)
    provenance["checkpoint_meta"] = checkpoint.meta
    info = checkpoint.info
    if opts.hide is not None:
        hidden_channels(info, opts.hide)  # a misspelt channel fails before any record is read
    device = resolve_device(opts.device)
    checkpoint.model.to(device).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple[Path, str, int], ClinicalDataset] = {}
    taken: set[str] = set()
    results = []
    for text in inputs:
        try:
            record = load_record(text, info, cache)
            name = _unique_name(record.name, taken)
            if name != record.name:
                record = replace(record, name=name)
            result = predict_record(checkpoint, record, out / name, opts, device, provenance)
            log.info("%s: predicted, outputs in %s", text, result.out_dir)
        except (InputError, ValueError, OSError) as exc:
            message = str(exc) if str(exc).startswith(text) else f"{text}: {exc}"
            log.info("not predicted: %s", message)
            results.append(
                RecordResult(input=text, name=Path(text).name, kind=input_kind(text), error=message)
            )
            continue
        results.append(result)
    summary = {
        "checkpoint": provenance.get("checkpoint"),
        "dataset": info.name,
        "classes": list(info.classes),
        "variant": checkpoint.model.cfg.variant.value,
        "options": opts.to_dict(),
        "records": [_summary_entry(r, info.classes) for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


# ---- command line --------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint .npz (e.g. global_model.npz)"
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="RECORD",
        help="WFDB record path (.hea optional), Sleep-EDF *-PSG.edf, or mimic:<root>#<stay_id>",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per record)")
    parser.add_argument("--samples", type=int, default=5, help="imputation samples per window (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10; DDPM runs all T)")
    parser.add_argument("--method", choices=["ddim", "ddpm"], default="ddim", help="sampler (default ddim)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler and of --hide (default 0)")
    parser.add_argument(
        "--hide",
        metavar="SPEC",
        help="simulate missingness first, for demonstration: points:<fraction>, blocks:<fraction> or drop",
    )
    parser.add_argument(
        "--hide-channels",
        nargs="+",
        metavar="CHANNEL",
        help="channels --hide applies to (names, space or comma separated; default every channel)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="windows per model call (default 16)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def options_from_args(args: argparse.Namespace) -> PredictOptions:
    """PredictOptions from parsed ``predict`` arguments; ValueError names a bad one."""
    if args.hide_channels and not args.hide:
        raise ValueError("--hide-channels needs --hide")
    channels = [c for item in (args.hide_channels or []) for c in item.split(",") if c]
    hide = HideSpec.parse(args.hide, channels) if args.hide else None
    return PredictOptions(
        n_samples=args.samples,
        steps=args.steps,
        method=args.method,
        seed=args.seed,
        hide=hide,
        batch_size=args.batch_size,
        device=args.device,
    )


def handler(args: argparse.Namespace) -> int:
    """Run ``predict``: 0 when all records were predicted, 1 when some failed, 2 on a usage error."""
    try:
        results = predict_records(args.checkpoint, args.input, args.out, options_from_args(args))
    except (CheckpointError, ValueError, RuntimeError) as err:
        print(f"condi predict: error: {err}", file=sys.stderr)
        return 2
    for r in results:
        if not r.ok:
            print(f"condi predict: {r.error}", file=sys.stderr)
        elif r.kind == "psg":
            print(f"{r.name}: {len(r.segments)} epochs -> {r.out_dir}")
        else:
            seg = r.segments[0]
            print(f"{r.name}: {seg.predicted} (p = {max(seg.probabilities):.2f}) -> {r.out_dir}")
    failed = sum(not r.ok for r in results)
    print(
        f"{len(results) - failed} of {len(results)} records predicted; "
        f"summary in {Path(args.out) / 'summary.json'}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount ``predict`` on the umbrella CLI; run the result with ``args.func(args)``."""
    parser = subparsers.add_parser(
        "predict",
        help="impute and classify records with a trained checkpoint",
        description="Impute the missing parts of records and classify them with a trained CondI checkpoint.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m condi_models.predict ...``: the same command outside the umbrella CLI."""
    parser = argparse.ArgumentParser(prog="condi predict", description="Impute and classify records")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
