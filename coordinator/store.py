"""The coordinator's checkpoint: enough to resume a run after a crash without losing or doubling a round.

Layout under ``<run_dir>/checkpoint``:

- ``global-<round>-<sha>.npz``: the global model's named tensors (numpy, read with
  ``allow_pickle=False``) and, under ``server_optimizer/``, the server optimizer's moments,
  written before the commit that names it (the SHA-256 covers the model's tensors alone);
- ``aggregates/round-<round>-<sha>.npy``: each recorded round's summed contribution vector (the
  unmasked secure sum, or the sum of the capped, clipped plain contributions), float64, named with
  its round in that round's row; with the initial model it replays the run
  (:mod:`coordinator.replay`);
- ``progress.json``: the commit point. It names the state file and its wire-format SHA-256, the
  round progress (round, attempt, failures, what is pending, the selection RNG state), the data
  layout and model config fixed when the first silo joined, every recorded round's metrics row,
  the training half of the row of a round that still awaits evaluation, the data statistics
  (normalizer, class counts) pooled before round 0, and for model selection the round with the
  best validation score so far (whose state file is kept too) and the final test's row.

Every file is written to a temporary name, fsynced and renamed, and the directory is fsynced, so
a crash leaves the old commit or the new one. ``<run_dir>/metrics.jsonl`` is rewritten from the
committed rows after each commit: it holds every recorded round exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condi_models.checkpoint import atomic_write_bytes, info_from_dict, info_to_dict
from condi_models.data.dataset import DatasetInfo
from condi_models.nn.config import ModelConfig
from coordinator.rounds import PENDING, RoundProgress
from federation import wire
from federation.statistics import PooledStatistics

log = logging.getLogger(__name__)

# Version 2 keeps the pooled statistics of the run instead of each silo's normalizer.
FORMAT = "condi-coordinator/2"
# Entries of a state file that hold the server optimizer's state rather than the model's.
OPTIMIZER_PREFIX = "server_optimizer/"


class StoreError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass
class CoordinatorCheckpoint:
    """What a committed checkpoint holds besides the tensors."""

    run_id: str
    federation: str
    progress: RoundProgress
    layout: DatasetInfo | None = None
    model: ModelConfig | None = None
    state_file: str | None = None
    state_sha256: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    pending_row: dict[str, Any] | None = None
    # The data statistics pooled before round 0, fixed for the run.
    statistics: PooledStatistics | None = None
    # Model selection: the round whose model had the best pooled validation macro AUROC so far
    # (round, macro_auroc, state_file, state_sha256), and the final test's row once evaluated.
    best: dict[str, Any] | None = None
    final: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of progress.json."""
        p = self.progress
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "federation": self.federation,
            "progress": {
                "round": p.round,
                "attempt": p.attempt,
                "failures": p.failures,
                "pending": p.pending,
                "rng_state": p.rng_state,
            },
            "layout": None if self.layout is None else info_to_dict(self.layout),
            "model": None if self.model is None else self.model.to_dict(),
            "state_file": self.state_file,
            "state_sha256": self.state_sha256,
            "rows": self.rows,
            "pending_row": self.pending_row,
            "statistics": None if self.statistics is None else self.statistics.to_dict(),
            "best": self.best,
            "final": self.final,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> CoordinatorCheckpoint:
        """Inverse of :meth:`to_dict`; a malformed document raises :class:`StoreError` naming ``source``."""
        if data.get("format") != FORMAT:
            raise StoreError(f"{source}: format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            p = data["progress"]
            progress = RoundProgress(
                round=int(p["round"]),
                attempt=int(p["attempt"]),
                failures=int(p["failures"]),
                pending=p["pending"],
                rng_state=dict(p["rng_state"]),
            )
            if progress.pending not in PENDING:
                raise ValueError(f"pending {progress.pending!r}")
            return cls(
                run_id=str(data["run_id"]),
                federation=str(data["federation"]),
                progress=progress,
                layout=None if data["layout"] is None else info_from_dict(data["layout"]),
                model=None if data["model"] is None else ModelConfig.from_dict(data["model"]),
                state_file=data["state_file"],
                state_sha256=str(data["state_sha256"]),
                rows=list(data["rows"]),
                pending_row=data["pending_row"],
                statistics=None
                if data["statistics"] is None
                else PooledStatistics.from_dict(data["statistics"], "statistics"),
                best=_best(data["best"]),
                final=None if data["final"] is None else dict(data["final"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{source}: inconsistent checkpoint ({exc})") from exc


def _best(data: Any) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or sorted(data) != ["macro_auroc", "round", "state_file", "state_sha256"]:
        raise ValueError("best: expected round, macro_auroc, state_file and state_sha256")
    if not re.fullmatch(r"global-\d{5}-[0-9a-f]{16}\.npz", str(data["state_file"])):
        raise ValueError(f"best.state_file: not a state file name: {data['state_file']!r}")
    return dict(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_saved_state(
    saved: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A state file's entries as (the model's tensors, the server optimizer's state)."""
    model = {k: v for k, v in saved.items() if not k.startswith(OPTIMIZER_PREFIX)}
    optimizer = {k.removeprefix(OPTIMIZER_PREFIX): v for k, v in saved.items() if k.startswith(OPTIMIZER_PREFIX)}
    return model, optimizer


def state_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """The wire-format payload SHA-256 of a state: what silos are told to download."""
    return wire.encode_state(tensors).manifest.payload_sha256


class CheckpointStore:
    """Reads and commits the checkpoint of one run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoint"
        self.progress_path = self.dir / "progress.json"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def save_state(
        self,
        round_index: int,
        tensors: Mapping[str, np.ndarray],
        optimizer: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[str, str]:
        """Write a global state file (not yet committed) with the server optimizer's state beside the
        model's tensors; returns its file name and the SHA-256 of the model's tensors."""
        sha = state_sha256(tensors)
        name = f"global-{round_index:05d}-{sha[:16]}.npz"
        entries = {k: np.asarray(v) for k, v in tensors.items()}
        entries.update({OPTIMIZER_PREFIX + k: np.asarray(v) for k, v in (optimizer or {}).items()})
        buf = io.BytesIO()
        np.savez(buf, **entries)
        atomic_write_bytes(self.dir / name, buf.getvalue())
        return name, sha

    @property
    def aggregates_dir(self) -> Path:
        """Where each recorded round's summed contributions are kept."""
        return self.dir / "aggregates"

    def save_aggregate(self, round_index: int, total: np.ndarray) -> dict[str, str]:
        """Write a round's summed contribution vector (not yet committed); returns the reference a
        row keeps: ``{"file": name, "sha256": sha}`` (SHA-256 of the raw float64 vector)."""
        vector = np.ascontiguousarray(total, dtype=np.float64)
        sha = hashlib.sha256(vector.tobytes()).hexdigest()
        name = f"round-{round_index:05d}-{sha[:16]}.npy"
        buf = io.BytesIO()
        np.save(buf, vector, allow_pickle=False)
        atomic_write_bytes(self.aggregates_dir / name, buf.getvalue())
        return {"file": name, "sha256": sha}

    def read_aggregate(self, ref: Mapping[str, Any]) -> np.ndarray:
        """The vector a row's ``aggregate`` reference names, checked against its SHA-256."""
        path = self.aggregates_dir / str(ref["file"])
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise StoreError(f"{path}: unreadable aggregate ({exc})") from exc
        if vector.dtype != np.float64 or vector.ndim != 1:
            raise StoreError(f"{path}: expected a float64 vector, got {vector.dtype} of shape {vector.shape}")
        if hashlib.sha256(vector.tobytes()).hexdigest() != ref["sha256"]:
            raise StoreError(f"{path}: content does not match the SHA-256 its round's row names")
        return vector

    def commit(self, checkpoint: CoordinatorCheckpoint) -> None:
        """Make ``checkpoint`` the one a restart resumes from; then tidy up and rewrite metrics.jsonl."""
        named = [checkpoint.state_file, None if checkpoint.best is None else checkpoint.best["state_file"]]
        for name in named:
            if name is not None and not (self.dir / name).is_file():
                raise StoreError(f"{self.dir / name}: state file missing; save it before committing")
        text = json.dumps(checkpoint.to_dict(), indent=1, sort_keys=True) + "\n"
        atomic_write_bytes(self.progress_path, text.encode("utf-8"))
        _fsync_dir(self.dir)
        keep = {checkpoint.state_file, None if checkpoint.best is None else checkpoint.best["state_file"]}
        for old in self.dir.glob("global-*.npz"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        # An aggregate saved by an attempt that never committed (a crash, a refused sum) is dropped.
        rows = [*checkpoint.rows, *([checkpoint.pending_row] if checkpoint.pending_row else [])]
        journal = {row["aggregate"]["file"] for row in rows if "aggregate" in row}
        for old in self.aggregates_dir.glob("round-*.npy"):
            if old.name not in journal:
                old.unlink(missing_ok=True)
        self.write_metrics(checkpoint.rows)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the committed rows (one line per recorded round)."""
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write_bytes(self.metrics_path, text.encode("utf-8"))

    def load(self) -> tuple[CoordinatorCheckpoint, dict[str, np.ndarray] | None] | None:
        """The committed checkpoint and its state file's entries (see :func:`split_saved_state`), or
        None when the run has none yet.

        The SHA-256 of the model's tensors must equal the committed one; a mismatch is an error
        rather than a silent restart from whatever the file holds.
        """
        if not self.progress_path.is_file():
            return None
        try:
            data = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.progress_path}: unreadable checkpoint ({exc})") from exc
        checkpoint = CoordinatorCheckpoint.from_dict(data, self.progress_path)
        if checkpoint.state_file is None:
            return checkpoint, None
        tensors = self.read_state(checkpoint.state_file, checkpoint.state_sha256)
        self.write_metrics(checkpoint.rows)
        return checkpoint, tensors

    def read_state(self, name: str, sha256: str) -> dict[str, np.ndarray]:
        """The entries of the state file ``name``, whose model tensors must have SHA-256 ``sha256``."""
        path = self.dir / name
        try:
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{path}: unreadable global state ({exc})") from exc
        if state_sha256(split_saved_state(tensors)[0]) != sha256:
            raise StoreError(f"{path}: content does not match the SHA-256 committed in {self.progress_path}")
        return tensors
