"""The state the coordinator's parts share, named once.

:class:`~coordinator.server.Coordinator` sets every attribute below in its constructor and is made
of the parts that use them: itself (joins, tasks, downloads, heartbeats), the submissions
(:mod:`coordinator.uploads`) and the driver (:mod:`coordinator.driver`). Everything here is read
and written under ``_cond``'s lock, except by the driver between its own transitions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from coordinator.config import FederationConfig
from coordinator.global_model import GlobalModel, RunningSums
from coordinator.rounds import RoundMachine, RoundPlan
from coordinator.store import CheckpointStore, CoordinatorCheckpoint
from federation.faults import FaultPoint


class CoordinatorState:
    """The attributes of a :class:`~coordinator.server.Coordinator`, as its parts see them."""

    cfg: FederationConfig
    plan: RoundPlan
    machine: RoundMachine
    # The federation's model, once the layout is known.
    model: GlobalModel | None
    store: CheckpointStore
    ckpt: CoordinatorCheckpoint
    run_dir: Path
    clock: Callable[[], float]
    _cond: threading.Condition
    _stopping: threading.Event
    # Plain mode: each attempt's accepted contributions, summed as they arrive.
    _sums: RunningSums
    # Bytes each silo downloaded, per (round, attempt, stage), for the report.
    _downloads: dict[tuple[int, int, int], dict[str, int]]
    # Fault injection (tests, the harness): where to die.
    exit_at: FaultPoint | None
    max_chunk_bytes: int
    _status_text: str
    _progress_line: str
    # How the run ended: ("complete" | "failed", message).
    outcome: tuple[str, str] | None

    def _checkpoint(self) -> None:
        """Commit the current progress (caller holds the lock)."""
        self.ckpt.progress = self.machine.progress()
        self.store.commit(self.ckpt)
