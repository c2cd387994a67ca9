"""The long-lived coordinator: one `coordinator serve` process runs two federations, one submitted
through the admin socket and one dropped in the watched folder, with the same three
`silo-agent --stay-up` processes; each run has its own directory and report; a queued run is
cancelled; bad run files are refused with the reason."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from coordinator.admin import AdminClient, AdminError
from federation.harness import HarnessOptions, _child_env, free_port, write_configs

pytestmark = pytest.mark.slow

FAST = {"liveness_s": 5.0, "gather_s": 60.0, "train_s": 120.0, "evaluate_s": 120.0, "done_grace_s": 5.0}


def _wait(predicate, timeout_s: float, what: str, logs: Path) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    tail = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"{what} did not happen within {timeout_s:g} s\n{tail}")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True, env=_child_env({}),
        timeout=120,
    )


def test_one_service_runs_two_federations_with_the_same_silo_processes(tmp_path: Path) -> None:
    opts = HarnessOptions(out=tmp_path / "fed", silos=3, rounds=2, per_round=3, min_silos=2, timeouts=FAST)
    fed_yaml, sites = write_configs(opts, free_port())
    base = yaml.safe_load(fed_yaml.read_text())
    runs_dir, socket_path, watch = tmp_path / "runs", tmp_path / "admin" / "admin.sock", tmp_path / "incoming"
    base["service"] = {"runs_dir": str(runs_dir), "admin_socket": str(socket_path), "watch_dir": str(watch)}
    fed_yaml.write_text(yaml.safe_dump(base))
    watch.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, args: list[str]) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=_child_env({}))

    service = start("coordinator", ["-m", "coordinator.cli", "serve", "--config", str(fed_yaml)])
    silos = {sid: start(sid, ["-m", "silo_agent.cli", "--config", str(p), "--stay-up"]) for sid, p in sites.items()}
    try:
        _wait(socket_path.exists, 60, "the admin socket", logs)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        client = AdminClient(socket_path)

        # Refused at submission, naming what is wrong; nothing is queued.
        with pytest.raises(AdminError, match="listen: set by the service"):
            client.request("POST", "/runs", b"name: sneaky\nlisten: 0.0.0.0:1\n")
        with pytest.raises(AdminError, match="rounds"):
            client.request("POST", "/runs", b"name: broken\nrounds: -3\n")
        assert client.request("GET", "/runs") == []

        (tmp_path / "a.yaml").write_text("name: study-a\nrounds: 2\n")
        submitted = _cli("submit", "--config", str(fed_yaml), str(tmp_path / "a.yaml"))
        assert submitted.returncode == 0 and submitted.stdout.startswith("queued run study-a-"), submitted.stderr
        run_a = submitted.stdout.split()[2]
        # Queued behind A (which takes seconds), then cancelled before it starts.
        run_c = client.request("POST", "/runs", b"name: study-c\nrounds: 1\n")["id"]
        assert client.request("POST", f"/runs/{run_c}/cancel")["state"] == "cancelled"

        def state(run_id: str) -> str:
            return next(r["state"] for r in client.request("GET", "/runs") if r["id"] == run_id)

        _wait(lambda: state(run_a) == "complete", 400, "run A's end", logs)
        # The second run arrives as a file in the watched folder, and a bad one beside it.
        (watch / "b.yaml").write_text("name: study-b\nrounds: 1\n")
        (watch / "bad.yaml").write_text("name: study-x\nsilos: [silo-9]\n")
        _wait(lambda: len(client.request("GET", "/runs")) == 3, 60, "run B's submission", logs)
        run_b = client.request("GET", "/runs")[-1]["id"]
        assert run_b.startswith("study-b-") and (watch / "submitted" / f"{run_b}.yaml").exists()
        assert "silos: set by the service" in (watch / "rejected" / "bad.yaml.error").read_text()
        _wait(lambda: state(run_b) == "complete", 400, "run B's end", logs)

        # A running run is stopped by `coordinator cancel` and ends cancelled; the silos stay up.
        run_d = client.request("POST", "/runs", b"name: study-d\nrounds: 40\n")["id"]
        _wait(lambda: state(run_d) == "running", 60, "run D's start", logs)
        cancelled = _cli("cancel", "--config", str(fed_yaml), run_d)
        assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"run {run_d}: stopping"
        _wait(lambda: state(run_d) == "cancelled", 120, "run D's cancellation", logs)

        assert state(run_c) == "cancelled" and not (runs_dir / run_c / "report.json").exists()
        for run_id, rounds in ((run_a, 2), (run_b, 1)):
            report = json.loads((runs_dir / run_id / "report.json").read_text())
            assert report["status"] == "complete" and report["run_id"] == run_id
            assert report["rounds_completed"] == rounds
        # The same three silo processes took part in both runs and are still up.
        assert all(p.poll() is None for p in silos.values())
        for sid in sites:
            log = (logs / f"{sid}.log").read_text()
            assert f"joined run {run_a}" in log and f"joined run {run_b}" in log
        followed = _cli("logs", "--config", str(fed_yaml), run_a, "--follow")
        assert followed.returncode == 0 and f"run {run_a} complete" in followed.stdout
        listed = _cli("runs", "--config", str(fed_yaml))
        assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
            [run_a, "complete"], [run_c, "cancelled"], [run_b, "complete"], [run_d, "cancelled"]
        ]
        status = _cli("status", "--config", str(fed_yaml), "--json")
        assert json.loads(status.stdout)["status"]["run_id"] == run_d
    finally:
        for proc in [*silos.values(), service]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=60) for name, proc in [*silos.items(), ("coordinator", service)]}
    assert codes == {**{sid: 0 for sid in sites}, "coordinator": 0}, codes
    assert not socket_path.exists() and not os.path.exists(runs_dir / "pending")
