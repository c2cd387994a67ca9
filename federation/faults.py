"""Deterministic fault injection for fault tests and the harness, shared by coordinator and silo.

A fault test must hit its fault every time, so a process is told where to die instead of being
killed by a poll that races it: ``ROUND:STAGE`` names the point, and the process exits with
:data:`FAULT_EXIT_CODE` when it gets there: at that stage of that round, or of the first later
round where it meets the stage (a silo that was not selected in ROUND dies in the next round
that selects it, so a schedule of faults cannot silently miss one). Where exactly "there" is
depends on the side: the silo stops once that stage's task is in hand (see
:mod:`silo_agent.agent`), the coordinator once it has accepted the stage's first submission of
that round (see :mod:`coordinator.uploads`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from federation.stages import Stage

# The exit status of a process that stopped at its injected fault; the harness restarts on it.
FAULT_EXIT_CODE = 17
# The environment variables that carry ROUND:STAGE to each side.
SILO_EXIT_AT = "CONDI_FAULT_EXIT_AT"
COORDINATOR_EXIT_AT = "CONDI_COORDINATOR_EXIT_AT"

STAGES = {
    "train": Stage.TRAIN,
    "evaluate": Stage.EVALUATE,
    "advertise_keys": Stage.ADVERTISE_KEYS,
    "share_keys": Stage.SHARE_KEYS,
    "masked_input": Stage.MASKED_INPUT,
    "unmask": Stage.UNMASK,
}


@dataclass(frozen=True)
class FaultPoint:
    """Where a process stops: the first time it reaches ``stage`` in round ``round`` or later."""

    round: int
    stage: Stage

    def reached(self, round_index: int, stage: int) -> bool:
        """Whether being at (``round_index``, ``stage``) is at or past this point."""
        return stage == self.stage and round_index >= self.round

    def to_text(self) -> str:
        """The ``ROUND:STAGE`` form :func:`parse_exit_at` reads."""
        name = next(k for k, v in STAGES.items() if v == self.stage)
        return f"{self.round}:{name}"


def parse_exit_at(variable: str, text: str | None) -> FaultPoint | None:
    """``ROUND:STAGE`` from environment variable ``variable``; None when unset."""
    if not text:
        return None
    round_text, _, stage = text.partition(":")
    if not round_text.isdigit() or stage not in STAGES:
        raise ValueError(f"{variable}={text!r}: expected ROUND:STAGE with STAGE one of {list(STAGES)}")
    return FaultPoint(int(round_text), STAGES[stage])


def exit_hard(logger: logging.Logger, why: str) -> None:
    """Log why, flush every handler and end the process at once, as a crash would (no cleanup)."""
    logger.error("fault injection: %s; exiting hard", why)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(FAULT_EXIT_CODE)
