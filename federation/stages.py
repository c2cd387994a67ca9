"""The stages of a round and the key that names one stage of one attempt, as plain Python values.

The round machine, the coordinator and the silo agent speak of stages with :class:`Stage`; only
:mod:`federation.transfer` turns a :class:`StageKey` into the wire's ``StageRef`` and back. The
numbers are the proto's ``Stage`` values (a test holds them equal), so a conversion is a check,
not a table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Stage(enum.IntEnum):
    """What a silo is asked to do: the task kinds of the protocol."""

    UNSPECIFIED = 0
    WAIT = 1
    TRAIN = 2
    ADVERTISE_KEYS = 3
    SHARE_KEYS = 4
    MASKED_INPUT = 5
    UNMASK = 6
    EVALUATE = 7
    DONE = 8
    STATISTICS = 9


# The stages whose task downloads the global state (in secure mode silos train in ADVERTISE_KEYS).
DOWNLOAD_STAGES = frozenset({Stage.TRAIN, Stage.ADVERTISE_KEYS, Stage.EVALUATE})


def stage_name(stage: int) -> str:
    """The stage's name (``TRAIN``), or its number when it names no stage."""
    try:
        return Stage(stage).name
    except ValueError:
        return f"stage {stage}"


@dataclass(frozen=True)
class StageKey:
    """The (run, round, attempt, stage) of a request or task."""

    run_id: str
    round: int
    attempt: int
    stage: Stage

    def describe(self) -> str:
        """Short text for log lines, e.g. ``round 3 attempt 1 TRAIN``."""
        return f"round {self.round} attempt {self.attempt} {stage_name(self.stage)}"


def stage_label(status: Mapping[str, Any]) -> str:
    """What a status.json says the run is doing, for the progress line: ``round 3 of 8 train``,
    ``data statistics: gather`` before round 0, ``final test: evaluate`` after the last round."""
    phase, pending = status.get("phase"), status.get("pending")
    if phase == "done":
        return "done"
    if pending == "statistics":
        return f"data statistics: {phase}"
    if pending == "final":
        return f"final test: {phase}"
    return f"round {status.get('round', 0) + 1} of {status.get('rounds', 0)} {phase}"
