"""Pooling what silos report in aggregate: evaluation scores.

Silos never send records. Per split they send counts and scores (samples, mean loss, accuracy,
the confusion matrix, macro AUROC, imputation error over so many hidden entries). Pooled here:

- accuracy and macro-F1 exactly, from the summed confusion matrices (macro-F1 over the classes
  present or predicted anywhere, as condi_models.metrics defines it);
- loss and imputation MAE exactly, as count-weighted means; RMSE from the weighted mean square;
- macro AUROC approximately, as the sample-weighted mean of the silos' values (ranking scores
  across sites cannot be pooled without the scores themselves).

The training data's statistics are pooled once, before round 0: federation.statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from condi_models.metrics import macro_f1_from_confusion, recall_from_confusion


class ReportError(ValueError):
    """A silo's metrics report that cannot be used; the message names the field."""


def _number(data: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> float | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ReportError(f"{where}.{key}: expected a finite number, got {value!r}")
    return float(value)


def check_split_report(
    data: Any, n_classes: int, where: str, *, max_n: int, entries_per_sample: int
) -> dict[str, Any]:
    """Validate one split's scores from a silo; returns them unchanged.

    Every count is bounded before it weighs in a pooled figure: at most ``max_n`` samples, at most
    ``entries_per_sample`` hidden entries per sample, scores in [0, 1], losses and errors >= 0.
    """
    if not isinstance(data, Mapping):
        raise ReportError(f"{where}: expected an object")
    n = _number(data, "n", where)
    if n is None or n < 1 or n != int(n) or n > max_n:
        raise ReportError(f"{where}.n: expected a whole number from 1 to {max_n}")
    for key in ("accuracy", "macro_f1", "macro_auroc"):
        value = _number(data, key, where, optional=key == "macro_auroc")
        if value is not None and not 0.0 <= value <= 1.0:
            raise ReportError(f"{where}.{key}: expected a score in [0, 1], got {value!r}")
    loss = _number(data, "loss", where)
    if loss is None or loss < 0:
        raise ReportError(f"{where}.loss: expected a number >= 0")
    cm = data.get("confusion_matrix")
    matrix = np.asarray(cm) if isinstance(cm, list) else None
    if (
        matrix is None
        or matrix.shape != (n_classes, n_classes)
        or matrix.dtype.kind not in "iu"
        or np.any(matrix < 0)
        or int(matrix.sum()) != int(n)
    ):
        raise ReportError(f"{where}.confusion_matrix: expected {n_classes}x{n_classes} counts summing to n")
    imputation = data.get("imputation")
    if imputation is not None:
        if not isinstance(imputation, Mapping):
            raise ReportError(f"{where}.imputation: expected an object or null")
        for key in ("n_entries", "mae", "rmse"):
            value = _number(imputation, key, f"{where}.imputation")
            if value is None or value < 0:
                raise ReportError(f"{where}.imputation.{key}: expected a number >= 0")
        if imputation["n_entries"] > n * entries_per_sample:
            raise ReportError(
                f"{where}.imputation.n_entries: more than {entries_per_sample} hidden entries per sample"
            )
    return dict(data)


def pool_split(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One pooled score set from the silos' reports of the same split; None without reports."""
    if not reports:
        return None
    n = np.array([r["n"] for r in reports], dtype=np.float64)
    confusion = np.sum([np.asarray(r["confusion_matrix"], dtype=np.int64) for r in reports], axis=0)
    total = float(n.sum())
    out: dict[str, Any] = {
        "n": int(total),
        "silos": len(reports),
        "loss": float(np.dot(n, [r["loss"] for r in reports]) / total),
        "accuracy": float(np.trace(confusion) / total),
        "macro_f1": macro_f1_from_confusion(confusion),
        "recall": recall_from_confusion(confusion),
        "confusion_matrix": confusion.tolist(),
    }
    auroc = [
        (w, r["macro_auroc"]) for w, r in zip(n, reports, strict=True) if r.get("macro_auroc") is not None
    ]
    if auroc:
        weights = np.array([w for w, _ in auroc])
        out["macro_auroc"] = float(np.dot(weights, [a for _, a in auroc]) / weights.sum())
    imputed = [r["imputation"] for r in reports if r.get("imputation")]
    entries = np.array([i["n_entries"] for i in imputed], dtype=np.float64)
    if imputed and entries.sum() > 0:
        out["imputation_mae"] = float(np.dot(entries, [i["mae"] for i in imputed]) / entries.sum())
        out["imputation_rmse"] = float(
            math.sqrt(np.dot(entries, [i["rmse"] ** 2 for i in imputed]) / entries.sum())
        )
    return out
