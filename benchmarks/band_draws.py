"""Band coverage against the number of draws: the band factors carried from the count they were fitted for.

Run from the repository root:
    .venv/bin/python benchmarks/band_draws.py --ptbxl ../shared/data/ptbxl [--draws 5,10,20] [--pattern blocks]
        [--epochs-a 25] [--threads 1] [--out FILE]

CondI is trained by Phase A on the training folds of cross-validation split 0 (``benchmarks/cv_grid.py``:
folds 5-8) at ps = pw = 0.8 of one pattern; its band factors are fitted after Phase A on training
entries with ``band_samples`` (5) independent draws (``condi_models.training.fit_band``). On the
centre windows of the validation folds (3-4), hidden the same way, each count of independent DDIM-10
draws is scored twice: with the factors as fitted and with the factors carried to that count
(``BandCalibration.factors_for``, ``condi_models/nn/band.py``). Nothing is chosen on these numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import imputation as bench
import numpy as np
from _common import fmt, machine, markdown_table, write_json
from imputation_cv import design_parser, validation_setup

from condi_models.batches import prepare_split
from condi_models.nn.config import Variant
from condi_models.nn.sampling import SamplingOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = design_parser(__doc__.split("\n")[0], "band_draws.json")
    p.add_argument("--draws", default="5,10,20", help="numbers of independent draws to score")
    p.add_argument("--pattern", choices=bench.ALL_PATTERNS, default="blocks")
    p.add_argument("--epochs-a", type=int, default=25)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--eval-batch", type=int, default=32)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, data = validation_setup(args)
    train_ds, val_ds, norm = data.train, data.val, data.norm
    miss = bench.missingness(args.pattern, bench.TRAIN_PS, bench.TRAIN_PW, args.seed)
    model = bench.build_model(Variant.CONDI, train_ds, args).to(device)
    training = bench.train(model, prepare_split(train_ds, norm, miss), args, device, f"band {args.pattern}")
    win = bench.centre_windows(prepare_split(val_ds, norm, miss), args.window, None)
    bench.log(f"factors {model.band.values()} fitted for {model.band.fitted_draws()} draws; "
              f"{len(win)} validation windows")
    rows = []
    opts = SamplingOptions(n_samples=1, steps=args.steps, antithetic=False)
    for n in (int(d) for d in args.draws.split(",")):
        t0 = time.perf_counter()
        draws, _ = bench.crps_draws(model, win, replace(opts, n_samples=n), args, device)
        estimate = np.median(draws, axis=0)
        for label, factors in (("as fitted", model.band.values()), ("carried", model.band.factors_for(n))):
            s = bench.score(win, estimate, draws, factors)
            rows.append({"draws": n, "factors": label, "band_factors": list(factors),
                         **{k: s[k] for k in ("coverage_50", "coverage_90", "width_50", "width_90")}})
            bench.log(f"{n} draws, factors {label}: 50 % {s['coverage_50']:.3f}, 90 % {s['coverage_90']:.3f}")
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
    results = {
        "command": " ".join(["benchmarks/band_draws.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device),
        "pattern": args.pattern,
        "train_folds": data.train_folds,
        "validation_folds": data.val_folds,
        "windows": len(win),
        "training": training,
        "fitted_draws": model.band.fitted_draws(),
        "rows": rows,
    }
    write_json(Path(args.out), results)
    print(report(results))


def report(results: dict[str, Any]) -> str:
    """Markdown: coverage and width of both bands per draw count, with the factors as fitted and carried."""
    rows = [[str(r["draws"]), r["factors"], ", ".join(fmt(f, 2) for f in r["band_factors"]), fmt(r["coverage_50"]),
             fmt(r["coverage_90"]), fmt(r["width_50"]), fmt(r["width_90"])] for r in results["rows"]]
    return markdown_table(["draws", "factors", "50 % / 90 % factor", "50 % cov.", "90 % cov.", "50 % width",
                           "90 % width"], rows)


if __name__ == "__main__":
    main()
