"""``record.png``: one panel per channel with observed, missing, imputed and hidden-truth traces.

For a PSG night, a strip of the predicted (and hypnogram) stage per epoch sits above a stretch of
``PLOT_EPOCHS`` consecutive epochs; a whole night would be one black smear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.ndimage import maximum_filter1d

from condi_models.data.dataset import DatasetInfo
from condi_models.predict.inputs import LoadedRecord

PLOT_EPOCHS = 2


@dataclass
class RecordArrays:
    """A record's outputs in source units, all (S, F, T)."""

    observed: np.ndarray
    seen: np.ndarray  # the input as the model saw it, NaN where not observed
    x_hat: np.ndarray | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    truth: np.ndarray | None = None
    hidden: np.ndarray | None = None


def _time_axis(n: int, rate: float, offset_s: float) -> tuple[np.ndarray, str]:
    seconds = offset_s + np.arange(n) / rate
    if seconds[-1] - seconds[0] >= 3 * 3600:
        return seconds / 3600.0, "hours"
    return seconds, "seconds"


def _grid(n_channels: int) -> tuple[int, int]:
    cols = 1 if n_channels <= 6 else 2 if n_channels <= 16 else 3
    return math.ceil(n_channels / cols), cols


def _draw_channel(ax: Any, t: np.ndarray, view: RecordArrays, f: int, colour: str) -> None:
    """One channel of a (F, T) view: gaps shaded, band and median in them, truth dashed, observed on top."""
    missing = ~view.observed[f]
    ax.fill_between(
        t, 0, 1, where=missing, step="mid", color="0.88", linewidth=0, transform=ax.get_xaxis_transform()
    )
    # One step either side of a gap, so the imputed line joins the observed trace around it.
    near = maximum_filter1d(missing.astype(np.uint8), size=3) > 0
    if view.x_hat is not None and view.lower is not None and view.upper is not None and missing.any():
        ax.fill_between(t, view.lower[f], view.upper[f], where=near, color=colour, alpha=0.25, linewidth=0)
        ax.plot(t, np.where(near, view.x_hat[f], np.nan), color=colour, linewidth=0.9)
    if view.truth is not None and view.hidden is not None and view.hidden[f].any():
        hidden = maximum_filter1d(view.hidden[f].astype(np.uint8), size=3) > 0
        ax.plot(t, np.where(hidden, view.truth[f], np.nan), color="tab:green", linestyle="--", linewidth=0.8)
    # Sparse series (hourly ICU data) need markers: isolated observations draw no line.
    ax.plot(
        t, view.seen[f], color="black", linewidth=0.7, marker="." if len(t) <= 200 else None, markersize=3
    )
    # Scale to the data (observed and hidden truth), so a wild imputation runs off the panel rather
    # than flattening the trace a reader came to see.
    known = view.seen[f] if view.truth is None else view.truth[f]
    known = known[np.isfinite(known)]
    if known.size:
        lo, hi = float(known.min()), float(known.max())
        pad = 0.15 * (hi - lo) if hi > lo else max(1.0, abs(hi)) * 0.5
        ax.set_ylim(lo - pad, hi + pad)


def _shown_segments(record: LoadedRecord, observed: np.ndarray) -> list[int]:
    """Segments drawn: up to PLOT_EPOCHS consecutive epochs from the first with a gap (PSG), else all."""
    if record.kind != "psg":
        return [0]
    gappy = np.flatnonzero(~observed.all(axis=(1, 2)))
    shown = [int(gappy[0]) if gappy.size else 0]
    index = record.segment_index
    while (
        len(shown) < PLOT_EPOCHS
        and shown[-1] + 1 < len(index)
        and index[shown[-1] + 1] == index[shown[-1]] + 1
    ):
        shown.append(shown[-1] + 1)
    return shown


def _flat_view(arrays: RecordArrays, shown: Sequence[int]) -> RecordArrays:
    """Consecutive segments joined along time: (S, F, T) arrays become (F, len(shown) * T)."""

    def join(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[s] for s in shown], axis=-1)

    def join_optional(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else join(a)

    return RecordArrays(
        observed=join(arrays.observed),
        seen=join(arrays.seen),
        x_hat=join_optional(arrays.x_hat),
        lower=join_optional(arrays.lower),
        upper=join_optional(arrays.upper),
        truth=join_optional(arrays.truth),
        hidden=join_optional(arrays.hidden),
    )


def plot_record(
    path: Path,
    record: LoadedRecord,
    info: DatasetInfo,
    arrays: RecordArrays,
    predicted: Sequence[str],
    title: str,
    band_label: str = "quantile band",
) -> None:
    """One panel per channel in a grid; for PSG a stage strip over the night above a stretch of epochs.

    ``band_label`` names the shaded band around the imputed median in the legend (its level).
    """
    channels = info.channel_names
    psg = record.kind == "psg"
    shown = _shown_segments(record, arrays.observed)
    view = _flat_view(arrays, shown)
    offset = float(record.segment_index[shown[0]]) * record.segment_seconds if psg else 0.0
    t, unit = _time_axis(view.observed.shape[1], info.sampling_rate_hz, offset)
    rows, cols = _grid(len(channels))
    strip = 1 if psg else 0
    fig = plt.figure(figsize=(7.5 * cols if cols > 1 else 13, 1.45 * (rows + strip) + 1.4))
    gs = fig.add_gridspec(
        rows + strip, cols, height_ratios=[1.3] * strip + [1.0] * rows, hspace=0.5, wspace=0.12
    )
    colour = "tab:blue"
    if psg:
        _draw_stages(fig.add_subplot(gs[0, :]), record, predicted, info, shown)
    first_ax = None
    for f, name in enumerate(channels):
        row, col = f % rows, f // rows
        ax = fig.add_subplot(gs[strip + row, col], sharex=first_ax)
        first_ax = first_ax or ax
        _draw_channel(ax, t, view, f, colour)
        for k in range(1, len(shown)):
            ax.axvline(t[k * arrays.observed.shape[2]], color="tab:orange", linewidth=1.0, linestyle=":")
        ax.set_title(
            f"{name} ({record.units[f]})" if record.units[f] else name, fontsize=8, loc="left", pad=2
        )
        ax.tick_params(labelsize=7)
        ax.margins(x=0)
        if row == rows - 1 or f == len(channels) - 1:
            ax.set_xlabel(f"time ({unit})", fontsize=8)
        else:
            ax.tick_params(labelbottom=False)
    handles: list[Any] = [
        Line2D([], [], color="black", linewidth=1, label="observed"),
        Patch(color="0.88", label="missing"),
    ]
    if arrays.x_hat is not None:
        handles += [
            Line2D([], [], color=colour, linewidth=1.2, label="imputed median"),
            Patch(color=colour, alpha=0.25, label=band_label),
        ]
    if arrays.truth is not None:
        handles.append(Line2D([], [], color="tab:green", linestyle="--", label="hidden truth"))
    height = fig.get_figheight()
    top = 1.0 - 1.15 / height
    fig.legend(
        handles=handles,
        loc="upper right",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.99, 1.0 - 0.5 / height),
    )
    fig.suptitle(title, x=0.01, y=0.995, ha="left", va="top", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.45 / fig.get_figheight() + 0.02, top=top)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw_stages(
    ax: Any,
    record: LoadedRecord,
    predicted: Sequence[str],
    info: DatasetInfo,
    shown: Sequence[int],
) -> None:
    """Predicted stage per epoch over the whole night (and the hypnogram's), the drawn epochs marked."""
    classes = list(info.classes)
    level = {c: len(classes) - 1 - i for i, c in enumerate(classes)}
    night_s = (record.segment_index[-1] + 1) * record.segment_seconds
    scale, unit = (3600.0, "hours") if night_s >= 2 * 3600 else (60.0, "minutes")
    starts = record.segment_index * record.segment_seconds / scale
    step = record.segment_seconds / scale
    # Steps drawn to each epoch's end, so the last epoch shows too.
    edges = np.append(starts, starts[-1] + step)
    ax.stairs(
        [level[p] for p in predicted],
        edges,
        baseline=None,
        color="tab:blue",
        linewidth=1.4,
        label="predicted",
    )
    if record.reference is not None:
        ax.stairs(
            [level[c] for c in record.reference],
            edges,
            baseline=None,
            color="0.3",
            linestyle="--",
            linewidth=1.0,
            label="hypnogram",
        )
    ax.axvspan(
        starts[shown[0]], starts[shown[-1]] + step, color="tab:orange", alpha=0.25, label="epochs drawn below"
    )
    ax.set_yticks(range(len(classes)), classes[::-1], fontsize=7)
    ax.set_ylim(-0.5, len(classes) - 0.5)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(f"time ({unit})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("stage per 30 s epoch", fontsize=8, loc="left", pad=2)
    ax.legend(
        fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False, borderaxespad=0.1
    )
