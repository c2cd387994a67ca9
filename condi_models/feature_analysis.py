"""Feature reconstruction analysis (paper, Section 4.4 and Figure 3).

Given the classifier-input features of the same samples under three conditions (clean data,
missing data zero-filled, missing data imputed), it measures per sample how far the zero-filled and
the imputed features lie from the clean ones, by L2 distance (magnitude) and cosine distance
(direction), and how often imputation brings a sample closer than zero-filling.

Cosine distance is 1 - cosine similarity; a zero vector has no direction, so its similarity to
anything is taken as 0 (distance 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

IMPROVED_COLOR = "tab:blue"
DEGRADED_COLOR = "tab:red"
TIED_COLOR = "tab:gray"


@dataclass(frozen=True)
class FeatureReconstruction:
    """Per-sample distances to the clean features, each (N,) float64."""

    l2_zero_filled: np.ndarray
    l2_imputed: np.ndarray
    cosine_zero_filled: np.ndarray
    cosine_imputed: np.ndarray

    def summary(self) -> FeatureReconstructionSummary:
        """Fractions improved and average distances."""
        return FeatureReconstructionSummary(
            n_samples=int(self.l2_imputed.size),
            fraction_improved_l2=float(np.mean(self.l2_imputed < self.l2_zero_filled)),
            fraction_improved_cosine=float(np.mean(self.cosine_imputed < self.cosine_zero_filled)),
            mean_l2_zero_filled=float(np.mean(self.l2_zero_filled)),
            mean_l2_imputed=float(np.mean(self.l2_imputed)),
            mean_cosine_zero_filled=float(np.mean(self.cosine_zero_filled)),
            mean_cosine_imputed=float(np.mean(self.cosine_imputed)),
        )


@dataclass(frozen=True)
class FeatureReconstructionSummary:
    """How often, and by how much, imputed features are closer to clean ones than zero-filled ones.

    "Improved" is strict: a sample whose two distances are equal counts as not improved.
    """

    n_samples: int
    fraction_improved_l2: float
    fraction_improved_cosine: float
    mean_l2_zero_filled: float
    mean_l2_imputed: float
    mean_cosine_zero_filled: float
    mean_cosine_imputed: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    similarity = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return 1.0 - np.clip(similarity, -1.0, 1.0)


def feature_reconstruction(
    clean: np.ndarray, zero_filled: np.ndarray, imputed: np.ndarray
) -> FeatureReconstruction:
    """Distances of zero-filled and imputed features (N, d) to the clean features (N, d), per sample."""
    arrays = {"clean": clean, "zero_filled": zero_filled, "imputed": imputed}
    converted = {}
    for name, arr in arrays.items():
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty (N, d) feature matrix, got shape {a.shape}")
        if a.shape != np.shape(clean):
            raise ValueError(f"{name}: shape {a.shape} differs from clean's {np.shape(clean)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: contains NaN or infinite values")
        converted[name] = a
    c, z, i = converted["clean"], converted["zero_filled"], converted["imputed"]
    return FeatureReconstruction(
        l2_zero_filled=_l2(z, c),
        l2_imputed=_l2(i, c),
        cosine_zero_filled=_cosine_distance(z, c),
        cosine_imputed=_cosine_distance(i, c),
    )


def scatter_plot(result: FeatureReconstruction, path: str | Path) -> Path:
    """Write Figure 3 as a PNG: L2 and cosine panels, zero-filled distance (x) vs imputed distance (y).

    Points below the diagonal (imputation helped) are blue, above it red, on it gray. Returns the path.
    """
    out = Path(path)
    summary = result.summary()
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("L2 distance", result.l2_zero_filled, result.l2_imputed, summary.fraction_improved_l2),
        (
            "Cosine distance",
            result.cosine_zero_filled,
            result.cosine_imputed,
            summary.fraction_improved_cosine,
        ),
    )
    for ax, (title, xs, ys, frac) in zip(fig.subplots(1, 2), panels, strict=True):
        colors = np.where(ys < xs, IMPROVED_COLOR, np.where(ys > xs, DEGRADED_COLOR, TIED_COLOR))
        ax.scatter(xs, ys, c=colors, s=10, alpha=0.7, linewidths=0)
        # Distances are non-negative; all-zero distances still get a visible unit square.
        hi = 1.05 * float(max(xs.max(), ys.max())) or 1.0
        ax.plot([0.0, hi], [0.0, hi], color="black", linewidth=1, linestyle="--", label="y = x")
        ax.set_xlim(0.0, hi)
        ax.set_ylim(0.0, hi)
        ax.set_xlabel("zero-filled vs clean")
        ax.set_ylabel("imputed vs clean")
        ax.set_title(f"{title}: {100 * frac:.1f}% of {summary.n_samples} improved")
        ax.legend(loc="upper left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out
