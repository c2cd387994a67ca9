"""What a run leaves for the operator: one metrics row per round, the final report, the global model.

A round's row holds the pooled evaluation of the new global model on the silos' validation
splits (and test splits in the last round), the training losses the silos reported, the time
spent per stage and the bytes moved per silo (state downloads for training and for evaluation,
update uploads) and, from silos training with differential privacy, the epsilon each says it has
spent so far (its claim; the coordinator cannot check it). At the end the coordinator writes ``report.json``,
``curves.png`` and ``global_model.npz`` (a condi checkpoint with the pooled normalizer, ready
for ``condi predict``) into the run directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condi_models.checkpoint import atomic_write_bytes, save_checkpoint
from condi_models.data.dataset import DatasetInfo
from condi_models.data.normalize import ChannelNormalizer
from condi_models.nn.model import CondIModel
from condi_models.reports import write_round_curves
from coordinator.pooling import pool_split


@dataclass(frozen=True)
class SiloUpload:
    """What the coordinator learnt about one accepted update (its tensors went into the round's sum)."""

    weights: Mapping[str, float]
    claims: Mapping[str, Any]
    upload_s: float
    upload_bytes: int
    # Plain mode: entries of the update clipped to the clip bound before they were summed.
    clipped: int = 0


@dataclass(frozen=True)
class TrainRecord:
    """How the training stage of a round went."""

    attempt: int
    selected: tuple[str, ...]
    uploads: Mapping[str, SiloUpload]
    download_bytes: Mapping[str, int]
    state_bytes: int
    stage_s: float
    aggregation_s: float


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _weighted_loss(uploads: Mapping[str, SiloUpload], key: str) -> float | None:
    pairs = [
        (u.weights.get("all", 0.0), u.claims.get(key))
        for u in uploads.values()
        if isinstance(u.claims.get(key), int | float) and math.isfinite(u.claims[key])
    ]
    total = sum(w for w, _ in pairs)
    return float(sum(w * v for w, v in pairs) / total) if pairs and total > 0 else None


def train_summary(round_index: int, train: TrainRecord) -> dict[str, Any]:
    """The training half of a round's row: who trained, losses, stage times, bytes per silo."""
    uploads = train.uploads
    summary: dict[str, Any] = {
        "round": round_index,
        "attempt": train.attempt,
        "selected": list(train.selected),
        "completed": sorted(uploads),
        "samples": int(sum(u.weights.get("all", 0.0) for u in uploads.values())),
        "phase_a_loss": _weighted_loss(uploads, "phase_a_loss"),
        "phase_b_loss": _weighted_loss(uploads, "phase_b_loss"),
        "timing": {
            "train_stage_s": round(train.stage_s, 3),
            "download_s": _mean([u.claims.get("download_s") for u in uploads.values()]),
            "phase_a_s": _mean([u.claims.get("phase_a_s") for u in uploads.values()]),
            "phase_b_s": _mean([u.claims.get("phase_b_s") for u in uploads.values()]),
            "upload_s": _mean([u.upload_s for u in uploads.values()]),
            "aggregation_s": round(train.aggregation_s, 4),
        },
        # A silo that already holds the state (from evaluating it) trains without downloading it.
        "bytes": {
            "state": train.state_bytes,
            "download_per_silo": _mean([train.download_bytes.get(s, 0) for s in uploads]),
            "upload_per_silo": _mean([u.upload_bytes for u in uploads.values()]),
        },
    }
    epsilon = {s: float(u.claims["epsilon"]) for s, u in sorted(uploads.items()) if "epsilon" in u.claims}
    if epsilon:
        summary["epsilon"] = epsilon
    return summary


def epsilon_by_silo(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """Each DP silo's claimed epsilon spent after every recorded round (None where it did not train)."""
    silos = sorted({s for r in rows for s in r.get("epsilon", {})})
    return {s: [r.get("epsilon", {}).get(s) for r in rows] for s in silos}


def round_row(
    summary: Mapping[str, Any],
    eval_attempt: int,
    eval_s: float,
    reports: Mapping[str, Mapping[str, Any]],
    eval_download_bytes: Mapping[str, int],
    *,
    secure_sum: tuple[tuple[str, ...], Mapping[str, Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """A round's metrics row: its training summary plus the pooled evaluation of the new global model.

    The pooled scores come from the silos' clear ``reports``, or with ``secure_sum`` =
    (silos summed, pooled splits) from a secure sum of metrics, where no silo's own scores exist.
    """
    row = dict(summary)
    evaluated_by = sorted(reports) if secure_sum is None else sorted(secure_sum[0])
    row["eval_attempt"] = eval_attempt
    row["evaluated_by"] = evaluated_by
    row["timing"] = {**row.get("timing", {}), "evaluate_stage_s": round(eval_s, 3)}
    row["bytes"] = {
        **row.get("bytes", {}),
        "eval_download_per_silo": _mean([eval_download_bytes.get(s, 0) for s in evaluated_by]),
    }
    for split in ("val", "test"):
        if secure_sum is None:
            pooled = pool_split([r["splits"][split] for r in reports.values() if split in r.get("splits", {})])
        else:
            pooled = secure_sum[1].get(split)
        if pooled is not None:
            row[split] = dict(pooled)
    return row


def write_report(
    run_dir: Path,
    *,
    federation: str,
    run_id: str,
    status: str,
    message: str,
    rows: Sequence[Mapping[str, Any]],
    model: CondIModel | None,
    normalizer: ChannelNormalizer | None,
    layout: DatasetInfo | None,
    departed: Mapping[str, str] | None = None,
    aggregation: Mapping[str, Any] | None = None,
    final: Mapping[str, Any] | None = None,
) -> Path:
    """Write report.json, curves.png and, when a model exists, global_model.npz; returns the report path.

    ``departed`` names the silos that left the run and why; report.json lists them, and the
    epsilon each DP silo claimed per round under ``privacy``. ``aggregation`` says how updates
    (and, with secure metrics, evaluation scores) were combined. ``final`` is the final test of
    the model selected on validation (its row, with ``selected_round`` and ``val_macro_auroc``);
    without it the last round's test is the final one and the last round's model is exported.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if final is None:
        final_test = next((dict(r["test"]) for r in reversed(rows) if "test" in r), None)
        selection = {"kind": "last", "selected_round": len(rows) - 1 if rows else None}
    else:
        final_test = None if final.get("test") is None else dict(final["test"])
        selection = {
            "kind": "best_val_auroc",
            "selected_round": final["selected_round"],
            "val_macro_auroc": final["val_macro_auroc"],
            "test_evaluated_by": list(final.get("evaluated_by", [])),
        }
    accuracy = [r["val"]["accuracy"] for r in rows if "val" in r]
    report = {
        "federation": federation,
        "run_id": run_id,
        "status": status,
        "message": message,
        "rounds_completed": len(rows),
        "final_test": final_test,
        "model_selection": selection,
        "val_accuracy_by_round": accuracy,
        "rounds": list(rows),
        "files": {"metrics": "metrics.jsonl", "curves": "curves.png"},
        "departed": dict(departed or {}),
        "aggregation": dict(aggregation or {}),
    }
    epsilon = epsilon_by_silo(rows)
    if epsilon:
        report["privacy"] = {"epsilon_by_silo": epsilon}
    if model is not None and normalizer is not None and layout is not None:
        save_checkpoint(
            run_dir / "global_model.npz",
            model,
            normalizer,
            layout,
            {"federation": federation, "run_id": run_id, "rounds": len(rows), "status": status,
             "selected_round": selection["selected_round"]},
        )
        report["files"]["global_model"] = "global_model.npz"
    write_round_curves(list(rows), run_dir / "curves.png", title=f"{federation} ({status})")
    path = run_dir / "report.json"
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return path
