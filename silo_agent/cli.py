"""``silo-agent``: the hospital-side command."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from condi_models.configfile import ConfigError
from condi_models.data.missingness import simulate_missingness
from condi_models.data.sources import DataSourceError, load_source, source_details
from condi_models.data.summary import summarize
from silo_agent.config import load_site_config

log = logging.getLogger("silo_agent")


def run_check(config_path: str, as_json: bool) -> int:
    """Validate the site config and its data now; print a summary. Returns the exit code."""
    cfg = load_site_config(config_path)
    dataset = load_source(cfg.data, origin=config_path)
    view = simulate_missingness(dataset, cfg.simulated_missingness) if cfg.simulated_missingness else None
    summary = summarize(dataset, view, source_details(cfg.data, origin=config_path))
    if as_json:
        print(json.dumps({"silo_id": cfg.silo_id, "config": config_path, **summary.to_dict()}, indent=2))
    else:
        print(f"silo {cfg.silo_id}: config {config_path} is valid")
        print(summary.to_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="silo-agent", description="CondI silo agent (runs at a hospital)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate site.yaml and the data source, print a summary")
    check.add_argument("--config", required=True, help="path to site.yaml")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "check":
            return run_check(args.config, args.json)
    except (ConfigError, DataSourceError, FileNotFoundError) as err:
        print(f"silo-agent: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
