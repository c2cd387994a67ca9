"""Evaluate a model on a prepared split: classification, and imputation on the hidden truth.

A record longer than the model's window is classified as PTB-XL benchmarks do: every window
that tiles it (``window_stride`` apart, the last one ending at the record's end) is imputed and
classified, and the record's class probabilities are the mean over its windows. Figures of the
single windows are reported beside the record-level ones. With ``record_level: false`` only the
centre crop is scored (the cheaper, older protocol). Windows are fixed and the sampler is seeded,
so two evaluations of the same model give the same numbers. Inference is what the variant
defines: CondI imputes and classifies the imputed sample; the no-imputation variants classify the
observed data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict

from condi_models.batches import PreparedSplit, crop, iterate_batches, record_window_starts
from condi_models.metrics import (
    SCORE_BINS,
    ClassificationReport,
    ImputationReport,
    classification_metrics,
    imputation_metrics,
    score_histograms,
)
from condi_models.nn.model import CondIModel
from condi_models.nn.sampling import SamplingOptions


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate; also the ``evaluation:`` config section."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    n_samples: int = 1
    method: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 10
    antithetic: bool = True
    batch_size: int = 64
    max_samples: int | None = None
    imputation_metrics: bool = True
    record_level: bool = True
    window_stride: int | None = None

    def sampling(self, quantiles: tuple[float, ...] = (0.05, 0.95)) -> SamplingOptions:
        return SamplingOptions(
            n_samples=self.n_samples, method=self.method, steps=self.steps, quantiles=quantiles,
            antithetic=self.antithetic,
        )


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation."""

    n_samples: int
    loss: float
    classification: ClassificationReport  # one prediction per record (mean over its windows)
    imputation: ImputationReport | None
    # (C, 2, SCORE_BINS) counts of binned class scores, for pooling AUROC across sites without scores.
    score_histograms: np.ndarray | None = None
    # Every window scored as a sample of its own; None when each record was one window.
    windows: ClassificationReport | None = None
    # (N, C) class probabilities per record, in the split's order (kept in memory, never reported).
    probs: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "loss": self.loss,
            "classification": self.classification.to_dict(),
            "windows": None if self.windows is None else self.windows.to_dict(),
            "imputation": None if self.imputation is None else self.imputation.to_dict(),
        }


@dataclass(frozen=True)
class ImputedSplit:
    """A whole split imputed: point estimates, and the draws when more than one was taken."""

    x_hat: np.ndarray  # (N, F, W)
    samples: np.ndarray | None  # (S, N, F, W)
    index: np.ndarray  # (N,) rows of the split
    start: np.ndarray  # (N,) window starts


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def impute_split(
    model: CondIModel,
    split: PreparedSplit,
    *,
    window: int | None = None,
    sampling: SamplingOptions | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device,
    keep_samples: bool = False,
) -> ImputedSplit:
    """Impute every row of ``split`` (centre-cropped to ``window``) with the model's diffusion imputer."""
    opts = sampling or SamplingOptions(n_samples=1)
    gen = _generator(seed, device)
    xs, draws, idx, starts = [], [], [], []
    batches = iterate_batches(
        split, batch_size, window=window, rng=None, device=device, template=model.uses_beat_template
    )
    for batch in batches:
        imp = model.impute(
            batch.x, batch.observed, opts, generator=gen, return_samples=keep_samples, template=batch.template
        )
        xs.append(imp.x_hat.cpu().numpy())
        if keep_samples:
            draws.append(imp.samples.cpu().numpy())
        idx.append(batch.index)
        starts.append(batch.start)
    return ImputedSplit(
        x_hat=np.concatenate(xs),
        samples=np.concatenate(draws, axis=1) if keep_samples else None,
        index=np.concatenate(idx),
        start=np.concatenate(starts),
    )


def evaluate(
    model: CondIModel,
    split: PreparedSplit,
    *,
    window: int | None,
    opts: EvalOptions,
    seed: int,
    device: torch.device,
) -> EvalResult:
    """Classify ``split`` as the variant defines inference; score imputation where the model imputes.

    ``loss`` is the mean cross-entropy of the single windows.
    """
    if opts.max_samples is not None and len(split) > opts.max_samples:
        split = _head(split, opts.max_samples)
    gen = _generator(seed, device)
    sampling = opts.sampling()
    model.to(device)
    length = split.x.shape[-1]
    w = length if window is None else window
    offsets: list[int | None] = [None]
    if opts.record_level and w < length:
        offsets = [int(o) for o in record_window_starts(length, w, opts.window_stride)]
    window_probs, losses = [], []
    truths, estimates, masks, draws = [], [], [], []
    score_imputation = opts.imputation_metrics and model.spec.diffusion and bool(split.hidden.any())
    # CRPS and band coverage need independent draws: a set of antithetic pairs and a centre path
    # scores too low (tests/test_metrics.py), so antithetic evaluations report MAE and RMSE alone.
    keep_samples = score_imputation and sampling.n_samples > 1 and not sampling.antithetic
    for offset in offsets:
        probs = []
        batches = iterate_batches(
            split, opts.batch_size, window=window, rng=None, device=device, offset=offset,
            template=model.uses_beat_template,
        )
        for batch in batches:
            pred = model.predict(
                batch.x, batch.observed, sampling, gen, return_samples=keep_samples, template=batch.template
            )
            imp = pred.imputation
            if imp is None and score_imputation:
                # A variant that imputes but classifies the observed data: score its imputer all the same.
                imp = model.impute(
                    batch.x, batch.observed, sampling, generator=gen, return_samples=keep_samples,
                    template=batch.template,
                )
            logits = pred.logits.detach()
            losses.append(float(torch.nn.functional.cross_entropy(logits, batch.y, reduction="sum")))
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            if score_imputation:
                truths.append(crop(split.truth, batch.index, batch.start, w))
                masks.append(crop(split.hidden, batch.index, batch.start, w))
                estimates.append(imp.x_hat.cpu().numpy())
                if imp.samples is not None:
                    draws.append(imp.samples.cpu().numpy())
        window_probs.append(np.concatenate(probs))
    y = split.y
    p = np.mean(window_probs, axis=0)
    classes = split.info.classes
    classification = classification_metrics(y, p, classes)
    windows = None
    if len(offsets) > 1:
        windows = classification_metrics(np.tile(y, len(offsets)), np.concatenate(window_probs), classes)
    imputation = None
    if score_imputation:
        mask = np.concatenate(masks)
        if mask.any():
            imputation = imputation_metrics(
                np.concatenate(truths),
                np.concatenate(estimates),
                mask,
                np.concatenate(draws, axis=1) if draws else None,
                model.band.factors_for(sampling.n_samples),
            )
    return EvalResult(
        n_samples=len(y),
        loss=float(np.sum(losses) / (len(y) * len(offsets))),
        classification=classification,
        imputation=imputation,
        score_histograms=score_histograms(y, p, SCORE_BINS),
        windows=windows,
        probs=p,
    )


def _head(split: PreparedSplit, n: int) -> PreparedSplit:
    """The first ``n`` rows of a split (evaluation subsets stay deterministic)."""
    return split.rows(np.arange(n))
