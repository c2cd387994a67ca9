"""Training-ready arrays and the batches drawn from them.

A :class:`PreparedSplit` is one split of a dataset after normalization and simulated
missingness: what the model may read (``x``, ``observed``, ``y``) and, kept apart, what only
imputation metrics may read (``truth``, ``hidden``). Long records are cut into windows: a random
crop per sample and epoch when training, a fixed centre crop when evaluating, so evaluation is
deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from condi_models.data.beat_template import BeatTemplate, beat_template
from condi_models.data.dataset import ClinicalDataset, DatasetInfo
from condi_models.data.missingness import MissingnessSpec, simulate_missingness
from condi_models.data.normalize import ChannelNormalizer
from condi_models.nn.prior import TemplateTensors


@dataclass(frozen=True)
class PreparedSplit:
    """One split, standardized, with simulated missingness applied."""

    info: DatasetInfo
    x: np.ndarray  # (N, F, L) float32 standardized, 0.0 where not observed
    observed: np.ndarray  # (N, F, L) bool, what the model may see
    y: np.ndarray  # (N,) int64
    truth: np.ndarray  # (N, F, L) float32 standardized source values; read only by metrics
    hidden: np.ndarray  # (N, F, L) bool, observed in the source and hidden by the simulation
    sample_ids: tuple[str, ...]
    # The records' beat template (condi_models.data.beat_template): computed on first use.
    template: BeatTemplate | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def beat_template(self) -> BeatTemplate:
        """The beat template of the split's whole records, from their observed entries only.

        Computed on first use and kept on the split (the split is immutable otherwise), so a silo
        that trains every round computes it once.
        """
        if self.template is None:
            object.__setattr__(self, "template", beat_template(self.x, self.observed, self.info.sampling_rate_hz))
        return self.template

    def rows(self, index: np.ndarray) -> PreparedSplit:
        """The split's rows ``index``, with their cut of the beat template where it was computed."""
        t = self.template
        return replace(
            self,
            x=self.x[index],
            observed=self.observed[index],
            y=self.y[index],
            truth=self.truth[index],
            hidden=self.hidden[index],
            sample_ids=tuple(self.sample_ids[i] for i in index),
            template=None if t is None else BeatTemplate(values=t.values[index], available=t.available[index]),
        )

    def modality_counts(self) -> np.ndarray:
        """Samples in which each modality has any observed entry, shape (M,)."""
        chan_mod = self.info.channel_modality
        per_mod = np.stack([self.observed[:, chan_mod == m, :].any(axis=(1, 2)) for m in range(self.info.n_modalities)])
        return per_mod.sum(axis=1).astype(np.int64)


def prepare_split(
    dataset: ClinicalDataset, normalizer: ChannelNormalizer, missingness: MissingnessSpec | None
) -> PreparedSplit:
    """Hide data as ``missingness`` says (none when None), then standardize with ``normalizer``."""
    if missingness is None:
        observed, hidden = dataset.observed, np.zeros_like(dataset.observed)
    else:
        view = simulate_missingness(dataset, missingness)
        observed, hidden = view.data.observed, view.hidden
    return PreparedSplit(
        info=dataset.info,
        x=normalizer.apply(dataset.x, observed),
        observed=observed,
        y=dataset.y,
        truth=normalizer.apply(dataset.x, dataset.observed),
        hidden=hidden,
        sample_ids=dataset.sample_ids,
    )


def fit_visible(dataset: ClinicalDataset, missingness: MissingnessSpec | None) -> ChannelNormalizer:
    """The normalizer of what stays visible once ``missingness`` has hidden its share of ``dataset``
    (masks are fixed per sample, so these are the entries :func:`prepare_split` keeps)."""
    observed = dataset.observed if missingness is None else simulate_missingness(dataset, missingness).data.observed
    return ChannelNormalizer.fit(dataset.x, observed)


@dataclass(frozen=True)
class Batch:
    """Model inputs for one batch, as tensors on the target device."""

    x: torch.Tensor  # (B, F, W) float32
    observed: torch.Tensor  # (B, F, W) bool
    y: torch.Tensor  # (B,) int64
    index: np.ndarray  # (B,) row indices into the split
    start: np.ndarray  # (B,) window start of each row
    template: TemplateTensors | None = None  # the windows' beat template, when asked for


def window_starts(n: int, length: int, window: int, rng: np.random.Generator | None) -> np.ndarray:
    """Random crop starts when ``rng`` is given (training), else the centre crop (evaluation)."""
    if window > length:
        raise ValueError(f"window of {window} steps is longer than the records ({length} steps)")
    if rng is None:
        return np.full(n, (length - window) // 2, dtype=np.int64)
    return rng.integers(0, length - window + 1, size=n)


def record_window_starts(length: int, window: int, stride: int | None = None) -> np.ndarray:
    """Starts of the windows that cover a record of ``length`` steps: every ``stride`` steps (the
    window by default), plus one ending at the record's end when the stride does not reach it."""
    if window > length:
        raise ValueError(f"window of {window} steps is longer than the records ({length} steps)")
    step = window if stride is None else stride
    if step < 1:
        raise ValueError(f"window stride must be >= 1, got {step}")
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return np.asarray(starts, dtype=np.int64)


def crop_template(template: BeatTemplate, index: np.ndarray, start: np.ndarray, window: int) -> BeatTemplate:
    """A beat template's rows ``index`` cut as ``crop`` cuts them."""
    return BeatTemplate(
        values=crop(template.values, index, start, window), available=crop(template.available, index, start, window)
    )


def template_windows(
    split: PreparedSplit, index: np.ndarray, start: np.ndarray, window: int, device: torch.device
) -> TemplateTensors:
    """The beat template of rows ``index`` cut as ``crop`` cuts them, as the tensors the model takes."""
    t = crop_template(split.beat_template(), index, start, window)
    return torch.from_numpy(t.values).to(device), torch.from_numpy(t.available).to(device)


def crop(arr: np.ndarray, index: np.ndarray, start: np.ndarray, window: int) -> np.ndarray:
    """Rows ``index`` of a (N, F, L) array, each cut to ``window`` steps from its ``start``."""
    steps = start[:, None] + np.arange(window)[None, :]
    return arr[index[:, None], :, steps].transpose(0, 2, 1)


def iterate_batches(
    split: PreparedSplit,
    batch_size: int,
    *,
    window: int | None,
    rng: np.random.Generator | None,
    device: torch.device,
    offset: int | None = None,
    template: bool = False,
) -> Iterator[Batch]:
    """Batches over the split: shuffled with random crops when ``rng`` is given, else in order with
    the centre crop, or the window starting at ``offset`` when given. With ``template`` each batch
    carries its windows' cut of the records' beat template."""
    n, _, length = split.x.shape
    w = length if window is None else window
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if offset is not None and rng is None:
        if not 0 <= offset <= length - w:
            raise ValueError(f"window offset {offset} does not fit a {w}-step window in {length} steps")
        starts = np.full(n, offset, dtype=np.int64)
    else:
        starts = window_starts(n, length, w, rng)
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        st = starts[idx]
        yield Batch(
            x=torch.from_numpy(crop(split.x, idx, st, w)).to(device),
            observed=torch.from_numpy(crop(split.observed, idx, st, w)).to(device),
            y=torch.from_numpy(split.y[idx]).to(device),
            index=idx,
            start=st,
            template=template_windows(split, idx, st, w, device) if template else None,
        )
