"""Watching a run: `coordinator status` and `silo-agent status`, the Prometheus endpoints of both
services, and the coordinator's live web view (checked in a real headless Chromium)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib import image

from coordinator.cli import main as coordinator_main
from coordinator.monitor import run_snapshot, web_routes
from federation.harness import HarnessOptions, run_harness
from federation.monitor_http import MonitorServer
from federation.service_metrics import CoordinatorMetrics, MonitorEndpoint
from silo_agent.cli import main as silo_main

FAST = {"liveness_s": 5.0, "gather_s": 60.0, "train_s": 120.0, "evaluate_s": 120.0, "done_grace_s": 10.0}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cli_json(main: Any, args: list[str]) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, json.loads(out.getvalue())


def _get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.mark.slow
def test_status_and_metrics_of_both_services_during_a_harness_run(tmp_path: Path) -> None:
    opts = HarnessOptions(
        out=tmp_path / "run", silos=3, rounds=3, per_round=3, min_silos=2, monitor=True, timeouts=FAST, timeout_s=500
    )
    fed_yaml = opts.out / "federation.yaml"
    site_yaml = opts.out / "sites" / "silo-1.yaml"
    seen: dict[str, Any] = {}

    def during(status: dict[str, Any]) -> None:
        # Once, at the first status of round 1's training: the run has two more rounds to go.
        if seen or status.get("round") != 1 or status.get("pending") != "train":
            return
        seen["coordinator"] = _cli_json(coordinator_main, ["status", "--config", str(fed_yaml), "--json"])
        seen["silo"] = _cli_json(silo_main, ["status", "--config", str(site_yaml), "--json"])
        coordinator_at = yaml.safe_load(fed_yaml.read_text())["monitor"]["listen"]
        silo_at = yaml.safe_load(site_yaml.read_text())["monitor"]["listen"]
        seen["metrics"] = _get(f"http://{coordinator_at}/metrics")
        seen["silo_metrics"] = _get(f"http://{silo_at}/metrics")
        seen["page"] = _get(f"http://{coordinator_at}/")
        seen["api"] = _get(f"http://{coordinator_at}/api/run")

    result = run_harness(opts, progress=during)
    assert result.coordinator_exit == 0, (result.out / "logs" / "coordinator.log").read_text()[-3000:]
    assert seen, "the run never reported round 1's training"

    code, coordinator = seen["coordinator"]
    assert code == 0 and coordinator["found"]
    status = coordinator["status"]
    assert status["round"] == 1 and status["rounds"] == 3 and status["outcome"] is None
    assert status["deadline"] is not None and status["deadline"].endswith("+00:00")
    assert sorted(status["connected"]) == ["silo-1", "silo-2", "silo-3"]
    assert [r["round"] for r in coordinator["rounds"]] == [0]

    code, silo = seen["silo"]
    assert code == 0 and silo["status"]["silo_id"] == "silo-1"
    assert silo["status"]["run_id"] == status["run_id"]
    assert silo["status"]["activity"] in ("waiting", "working")
    assert silo["status"]["tasks_done"].get("evaluate", 0) >= 1 and silo["disk_bytes"] > 0

    code, headers, body = seen["metrics"]
    text = body.decode()
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'condi_calls_total{code="OK",method="Join",outcome="ok"} 3.0' in text
    assert "condi_round 1.0" in text and "condi_rounds_planned 3.0" in text
    assert 'condi_silo_connected{silo="silo-2"} 1.0' in text
    assert 'condi_silo_last_contact_timestamp_seconds{silo="silo-3"}' in text
    assert sorted(status["last_contact"]) == ["silo-1", "silo-2", "silo-3"]
    assert "condi_rounds_completed_total 1.0" in text and "condi_validation_macro_auroc" in text

    code, _, body = seen["silo_metrics"]
    text = body.decode()
    assert code == 200 and "condi_silo_bytes_downloaded_total" in text
    assert 'condi_silo_tasks_total{stage="evaluate"}' in text

    assert seen["page"][0] == 200 and b"<title>CondI coordinator</title>" in seen["page"][2]
    assert seen["page"][1]["Content-Security-Policy"].startswith("default-src 'self'")
    assert json.loads(seen["api"][2])["status"]["run_id"] == status["run_id"]

    # After the run: both commands say how it ended.
    code, coordinator = _cli_json(coordinator_main, ["status", "--config", str(fed_yaml), "--json"])
    assert code == 0 and coordinator["status"]["outcome"] == "complete"
    assert coordinator["outcome"]["rounds_completed"] == 3
    code, silo = _cli_json(silo_main, ["status", "--config", str(site_yaml), "--json"])
    assert code == 0 and silo["status"]["activity"] == "done" and silo["status"]["task"] is None


def test_status_commands_say_when_nothing_ran(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "silo_id": "silo-1", "data": {"source": "synthetic_ecg", "n_records": 10}, "state_dir": str(tmp_path / "s"),
    }))
    assert silo_main(["status", "--config", str(site)]) == 1
    assert "has not run with this state directory" in capsys.readouterr().out
    assert run_snapshot(tmp_path / "nothing")["found"] is False


# ---- the web view, on a run directory this test writes as the coordinator does ----------------


def _write_run(run_dir: Path, recorded: int, rounds: int = 3) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    status = {
        "federation": "ward-study", "run_id": "ward-study-20261205T000000Z-abc123", "outcome": None,
        "rounds_recorded": recorded, "round": recorded, "rounds": rounds, "attempt": 0, "phase": "train",
        "pending": "train", "connected": ["hosp-a", "hosp-b", "hosp-c"], "members": ["hosp-a", "hosp-c"],
        "done": ["hosp-a"], "failure": None, "departed": {"hosp-d": "privacy budget spent"},
        "last_contact": {"hosp-a": "2026-12-05T00:00:10+00:00"},
    }
    (run_dir / "status.json").write_text(json.dumps(status))
    rows = [
        {"round": r, "aggregation": "secure", "selected": ["hosp-a", "hosp-c"], "completed": ["hosp-a", "hosp-c"],
         "phase_a_loss": None, "phase_b_loss": None, "timing": {"train_stage_s": 3.0},
         "bytes": {"upload_per_silo": 1000.0, "download_per_silo": 2000.0},
         "val": {"accuracy": 0.4 + 0.1 * r, "macro_auroc": 0.6 + 0.1 * r, "n": 90, "silos": 3,
                 "per_silo": {"hosp-a": {"accuracy": 0.99}}}}
        for r in range(recorded)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "events.jsonl").write_text(
        json.dumps({"time": "2026-12-05T00:00:01.000+00:00", "level": "WARNING", "logger": "coordinator.server",
                    "message": "<b>hosp-d</b> leaves: privacy budget spent"}) + "\n"
    )


@pytest.fixture
def view(tmp_path: Path):
    run_dir = tmp_path / "run"
    _write_run(run_dir, recorded=1)
    metrics = CoordinatorMetrics(lambda: run_snapshot(run_dir, events=0), ["hosp-a", "hosp-b"], ["Join"])
    runs = [{"id": "ward-study-20261205T000000Z-abc123", "state": "running", "submitted": "2026-12-05T00:00:00",
             "ended": None, "message": ""},
            {"id": "ward-pilot-20261204T000000Z-def456", "state": "complete", "submitted": "2026-12-04T00:00:00",
             "ended": "2026-12-04T01:00:00", "message": "all 3 rounds completed"}]
    routes = web_routes(lambda: run_dir, lambda: runs)
    server = MonitorServer(MonitorEndpoint(listen="127.0.0.1:0"), metrics.registry, routes)
    server.start()
    yield run_dir, f"http://127.0.0.1:{server.port}"
    server.stop()


def test_the_view_is_read_only_local_and_shows_no_silo_metrics(view: tuple[Path, str]) -> None:
    _, base = view
    assert _get(f"{base}/api/run", host="attacker.example:80")[0] == 403
    assert _get(f"{base}/../status.json")[0] == 404
    request = urllib.request.Request(f"{base}/api/run", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 501
    code, headers, body = _get(f"{base}/api/run")
    assert code == 200 and headers["Cache-Control"] == "no-store" and headers["X-Frame-Options"] == "DENY"
    snap = json.loads(body)
    assert "per_silo" not in json.dumps(snap) and snap["rounds"][0]["val"]["accuracy"] == pytest.approx(0.4)
    assert snap["rounds"][0]["bytes_in"] == 2000.0 and snap["rounds"][0]["bytes_out"] == 4000.0
    text = _get(f"{base}/metrics")[2].decode()
    assert "condi_bytes_received_total 2000.0" in text and 'condi_silo_connected{silo="hosp-b"} 1.0' in text
    with pytest.raises(ValueError, match="loopback"):
        MonitorEndpoint(listen="0.0.0.0:9464")


def _chromium(url: str, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,900",
           "--virtual-time-budget=4000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian package chromium; make test installs it)"
)
def test_the_live_view_draws_the_run_in_chromium_and_follows_it(view: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, base = view
    dom = _chromium(f"{base}/", "--dump-dom")
    assert "ward-study · run ward-study-20261205T000000Z-abc123" in dom
    assert "round 2 of 3 · train · attempt 0 · 1 of 3 rounds recorded" in dom
    assert "hosp-c" in dom and "departed: privacy budget spent" in dom and "00:00:10" in dom
    # An event's text is shown as text: the markup a message carries is not parsed.
    assert "&lt;b&gt;hosp-d&lt;/b&gt; leaves" in dom
    assert dom.count("<circle") == 2  # one point per curve
    assert "ward-pilot-20261204T000000Z-def456" in dom and "all 3 rounds completed" in dom

    _write_run(run_dir, recorded=2)
    dom = _chromium(f"{base}/", "--dump-dom")
    assert "round 3 of 3 · train · attempt 0 · 2 of 3 rounds recorded" in dom and dom.count("<circle") == 4

    shot = tmp_path / "view.png"
    _chromium(f"{base}/", f"--screenshot={shot}")
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    # Not a blank page: the header's dark blue, the white panels and the two curves' colours.
    colours = {tuple(np.round(p[:3], 1)) for p in pixels.reshape(-1, pixels.shape[2])[::97]}
    assert len(colours) >= 6
