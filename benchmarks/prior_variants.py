"""The Gaussian prior alone under its settings: held edges and ridge, by where a hidden entry lies.

Run from the repository root:
    .venv/bin/python benchmarks/prior_variants.py --mimic ../shared/data/mimic-iv-demo
        [--patterns points,blocks,drop] [--ridges 0.001,0.03,0.1,0.3,1] [--threads 1] [--out FILE]
    (or --ptbxl ../shared/data/ptbxl)

The prior (``condi_models.nn.prior``) is what CondI imputes with when its network gate is 0, as it
was in most models of the imputation CV. Here it is fitted alone: EM from a fresh model on the
training folds of cross-validation split 0 (``benchmarks/cv_grid.py``) at ps = pw = 0.8 of each
pattern, as a silo refits it, then scored on the centre windows of the validation folds (its
conditional mean: the median of antithetic draws at gate 0). The model's defaults are kept but for
the two settings compared: ``prior_interpolation_edges`` (off, then on) and ``prior_ridge`` (each of
``--ridges``). MAE is reported on all hidden entries and on three kinds: between two observed
entries of the channel, before its first or after its last, and in a channel with none observed
in the window; the linear interpolation baseline beside them. This is a design check on validation
folds; the test folds are not read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import imputation as bench
import numpy as np
import torch
from _common import fmt, machine, markdown_table, write_json
from imputation_cv import design_parser, validation_setup

from condi_models.batches import PreparedSplit, prepare_split
from condi_models.evaluation import impute_split
from condi_models.imputers import make_imputer, observed_neighbours
from condi_models.nn.config import Variant
from condi_models.nn.model import CondIModel
from condi_models.nn.sampling import SamplingOptions
from condi_models.simulation import ModelSpec
from condi_models.training import refit_prior

KINDS = ("all", "between", "edge", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = design_parser(__doc__.split("\n")[0], "prior_variants.json")
    p.add_argument("--patterns", default="points,blocks,drop")
    p.add_argument("--ridges", default="0.001,0.03,0.1,0.3,1")
    p.add_argument("--em-iterations", type=int, default=20, help="EM steps of the refit (the training default)")
    return p.parse_args(argv)


def entry_kinds(observed: np.ndarray, hidden: np.ndarray) -> dict[str, np.ndarray]:
    """``hidden`` split by where each entry lies in its channel's row of ``observed`` (KINDS)."""
    before, after = observed_neighbours(observed)
    has_before, has_after = before >= 0, after < observed.shape[-1]
    return {
        "all": hidden,
        "between": hidden & has_before & has_after,
        "edge": hidden & (has_before ^ has_after),
        "none": hidden & ~has_before & ~has_after,
    }


def prior_mae(
    spec: ModelSpec,
    train: PreparedSplit,
    win: PreparedSplit,
    kinds: dict[str, np.ndarray],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float | None]:
    """The prior's MAE per kind of hidden entry, the model built from ``spec`` and refitted on ``train``."""
    torch.manual_seed(args.seed)
    model = CondIModel(spec.build(train.info, win.info.length)).to(device)
    refit_prior(model, train, args.em_iterations, args.seed)
    with torch.no_grad():
        model.network_gate.fill_(0.0)
    sampling = SamplingOptions(n_samples=1, steps=1, antithetic=True)
    estimate = impute_split(model, win, sampling=sampling, seed=args.seed, device=device).x_hat
    return {k: _mae(estimate, win.truth, m) for k, m in kinds.items()}


def _mae(estimate: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float | None:
    return float(np.abs(estimate - truth)[where].mean()) if where.any() else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, data = validation_setup(args)
    window = min(args.window, data.train.info.length)
    rows = []
    for pattern in args.patterns.split(","):
        miss = bench.missingness(pattern, bench.TRAIN_PS, bench.TRAIN_PW, args.seed)
        train = prepare_split(data.train, data.norm, miss)
        win = bench.centre_windows(prepare_split(data.val, data.norm, miss), window, None)
        kinds = entry_kinds(win.observed, win.hidden)
        interp = make_imputer("interpolation").fit(train.x, train.observed).impute(win.x, win.observed)
        rows.append({
            "pattern": pattern,
            "prior": "linear interpolation",
            "entries": {k: int(m.sum()) for k, m in kinds.items()},
            "mae": {k: _mae(interp, win.truth, m) for k, m in kinds.items()},
        })
        for edges in (False, True):
            for ridge in (float(r) for r in args.ridges.split(",")):
                t0 = time.perf_counter()
                spec = ModelSpec(variant=Variant.CONDI, prior_interpolation_edges=edges, prior_ridge=ridge)
                mae = prior_mae(spec, train, win, kinds, args, device)
                label = f"{'edges held' if edges else 'no edges'}, ridge {ridge:g}"
                rows.append({"pattern": pattern, "prior": label, "mae": mae,
                             "seconds": round(time.perf_counter() - t0, 1)})
                bench.log(f"{pattern}, {label}: MAE {mae['all']:.3f}")
    results = {
        "command": " ".join(["benchmarks/prior_variants.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device),
        "train_folds": data.train_folds,
        "validation_folds": data.val_folds,
        "rows": rows,
    }
    write_json(Path(args.out), results)
    print(report(results))


def report(results: dict[str, Any]) -> str:
    """Markdown: the prior's MAE per pattern and setting, on every kind of hidden entry."""
    rows = [[r["pattern"], r["prior"], *(fmt(r["mae"][k]) for k in KINDS)]
            for r in results["rows"]]
    return markdown_table(["pattern", "prior", *(f"MAE, {k}" for k in KINDS)], rows)


if __name__ == "__main__":
    main()
