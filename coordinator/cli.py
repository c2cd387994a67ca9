"""``coordinator``: the operator-side command.

``coordinator --config federation.yaml`` serves the federation until the run ends (exit 0 when
every round completed, 1 when the run failed or was stopped, 2 on a configuration error).
``coordinator check --config federation.yaml`` validates the file and prints the round plan;
files it names that do not exist yet are listed on stderr. ``coordinator replay --config
federation.yaml`` rebuilds the run's global model from its journal of summed contributions and
checks it against every recorded round (exit 0 when all match, 1 when not). ``coordinator status
--config federation.yaml [--json]`` shows the run's round, stage, silos and last error, read from
its run directory (exit 1 when there is no run there yet).

For fault tests, ``CONDI_COORDINATOR_EXIT_AT=ROUND:STAGE`` makes the coordinator exit hard (status 17)
right after it accepts the first submission of that round's stage, as a crash mid-stage would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from condi_models.configfile import ConfigError
from coordinator.config import federation_file_problems, load_federation_config
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

    try:
        result = replay(load_federation_config(config), run_dir)
    except StoreError as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.matches else 1


def _status(config: str, run_dir: str | None, as_json: bool) -> int:
    from coordinator.monitor import run_snapshot, status_text

    snapshot = run_snapshot(load_federation_config(config).run_dir if run_dir is None else run_dir)
    print(json.dumps(snapshot, indent=2, default=str) if as_json else status_text(snapshot))
    return 0 if snapshot["found"] else 1


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
        if args.config is None:
            parser.error("give --config federation.yaml to serve, or use `coordinator check --config ...`")
        return _serve(args.config, args.verbose, args.log_config)
    except ConfigError as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
