"""Figures people look at: per-round curves of a federated run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are files, never windows
import matplotlib.pyplot as plt


def _series(rounds: Sequence[dict[str, Any]], *keys: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rounds:
        value: Any = row
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is not None:
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def write_round_curves(rounds: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Accuracy and macro-F1, training losses and imputation MAE per round, as one PNG."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("macro_auroc", "macro AUROC")):
        xs, ys = _series(rounds, "val", key)
        if xs:
            axes[0].plot(xs, ys, marker="o", ms=3, label=label)
    axes[0].set_title("validation")
    for key, label in (("phase_a_loss", "Phase A (diffusion)"), ("phase_b_loss", "Phase B (classifier)")):
        xs, ys = _series(rounds, key)
        if xs:
            axes[1].plot(xs, ys, marker="o", ms=3, label=label)
    axes[1].set_title("local training loss")
    xs, ys = _series(rounds, "val", "imputation_mae")
    if xs:
        axes[2].plot(xs, ys, marker="o", ms=3, color="tab:purple", label="MAE on hidden entries")
    axes[2].set_title("imputation (standardized units)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
