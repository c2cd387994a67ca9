"""The ``predict`` command: argument parsing and exit codes around :func:`predict_records`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from condi_models.checkpoint import CheckpointError
from condi_models.predict.options import HideSpec, PredictOptions
from condi_models.predict.pipeline import RecordResult, predict_records


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint .npz (e.g. global_model.npz)"
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="RECORD",
        help="WFDB record path (.hea optional), Sleep-EDF *-PSG.edf, mimic:<root>#<stay_id>, a folder "
        "(every record under it) or a list file (.txt, .list, .lst: one input per line)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per record)")
    parser.add_argument("--samples", type=int, default=5, help="imputation samples per window (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10; DDPM runs all T)")
    parser.add_argument("--method", choices=["ddim", "ddpm"], default="ddim", help="sampler (default ddim)")
    parser.add_argument(
        "--independent-draws",
        action="store_true",
        help="draw the samples independently (default: antithetic pairs plus the centre path, see the README)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler and of --hide (default 0)")
    parser.add_argument(
        "--hide",
        metavar="SPEC",
        help="simulate missingness first, for demonstration: points:<fraction>, blocks:<fraction> or drop",
    )
    parser.add_argument(
        "--hide-channels",
        nargs="+",
        metavar="CHANNEL",
        help="channels --hide applies to (names, space or comma separated; default every channel)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="windows per model call, from several records (default 16)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--workers",
        type=int,
        help="model calls run at once, one torch thread each (default: as many as torch threads on a CPU, 1 on a GPU)",
    )
    parser.add_argument(
        "--read-workers", type=int, default=1, help="processes reading records ahead of the model (default 1; 0: none)"
    )
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="leave out record.png (drawing it costs more CPU than a one-draw imputation)",
    )


def options_from_args(args: argparse.Namespace) -> PredictOptions:
    """PredictOptions from parsed ``predict`` arguments; ValueError names a bad one."""
    if args.hide_channels and not args.hide:
        raise ValueError("--hide-channels needs --hide")
    channels = [c for item in (args.hide_channels or []) for c in item.split(",") if c]
    hide = HideSpec.parse(args.hide, channels) if args.hide else None
    return PredictOptions(
        n_samples=args.samples,
        steps=args.steps,
        method=args.method,
        antithetic=not args.independent_draws,
        seed=args.seed,
        hide=hide,
        batch_size=args.batch_size,
        device=args.device,
        read_workers=args.read_workers,
        workers=args.workers,
        figures=not args.no_figures,
    )


def _hidden_scores(result: RecordResult) -> str:
    """``; hidden: MAE .., CRPS .., coverage 50 % .. / 90 % ..`` for a record scored on --hide, else empty."""
    e = result.imputation_error
    if e is None:
        return ""
    text = f"; hidden: MAE {e['mae']:.4g}"
    if "coverage_90" in e:
        text += f", CRPS {e['crps']:.4g}, band coverage 50 % {e['coverage_50']:.2f} / 90 % {e['coverage_90']:.2f}"
    return text


def handler(args: argparse.Namespace) -> int:
    """Run ``predict``: 0 when all records were predicted, 1 when some failed, 2 on a usage error."""
    try:
        results = predict_records(args.checkpoint, args.input, args.out, options_from_args(args), progress=True)
    except (CheckpointError, ValueError, RuntimeError) as err:
        print(f"condi predict: error: {err}", file=sys.stderr)
        return 2
    for r in results:
        if not r.ok:
            print(f"condi predict: {r.error}", file=sys.stderr)
        elif r.kind == "psg":
            print(f"{r.name}: {len(r.segments)} epochs{_hidden_scores(r)} -> {r.out_dir}")
        else:
            seg = r.segments[0]
            print(f"{r.name}: {seg.predicted} (p = {max(seg.probabilities):.2f}){_hidden_scores(r)} -> {r.out_dir}")
    failed = sum(not r.ok for r in results)
    out = Path(args.out)
    print(
        f"{len(results) - failed} of {len(results)} records predicted; "
        f"summary in {out / 'summary.json'}, predictions in {out / 'predictions.csv'}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount ``predict`` on the umbrella CLI; run the result with ``args.func(args)``."""
    parser = subparsers.add_parser(
        "predict",
        help="impute and classify records with a trained checkpoint",
        description="Impute the missing parts of records and classify them with a trained CondI checkpoint.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m condi_models.predict ...``: the same command outside the umbrella CLI."""
    parser = argparse.ArgumentParser(prog="condi predict", description="Impute and classify records")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return handler(args)

