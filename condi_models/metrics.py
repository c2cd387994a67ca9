"""Evaluation metrics: classification quality from class probabilities, imputation quality from estimates.

Everything here is plain numpy (scipy for ranking) so the coordinator's reports, the silo's local
evaluation and the benchmarks compute the same numbers the same way, without sklearn.

Conventions, chosen to match what the field reports:

- AUROC is the Mann-Whitney statistic with average ranks, so tied scores count one half.
- AUPRC is average precision: the sum over distinct score thresholds of (recall gain) x precision,
  with tied scores entering together (no interpolation), as scikit-learn computes it.
- A class absent from ``y_true`` (or the only class present) has no AUROC/AUPRC; it is skipped in
  the macro averages and named in ``skipped_auroc_classes``.
- Precision, recall and F1 with a zero denominator are 0. Macro-F1 averages over the classes that
  occur in ``y_true`` or in the predictions; a class neither present nor predicted has nothing to
  score and would only drag the average to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

# The quantile levels of CSDI's CRPS approximation: 0.05, 0.10, ..., 0.95.
CRPS_QUANTILES = np.arange(1, 20) / 20.0
# Bins of the class-score histograms sites report for a pooled AUROC (a 0.01 grid of probabilities).
SCORE_BINS = 100
# The central bands whose coverage is reported and calibrated: 50 % (quantiles 0.25 and 0.75 of
# the draws) and 90 % (0.05 and 0.95).
BAND_LEVELS = (0.5, 0.9)


def auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``is_positive``.

    Computed as the probability that a random positive outranks a random negative, ties counting
    one half. Raises ValueError when either class is empty (the area is undefined).
    """
    pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives; got {n_pos} positive, {n_neg} negative")
    ranks = rankdata(s, method="average")
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise) of ``scores``.

    Thresholds are the distinct score values from high to low; samples sharing a score enter
    together. Raises ValueError when there is no positive (recall is undefined).
    """
    pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(pos[order])
    # The last index of each run of equal scores is where a threshold's counts are complete.
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp_at = tp[last_of_run].astype(np.float64)
    precision = tp_at / (last_of_run + 1)
    recall_gain = np.diff(np.r_[0.0, tp_at]) / n_pos
    return float(np.sum(recall_gain * precision))


def score_histograms(y_true: np.ndarray, probs: np.ndarray, n_bins: int) -> np.ndarray:
    """Per class, counts of its one-vs-rest score in ``n_bins`` equal bins of [0, 1]: (C, 2, n_bins).

    ``[c, 0]`` counts the samples of other classes, ``[c, 1]`` those of class ``c``. Sums of such
    histograms over sites give the pooled AUROC of the binned scores (:func:`binned_macro_auroc`)
    without any site's scores leaving it.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs: expected shape ({y.size}, C), got {p.shape}")
    bins = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    out = np.zeros((p.shape[1], 2, n_bins), dtype=np.int64)
    for c in range(p.shape[1]):
        np.add.at(out[c], ((y == c).astype(np.int64), bins[:, c]), 1)
    return out


def binned_macro_auroc(histograms: np.ndarray) -> float | None:
    """Macro AUROC from :func:`score_histograms` counts; None when no class has positives and negatives.

    Scores in one bin tie and count one half, so this is the exact Mann-Whitney AUROC of the
    scores rounded down to their bins.
    """
    h = np.asarray(histograms, dtype=np.float64)
    areas = []
    for neg, pos in h:
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            continue
        below = np.cumsum(neg) - neg
        areas.append(float(np.sum(pos * (below + 0.5 * neg)) / (n_pos * n_neg)))
    return float(np.mean(areas)) if areas else None


def recall_from_confusion(confusion: np.ndarray) -> list[float | None]:
    """Per-class recall of a confusion matrix (rows true, columns predicted); None for an absent class."""
    cm = np.asarray(confusion, dtype=np.float64)
    true, tp = cm.sum(axis=1), np.diag(cm)
    return [float(t / n) if n > 0 else None for t, n in zip(tp, true, strict=True)]


def macro_f1_from_confusion(confusion: np.ndarray) -> float:
    """Macro-F1 of a confusion matrix (rows true, columns predicted), over classes present or predicted."""
    cm = np.asarray(confusion, dtype=np.float64)
    true, pred, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    in_play = (true > 0) | (pred > 0)
    precision = np.divide(tp, pred, out=np.zeros(len(tp)), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros(len(tp)), where=true > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(tp)), where=denom > 0)
    return float(f1[in_play].mean()) if in_play.any() else 0.0


def _safe_ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


@dataclass(frozen=True)
class ClassMetrics:
    """One class's scores, one-vs-rest. ``auroc``/``auprc`` are None where undefined."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int
    auroc: float | None
    auprc: float | None


@dataclass(frozen=True)
class BinaryMetrics:
    """The positive class's scores for a two-class task (positive = ``classes[1]``)."""

    positive_class: str
    auroc: float | None
    auprc: float | None
    f1: float


@dataclass(frozen=True)
class ClassificationReport:
    """Classification quality of argmax predictions and of the probability ranking."""

    n_samples: int
    accuracy: float
    macro_f1: float
    macro_auroc: float | None
    macro_auprc: float | None
    per_class: tuple[ClassMetrics, ...]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    skipped_auroc_classes: tuple[str, ...]
    binary: BinaryMetrics | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; per-class entries keyed by class name."""
        out = asdict(self)
        out["per_class"] = {
            m.name: {k: v for k, v in asdict(m).items() if k != "name"} for m in self.per_class
        }
        out["skipped_auroc_classes"] = list(self.skipped_auroc_classes)
        return out


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> ClassificationReport:
    """Score class probabilities ``probs`` (N, C) against integer labels ``y_true`` (N,).

    Predictions are the argmax of ``probs``; AUROC/AUPRC use each column as a one-vs-rest score.
    For two classes, ``binary`` holds the scores of ``classes[1]`` as the positive class.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"classes: need at least 2 class names, got {list(classes)}")
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true: expected a non-empty 1-D label array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true: expected integer class indices, got dtype {y.dtype}")
    if p.shape != (y.size, n_classes):
        raise ValueError(f"probs: expected shape ({y.size}, {n_classes}), got {p.shape}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true: labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs: contains NaN or infinite values")

    pred = np.argmax(p, axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)

    per_class: list[ClassMetrics] = []
    skipped: list[str] = []
    for c, name in enumerate(classes):
        precision = _safe_ratio(tp[c], predicted[c])
        recall = _safe_ratio(tp[c], support[c])
        f1 = _safe_ratio(2 * precision * recall, precision + recall)
        is_pos = y == c
        if 0 < support[c] < y.size:
            roc: float | None = auroc(is_pos, p[:, c])
            pr: float | None = average_precision(is_pos, p[:, c])
        else:
            roc = pr = None
            skipped.append(name)
        per_class.append(ClassMetrics(name, precision, recall, f1, int(support[c]), roc, pr))

    scored = [m for m in per_class if m.auroc is not None]
    in_play = (support > 0) | (predicted > 0)
    binary = None
    if n_classes == 2:
        pos = per_class[1]
        binary = BinaryMetrics(positive_class=pos.name, auroc=pos.auroc, auprc=pos.auprc, f1=pos.f1)
    return ClassificationReport(
        n_samples=int(y.size),
        accuracy=float(tp.sum() / y.size),
        macro_f1=float(np.mean([m.f1 for m, keep in zip(per_class, in_play, strict=True) if keep])),
        macro_auroc=float(np.mean([m.auroc for m in scored])) if scored else None,
        macro_auprc=float(np.mean([m.auprc for m in scored])) if scored else None,
        per_class=tuple(per_class),
        confusion_matrix=confusion.tolist(),
        skipped_auroc_classes=tuple(skipped),
        binary=binary,
    )


@dataclass(frozen=True)
class ImputationReport:
    """Imputation error over the hidden entries; CRPS fields are None without samples.

    - ``mae``, ``rmse``: of the point estimate over the evaluated entries.
    - ``crps_normalized``: CSDI's approximation, the mean over quantile levels 0.05..0.95 of the
      twice-pinball loss of the sample quantiles, summed over entries and divided by sum |truth|.
      None when sum |truth| is 0.
    - ``crps_empirical``: the exact CRPS of the samples' empirical distribution,
      E|X - y| - 0.5 E|X - X'| (X, X' drawn independently from the samples, pairs with themselves
      included), averaged over entries.
    - ``crps_empirical_normalized``: the same exact CRPS summed over entries over sum |truth|, on the
      scale of ``crps_normalized``. None when sum |truth| is 0.
    - ``crps_fair``: the "fair" sample CRPS, E|X - y| - 1/(2m(m-1)) sum_{i != j} |X_i - X_j| over the
      m samples, averaged over entries: an unbiased estimate of the CRPS of the distribution the
      samples are drawn from, where ``crps_empirical`` is biased high by E|X - X'| / (2m). None for
      one sample. ``crps_fair_normalized``: its sum over entries over sum |truth|.
    - ``coverage_50``, ``coverage_90``: the fraction of entries whose truth lies inside the central
      50 % and 90 % bands of the samples (:func:`central_band`, widened by the band factors the
      imputer was calibrated with); ``width_50``, ``width_90`` their mean widths. None for one sample.

    Every CRPS here assumes the samples are independent draws. Antithetic pairs (x, -x around the
    centre path) and the centre path itself are not: scored this way their CRPS comes out lower
    than that of independent draws of the same forecast (``tests/test_metrics.py``), so score CRPS
    on independent draws (``SamplingOptions(antithetic=False)``).
    """

    n_entries: int
    mae: float
    rmse: float
    n_samples: int | None
    crps_normalized: float | None
    crps_empirical: float | None
    crps_empirical_normalized: float | None
    crps_fair: float | None = None
    crps_fair_normalized: float | None = None
    coverage_50: float | None = None
    coverage_90: float | None = None
    width_50: float | None = None
    width_90: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def central_band(samples: np.ndarray, level: float, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of the central ``level`` band of ``samples`` (S, ...) at each entry.

    The band's ends are the (1 -/+ level) / 2 quantiles of the samples (linear interpolation),
    each moved away from the samples' median by ``factor`` (1: the plain sample quantiles). Few
    samples put their quantiles too close to the median (five draws of the true distribution
    cover a new one 67 % of the time between their extremes), and the factor makes up for that
    and for any error in the imputer's spread (:func:`band_factor`).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"band level must lie strictly between 0 and 1, got {level}")
    lo, mid, hi = np.quantile(samples, [(1.0 - level) / 2.0, 0.5, (1.0 + level) / 2.0], axis=0)
    return mid - factor * (mid - lo), mid + factor * (hi - mid)


def band_coverage(truth: np.ndarray, samples: np.ndarray, level: float, factor: float = 1.0) -> tuple[float, float]:
    """(coverage, mean width) of the :func:`central_band` of ``samples`` (S, K) for ``truth`` (K,)."""
    lower, upper = central_band(samples, level, factor)
    inside = (truth >= lower) & (truth <= upper)
    return float(inside.mean()), float(np.mean(upper - lower))


def band_factor(truth: np.ndarray, samples: np.ndarray, level: float) -> float:
    """The factor that makes the :func:`central_band` of ``samples`` (S, K) cover ``level`` of ``truth`` (K,).

    Per entry, the smallest factor whose band holds its truth is its distance from the median
    over the band's half on that side; the ``level`` quantile of those (the next one up, so the
    coverage of these entries is at least ``level``) is the factor. This is split conformal
    prediction with the band's own spread as the scale, so on entries exchangeable with these
    (hidden the same way, imputed with as many draws) the band covers ``level`` of the truth.
    """
    if truth.ndim != 1 or samples.ndim != 2 or samples.shape[1] != truth.size or truth.size == 0:
        raise ValueError(f"band_factor needs truth (K,) and samples (S, K); got {truth.shape} and {samples.shape}")
    lower, upper = central_band(samples, level)
    mid = np.quantile(samples, 0.5, axis=0)
    above = truth >= mid
    distance = np.abs(truth - mid)
    half = np.where(above, upper - mid, mid - lower)
    needed = np.divide(distance, half, out=np.where(distance > 0, np.inf, 0.0), where=half > 0)
    factor = float(np.quantile(needed, level, method="higher"))
    if not np.isfinite(factor):
        raise ValueError(f"the draws have no spread at more than {1 - level:.0%} of the entries: no band covers them")
    return factor


def quantile_crps_sum(truth: np.ndarray, samples: np.ndarray) -> float:
    """CSDI's CRPS approximation summed over entries (not normalized).

    ``truth`` is (K,), ``samples`` (S, K). For each level q in 0.05..0.95 the q-quantile of the
    samples (linear interpolation) is scored with 2 x the pinball loss; the levels are averaged.
    """
    q_pred = np.quantile(samples, CRPS_QUANTILES, axis=0)  # (Q, K)
    diff = q_pred - truth[None, :]
    indicator = (truth[None, :] <= q_pred).astype(np.float64)
    loss = 2.0 * np.abs(diff * (indicator - CRPS_QUANTILES[:, None]))
    return float(loss.sum(axis=1).mean())


def empirical_crps(truth: np.ndarray, samples: np.ndarray, fair: bool = False) -> np.ndarray:
    """Sample CRPS at each entry, shape (K,), in its energy form E|X - y| - 0.5 E|X - X'|.

    ``truth`` is (K,), ``samples`` (S, K). By default E|X - X'| is the mean over all S^2 ordered
    pairs, self-pairs included: the exact CRPS of the empirical distribution. With ``fair`` it is
    the mean over the S(S - 1) pairs of distinct samples, which makes the result an unbiased
    estimate of the CRPS of the distribution S independent samples come from (S >= 2). Uses
    sum_{i,j} |x_i - x_j| = 2 sum_i (2i - S - 1) x_(i) over the sorted samples, so the cost is a
    sort, not S^2 pairs.
    """
    n = samples.shape[0]
    if fair and n < 2:
        raise ValueError(f"the fair CRPS needs at least 2 samples, got {n}")
    term1 = np.mean(np.abs(samples - truth[None, :]), axis=0)
    ordered = np.sort(samples, axis=0)
    weights = (2.0 * np.arange(1, n + 1) - n - 1)[:, None]
    mean_pair_gap = 2.0 * np.sum(weights * ordered, axis=0) / (n * (n - 1) if fair else n * n)
    return term1 - 0.5 * mean_pair_gap


def imputation_metrics(
    truth: np.ndarray,
    estimate: np.ndarray,
    eval_mask: np.ndarray,
    samples: np.ndarray | None = None,
    band_factors: Sequence[float] | None = None,
) -> ImputationReport:
    """Score an imputation on the entries where ``eval_mask`` is True (the hidden ground truth).

    ``truth``, ``estimate`` and ``eval_mask`` share one shape; ``samples`` (optional) is
    (n_samples, *truth.shape) of independent draws from the imputer, used for CRPS and band
    coverage only (the estimate may come from other draws, e.g. the median of antithetic ones).
    ``band_factors`` widen the bands of ``BAND_LEVELS``, one factor each (default 1: the sample
    quantiles).
    """
    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    mask = np.asarray(eval_mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"eval_mask: expected a bool array, got dtype {mask.dtype}")
    if truth.shape != mask.shape or estimate.shape != mask.shape:
        raise ValueError(
            f"truth {truth.shape}, estimate {estimate.shape} and eval_mask {mask.shape} must share one shape"
        )
    n_entries = int(mask.sum())
    if n_entries == 0:
        raise ValueError("eval_mask selects no entries: there is no hidden ground truth to score against")
    t = truth[mask]
    e = estimate[mask]
    if not np.all(np.isfinite(t)):
        raise ValueError("truth: NaN or infinite values at evaluated entries")
    if not np.all(np.isfinite(e)):
        raise ValueError("estimate: NaN or infinite values at evaluated entries")
    err = e - t
    mae = float(np.mean(np.abs(err)))
    rmse = float(np.sqrt(np.mean(err * err)))
    if samples is None:
        return ImputationReport(n_entries, mae, rmse, None, None, None, None)

    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != truth.ndim + 1 or samples.shape[1:] != truth.shape or samples.shape[0] < 1:
        raise ValueError(f"samples: expected shape (n_samples, *{truth.shape}), got {samples.shape}")
    s = samples[:, mask]
    if not np.all(np.isfinite(s)):
        raise ValueError("samples: NaN or infinite values at evaluated entries")
    denom = float(np.abs(t).sum())
    crps_entries = empirical_crps(t, s)
    fair = empirical_crps(t, s, fair=True) if s.shape[0] > 1 else None
    factors = tuple(band_factors) if band_factors is not None else (1.0,) * len(BAND_LEVELS)
    if len(factors) != len(BAND_LEVELS):
        raise ValueError(f"band_factors: one per band level {BAND_LEVELS}, got {factors}")
    # One draw has no spread: its band is the draw itself, and its coverage would say nothing.
    bands = [band_coverage(t, s, lv, f) for lv, f in zip(BAND_LEVELS, factors, strict=True)] if s.shape[0] > 1 else None
    return ImputationReport(
        n_entries=n_entries,
        mae=mae,
        rmse=rmse,
        n_samples=int(s.shape[0]),
        crps_normalized=quantile_crps_sum(t, s) / denom if denom > 0 else None,
        crps_empirical=float(crps_entries.mean()),
        crps_empirical_normalized=float(crps_entries.sum() / denom) if denom > 0 else None,
        crps_fair=None if fair is None else float(fair.mean()),
        crps_fair_normalized=None if fair is None or denom == 0 else float(fair.sum() / denom),
        coverage_50=None if bands is None else bands[0][0],
        coverage_90=None if bands is None else bands[1][0],
        width_50=None if bands is None else bands[0][1],
        width_90=None if bands is None else bands[1][1],
    )
