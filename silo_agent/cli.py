"""``silo-agent``: the hospital-side command.

``silo-agent --config site.yaml`` takes part in the federation (exit 0 when the run is over, 1
when the coordinator was lost, 2 when the configuration, the certificates or the coordinator
refused). ``silo-agent check --config site.yaml`` validates the config and the data and, when
the sections are present, the certificate chain (issued by the CA, key matches, silo id equals
``silo_id``, not expired) and whether the coordinator answers its health service; with
``--layout`` it prints the data's layout as federation.yaml's ``layout:`` section instead.
``silo-agent status --config site.yaml [--json]`` shows what the agent does or last did, read
from its state directory (exit 1 when it never ran there).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from condi_models.configfile import ConfigError
from condi_models.data.missingness import simulate_missingness
from condi_models.data.sources import DataLayout, DataSourceError, load_source, source_details
from condi_models.data.summary import summarize
from federation import logs, pki
from federation.tls import TlsError
from silo_agent.config import SiteConfig, check_site_files, load_site_config
from silo_agent.local_data import LocalDataError
from silo_agent.status import read_status, status_text

log = logging.getLogger("silo_agent")

_HEALTH_TIMEOUT_S = 5.0


def _certificate_check(cfg: SiteConfig) -> dict[str, Any]:
    assert cfg.tls is not None
    passphrase = pki.read_passphrase(cfg.tls.passphrase_file, cfg.tls.passphrase_env)
    report = pki.check_chain(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, passphrase=passphrase)
    problems = list(report.problems)
    if report.silo_id is not None and report.silo_id != cfg.silo_id:
        problems.append(
            f"the certificate is for silo {report.silo_id!r}, site.yaml says silo_id {cfg.silo_id!r}"
        )
    return {
        "certificate": str(report.cert_path),
        "subject": report.subject,
        "silo_id": report.silo_id,
        "not_valid_after": report.not_valid_after.isoformat(),
        "days_left": report.days_left,
        "problems": problems,
        "warnings": list(report.warnings),
    }


def _coordinator_check(cfg: SiteConfig) -> dict[str, Any]:
    from silo_agent.client import connect, health_status

    assert cfg.coordinator is not None and cfg.tls is not None
    out: dict[str, Any] = {"address": cfg.coordinator.address, "problems": []}
    try:
        channel = connect(cfg.coordinator, cfg.tls)
    except TlsError as exc:
        out["problems"].append(str(exc))
        return out
    try:
        out["status"] = health_status(channel, _HEALTH_TIMEOUT_S)
        if out["status"] != "SERVING":
            out["problems"].append(f"the coordinator answers {out['status']}")
    except grpc.RpcError as exc:
        out["problems"].append(
            f"the coordinator at {cfg.coordinator.address} does not answer "
            f"({exc.code().name}: {exc.details()})"
        )
    finally:
        channel.close()
    return out


def run_check(config_path: str, as_json: bool, layout: bool = False) -> int:
    """Validate the site config, its data, certificates and coordinator now; print a summary.

    With ``layout``, print only federation.yaml's ``layout:`` section for the data read, for the
    operator to pin.
    """
    cfg = load_site_config(config_path)
    if layout:
        dataset = load_source(cfg.data, origin=config_path)
        print(yaml.safe_dump({"layout": DataLayout.of(dataset.info).model_dump()}, sort_keys=False), end="")
        return 0
    check_site_files(cfg, config_path)
    dataset = load_source(cfg.data, origin=config_path)
    view = simulate_missingness(dataset, cfg.simulated_missingness) if cfg.simulated_missingness else None
    summary = summarize(dataset, view, source_details(cfg.data, origin=config_path))
    checks: dict[str, Any] = {}
    if cfg.tls is not None:
        checks["tls"] = _certificate_check(cfg)
    if cfg.coordinator is not None:
        checks["coordinator"] = _coordinator_check(cfg)
    problems = [p for section in checks.values() for p in section["problems"]]
    if as_json:
        print(
            json.dumps(
                {"silo_id": cfg.silo_id, "config": config_path, **summary.to_dict(), **checks}, indent=2
            )
        )
    else:
        print(f"silo {cfg.silo_id}: config {config_path} is valid")
        print(summary.to_text())
        if "tls" in checks:
            t = checks["tls"]
            print(f"certificate {t['certificate']}: silo {t['silo_id']}, valid until {t['not_valid_after']}")
            for warning in t["warnings"]:
                print(f"warning: {warning}")
        if "coordinator" in checks and "status" in checks["coordinator"]:
            print(f"coordinator {checks['coordinator']['address']}: {checks['coordinator']['status']}")
        for problem in problems:
            print(f"problem: {problem}")
    return 1 if problems else 0


def run_agent(config_path: str, verbose: bool, log_config: str | None = None, stay_up: bool = False) -> int:
    """Take part in the federation as site.yaml says: in one run, or with ``stay_up`` in every run
    the coordinator service starts, until stopped."""
    from silo_agent.agent import Faults, SiloAgent

    log_settings = logs.load_log_settings(log_config, verbose)
    cfg = load_site_config(config_path)
    check_site_files(cfg, config_path)
    logs.configure(json_path=Path(cfg.state_dir) / "events.jsonl", settings=log_settings)
    if not stay_up:
        return SiloAgent(cfg, config_path, faults=Faults.from_env()).run()
    def stop(signum: int, _frame: object) -> None:
        # Unwinds whatever the agent is doing (a retry's wait included); its state is on disk and a
        # later start takes the run up again.
        logging.getLogger("silo_agent").warning("received signal %d; stopping", signum)
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    refused: set[str] = set()
    while True:
        agent = SiloAgent(cfg, config_path, faults=Faults.from_env(), skip_runs=frozenset(refused))
        code = agent.run()
        if agent.outcome == "identity":
            # The certificate is revoked, off the allow-list or unfit for secure aggregation: no
            # later run will take it either.
            return code
        if agent.outcome == "policy" and agent.joined_run is not None:
            refused.add(agent.joined_run)
        # Between runs the coordinator answers UNAVAILABLE; ask again after a while.
        pause = STAY_UP_PAUSE_S if agent.outcome in ("done", "budget") else STAY_UP_RETRY_S
        logging.getLogger("silo_agent").info("staying up (%s): next join in %.0f s", agent.outcome, pause)
        time.sleep(pause)


# How long a staying-up agent waits before joining again: after a run it took part in, and after
# it found no run (or one it refused) or lost the coordinator.
STAY_UP_PAUSE_S = 5.0
STAY_UP_RETRY_S = 15.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="silo-agent", description="CondI silo agent (runs at a hospital)")
    parser.add_argument("--config", help="path to site.yaml (take part in the federation)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--log-config", help="logging.yaml: level, stderr format, events.jsonl rotation")
    parser.add_argument(
        "--stay-up", action="store_true",
        help="after a run, wait for the coordinator service's next one and take part (until stopped)",
    )
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser(
        "check", help="validate site.yaml, data, certificates and coordinator; print a summary"
    )
    check.add_argument("--config", required=True, help="path to site.yaml")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.add_argument(
        "--layout", action="store_true", help="print the data's layout as federation.yaml's `layout:` section"
    )
    status = sub.add_parser(
        "status", help="what the agent does: run, task and deadline, last task and error, epsilon spent, disk used"
    )
    status.add_argument("--config", required=True, help="path to site.yaml")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def run_status(config_path: str, as_json: bool) -> int:
    """Print the agent's status from its state directory (exit 1 when it never ran there)."""
    cfg = load_site_config(config_path)
    privacy = cfg.privacy
    snap = read_status(
        cfg.state_dir,
        delta=None if privacy is None else privacy.delta,
        accountant="rdp" if privacy is None else privacy.accountant,
    )
    target = None if privacy is None else privacy.target_epsilon
    print(json.dumps({**snap, "target_epsilon": target}, indent=2) if as_json else status_text(snap, target))
    return 0 if snap["found"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("check", "status"):
        logs.configure(logging.DEBUG if args.verbose else logging.WARNING)
    elif args.config is None:
        parser.error("give --config site.yaml to take part, or use `silo-agent check --config ...`")
    try:
        if args.command == "check":
            return run_check(args.config, args.json, args.layout)
        if args.command == "status":
            return run_status(args.config, args.json)
        return run_agent(args.config, args.verbose, args.log_config, args.stay_up)
    except (
        ConfigError,
        DataSourceError,
        LocalDataError,
        FileNotFoundError,
        TlsError,
        pki.PkiError,
        ValueError,
    ) as err:
        print(f"silo-agent: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
