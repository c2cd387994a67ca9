"""Secure aggregation with real processes on loopback: silos dying at every secure stage, the run completing.

One harness run with six silos and two rounds. Before round 0, the secure sum of the data
statistics loses one silo before its masked input (the fault points name round 0, whose stages
the statistics sum goes through first) and completes from the other five; round 0's training
then loses one silo while advertising keys and completes from the four left. Round 1
loses one silo before it shares keys and one before unmasking, which leaves fewer than t
unmasking responses: that attempt is aborted without a result and retried with the two silos
left. The pure-level test of each stage alone is in test_secure_federation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.harness import HarnessOptions, run_harness

pytestmark = pytest.mark.slow

FAST = {"liveness_s": 5.0, "gather_s": 60.0, "train_s": 120.0, "evaluate_s": 120.0, "done_grace_s": 10.0}


def test_silos_dropping_at_each_secure_stage_and_a_too_small_attempt_retried(tmp_path: Path) -> None:
    kills = (
        ("silo-1", 0, "advertise_keys"),
        ("silo-2", 0, "masked_input"),
        ("silo-3", 1, "share_keys"),
        ("silo-4", 1, "unmask"),
    )
    opts = HarnessOptions(
        out=tmp_path / "run",
        silos=6,
        rounds=2,
        per_round=6,
        min_silos=2,
        kill_silos=kills,
        threshold=0.6,
        timeouts={**FAST, "secure_stage_s": 60.0},
        max_attempts=3,
        timeout_s=500,
    )
    result = run_harness(opts)
    coordinator_log = (result.out / "logs" / "coordinator.log").read_text()
    assert result.coordinator_exit == 0, coordinator_log[-3000:]
    for victim, _, stage in kills:
        assert result.silo_exits[victim] == 17, (victim, result.silo_exits)
        log = (result.out / "logs" / f"{victim}.log").read_text()
        assert "fault injection: stopping in round" in log and stage.upper() in log, log[-1500:]
    assert result.silo_exits["silo-5"] == 0 and result.silo_exits["silo-6"] == 0
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["aggregation"] == "secure" for r in rows)
    # The statistics (attempt 0) were summed without silo-2, which never uploaded its masked vector;
    # round 0 (attempt 1): silo-1 never advertised; the other four are in the sum.
    assert "data statistics pooled from 5 silos (secure sum)" in coordinator_log
    assert rows[0]["attempt"] == 1 and rows[0]["completed"] == ["silo-3", "silo-4", "silo-5", "silo-6"]
    # Round 0 has t = 4 of 6; round 1, attempt 0 (silos 3-6, t = 3): only silos 5 and 6 answered the unmask request.
    assert rows[1]["attempt"] >= 1 and rows[1]["completed"] == ["silo-5", "silo-6"]
    assert "secure aggregation did not complete" in coordinator_log and "nothing was revealed" in coordinator_log
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 2
    # The coordinator only ever logged masked vectors, never a plain update.
    assert "masked vector from silo" in coordinator_log and " update from silo" not in coordinator_log


def test_secure_metrics_leave_the_coordinator_only_pooled_scores(tmp_path: Path) -> None:
    opts = HarnessOptions(
        out=tmp_path / "run", silos=3, rounds=2, per_round=3, min_silos=2, secure_metrics=True,
        timeouts={**FAST, "secure_stage_s": 60.0}, timeout_s=500,
    )
    result = run_harness(opts)
    coordinator_log = (result.out / "logs" / "coordinator.log").read_text()
    assert result.coordinator_exit == 0, coordinator_log[-3000:]
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["aggregation"]["mode"] == "secure" and report["aggregation"]["secure_metrics"] is True
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        # Every silo's scores are in the pooled sum; no silo's own scores reached the coordinator.
        assert row["val"]["secure_sum"] is True and row["val"]["silos"] == 3, row["val"]
        assert row["evaluated_by"] == ["silo-1", "silo-2", "silo-3"]
        assert sum(map(sum, row["val"]["confusion_matrix"])) == row["val"]["n"]
    # Nor did any silo's sample count or losses: the rows hold the summed weight alone.
    assert all(r["phase_a_loss"] is None and r["phase_b_loss"] is None and r["samples"] > 0 for r in rows)
    # The data statistics went through a secure sum too: no silo's own sums reached the coordinator.
    assert "data statistics pooled from 3 silos (secure sum)" in coordinator_log
    assert "statistics from silo" not in coordinator_log
    assert all("test" not in r for r in rows)
    assert report["final_test"]["secure_sum"] is True and report["final_test"]["silos"] == 3
    assert "metrics from silo" not in coordinator_log and "secure evaluation" not in coordinator_log
    # The exported model carries the normalizer pooled from the secure sum.
    assert (result.run_dir / "global_model.npz").is_file()
