"""What an operator sees of a run, read from its run directory: for `coordinator status` and the
live web view.

A run directory already holds everything, written by the coordinator as the run goes:
``status.json`` (round, stage, members, who is done, replaced atomically), ``metrics.jsonl`` (one
line per recorded round), ``events.jsonl`` (the structured log) and, at the end, ``report.json``.
:func:`run_snapshot` reads them without touching the coordinator, so it serves a running
service, a stopped one and a finished run alike, from any process that may read the directory.

Only pooled figures are taken from a round's line, by name: the round, the pooled validation
scores, the mean training losses, the stage timings, who was selected and who completed. A
silo's own metrics never appear here, whether or not the run sums them securely.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.stages import stage_label

# The pooled validation figures a round line may carry.
_VAL_FIELDS = ("accuracy", "macro_auroc", "macro_f1", "loss", "imputation_mae", "n", "silos", "secure_sum")
_EVENT_FIELDS = ("time", "level", "message", "event")
EVENTS_SHOWN = 100


def _json_lines(path: Path, keep: int | None = None) -> list[dict[str, Any]]:
    """The parsed lines of a JSON-lines file (the last ``keep`` when given); a line still being
    written, or one that does not parse, is skipped."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8", errors="replace") as fh:
        lines = deque(fh, maxlen=keep) if keep else list(fh)
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _round_line(row: dict[str, Any]) -> dict[str, Any]:
    val = row.get("val") if isinstance(row.get("val"), dict) else None
    timing = row.get("timing") if isinstance(row.get("timing"), dict) else {}
    sizes = row.get("bytes") if isinstance(row.get("bytes"), dict) else {}
    n_selected, n_completed = len(row.get("selected") or []), len(row.get("completed") or [])
    return {
        "round": row.get("round"),
        "aggregation": row.get("aggregation"),
        "selected": n_selected,
        "completed": n_completed,
        # Payload bytes of the round: updates in; global states out, for training and evaluation.
        "bytes_in": float(sizes.get("upload_per_silo") or 0.0) * n_completed,
        "bytes_out": float(sizes.get("download_per_silo") or 0.0) * n_selected
        + float(sizes.get("eval_download_per_silo") or 0.0) * len(row.get("evaluated_by") or []),
        "phase_a_loss": row.get("phase_a_loss"),
        "phase_b_loss": row.get("phase_b_loss"),
        "train_stage_s": timing.get("train_stage_s"),
        "evaluate_stage_s": timing.get("evaluate_stage_s"),
        "val": None if val is None else {k: val[k] for k in _VAL_FIELDS if k in val},
    }


def run_snapshot(run_dir: str | Path, *, events: int = EVENTS_SHOWN) -> dict[str, Any]:
    """The run in ``run_dir`` as the operator sees it: status, rounds, latest events, outcome."""
    run_dir = Path(run_dir)
    status = _json_file(run_dir / "status.json")
    report = _json_file(run_dir / "report.json")
    rounds = [_round_line(r) for r in _json_lines(run_dir / "metrics.jsonl")]
    recent = [{k: e[k] for k in _EVENT_FIELDS if k in e} for e in _json_lines(run_dir / "events.jsonl", events)]
    updated = (run_dir / "status.json").stat().st_mtime if (run_dir / "status.json").exists() else None
    return {
        "run_dir": str(run_dir),
        "found": status is not None,
        "status": status,
        "status_age_s": None if updated is None else round(time.time() - updated, 1),
        "rounds": rounds,
        "events": recent,
        "outcome": None if report is None else {
            k: report.get(k) for k in ("status", "message", "rounds_completed", "final_test", "model_selection")
        },
    }


def status_text(snapshot: dict[str, Any]) -> str:
    """A few readable lines for `coordinator status`."""
    status = snapshot["status"]
    if status is None:
        return f"no run in {snapshot['run_dir']} (no status.json yet)"
    lines = [
        f"run        {status.get('run_id')} ({status.get('federation')})",
        f"stage      {stage_label(status)}, attempt {max(status.get('attempt', 0), 0)}"
        + (f", ended: {status['outcome']}" if status.get("outcome") else ""),
        f"recorded   {status.get('rounds_recorded', 0)} of {status.get('rounds')} rounds",
        f"silos      connected: {', '.join(status.get('connected') or []) or 'none'}",
    ]
    for silo, when in sorted((status.get("last_contact") or {}).items()):
        lines.append(f"           {silo}: last call {when}")
    if status.get("members"):
        lines.append(f"stage      members: {', '.join(status['members'])}; done: {', '.join(status['done']) or 'none'}")
    if status.get("deadline"):
        lines.append(f"deadline   {status['deadline']} (this stage)")
    if status.get("departed"):
        lines.append("departed   " + "; ".join(f"{s}: {why}" for s, why in status["departed"].items()))
    if status.get("failure"):
        lines.append(f"failure    {status['failure']}")
    last_val = next((r["val"] for r in reversed(snapshot["rounds"]) if r["val"]), None)
    if last_val is not None:
        lines.append(
            f"validation accuracy {last_val.get('accuracy', float('nan')):.3f}, "
            f"macro AUROC {last_val.get('macro_auroc') or float('nan'):.3f} (pooled, last evaluated round)"
        )
    errors = [e for e in snapshot["events"] if e.get("level") in ("ERROR", "WARNING")]
    if errors:
        lines.append(f"last {errors[-1]['level'].lower():<6} {errors[-1]['time']} {errors[-1]['message']}")
    if snapshot["status_age_s"] is not None:
        lines.append(f"updated    {snapshot['status_age_s']:.0f} s ago")
    return "\n".join(lines)


_WEB = Path(__file__).resolve().parent / "web"
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/view.js": ("view.js", "text/javascript; charset=utf-8"),
    "/view.css": ("view.css", "text/css; charset=utf-8"),
}


def web_routes(
    current: Callable[[], Path | None], runs: Callable[[], list[dict[str, Any]]] = list
) -> dict[str, Callable[[], tuple[str, bytes]]]:
    """The live view's pages for :class:`federation.monitor_http.MonitorServer`: the static page,
    ``/api/run`` (the snapshot of the run ``current`` names; empty between runs) and ``/api/runs``
    (a long-lived service's runs)."""
    routes: dict[str, Callable[[], tuple[str, bytes]]] = {
        path: (lambda name=name, kind=kind: (kind, (_WEB / name).read_bytes()))
        for path, (name, kind) in _STATIC.items()
    }

    def run() -> tuple[str, bytes]:
        run_dir = current()
        snap = {"status": None, "rounds": [], "events": []} if run_dir is None else run_snapshot(run_dir)
        return "application/json", json.dumps(snap, default=str).encode("utf-8")

    routes["/api/run"] = run
    routes["/api/runs"] = lambda: ("application/json", json.dumps(runs(), default=str).encode("utf-8"))
    return routes
