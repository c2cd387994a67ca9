"""``coordinator``: the operator-side command.

``coordinator --config federation.yaml`` serves the federation until the run ends (exit 0 when
every round completed, 1 when the run failed or was stopped, 2 on a configuration error).
``coordinator check --config federation.yaml`` validates the file and prints the round plan;
files it names that do not exist yet are listed on stderr. ``coordinator replay --config
federation.yaml`` rebuilds the run's global model from its journal of summed contributions and
checks it against every recorded round (exit 0 when all match, 1 when not). ``coordinator status
--config federation.yaml [--json]`` shows the run's round, stage, silos and last error, read from
its run directory (exit 1 when there is no run there yet).

``coordinator serve --config federation.yaml`` (with a ``service:`` section) stays up and runs the
federations submitted to it one after another (:mod:`coordinator.service`); ``coordinator submit
RUN.yaml``, ``runs``, ``logs RUN [--follow]`` and ``cancel RUN`` (each with ``--config``) talk to
it over its local admin socket (exit 2 when it refuses, saying why).

For fault tests, ``CONDI_COORDINATOR_EXIT_AT=ROUND:STAGE`` makes the coordinator exit hard (status 17)
right after it accepts the first submission of that round's stage, as a crash mid-stage would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from condi_models.configfile import ConfigError
from coordinator.config import federation_file_problems, load_federation_config, run_config
from federation import logs
from federation.faults import COORDINATOR_EXIT_AT, parse_exit_at
from federation.tls import TlsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator", description="CondI federation coordinator (operator side)"
    )
    parser.add_argument("--config", help="path to federation.yaml (serve the federation)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--log-config", help="logging.yaml: level, stderr format, events.jsonl rotation")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="validate federation.yaml and print the round plan")
    check.add_argument("--config", required=True, help="path to federation.yaml")
    replay = sub.add_parser("replay", help="rebuild the run's model from its journal and check every round")
    replay.add_argument("--config", required=True, help="path to federation.yaml")
    replay.add_argument("--run-dir", help="the run directory (default: federation.yaml's run_dir)")
    status = sub.add_parser("status", help="the run's round, stage, silos, last error (read from its run directory)")
    status.add_argument("--config", required=True, help="path to federation.yaml")
    status.add_argument("--run-dir", help="the run directory (default: federation.yaml's run_dir)")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    serve = sub.add_parser("serve", help="stay up and run submitted federations one after another (service:)")
    serve.add_argument("--config", required=True, help="path to federation.yaml with a service: section")
    serve.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    serve.add_argument("--log-config", help="logging.yaml: level, stderr format, events.jsonl rotation")
    admin = {
        "submit": "queue a run (a file of federation.yaml's run fields) on the service",
        "runs": "list the service's runs",
        "logs": "print a run's events (--follow: until it ends)",
        "cancel": "cancel a queued run, or stop a running one",
    }
    for name, text in admin.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="the service's federation.yaml (names the admin socket)")
        if name == "submit":
            p.add_argument("run_file", help="run.yaml")
        elif name in ("logs", "cancel"):
            p.add_argument("run_id", help="the run's id (coordinator runs lists them)")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
        if name == "runs":
            p.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def _check(config: str) -> int:
    cfg = load_federation_config(config)
    print(json.dumps({"config": config, **cfg.model_dump(mode="json")}, indent=2))
    for problem in federation_file_problems(cfg, config):
        print(f"coordinator: warning: {problem}; serving will refuse to start", file=sys.stderr)
    return 0


def _replay(config: str, run_dir: str | None) -> int:
    from coordinator.replay import replay
    from coordinator.store import StoreError

    cfg = load_federation_config(config)
    submitted = None if run_dir is None else Path(run_dir) / "run.yaml"
    if cfg.service is not None and submitted is not None and submitted.is_file():
        # A service's run: its config is the service's with the run file laid over it.
        cfg = run_config(cfg, yaml.safe_load(submitted.read_text(encoding="utf-8")) or {}, run_dir, str(submitted))
    try:
        result = replay(cfg, run_dir)
    except StoreError as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.matches else 1


def _status(config: str, run_dir: str | None, as_json: bool) -> int:
    from coordinator.monitor import run_snapshot, status_text

    cfg = load_federation_config(config)
    runs: list[dict] = []
    if run_dir is None and cfg.service is not None:
        # A service's runs: show the one running, else the latest (read from disk, so this works
        # whether the service is up or not).
        listed = Path(cfg.service.runs_dir) / "runs.json"
        runs = json.loads(listed.read_text(encoding="utf-8")) if listed.exists() else []
        running = [r for r in runs if r["state"] == "running"] or runs[-1:]
        run_dir = str(Path(cfg.service.runs_dir) / running[0]["id"]) if running else cfg.service.runs_dir
    snapshot = run_snapshot(cfg.run_dir if run_dir is None else run_dir)
    if as_json:
        print(json.dumps({**snapshot, **({"runs": runs} if cfg.service is not None else {})}, indent=2, default=str))
    else:
        print(status_text(snapshot))
        queued = sum(r["state"] == "queued" for r in runs)
        if runs:
            print(f"service    {len(runs)} runs, {queued} queued (coordinator runs --config ... lists them)")
    return 0 if snapshot["found"] else 1


def _admin(args: argparse.Namespace) -> int:
    from coordinator.admin import AdminClient, AdminError

    cfg = load_federation_config(args.config)
    if cfg.service is None:
        print(f"coordinator: error: {args.config}: no service: section, so no service to ask", file=sys.stderr)
        return 2
    client = AdminClient(cfg.service.admin_socket)
    try:
        if args.command == "submit":
            entry = client.request("POST", "/runs", Path(args.run_file).read_bytes())
            print(f"queued run {entry['id']} ({entry['name']})")
        elif args.command == "runs":
            runs = client.request("GET", "/runs")
            if args.json:
                print(json.dumps(runs, indent=2))
            for r in [] if args.json else runs:
                print(f"{r['id']:<48} {r['state']:<10} submitted {r['submitted']}  {r['message']}".rstrip())
        elif args.command == "cancel":
            entry = client.request("POST", f"/runs/{args.run_id}/cancel")
            print(f"run {entry['id']}: {'cancelled' if entry['state'] == 'cancelled' else 'stopping'}")
        else:
            after = 0
            while True:
                page = client.request("GET", f"/runs/{args.run_id}/events?after={after}")
                for line in page["lines"]:
                    print(line, flush=True)
                after = page["next"]
                if not args.follow or (page["state"] not in ("queued", "running") and not page["lines"]):
                    break
                if not page["lines"]:
                    time.sleep(1.0)
    except (AdminError, OSError) as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2
    return 0


def _serve_runs(config: str, verbose: bool, log_config: str | None) -> int:
    from coordinator.runs import RunError
    from coordinator.service import CoordinatorService
    from coordinator.store import StoreError

    log_settings = logs.load_log_settings(log_config, verbose)
    cfg = load_federation_config(config)
    if cfg.service is None:
        print(f"coordinator: error: {config}: `coordinator serve` needs a service: section", file=sys.stderr)
        return 2
    logs.configure(json_path=Path(cfg.service.runs_dir) / "events.jsonl", settings=log_settings)
    try:
        return CoordinatorService(cfg, config, log_settings).serve()
    except (StoreError, TlsError, RunError, OSError) as err:
        logging.getLogger("coordinator").error("%s", err)
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2


def _serve(config: str, verbose: bool, log_config: str | None) -> int:
    from coordinator.app import serve
    from coordinator.store import StoreError

    log_settings = logs.load_log_settings(log_config, verbose)
    cfg = load_federation_config(config)
    try:
        exit_at = parse_exit_at(COORDINATOR_EXIT_AT, os.environ.get(COORDINATOR_EXIT_AT))
    except ValueError as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2
    logs.configure(json_path=Path(cfg.run_dir) / "events.jsonl", settings=log_settings)
    try:
        return serve(cfg, config, exit_at=exit_at)
    except (StoreError, TlsError) as err:
        logging.getLogger("coordinator").error("%s", err)
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "replay":
            return _replay(args.config, args.run_dir)
        if args.command == "status":
            return _status(args.config, args.run_dir, args.json)
        if args.command == "serve":
            return _serve_runs(args.config, args.verbose, args.log_config)
        if args.command in ("submit", "runs", "logs", "cancel"):
            return _admin(args)
        if args.config is None:
            parser.error("give --config federation.yaml to serve, or use `coordinator check --config ...`")
        return _serve(args.config, args.verbose, args.log_config)
    except ConfigError as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
