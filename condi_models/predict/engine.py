"""Records to the model in shared batches: reading ahead in worker processes, windows of several records per call.

A record (an epoch, for PSG) longer than the model's input length L is cut into consecutive windows
of L, the last one aligned to the record's end; its windows go to the model in chunks of
``batch_size``, and a model call holds the next chunk of as many records as fit in ``batch_size``
windows. Each record draws its sampler noise from its own generator, seeded by the run's seed and
the record's name, in the shapes it would draw alone (``RowGenerators``): a record's imputation
and probabilities do not depend on which records share its calls, or on the number of reading
workers, up to the rounding of batched arithmetic.

Records are read (and resampled or decimated) in a ``torch.utils.data.DataLoader``'s worker
processes, so that reading overlaps the model; an input that cannot be read comes back as a
:class:`ReadFailure` and the others go on.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from condi_models.batches import record_window_starts
from condi_models.data.beat_template import BeatTemplate, beat_template
from condi_models.data.dataset import ClinicalDataset, DatasetInfo
from condi_models.data.missingness import MissingnessSpec, simulate_missingness
from condi_models.data.normalize import ChannelNormalizer
from condi_models.nn.model import CondIModel
from condi_models.nn.sampling import RowGenerators, SamplingOptions
from condi_models.predict.inputs import InputError, LoadedRecord, load_record
from condi_models.predict.options import HideSpec, PredictOptions


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


def seed_for(seed: int, name: str) -> int:
    """A sampler seed from the run seed and the record's name, so a record's output ignores its neighbours."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class PreparedRecord:
    """A record read onto the checkpoint's layout, with its missingness and the model's standardized input.

    ``observed`` is the mask the model sees (after any ``hide``), ``original`` the record's own;
    ``z`` holds the standardized values, 0 where not observed. All (S, F, T). ``template`` is the
    record's beat template from ``z`` and ``observed``, where the model's prior uses one.
    """

    index: int  # position among the run's inputs
    text: str
    record: LoadedRecord
    original: np.ndarray
    observed: np.ndarray
    z: np.ndarray
    template: BeatTemplate | None = None


@dataclass(frozen=True)
class ReadFailure:
    """An input that could not be used, and why (the message names the input)."""

    index: int
    text: str
    message: str


@dataclass
class ModelOutput:
    """What the model gave for one record: per-window probabilities and the stitched imputation."""

    window_segment: np.ndarray  # (W,) segment of each window
    window_start: np.ndarray  # (W,)
    probs: np.ndarray  # (W, C)
    median: np.ndarray | None  # (S, F, T) standardized, stitched
    lower: np.ndarray | None
    upper: np.ndarray | None
    # (n, S, F, T) independent draws, standardized and stitched, that score the imputation; with --hide only.
    draws: np.ndarray | None = None


def prepare(
    index: int,
    text: str,
    record: LoadedRecord,
    info: DatasetInfo,
    normalizer: ChannelNormalizer,
    opts: PredictOptions,
    window: int,
    template: bool = False,
) -> PreparedRecord:
    """The model's input from a record read: simulated missingness, then standardized values.

    With ``template`` also the record's beat template, built on the whole record before it is cut
    into windows. InputError when the record is shorter than the model's input; ValueError from a
    bad ``hide``.
    """
    values = record.values
    if values.shape[2] < window:
        unit = "epoch" if record.kind == "psg" else "record"
        raise InputError(
            f"{record.source}: {values.shape[2]} steps per {unit}, fewer than the model's input length of {window}"
        )
    original = ~np.isnan(values)
    observed = original if opts.hide is None else hide_entries(record, info, opts.hide, opts.seed)
    z = normalizer.apply(np.where(observed, values, np.float32(0.0)), observed)
    beats = beat_template(z, observed, info.sampling_rate_hz) if template else None
    return PreparedRecord(index, text, record, original, observed, z, beats)


def failure(index: int, text: str, exc: Exception) -> ReadFailure:
    """A ReadFailure whose message starts with the input."""
    message = str(exc) if str(exc).startswith(text) else f"{text}: {exc}"
    return ReadFailure(index, text, message)


class RecordReader(Dataset):
    """The run's inputs as a map-style dataset of records read (or read failures), for a DataLoader."""

    def __init__(self, inputs: Sequence[str], info: DatasetInfo) -> None:
        self.inputs = list(inputs)
        self.info = info
        # One MIMIC load per root and worker process.
        self.cache: dict[tuple[Path, str, int], ClinicalDataset] = {}

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> LoadedRecord | ReadFailure:
        text = self.inputs[i]
        try:
            return load_record(text, self.info, self.cache)
        except (InputError, ValueError, OSError) as exc:
            return failure(i, text, exc)


def _as_is(item: LoadedRecord | ReadFailure) -> LoadedRecord | ReadFailure:
    return item


def read_records(reader: RecordReader, workers: int) -> Iterator[LoadedRecord | ReadFailure]:
    """The reader's items in input order, read ``workers`` processes ahead (0: in this process)."""
    if workers == 0:
        return (reader[i] for i in range(len(reader)))
    return iter(DataLoader(reader, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is))


@dataclass
class _InFlight:
    """A record whose windows are going through the model, and what has come back so far."""

    prepared: PreparedRecord
    plan: list[tuple[int, int, tuple[int, int]]]  # (segment, window start, stitched steps) per window
    generator: torch.Generator
    output: ModelOutput
    probs: list[np.ndarray] = field(default_factory=list)
    sent: int = 0  # windows of the plan sent to the model
    busy: bool = False  # a chunk of it is in a call: its generator is in use

    @property
    def unsent(self) -> int:
        return len(self.plan) - self.sent

    @property
    def finished(self) -> bool:
        return not self.busy and self.unsent == 0


def _in_flight(prepared: PreparedRecord, model: CondIModel, seed: int, scoring: SamplingOptions | None) -> _InFlight:
    z = prepared.z
    s, total = z.shape[0], z.shape[2]
    window = model.cfg.length
    starts = record_window_starts(total, window)
    bounds = stitch_bounds(starts, window, total)
    plan = [(seg, int(a), b) for seg in range(s) for a, b in zip(starts, bounds)]
    imputes = model.spec.impute_for_classification
    output = ModelOutput(
        window_segment=np.array([seg for seg, _, _ in plan], dtype=np.int64),
        window_start=np.array([a for _, a, _ in plan], dtype=np.int64),
        probs=np.zeros((0, model.cfg.n_classes), np.float32),
        median=np.zeros(z.shape, dtype=np.float32) if imputes else None,
        lower=np.zeros(z.shape, dtype=np.float32) if imputes else None,
        upper=np.zeros(z.shape, dtype=np.float32) if imputes else None,
        draws=np.zeros((scoring.n_samples, *z.shape), dtype=np.float32) if imputes and scoring else None,
    )
    generator = torch.Generator().manual_seed(seed_for(seed, prepared.record.name))
    return _InFlight(prepared, plan, generator, output)


_Call = list[tuple[_InFlight, list[tuple[int, int, tuple[int, int]]]]]


def _next_call(waiting: Iterable[_InFlight], batch_size: int) -> _Call:
    """The next chunk of each idle waiting record that still fits in ``batch_size`` windows, in order.

    A record's chunks are fixed (``batch_size`` windows from its start) and go one at a time, so
    its noise is what it would draw alone.
    """
    call: _Call = []
    size = 0
    for r in waiting:
        chunk = r.plan[r.sent : r.sent + batch_size]
        if not r.busy and chunk and size + len(chunk) <= batch_size:
            call.append((r, chunk))
            size += len(chunk)
    return call


def _one_thread() -> None:
    torch.set_num_threads(1)


def model_workers(opts: PredictOptions, device: torch.device) -> int:
    """Model calls run side by side: ``opts.workers``, else one per torch thread on a CPU and one on a GPU."""
    if opts.workers is not None:
        return opts.workers
    return torch.get_num_threads() if device.type == "cpu" else 1


def run_batched(
    model: CondIModel,
    records: Iterable[PreparedRecord | ReadFailure],
    opts: PredictOptions,
    device: torch.device,
) -> Iterator[tuple[PreparedRecord, ModelOutput] | ReadFailure]:
    """Each record with its model output (or its read failure) once its last window is done.

    A call takes the next chunk of ``opts.batch_size`` windows of each waiting record that still
    fits, in input order (``_next_call``). With several workers (``model_workers``) as many calls
    run at once, each on a thread of its own with one torch thread: on a CPU that keeps every
    core busy with no thread team to join after each of the model's small operations. Records
    are read ahead until the waiting ones fill every worker's next call; they come out in input
    order, read failures as soon as they are read.

    With ``opts.hide`` the records also keep independent draws that score the imputation against
    the hidden truth (CRPS and band coverage need independent draws): the point estimate's own
    when they are independent, else a set of their own, which costs as much sampling again.
    """
    workers = model_workers(opts, device)
    window = model.cfg.length
    sampling = opts.sampling()
    scoring = None if opts.hide is None else replace(sampling, antithetic=False)
    source = iter(records)
    waiting: deque[_InFlight] = deque()
    running: dict[Future[None], list[_InFlight]] = {}
    exhausted = False
    pool = ThreadPoolExecutor(workers, thread_name_prefix="predict", initializer=_one_thread) if workers > 1 else None
    try:
        while waiting or running or not exhausted:
            while not exhausted and sum(r.unsent for r in waiting) < opts.batch_size * workers:
                item = next(source, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, ReadFailure):
                    yield item
                else:
                    waiting.append(_in_flight(item, model, opts.seed, scoring))
            while len(running) < workers and (call := _next_call(waiting, opts.batch_size)):
                for r, chunk in call:
                    r.busy, r.sent = True, r.sent + len(chunk)
                if pool is None:
                    _predict_call(model, call, sampling, scoring, device, window)
                    for r, _ in call:
                        r.busy = False
                else:
                    future = pool.submit(_predict_call, model, call, sampling, scoring, device, window)
                    running[future] = [r for r, _ in call]
            if running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()  # a call's error surfaces here
                    for r in running.pop(future):
                        r.busy = False
            while waiting and waiting[0].finished:
                done = waiting.popleft()
                done.output.probs = np.concatenate(done.probs)
                yield done.prepared, done.output
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _predict_call(
    model: CondIModel,
    call: _Call,
    sampling: SamplingOptions,
    scoring: SamplingOptions | None,
    device: torch.device,
    window: int,
) -> None:
    """One model call on the given chunks; their probabilities and stitched imputation go to their records.

    With ``scoring`` the call also keeps (or draws) the independent draws of ``run_batched``. It
    writes only to the records of its call, which no other call holds meanwhile.
    """

    def windows(array_of: Callable[[PreparedRecord], np.ndarray]) -> torch.Tensor:
        cut = [array_of(r.prepared)[seg, :, a : a + window] for r, chunk in call for seg, a, _ in chunk]
        return torch.from_numpy(np.stack(cut)).to(device)

    generators = RowGenerators([r.generator for r, _ in call], [len(chunk) for _, chunk in call])
    xt, mt = windows(lambda p: p.z), windows(lambda p: p.observed)
    tt = None
    if model.uses_beat_template:
        tt = (windows(lambda p: p.template.values), windows(lambda p: p.template.available))
    pred = model.predict(xt, mt, sampling, generators, return_samples=scoring == sampling, template=tt)
    probs = torch.softmax(pred.logits.float(), dim=1).cpu().numpy()
    imp = pred.imputation
    med = None if imp is None else imp.median.cpu().numpy()
    qs = None if imp is None else imp.quantiles.cpu().numpy()
    draws = None
    if imp is not None and scoring is not None:
        if scoring != sampling:
            imp = model.impute(xt, mt, scoring, generator=generators, return_samples=True, template=tt)
        draws = imp.samples.cpu().numpy()
    j = 0
    for r, chunk in call:
        r.probs.append(probs[j : j + len(chunk)])
        out = r.output
        for seg, a, (keep_lo, keep_hi) in chunk:
            if med is not None and qs is not None and out.median is not None:
                part = slice(keep_lo - a, keep_hi - a)
                out.median[seg, :, keep_lo:keep_hi] = med[j, :, part]
                out.lower[seg, :, keep_lo:keep_hi] = qs[0, j, :, part]
                out.upper[seg, :, keep_lo:keep_hi] = qs[-1, j, :, part]
                if draws is not None and out.draws is not None:
                    out.draws[:, seg, :, keep_lo:keep_hi] = draws[:, j, :, part]
            j += 1
