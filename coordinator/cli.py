"""``coordinator``: the operator-side command."""

from __future__ import annotations

import argparse
import json
import sys

from condi_models.configfile import ConfigError
from coordinator.config import load_federation_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="CondI federation coordinator (operator side)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate federation.yaml and print the round plan")
    check.add_argument("--config", required=True, help="path to federation.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_federation_config(args.config)
    except ConfigError as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"config": args.config, **cfg.model_dump()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
