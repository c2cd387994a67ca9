"""Evaluation reports as one vector of sums, so they can go through the secure sum.

With ``aggregation.secure_metrics`` the coordinator must learn only pooled scores, never one
hospital's. Everything it pools is a sum over silos, so each silo writes its counts and sums
into a fixed-length float vector (:class:`MetricsLayout`), the vector is masked and summed like
a model update, and :func:`decode_metrics` turns the unmasked total into the same pooled figures
:func:`coordinator.pooling.pool_split` gives from clear reports. Per evaluated split:

- ``n`` and the summed loss: the pooled mean loss;
- the confusion matrix: accuracy and macro-F1, exactly;
- per class, histograms of its score for positives and negatives (``SCORE_BINS`` bins): the
  pooled macro AUROC of the binned scores, exactly (where clear reports only allow a mean of the
  silos' AUROCs);
- imputation entries and the sums of absolute and squared errors: MAE and RMSE, exactly.

The training data's statistics are not in it: they are summed once before round 0
(federation.statistics), since summing them again each round over other silos would expose one.

The ring is 64 bits with 12 fraction bits: counts are whole numbers and stay exact, sums of
losses and errors keep 2^-12 resolution, and one entry may be at most ``METRICS_CLIP`` in size;
a silo refuses to send a vector with a larger entry rather than have it clipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from condi_models.evaluation import EvalResult
from condi_models.metrics import SCORE_BINS, binned_macro_auroc, macro_f1_from_confusion, recall_from_confusion
from federation.secagg.quantize import QuantConfig

METRICS_CLIP = float(2**36)
METRICS_QUANT = QuantConfig(clip_bound=METRICS_CLIP, frac_bits=12, ring_bits=64)


class MetricsEncodingError(ValueError):
    """Scores that cannot be written into (or read from) the metrics vector; the message says which."""


@dataclass(frozen=True)
class MetricsLayout:
    """Where each sum sits in the metrics vector of one evaluation stage."""

    n_classes: int
    splits: tuple[str, ...]
    bins: int = SCORE_BINS

    @property
    def split_length(self) -> int:
        """Entries per split: n, loss sum, confusion, two histograms per class, three imputation sums."""
        c = self.n_classes
        return 2 + c * c + 2 * c * self.bins + 3

    @property
    def vector_length(self) -> int:
        """Length of the whole vector: every split's sums."""
        return len(self.splits) * self.split_length


def encode_metrics(layout: MetricsLayout, results: Mapping[str, EvalResult]) -> np.ndarray:
    """A silo's evaluation as the float64 vector of sums it contributes to the secure sum;
    ``results`` holds one :class:`EvalResult` per split of the layout."""
    c = layout.n_classes
    parts: list[np.ndarray] = []
    for split in layout.splits:
        result = results.get(split)
        if result is None:
            raise MetricsEncodingError(f"metrics vector: no evaluation of the {split!r} split")
        hist = result.score_histograms
        if hist is None or hist.shape != (c, 2, layout.bins):
            raise MetricsEncodingError(
                f"metrics vector: the {split!r} split needs score histograms of shape ({c}, 2, {layout.bins})"
            )
        confusion = np.asarray(result.classification.confusion_matrix, dtype=np.float64)
        if confusion.shape != (c, c):
            raise MetricsEncodingError(f"metrics vector: the {split!r} confusion matrix is not {c}x{c}")
        imp = result.imputation
        imputation = (
            [0.0, 0.0, 0.0] if imp is None else [imp.n_entries, imp.mae * imp.n_entries, imp.rmse**2 * imp.n_entries]
        )
        parts += [
            np.array([result.n_samples, result.loss * result.n_samples], dtype=np.float64),
            confusion.ravel(),
            hist[:, 1, :].ravel().astype(np.float64),
            hist[:, 0, :].ravel().astype(np.float64),
            np.array(imputation, dtype=np.float64),
        ]
    vector = np.concatenate(parts)
    if not np.all(np.isfinite(vector)):
        raise MetricsEncodingError("metrics vector: NaN or infinite sums; refusing to send them")
    big = int(np.sum(np.abs(vector) > METRICS_CLIP))
    if big:
        raise MetricsEncodingError(
            f"metrics vector: {big} sums exceed the secure-sum bound {METRICS_CLIP:g}; they would be clipped"
        )
    assert vector.size == layout.vector_length
    return vector


def decode_metrics(layout: MetricsLayout, total: np.ndarray, silos: int, *, max_n: int) -> dict[str, Any]:
    """Pooled scores from the unmasked sum of ``silos`` metrics vectors, each of at most ``max_n``
    samples a split; a sum no such silos could give (too many samples, counts that disagree,
    negative counts or errors) raises :class:`MetricsEncodingError`.

    Returns ``{name: pooled}`` per split, each in the form of :func:`coordinator.pooling.pool_split`
    plus ``"secure_sum": True``.
    """
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (layout.vector_length,):
        raise MetricsEncodingError(f"metrics sum: expected {layout.vector_length} entries, got {total.shape}")
    c, b = layout.n_classes, layout.bins
    splits: dict[str, Any] = {}
    for i, split in enumerate(layout.splits):
        v = total[i * layout.split_length : (i + 1) * layout.split_length]
        n = int(round(v[0]))
        if n > silos * max_n:
            raise MetricsEncodingError(f"metrics sum: {n} {split} samples from {silos} silos of at most {max_n}")
        if n < 1:
            continue
        at = 2
        confusion = np.rint(v[at : at + c * c]).astype(np.int64).reshape(c, c)
        at += c * c
        pos = np.rint(v[at : at + c * b]).reshape(c, b)
        at += c * b
        neg = np.rint(v[at : at + c * b]).reshape(c, b)
        at += c * b
        entries, abs_sum, sq_sum = v[at : at + 3]
        if (
            int(confusion.sum()) != n
            or np.any(confusion < 0)
            or np.any(pos < 0)
            or np.any(neg < 0)
            or np.any(pos.sum(axis=1) + neg.sum(axis=1) != n)
            or min(entries, abs_sum, sq_sum, v[1]) < -silos
        ):
            raise MetricsEncodingError(
                f"metrics sum: the {split} counts disagree (confusion matrix, score histograms and n) or are negative"
            )
        pooled: dict[str, Any] = {
            "n": n,
            "silos": silos,
            "loss": float(v[1] / n),
            "accuracy": float(np.trace(confusion) / n),
            "macro_f1": macro_f1_from_confusion(confusion),
            "recall": recall_from_confusion(confusion),
            "confusion_matrix": confusion.tolist(),
            "secure_sum": True,
        }
        auroc = binned_macro_auroc(np.stack([neg, pos], axis=1))
        if auroc is not None:
            pooled["macro_auroc"] = auroc
        if entries >= 0.5:
            pooled["imputation_mae"] = float(abs_sum / entries)
            pooled["imputation_rmse"] = float(np.sqrt(max(sq_sum, 0.0) / entries))
        splits[split] = pooled
    return splits
