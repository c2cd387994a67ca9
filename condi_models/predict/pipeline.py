"""Impute and classify records with a checkpoint and write each record's outputs.

A record (an epoch, for PSG) longer than the model's input length L is cut into consecutive windows
of L, the last one aligned to the record's end. Where two windows overlap, each step is taken from
the window in which it lies nearer the centre (the overlap is split at its middle): there the
imputer saw context on both sides, and every stitched value stays a value one window produced,
with no blend of two sample medians. Class probabilities are the mean over a record's windows
(over an epoch's windows for PSG; never across epochs). How records are read ahead and batched
for the model is :mod:`.engine`'s part.

Values are standardized with the checkpoint's normalizer before the model and brought back to
source units after; observed entries of the outputs are the input values exactly. A
:class:`HideSpec` simulates missingness first (through :mod:`condi_models.data.missingness`) so
that imputation can be looked at against the truth on a complete record.

Per record, ``DIR/<record>/`` receives ``imputed.npz`` (plain arrays, no pickle), ``prediction.json``
and ``record.png`` (unless figures are off); ``DIR/summary.json`` lists every record, failed ones
with their reason, and ``DIR/predictions.csv`` holds every prediction as one table. A record that
cannot be read is reported and the others go on.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from condi_models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from condi_models.data.dataset import DatasetInfo
from condi_models.metrics import imputation_metrics
from condi_models.nn.model import resolve_device
from condi_models.predict.engine import (
    ModelOutput,
    PreparedRecord,
    ReadFailure,
    RecordReader,
    failure,
    hidden_channels,
    prepare,
    read_records,
    run_batched,
)
from condi_models.predict.figure import RecordArrays, plot_record
from condi_models.predict.inputs import InputError, LoadedRecord, expand_inputs, input_kind
from condi_models.predict.options import PredictOptions

log = logging.getLogger(__name__)


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
    imputation_error: dict[str, Any] | None = None  # on the entries --hide hid

    @property
    def ok(self) -> bool:
        return self.error is None


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


def _imputation_error(
    arrays: RecordArrays, channels: Sequence[str], draws: np.ndarray | None, band_factors: Sequence[float] | None
) -> dict[str, Any] | None:
    """MAE and RMSE of the median on the hidden entries; CRPS and band coverage of the independent ``draws``.

    ``draws`` (n, S, F, T) are in source units; their 50 % and 90 % bands are widened by
    ``band_factors`` as the model's own quantiles are. Coverage does not depend on the units.
    """
    if arrays.hidden is None or arrays.truth is None or arrays.x_hat is None or not arrays.hidden.any():
        return None
    report = imputation_metrics(arrays.truth, arrays.x_hat, arrays.hidden, draws, band_factors)
    err = np.where(arrays.hidden, arrays.x_hat - arrays.truth, 0.0).astype(np.float64)
    per_channel = {}
    for f, name in enumerate(channels):
        k = arrays.hidden[:, f].sum()
        if k:
            per_channel[name] = float(np.abs(err[:, f]).sum() / k)
    out: dict[str, Any] = {
        "hidden_entries": report.n_entries,
        "mae": report.mae,
        "rmse": report.rmse,
        "mae_by_channel": per_channel,
    }
    if report.coverage_90 is not None:
        out.update(
            crps=report.crps_fair,
            coverage_50=report.coverage_50,
            coverage_90=report.coverage_90,
            band_width_50=report.width_50,
            band_width_90=report.width_90,
            scored_draws=f"{report.n_samples} independent (CRPS: fair estimate)",
        )
    out["units"] = "source units of each channel"
    return out


def _band(opts: PredictOptions, band_factors: Sequence[float] | None) -> dict[str, Any]:
    """The band the outputs hold: its level and the factors its ends are widened by."""
    lo, hi = opts.quantiles
    return {
        "level": round(hi - lo, 6),
        "quantiles": [lo, hi],
        "factors": None if band_factors is None else [round(f, 4) for f in band_factors],
    }


def _band_label(band: dict[str, Any]) -> str:
    calibrated = band["factors"] is not None and any(f != 1.0 for f in band["factors"])
    return f"{band['level'] * 100:g} % band" + (" (calibrated)" if calibrated else "")


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
    band: str,
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
        how += f", {band} from the {opts.quantiles[0]:g}-{opts.quantiles[1]:g} quantiles, seed {opts.seed}"
    else:
        how += " (classifies the observed data; no imputation)"
    if opts.hide is not None:
        how += f"; hidden for demonstration: {opts.hide.describe()}"
    return f"{head}\n{how}"


def _finish(
    checkpoint: Checkpoint,
    prepared: PreparedRecord,
    out: ModelOutput,
    out_dir: Path,
    opts: PredictOptions,
    provenance: dict[str, Any],
    figure: bool,
) -> RecordResult:
    """A record's outputs from its model output: imputed.npz, prediction.json and (with ``figure``) record.png."""
    info, model = checkpoint.info, checkpoint.model
    record, observed, values = prepared.record, prepared.observed, prepared.record.values
    seen = np.where(observed, values, np.float32(np.nan)).astype(np.float32)
    arrays = RecordArrays(observed=observed, seen=seen)
    if out.median is not None and out.lower is not None and out.upper is not None:
        norm = checkpoint.normalizer
        arrays.x_hat = np.where(observed, values, norm.invert(out.median)).astype(np.float32)
        arrays.lower = np.where(observed, values, norm.invert(out.lower)).astype(np.float32)
        arrays.upper = np.where(observed, values, norm.invert(out.upper)).astype(np.float32)
    draws = None
    if out.draws is not None:
        draws = checkpoint.normalizer.invert(out.draws)
    band_factors = None if model.band is None else model.band.factors_for(opts.n_samples)
    if opts.hide is not None:
        arrays.hidden = prepared.original & ~observed
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
        **({"band": _band(opts, band_factors)} if imputed else {}),
        "sampling_rate_hz": info.sampling_rate_hz,
        "window_length": model.cfg.length,
        "notes": list(record.notes),
        **provenance,
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
    error = _imputation_error(arrays, info.channel_names, draws, band_factors)
    if error is not None:
        doc["imputation_error_on_hidden"] = error
    (out_dir / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")
    if figure:
        band = _band_label(_band(opts, band_factors))
        title = _title(record, info, segments, model.cfg.variant.value, opts, imputed, band)
        plot_record(out_dir / "record.png", record, info, arrays, [s.predicted for s in segments], title, band)
    return RecordResult(
        input=record.source,
        name=record.name,
        kind=record.kind,
        out_dir=out_dir,
        segments=tuple(segments),
        imputed=imputed,
        imputation_error=error,
    )


def predict_record(
    checkpoint: Checkpoint,
    record: LoadedRecord,
    out_dir: Path,
    opts: PredictOptions,
    device: torch.device,
    provenance: dict[str, Any] | None = None,
) -> RecordResult:
    """Impute and classify one loaded record; write imputed.npz, prediction.json, record.png there."""
    model = checkpoint.model
    prepared = prepare(
        0, record.source, record, checkpoint.info, checkpoint.normalizer, opts, model.cfg.length,
        model.uses_beat_template,
    )
    ((_, out),) = run_batched(model, [prepared], opts, device)
    return _finish(checkpoint, prepared, out, out_dir, opts, provenance or {}, opts.figures)


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
    if result.imputation_error is not None:
        entry["imputation_error_on_hidden"] = {
            k: v for k, v in result.imputation_error.items() if k != "mae_by_channel"
        }
    return entry


def _prepared(
    items: Iterable[tuple[str, LoadedRecord | ReadFailure]],
    checkpoint: Checkpoint,
    opts: PredictOptions,
) -> Iterator[PreparedRecord | ReadFailure]:
    """Records read, in input order, made the model's inputs; each record named apart from those before it."""
    taken: set[str] = set()
    window = checkpoint.model.cfg.length
    for index, (text, item) in enumerate(items):
        if isinstance(item, ReadFailure):
            yield item
            continue
        try:
            name = _unique_name(item.name, taken)
            record = item if name == item.name else replace(item, name=name)
            yield prepare(
                index, text, record, checkpoint.info, checkpoint.normalizer, opts, window,
                checkpoint.model.uses_beat_template,
            )
        except (InputError, ValueError, OSError) as exc:
            yield failure(index, text, exc)


def _csv_rows(results: Sequence[RecordResult], classes: Sequence[str]) -> list[list[str]]:
    """predictions.csv: one row per record (per epoch for a PSG night), failed records with their status."""
    per_epoch = any(r.kind == "psg" for r in results)
    rows = [["record", *(["epoch"] if per_epoch else []), "input", "status", "predicted", *classes]]
    for r in results:
        if not r.ok:
            rows.append([r.name, *([""] if per_epoch else []), r.input, "error", "", *([""] * len(classes))])
            continue
        for seg in r.segments:
            epoch = [str(seg.index) if r.kind == "psg" else ""] if per_epoch else []
            probs = [f"{p:.6f}" for p in seg.probabilities]
            rows.append([r.name, *epoch, r.input, "ok", seg.predicted, *probs])
    return rows


def predict_records(
    checkpoint: Checkpoint | str | Path,
    inputs: Sequence[str],
    out_dir: str | Path,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> list[RecordResult]:
    """Impute and classify every input with ``checkpoint`` (a loaded one, or the path of one).

    ``inputs`` may name folders and list files (``expand_inputs``). Writes
    ``out_dir/<record>/{imputed.npz, prediction.json, record.png}`` per record, and
    ``out_dir/summary.json`` and ``out_dir/predictions.csv`` over all of them. Records are read
    ``options.read_workers`` processes ahead and go to the model several to a call (``engine``);
    ``progress`` shows a progress bar on a terminal. An input that cannot be read or does not fit
    the checkpoint gets a RecordResult with ``error`` set (and a summary entry); the others go on.
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
    texts = expand_inputs(inputs)
    device = resolve_device(opts.device)
    checkpoint.model.to(device).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = RecordReader(texts, info)
    read = zip(texts, read_records(reader, opts.read_workers))
    results: dict[int, RecordResult] = {}
    with tqdm(total=len(texts), unit="record", disable=None if progress else True, file=sys.stderr) as bar:
        for item in run_batched(checkpoint.model, _prepared(read, checkpoint, opts), opts, device):
            if isinstance(item, ReadFailure):
                log.info("not predicted: %s", item.message)
                result = RecordResult(
                    input=item.text, name=Path(item.text).name, kind=input_kind(item.text), error=item.message
                )
                results[item.index] = result
            else:
                prepared, model_out = item
                name = prepared.record.name
                try:
                    result = _finish(checkpoint, prepared, model_out, out / name, opts, provenance, opts.figures)
                except OSError as exc:
                    result = RecordResult(
                        input=prepared.text, name=name, kind=prepared.record.kind, error=f"{prepared.text}: {exc}"
                    )
                log.info("%s: predicted, outputs in %s", prepared.text, result.out_dir)
                results[prepared.index] = result
            bar.update()
    ordered = [results[i] for i in range(len(texts))]
    summary = {
        "checkpoint": provenance.get("checkpoint"),
        "dataset": info.name,
        "classes": list(info.classes),
        "variant": checkpoint.model.cfg.variant.value,
        "options": opts.to_dict(),
        "records": [_summary_entry(r, info.classes) for r in ordered],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "predictions.csv").open("w", newline="") as f:
        csv.writer(f).writerows(_csv_rows(ordered, info.classes))
    return ordered
