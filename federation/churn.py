"""A seeded schedule of crashes for the harness's churn soak (``condi harness --churn``).

Each silo is killed a few times and the coordinator twice, each at a named (round, stage) fault
point (:class:`federation.faults.FaultPoint`) drawn from the seed, and every killed process is
started again on its state. Points fall on distinct rounds, so one attempt rarely loses more than
one silo; a silo not selected in its round dies in the next round that selects it. The same seed
gives the same schedule.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from federation.faults import STAGES, FaultPoint

# Stages where a submission reaches the coordinator (its fault points) and where a silo holds a task.
_PLAIN_STAGES = ("train", "evaluate")
_SECURE_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask", "evaluate")


class ChurnError(ValueError):
    """A churn schedule that cannot be drawn for the run; the message says what to change."""


@dataclass(frozen=True)
class ChurnPlan:
    """Where the coordinator and each silo are killed, in the order each process meets them."""

    coordinator: tuple[FaultPoint, ...]
    silos: Mapping[str, tuple[FaultPoint, ...]]

    @classmethod
    def draw(
        cls,
        silo_ids: Sequence[str],
        rounds: int,
        seed: int,
        *,
        secure: bool,
        coordinator_crashes: int = 2,
        kills_per_silo: int = 2,
    ) -> ChurnPlan:
        """A schedule for ``rounds`` rounds: faults on distinct rounds in 1 .. rounds - 1 (round 0
        runs undisturbed, so every silo has joined and trained once)."""
        wanted = coordinator_crashes + kills_per_silo * len(silo_ids)
        if wanted > rounds - 1:
            raise ChurnError(
                f"{wanted} faults ({coordinator_crashes} coordinator crashes, {kills_per_silo} kills for each of "
                f"{len(silo_ids)} silos) need at least {wanted + 1} rounds, got {rounds}"
            )
        rng = random.Random(seed)
        stages = _SECURE_STAGES if secure else _PLAIN_STAGES
        chosen = rng.sample(range(1, rounds), wanted)
        points = [FaultPoint(r, STAGES[rng.choice(stages)]) for r in chosen]
        coordinator = tuple(sorted(points[:coordinator_crashes], key=lambda p: p.round))
        silos = {
            sid: tuple(
                sorted(
                    points[coordinator_crashes + i * kills_per_silo : coordinator_crashes + (i + 1) * kills_per_silo],
                    key=lambda p: p.round,
                )
            )
            for i, sid in enumerate(silo_ids)
        }
        return cls(coordinator=coordinator, silos=silos)

    def to_dict(self) -> dict[str, object]:
        """The schedule in ``ROUND:STAGE`` form, for the harness's report."""
        return {
            "coordinator": [p.to_text() for p in self.coordinator],
            "silos": {sid: [p.to_text() for p in points] for sid, points in self.silos.items()},
        }
