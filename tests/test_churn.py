"""The churn soak's schedule and the fault points it hands out (no processes)."""

from __future__ import annotations

import pytest

from federation.churn import ChurnError, ChurnPlan
from federation.faults import STAGES, FaultPoint, parse_exit_at
from federation.proto_gen.condi.v1 import federation_pb2 as pb

SILOS = [f"silo-{i}" for i in range(1, 7)]


def test_a_churn_plan_is_seeded_and_puts_each_fault_on_its_own_round() -> None:
    plan = ChurnPlan.draw(SILOS, 50, seed=0, secure=True)
    assert plan == ChurnPlan.draw(SILOS, 50, seed=0, secure=True)
    assert plan != ChurnPlan.draw(SILOS, 50, seed=1, secure=True)
    points = [*plan.coordinator, *(p for points in plan.silos.values() for p in points)]
    assert len(points) == 2 + 2 * len(SILOS)
    rounds = [p.round for p in points]
    assert len(set(rounds)) == len(rounds) and min(rounds) >= 1 and max(rounds) <= 49
    # Each process meets its points in order; secure runs have no TRAIN stage to die in.
    assert all(list(ps) == sorted(ps, key=lambda p: p.round) for ps in plan.silos.values())
    assert all(p.stage != pb.STAGE_TRAIN for p in points)
    plain = ChurnPlan.draw(SILOS, 50, seed=0, secure=False)
    assert {p.stage for ps in plain.silos.values() for p in ps} <= {pb.STAGE_TRAIN, pb.STAGE_EVALUATE}


def test_a_run_too_short_for_its_faults_is_refused_saying_how_many_rounds_it_needs() -> None:
    with pytest.raises(ChurnError, match="need at least 15 rounds, got 10"):
        ChurnPlan.draw(SILOS, 10, seed=0, secure=True)


def test_a_fault_point_is_reached_at_its_round_or_the_first_later_one_with_its_stage() -> None:
    point = parse_exit_at("X", "3:share_keys")
    assert point == FaultPoint(3, STAGES["share_keys"]) and point.to_text() == "3:share_keys"
    assert not point.reached(2, pb.STAGE_SHARE_KEYS)
    assert not point.reached(3, pb.STAGE_UNMASK)
    assert point.reached(3, pb.STAGE_SHARE_KEYS) and point.reached(7, pb.STAGE_SHARE_KEYS)
    with pytest.raises(ValueError, match="expected ROUND:STAGE"):
        parse_exit_at("X", "3:nap")
