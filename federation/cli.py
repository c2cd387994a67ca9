"""``condi``: the researcher's and operator's umbrella command.

Subcommands are registered by the module that owns them; this file only wires them together.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from condi_models.configfile import ConfigError
from federation.certs_cli import add_certs_parser


def _synth(args: argparse.Namespace) -> int:
    """Write a synthetic data set to disk in the layout of the real source it imitates."""
    out = Path(args.out)
    if args.kind == "icu":
        from condi_models.data.synthetic_icu import write_synthetic_mimic

        root = write_synthetic_mimic(out, args.n, seed=args.seed)
        print(f"wrote {args.n} synthetic ICU stays in MIMIC-IV table layout under {root}")
    else:
        from condi_models.data.synthetic_psg import write_synthetic_cassette

        write_synthetic_cassette(out, args.n, seed=args.seed)
        print(f"wrote {args.n} synthetic PSG nights as Sleep-EDF cassette EDF pairs under {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condi", description="CondI: federated learning on incomplete clinical time series"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write synthetic data in a real source's file layout")
    synth.add_argument("kind", choices=["icu", "psg"], help="icu: MIMIC-IV tables; psg: Sleep-EDF EDF pairs")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("-n", type=int, default=20, help="stays (icu) or nights (psg)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)
    add_certs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"condi: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
