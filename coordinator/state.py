"""The state the coordinator's parts share, in one object each part holds.

:class:`~coordinator.server.Coordinator` makes it and is composed of the parts that use it: itself
(joins, tasks, downloads, heartbeats), the submissions (:class:`~coordinator.uploads.Submissions`)
and the driver (:class:`~coordinator.driver.RoundDriver`). Everything here is read and written
under ``cond``'s lock, except by the driver between its own transitions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.config import FederationConfig
from coordinator.global_model import GlobalModel, RunningSums
from coordinator.rounds import RoundMachine, RoundPlan
from coordinator.store import CheckpointStore, CoordinatorCheckpoint


@dataclass(eq=False)
class CoordinatorState:
    """The run's configuration, round machine, global model and checkpoint, and the lock over them."""

    cfg: FederationConfig
    plan: RoundPlan
    clock: Callable[[], float]
    run_dir: Path
    store: CheckpointStore
    ckpt: CoordinatorCheckpoint
    machine: RoundMachine
    # The federation's model, once the layout is known (federation.yaml, the checkpoint or the
    # first silo to join).
    model: GlobalModel | None = None
    # Held around every read and change of the state; notified whenever a silo's task may change.
    cond: threading.Condition = field(default_factory=threading.Condition)
    # Set when the coordinator stops: the driver and held long polls end.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Plain mode: each attempt's accepted contributions, summed as they arrive.
    sums: RunningSums = field(default_factory=RunningSums)
    # Bytes each silo downloaded, per (round, attempt, stage), for the report.
    downloads: dict[tuple[int, int, int], dict[str, int]] = field(default_factory=dict)

    def checkpoint(self) -> None:
        """Commit the current progress (caller holds the lock)."""
        self.ckpt.progress = self.machine.progress()
        self.store.commit(self.ckpt)
