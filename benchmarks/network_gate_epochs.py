"""Does the denoiser add to its prior with more Phase A steps? MAE at each network gate, on validation folds.

Run from the repository root:
    .venv/bin/python benchmarks/network_gate_epochs.py --ptbxl ../shared/data/ptbxl [--epochs 25,100,300]
        [--patterns blocks] [--window 250] [--tokens-per-channel 25] [--threads 1] [--out FILE]

``--window 1000 --tokens-per-channel 100`` trains and scores on whole 10 s PTB-XL records with the
default patch of 10 steps, so the denoiser's time attention reaches every beat of the record.

Per pattern, CondI (the default PTB-XL model) is trained once by Phase A on the training folds of
cross-validation split 0 (``benchmarks/cv_grid.py``: folds 5-8) at ps = pw = 0.8, for the largest
number of epochs asked (after warm-up a silo's local learning rate is constant, so the model after
E epochs of a longer run is the model of an E-epoch run). After each epoch asked for, the gate
``fit_gate`` would choose on held-out training windows is recorded, and on the centre windows of
the validation folds (3-4), hidden the same way, the imputation (median of 5 antithetic DDIM-10
draws) is scored at every gate of ``GATE_CANDIDATES``: gate 0 is the prior alone, gate 1 the whole
network. Nothing is chosen on these numbers here; they say whether training longer would let the
network correct its prior.
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

from condi_models.batches import prepare_split
from condi_models.evaluation import impute_split
from condi_models.nn.config import Variant
from condi_models.nn.sampling import SamplingOptions
from condi_models.training import (
    GATE_CANDIDATES,
    LocalTrainingConfig,
    TrainingProgress,
    fit_gate,
    held_out_windows,
    train_local,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = design_parser(__doc__.split("\n")[0], "network_gate_epochs.json")
    p.add_argument("--epochs", default="25,100", help="Phase A epochs at which to score the model")
    p.add_argument("--patterns", default="blocks", help=f"of {', '.join(bench.ALL_PATTERNS)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, data = validation_setup(args)
    train_ds, val_ds, norm = data.train, data.val, data.norm
    wanted = sorted(int(e) for e in args.epochs.split(","))
    results: dict[str, Any] = {
        "command": " ".join(["benchmarks/network_gate_epochs.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device),
        "train_folds": data.train_folds,
        "validation_folds": data.val_folds,
        "cells": [],
    }
    opts = SamplingOptions(n_samples=5, steps=10, antithetic=True)
    cfg = LocalTrainingConfig(epochs_a=wanted[-1], epochs_b=0, batch_size=args.batch_size, lr_a=args.lr,
                              window=args.window)
    for pattern in args.patterns.split(","):
        miss = bench.missingness(pattern, bench.TRAIN_PS, bench.TRAIN_PW, args.seed)
        split = prepare_split(train_ds, norm, miss)
        win = bench.centre_windows(prepare_split(val_ds, norm, miss), args.window, None)
        model = bench.build_model(Variant.CONDI, train_ds, args).to(device)
        t0 = time.perf_counter()

        def checkpoint(p: TrainingProgress, pattern: str = pattern, split: Any = split, win: Any = win,
                       model: Any = model, t0: float = t0) -> None:
            if p.phase != "A" or p.batch != p.batches or p.epoch not in wanted:
                return
            fit_gate(model, held_out_windows(model, split, cfg, args.seed, device), cfg, args.seed)
            cell: dict[str, Any] = {"pattern": pattern, "epochs_a": p.epoch, "train_records": len(split),
                                    "last_loss": p.loss, "chosen_gate": float(model.network_gate),
                                    "windows": len(win), "mae": {}}
            for gate in GATE_CANDIDATES:
                with torch.no_grad():
                    model.network_gate.fill_(gate)
                res = impute_split(model, win, sampling=opts, seed=args.seed, device=device)
                cell["mae"][str(gate)] = float(np.abs(res.x_hat - win.truth)[win.hidden].mean())
            with torch.no_grad():
                model.network_gate.fill_(1.0)  # as during training: the gate is fitted after Phase A
            cell["seconds"] = round(time.perf_counter() - t0, 1)
            bench.log(f"{pattern} after {p.epoch} epochs: gate chosen {cell['chosen_gate']}, "
                f"validation MAE by gate {cell['mae']}")
            results["cells"].append(cell)
            write_json(Path(args.out), results)

        train_local(model, split, cfg, seed=args.seed, device=device, progress=checkpoint)
    print(report(results))


def report(results: dict[str, Any]) -> str:
    """Markdown: per pattern and epochs, the validation MAE at every gate and the gate fit_gate chose."""
    rows = [[c["pattern"], str(c["epochs_a"]), str(c["train_records"]),
             *(fmt(c["mae"][str(g)]) for g in GATE_CANDIDATES), fmt(c["chosen_gate"], 1)]
            for c in results["cells"]]
    return markdown_table(["pattern", "Phase A epochs", "train records",
                           *(f"MAE, gate {g}" for g in GATE_CANDIDATES), "gate chosen"], rows)


if __name__ == "__main__":
    main()
