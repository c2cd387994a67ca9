"""DP-SGD in the deployed federation: real coordinator and silo-agent processes over mutual TLS.

Each harness run uses the tiny profile. It checks that every silo's epsilon is reported per round
and stays within its target, that a silo's accountant survives the silo being killed and started
again on its state directory, and that a silo whose budget is spent leaves the run, tells the
coordinator, and the others finish. The round machine's ``depart`` is also checked on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from condi_models.privacy import PrivacyLedger
from coordinator.rounds import Phase, RoundMachine, RoundPlan, RoundProgress
from federation.harness import HarnessOptions, HarnessResult, run_harness
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from silo_agent.config import expected_rounds
from tests.helpers import REPO

FAST = {"liveness_s": 5.0, "gather_s": 60.0, "train_s": 120.0, "evaluate_s": 120.0, "done_grace_s": 10.0}
SILOS = ("silo-1", "silo-2", "silo-3")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _log(result: HarnessResult, name: str) -> str:
    return (result.out / "logs" / f"{name}.log").read_text()


def _ledger(out: Path, silo: str) -> PrivacyLedger:
    return PrivacyLedger.load(out / "silos" / silo / "privacy-ledger.json")


def test_expected_rounds_is_the_share_of_the_run_a_silo_is_drawn_for() -> None:
    assert expected_rounds(3, 3, 3) == 3
    assert expected_rounds(10, 3, 6) == 5
    assert expected_rounds(5, 2, 6) == 2
    with pytest.raises(ValueError, match="rounds=0"):
        expected_rounds(0, 3, 3)


def test_a_departed_silo_is_not_waited_for_nor_selected_again() -> None:
    plan = RoundPlan(
        allowed=SILOS,
        rounds=2,
        silos_per_round=3,
        min_silos=2,
        max_attempts=1,
        seed=0,
        gather_s=30.0,
        train_s=100.0,
        evaluate_s=50.0,
        liveness_s=10.0,
    )
    m = RoundMachine(plan, "run", RoundProgress.start(0, statistics=False), "0" * 64, 0.0)
    for silo in SILOS:
        m.join(silo, 0.0)
    m.tick(0.0)
    assert m.phase == Phase.TRAIN and m.status(0.0)["members"] == list(SILOS)
    for silo in ("silo-1", "silo-2"):
        key = m.task_for(silo, 1.0).key
        m.accept_update(silo, key, "0" * 64, f"digest-{silo}", {"from": silo})
    # silo-3 is alive and has not uploaded: the stage waits for it until it leaves.
    assert m.tick(1.0) == [] and m.phase == Phase.TRAIN
    m.depart("silo-3", "privacy budget spent", 1.5)
    (effect,) = m.tick(1.5)
    assert m.phase == Phase.AGGREGATE and sorted(effect.updates) == ["silo-1", "silo-2"]
    assert m.alive(2.0) == ("silo-1", "silo-2")
    assert m.status(2.0)["departed"] == {"silo-3": "privacy budget spent"}
    m.aggregated("1" * 64, 2.0)
    m.tick(2.0)
    assert m.phase == Phase.EVALUATE and m.status(2.0)["members"] == ["silo-1", "silo-2"]
    assert m.task_for("silo-3", 2.0).key.stage == pb.STAGE_WAIT


@pytest.mark.slow
def test_harness_dp_reports_epsilon_per_silo_and_round_within_the_target(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli", "harness", "--silos", "3", "--rounds", "2", "--dp",
         "--dp-epsilon", "6", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "secure aggregation; DP-SGD at epsilon 6, delta 1e-05 (epsilon spent: silo-1" in done.stderr
    site = yaml.safe_load((out / "sites" / "silo-1.yaml").read_text())
    assert site["privacy"] == {"target_epsilon": 6.0, "delta": 1e-05}
    run_dir = out / "coordinator"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "complete" and report["departed"] == {}
    by_silo = report["privacy"]["epsilon_by_silo"]
    assert sorted(by_silo) == list(SILOS)
    for silo, (first, second) in by_silo.items():
        assert 0 < first < second <= 6.0, (silo, first, second)
        ledger = _ledger(out, silo)
        # No planned_rounds in site.yaml: 2 rounds with 3 of 3 silos drawn each.
        assert ledger.rounds == 2 and ledger.plan is not None and ledger.plan.planned_rounds == 2
        assert ledger.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(second)
        assert (out / "silos" / silo / "dp.secret").stat().st_mode & 0o077 == 0
    rows = _rows(run_dir)
    assert [sorted(r["epsilon"]) for r in rows] == [list(SILOS), list(SILOS)]
    assert "privacy: planning for 2 rounds" in (out / "logs" / "silo-2.log").read_text()


@pytest.mark.slow
def test_the_accountant_survives_a_silo_killed_and_started_again(tmp_path: Path) -> None:
    # A long liveness window: the coordinator keeps waiting for silo-1 while it restarts.
    opts = HarnessOptions(
        out=tmp_path / "run",
        silos=3,
        rounds=3,
        per_round=3,
        min_silos=2,
        secure=False,
        kill_silo=("silo-1", 1, "train"),
        restart_killed=True,
        dp=True,
        timeouts={**FAST, "liveness_s": 60.0},
        timeout_s=500,
    )
    result = run_harness(opts)
    assert result.coordinator_exit == 0, _log(result, "coordinator")[-3000:]
    assert result.silo_exits == {"silo-1": 0, "silo-2": 0, "silo-3": 0}
    silo_log = _log(result, "silo-1")
    assert "fault injection: stopping in round 1 attempt 0 TRAIN" in silo_log
    # The second start read the ledger the first one wrote: one round already spent.
    assert "spent so far 0 over 0 rounds" in silo_log
    assert "over 1 rounds (ledger" in silo_log
    rows = _rows(result.run_dir)
    assert [r["completed"] for r in rows] == [list(SILOS)] * 3
    epsilons = [r["epsilon"]["silo-1"] for r in rows]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] <= 8.0, epsilons
    ledger = _ledger(result.out, "silo-1")
    assert ledger.rounds == 3 and ledger.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(epsilons[2])


@pytest.mark.slow
def test_a_silo_whose_budget_is_spent_leaves_and_the_run_completes(tmp_path: Path) -> None:
    opts = HarnessOptions(
        out=tmp_path / "run",
        silos=3,
        rounds=2,
        per_round=3,
        min_silos=2,
        dp=True,
        privacy_overrides={"silo-3": {"planned_rounds": 1}},
        # t = 2 of 3: the secure round survives silo-3 leaving before it advertises keys. (With t = 3
        # the attempt aborts, and the retry finds the others' budgets spent by the aborted attempt.)
        threshold=2,
        timeouts={**FAST, "secure_stage_s": 60.0},
        timeout_s=500,
    )
    result = run_harness(opts)
    coordinator_log = _log(result, "coordinator")
    assert result.coordinator_exit == 0, coordinator_log[-3000:]
    assert result.silo_exits == {"silo-1": 0, "silo-2": 0, "silo-3": 0}
    silo_log = _log(result, "silo-3")
    assert "privacy budget exhausted" in silo_log and "all 1 planned rounds are used" in silo_log
    assert "silo silo-3 leaves the run: privacy budget spent" in silo_log.rstrip().splitlines()[-1]
    assert "silo silo-3 leaves the run in round 1: privacy budget spent" in coordinator_log
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    (departure,) = [e for e in events if e.get("event") == "silo_departed"]
    assert departure["silo"] == "silo-3" and departure["round"] == 1
    rows = _rows(result.run_dir)
    assert rows[0]["completed"] == list(SILOS) and sorted(rows[0]["epsilon"]) == list(SILOS)
    # Round 1 went on in secure mode without silo-3 (a dropout before it advertised keys).
    assert rows[1]["completed"] == ["silo-1", "silo-2"] and sorted(rows[1]["epsilon"]) == ["silo-1", "silo-2"]
    assert rows[1]["evaluated_by"] == ["silo-1", "silo-2"] and rows[1]["aggregation"] == "secure"
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 2
    assert list(report["departed"]) == ["silo-3"] and "privacy budget spent" in report["departed"]["silo-3"]
    assert report["privacy"]["epsilon_by_silo"]["silo-3"][1] is None
    assert _ledger(result.out, "silo-3").rounds == 1
