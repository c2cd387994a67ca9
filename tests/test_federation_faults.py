"""Faults with real processes on loopback over mutual TLS: silos killed mid-round, a coordinator restarted.

Each test runs ``condi harness`` machinery (a dev PKI, one coordinator process, N silo-agent
processes) on the tiny profile and checks what the run left behind: exit codes, the metrics
JSONL (every round exactly once), the report and the log lines naming who and what.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import load_federation_config
from coordinator.replay import replay as replay_run
from coordinator.rounds import RoundMachine, RoundPlan, RoundProgress
from coordinator.store import StoreError
from federation.harness import HarnessOptions, HarnessResult, run_harness

pytestmark = pytest.mark.slow

# Fast failure detection for tests: heartbeats every 0.5 s, a silo silent for 5 s is gone.
FAST = {"liveness_s": 5.0, "gather_s": 60.0, "train_s": 120.0, "evaluate_s": 120.0, "done_grace_s": 10.0}


def first_selection(silos: int, per_round: int, seed: int) -> list[str]:
    """Who the coordinator selects in round 0 when every silo has joined (the seeded draw)."""
    ids = tuple(f"silo-{i}" for i in range(1, silos + 1))
    plan = RoundPlan(
        allowed=ids,
        rounds=1,
        silos_per_round=per_round,
        min_silos=1,
        max_attempts=1,
        seed=seed,
        gather_s=1.0,
        train_s=1.0,
        evaluate_s=1.0,
        liveness_s=1.0,
    )
    machine = RoundMachine(plan, "probe", RoundProgress.start(seed, statistics=False), "", 0.0)
    for silo in ids:
        machine.join(silo, 0.0)
    machine.tick(0.0)
    return list(machine.status(0.0)["members"])


def _rows(result: HarnessResult) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def _log(result: HarnessResult, name: str) -> str:
    return (result.out / "logs" / f"{name}.log").read_text()


def test_a_killed_silo_makes_the_round_retry_when_the_minimum_fails(tmp_path: Path) -> None:
    selected = first_selection(4, 3, seed=0)
    victim = selected[1]
    opts = HarnessOptions(
        out=tmp_path / "run",
        silos=4,
        rounds=1,
        per_round=3,
        min_silos=3,
        kill_silo=(victim, 0, "train"),
        secure=False,
        timeouts=FAST,
        timeout_s=400,
    )
    result = run_harness(opts)
    assert result.coordinator_exit == 0, _log(result, "coordinator")[-3000:]
    assert result.silo_exits[victim] == 17
    assert all(code == 0 for silo, code in result.silo_exits.items() if silo != victim), result.silo_exits
    (row,) = _rows(result)
    survivors = sorted(s for s in result.silo_exits if s != victim)
    # Attempt 0 of round 0 summed the data statistics; 1 lost the victim; 2 completed.
    assert row["round"] == 0 and row["attempt"] == 2
    assert row["selected"] == survivors and row["completed"] == survivors
    coordinator_log = _log(result, "coordinator")
    retry = [line for line in coordinator_log.splitlines() if "retrying round 0" in line]
    assert len(retry) == 1 and f"silent {victim}" in retry[0] and "2 of the 3 required" in retry[0]
    assert "fault injection: stopping in round 0 attempt 1 TRAIN" in _log(result, victim)
    report = json.loads(result.report.read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 1


def test_the_coordinator_killed_mid_round_resumes_without_losing_or_doubling_a_round(tmp_path: Path) -> None:
    # silo-3 also dies in round 0: the round completes with the other two (the minimum holds),
    # and the restarted coordinator goes on without it once its gather deadline passes.
    opts = HarnessOptions(
        out=tmp_path / "run",
        silos=3,
        rounds=2,
        per_round=3,
        min_silos=2,
        kill_silo=("silo-3", 0, "train"),
        restart_coordinator_at=(1, "train"),
        secure=False,
        timeouts={**FAST, "gather_s": 10.0},
        timeout_s=500,
    )
    result = run_harness(opts)
    coordinator_log = _log(result, "coordinator")
    assert result.coordinator_exit == 0, coordinator_log[-3000:]
    assert result.coordinator_starts == 2
    assert result.silo_exits == {"silo-1": 0, "silo-2": 0, "silo-3": 17}
    rows = _rows(result)
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["completed"] == ["silo-1", "silo-2"] for r in rows)
    assert rows[0]["selected"] == ["silo-1", "silo-2", "silo-3"] and rows[0]["attempt"] == 1
    # Round 1 was under way when the coordinator died: the restarted one ran it again as a new attempt.
    assert rows[1]["attempt"] >= 1
    assert coordinator_log.count("resuming run") == 1
    assert "round 1, train pending, 1 rounds recorded" in coordinator_log
    assert "joining again" in _log(result, "silo-1") and "joining again" in _log(result, "silo-2")
    # The crash came at its injected point: right after round 1's first accepted update.
    assert coordinator_log.count("fault injection: stopping in round 1 attempt 0 TRAIN after accepting") == 1
    report = json.loads(result.report.read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 2
    assert report["final_test"]["n"] > 0
    assert (result.run_dir / "global_model.npz").is_file()


def test_a_churn_soak_records_every_round_once_and_replays_to_the_committed_model(tmp_path: Path) -> None:
    # Every silo killed twice and the coordinator twice, at seeded points, each restarted.
    opts = HarnessOptions(out=tmp_path / "run", silos=3, rounds=9, churn=True, timeouts=FAST, timeout_s=600)
    result = run_harness(opts)
    assert result.coordinator_exit == 0, _log(result, "coordinator")[-3000:]
    assert result.churn is not None and result.coordinator_starts == 3
    plan = result.churn["plan"]
    assert len(plan["coordinator"]) == 2 and all(len(points) == 2 for points in plan["silos"].values())
    killed = [e["process"] for e in result.churn["events"]]
    assert sorted(killed) == sorted(["coordinator"] * 2 + [s for s in plan["silos"] for _ in range(2)])
    assert [r["round"] for r in _rows(result)] == list(range(9))
    replay = result.churn["replay"]
    assert replay["matches"] and replay["each_round_once"] and replay["rounds"] == 9, replay
    assert json.loads((result.out / "churn.json").read_text()) == result.churn
    # The journal is what the replay trusts: one altered sum is caught by its digest.
    journal = sorted((result.run_dir / "checkpoint" / "aggregates").glob("round-*.npy"))
    assert len(journal) == 9
    vector = np.load(journal[4])
    vector[0] += 1e-3
    np.save(journal[4], vector)
    with pytest.raises(StoreError, match="does not match the SHA-256"):
        replay_run(load_federation_config(result.out / "federation.yaml"))
