"""Impute and classify records with a checkpoint and write each record's outputs.

A record (an epoch, for PSG) longer than the model's input length L is cut into consecutive windows
of L, the last one aligned to the record's end. Where two windows overlap, each step is taken from
the window in which it lies nearer the centre (the overlap is split at its middle): there the
imputer saw context on both sides, and every stitched value stays a value one window produced,
with no blend of two sample medians. Class probabilities are the mean over a record's windows
(over an epoch's windows for PSG; never across epochs).

Values are standardized with the checkpoint's normalizer before the model and brought back to
source units after; observed entries of the outputs are the input values exactly. A
:class:`HideSpec` simulates missingness first (through :mod:`condi_models.data.missingness`) so
that imputation can be looked at against the truth on a complete record.

Per record, ``DIR/<record>/`` receives ``imputed.npz`` (plain arrays, no pickle), ``prediction.json``
and ``record.png``; ``DIR/summary.json`` lists every record, failed ones with their reason. A record
that cannot be read is reported and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condi_models.batches import record_window_starts
from condi_models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from condi_models.data.dataset import ClinicalDataset, DatasetInfo
from condi_models.data.missingness import MissingnessSpec, simulate_missingness
from condi_models.nn.model import CondIModel, resolve_device
from condi_models.predict.figure import RecordArrays, plot_record
from condi_models.predict.inputs import InputError, LoadedRecord, input_kind, load_record
from condi_models.predict.options import HideSpec, PredictOptions

log = logging.getLogger(__name__)


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


def stitch_bounds(starts: np.ndarray, window: int, total: int) -> list[tuple[int, int]]:
    """The steps [lo, hi) each window supplies: an overlap is split at its middle (nearer centre wins)."""
    bounds = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else (int(start) + int(starts[i - 1]) + window) // 2
        hi = total if i == len(starts) - 1 else (int(starts[i + 1]) + int(start) + window) // 2
        bounds.append((lo, hi))
    return bounds


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
    starts = record_window_starts(total, window)
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


def _imputation_error(arrays: RecordArrays, channels: Sequence[str]) -> dict[str, Any] | None:
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
    path: Path, record: LoadedRecord, info: DatasetInfo, arrays: RecordArrays, quantiles: Sequence[float]
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
        how += f"; {opts.n_samples} {'antithetic' if opts.antithetic else 'independent'} samples, {sampler}"
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
    arrays = RecordArrays(observed=observed, seen=seen)
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
    plot_record(out_dir / "record.png", record, info, arrays, [s.predicted for s in segments], title)
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
