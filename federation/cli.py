"""``condi``: the researcher's and operator's umbrella command.

Subcommands are registered by the module that owns them; this file only wires them together.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from condi_models.configfile import ConfigError
from condi_models.predict import add_predict_parser
from federation import logs
from federation.certs_cli import add_certs_parser
from federation.harness import add_harness_parser


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


def _sim(args: argparse.Namespace) -> int:
    """Run an in-process federated simulation; the final metrics are the last line of output."""
    from condi_models.simulation import load_experiment, run_simulation

    cfg = load_experiment(args.config)
    bar = tqdm(total=cfg.federation.rounds, desc=f"sim {cfg.name}", unit="round", file=sys.stderr)

    def progress(row: dict) -> None:
        val = row.get("val", {})
        bar.set_postfix({k: f"{v:.3f}" for k, v in val.items() if k in ("accuracy", "imputation_mae")})
        bar.update(1)

    result = run_simulation(cfg, run_dir=Path(args.out) if args.out else None, origin=args.config, progress=progress)
    bar.close()
    print(f"run directory: {result.run_dir}", file=sys.stderr)
    (result.run_dir / "final_metrics.json").write_text(json.dumps(result.final["test"]) + "\n")
    print(json.dumps(result.final["test"]))
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
    add_harness_parser(sub)
    sim = sub.add_parser("sim", help="in-process federated simulation from an experiment.yaml")
    sim.add_argument("--config", required=True, help="path to experiment.yaml")
    sim.add_argument("--out", help="run directory (default: out_dir/name from the config)")
    sim.set_defaults(func=_sim)
    add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"condi: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
