"""`condi harness --silos 3 --rounds 2 --out DIR` end to end: real processes, real mutual TLS, tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from condi_models.checkpoint import load_checkpoint
from coordinator.rounds import RoundMachine, RoundPlan, RoundProgress
from federation.harness import HarnessError, HarnessOptions, run_harness, stage_label
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_harness_cli_runs_a_small_federation_and_prints_the_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "federation.cli",
            "harness",
            "--silos",
            "3",
            "--rounds",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report_path = Path(done.stdout.strip().splitlines()[-1])
    assert report_path == out.resolve() / "coordinator" / "report.json"
    report = json.loads(report_path.read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 2
    assert "validation accuracy by round" in done.stderr

    run_dir = report_path.parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert row["completed"] == ["silo-1", "silo-2", "silo-3"]
        assert row["evaluated_by"] == ["silo-1", "silo-2", "silo-3"]
        assert 0.0 <= row["val"]["accuracy"] <= 1.0
        assert row["bytes"]["upload_per_silo"] > row["bytes"]["state"] > 0
        assert row["bytes"]["eval_download_per_silo"] == row["bytes"]["state"]
        assert row["timing"]["aggregation_s"] >= 0
    # Round 0 downloads the initial state; round 1 trains from the state its silos just evaluated.
    assert rows[0]["bytes"]["download_per_silo"] == rows[0]["bytes"]["state"]
    assert rows[1]["bytes"]["download_per_silo"] == 0
    # Test is read once, after the last round, on the model of the best validation round.
    assert all("test" not in r for r in rows)
    selection = report["model_selection"]
    assert selection["kind"] == "best_val_auroc" and selection["selected_round"] in (0, 1)
    aurocs = [r["val"]["macro_auroc"] for r in rows if r["val"].get("macro_auroc") is not None]
    if aurocs:
        assert selection["val_macro_auroc"] == max(aurocs)
        assert rows[selection["selected_round"]]["val"]["macro_auroc"] == max(aurocs)
    assert report["final_test"]["n"] > 0 and selection["test_evaluated_by"] == ["silo-1", "silo-2", "silo-3"]

    # The exported global model is a condi checkpoint of the selected round with the pooled normalizer.
    ckpt = load_checkpoint(run_dir / "global_model.npz")
    assert ckpt.info.n_modalities == 12 and ckpt.info.classes == ("NORM", "MI", "STTC", "CD", "HYP")
    assert ckpt.normalizer.mean.shape == (12,) and np.all(ckpt.normalizer.std > 0)
    state = np.load(next((run_dir / "checkpoint").glob("global-*.npz")))
    for name, value in ckpt.model.state_to_named_tensors().items():
        assert torch.equal(value, torch.from_numpy(state[name]))
    assert (run_dir / "curves.png").stat().st_size > 0
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert (run_dir / "events.jsonl").stat().st_mode & 0o777 == 0o600
    assert any(e.get("event") == "round_done" and e.get("round") == 1 for e in events)
    assert [e["round"] for e in events if e.get("event") == "model_selected"] == [selection["selected_round"]]
    assert sum(e.get("event") == "final_test" for e in events) == 1
    assert sum(e.get("event") == "statistics_pooled" for e in events) == 1

    logs = out / "logs"
    for name in ("coordinator", "silo-1", "silo-2", "silo-3"):
        text = (logs / f"{name}.log").read_text()
        assert " ERROR " not in text and "Traceback" not in text, f"{name}: {text[-2000:]}"
    assert "the run is over: the run is complete after 2 rounds" in (logs / "silo-2.log").read_text()
    state_doc = json.loads((out / "silos" / "silo-1" / "agent.json").read_text())
    # The last task it did: the final test, numbered after rounds 0 and 1.
    assert state_doc["run_id"] == report["run_id"] and state_doc["last_done"]["round"] == 2


def test_harness_refuses_a_used_run_directory_and_unknown_silos(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(HarnessError, match="not empty"):
        run_harness(HarnessOptions(out=tmp_path / "used"))
    with pytest.raises(HarnessError, match="no silo 'silo-9'"):
        run_harness(HarnessOptions(out=tmp_path / "new", kill_silo=("silo-9", 0, "train")))


def test_the_progress_line_names_the_statistics_stage_and_the_final_test() -> None:
    machine = RoundMachine(
        RoundPlan(allowed=("a", "b"), rounds=8, silos_per_round=2, min_silos=2, max_attempts=1, seed=0,
                  gather_s=1.0, train_s=1.0, evaluate_s=1.0, liveness_s=1.0),
        "run", RoundProgress.start(0, statistics=True), "", 0.0,
    )
    assert stage_label(machine.status(0.0)) == "data statistics: gather"
    assert stage_label({"phase": "train", "pending": "train", "round": 2, "rounds": 8}) == "round 3 of 8 train"
    assert stage_label({"phase": "evaluate", "pending": "final", "round": 8, "rounds": 8}) == "final test: evaluate"
    assert stage_label({"phase": "done", "pending": "done", "round": 8, "rounds": 8}) == "done"
