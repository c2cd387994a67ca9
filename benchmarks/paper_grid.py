"""The paper's Table 2 / 3 grid: every method at ps, pw in {0.2, 0.8}, federated as in the paper.

Run from the repository root:
    .venv/bin/python benchmarks/paper_grid.py [--datasets synthetic_ecg,ptbxl,synthetic_psg,mimic]
        [--ptbxl ../shared/data/ptbxl] [--mimic ../shared/data/mimic-iv-demo]
    .venv/bin/python benchmarks/paper_grid.py --quick ...      # smoke run, minutes per dataset

Methods: FedAvg zero-fill, PEPSY-style, CondI and its three ablations (no imputation, no W_cond,
neither). Each cell is one in-process federated simulation through ``run_simulation``, the code
``condi sim`` runs, from a config validated exactly as an experiment.yaml is: K = 6 silos, 3 per
round, Dirichlet(0.5) label skew over patients, simulated missingness (ps, pw) of ``--pattern``
on train, validation and test alike, with whole modalities dropped (``--p-drop``, default 0.5: an
affected lead is dropped whole with that probability, so the paper's "samples with at least one
missing modality" holds and eq. 4's routing acts; ``--p-drop 0`` is the older setting where every
lead stays partly observed). Every cell uses the same seed, so methods see the same
split, partition, masks, silo selections and batches.

Datasets: ``synthetic_ecg`` (``--ecg-records``, split by patient 70/15/15), ``ptbxl`` (the real
sample at ``--ptbxl``, split by strat_fold: train 1-6, validation 7, test 8), ``synthetic_psg``
(``--psg-nights`` nights of ``--psg-epochs`` 30 s epochs at ``--psg-fs`` Hz, split by subject),
``mimic`` (the MIMIC-IV demo at ``--mimic``, IHM-48, split by patient; AUROC and macro-F1).
ECG windows are 250 steps (random crops in training, the centre crop in evaluation); PSG epochs
and ICU stays are used whole.

Budget: the paper trains 70 rounds (30 for MIMIC-IV) of 3 local epochs at full size, far beyond
two CPU cores. The defaults are the ``small`` model, 1 + 1 local epochs (Phase A + B) and
``DEFAULT_ROUNDS`` rounds (ECG and PTB-XL 30, synthetic PSG 10, MIMIC-IV 30), synthetic PSG at
25 Hz (Sleep-EDF is 100 Hz; 25 Hz keeps delta, theta and alpha), so that one dataset's 24 cells
take at most about an hour on two cores. Measured per-cell costs give, on two idle cores: synthetic
ECG about 35 min, PTB-XL about 25 min, synthetic PSG about 45 min, MIMIC-IV demo about 10 min; on
a machine shared with other work (load 4-6 on 2 cores) allow up to twice that. The validation
split is evaluated only after the last round. Raise the flags where there is more compute.

Results go to benchmarks/results/paper_grid_<dataset>.json (``_quick`` with --quick) after every
cell; a rerun with the same settings skips finished cells (``--restart`` discards them). Per
dataset a markdown table like the paper's (accuracy for ECG / PSG; AUROC and macro-F1 for MIMIC,
in percent) and the issue's checks at ps = pw = 0.8: CondI >= FedAvg zero-fill + 3 points,
CondI >= PEPSY-style, and CondI's drop from (0.2, 0.2) to (0.8, 0.8) at most 2 points.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    MODEL_SIZES,
    REPO,
    RESULTS,
    Target,
    fmt,
    machine,
    markdown_table,
    read_json,
    targets_table,
    write_json,
)

from condi_models.configfile import parse_config
from condi_models.nn.config import Variant
from condi_models.nn.model import resolve_device
from condi_models.simulation import ExperimentConfig, ModelSpec, run_simulation

METHODS = (
    Variant.FEDAVG_ZERO_FILL,
    Variant.PEPSY,
    Variant.CONDI,
    Variant.NO_IMPUTATION,
    Variant.NO_WCOND,
    Variant.NO_IMPUTATION_NO_WCOND,
)
LABELS = {
    Variant.FEDAVG_ZERO_FILL: "FedAvg zero-fill",
    Variant.PEPSY: "PEPSY-style",
    Variant.CONDI: "CondI",
    Variant.NO_IMPUTATION: "CondI w/o imputation",
    Variant.NO_WCOND: "CondI w/o W_cond",
    Variant.NO_IMPUTATION_NO_WCOND: "CondI w/o both",
}
# The most severe and the mildest cell first, so an interrupted run can already be checked.
CELLS = ((0.8, 0.8), (0.2, 0.2), (0.2, 0.8), (0.8, 0.2))
DATASETS = ("synthetic_ecg", "ptbxl", "synthetic_psg", "mimic")
DEFAULT_ROUNDS = {"synthetic_ecg": 30, "ptbxl": 30, "synthetic_psg": 10, "mimic": 30}

QUICK = {
    "rounds": 1,
    "epochs_a": 1,
    "epochs_b": 1,
    "model_size": "tiny",
    "ecg_records": 120,
    "psg_nights": 24,
    "psg_epochs": 30,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dataset_section(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(data:, split:, training window) for one dataset."""
    if name == "synthetic_ecg":
        data = {"source": "synthetic_ecg", "n_records": args.ecg_records, "seed": args.seed}
        return data, {"scheme": "patient"}, args.window
    if name == "ptbxl":
        data = {"source": "ptbxl", "path": str(Path(args.ptbxl).resolve())}
        split = {"scheme": "folds", "train_folds": [1, 2, 3, 4, 5, 6], "val_folds": [7], "test_folds": [8]}
        return data, split, args.window
    if name == "synthetic_psg":
        data = {"source": "synthetic_psg", "n_nights": args.psg_nights, "epochs_per_night": args.psg_epochs,
                "fs": args.psg_fs, "seed": args.seed}
        return data, {"scheme": "patient"}, None
    if name == "mimic":
        data = {"source": "mimic", "path": str(Path(args.mimic).resolve()), "task": "ihm48"}
        return data, {"scheme": "patient"}, None
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")


def settings(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything a cell's result depends on; a stored grid is resumed only when these match."""
    data, split, window = dataset_section(name, args)
    return {
        "dataset": name,
        "data": data,
        "split": split,
        "window": window,
        "pattern": args.pattern,
        # Grids stored before modality drops were run without them and stay resumable with --p-drop 0.
        **({"p_drop": args.p_drop} if args.p_drop > 0 else {}),
        "rounds": rounds_for(name, args),
        "silos": 6,
        "silos_per_round": 3,
        "alpha": 0.5,
        "epochs_a": args.epochs_a,
        "epochs_b": args.epochs_b,
        "batch_size": args.batch_size,
        "model_size": args.model_size,
        "eval_samples": args.eval_samples,
        "eval_steps": args.eval_steps,
        "antithetic": not args.independent_draws,
        "seed": args.seed,
        "gaussian_prior": not args.no_prior,
        "prior_lags": args.prior_lags,
        "phase_b_input": args.phase_b_input,
    }


def rounds_for(name: str, args: argparse.Namespace) -> int:
    return args.rounds if args.rounds is not None else DEFAULT_ROUNDS[name]


def experiment(s: dict[str, Any], method: Variant, ps: float, pw: float, device: str) -> ExperimentConfig:
    """One cell as an experiment.yaml would state it, validated the same way."""
    raw = {
        "name": f"{s['dataset']}-{method.value}-ps{ps:g}-pw{pw:g}",
        "seed": s["seed"],
        "device": device,
        "data": s["data"],
        "split": s["split"],
        "missingness": {"ps": ps, "pw": pw, "pattern": s["pattern"], "p_drop": s.get("p_drop", 0.0),
                        "seed": s["seed"]},
        "federation": {
            "silos": s["silos"], "silos_per_round": s["silos_per_round"], "rounds": s["rounds"],
            "partition": "dirichlet", "alpha": s["alpha"], "eval_every": s["rounds"],
        },
        "model": {
            "variant": method.value, "gaussian_prior": s["gaussian_prior"], "prior_lags": s.get("prior_lags", 0),
            **MODEL_SIZES[s["model_size"]],
        },
        "training": {"epochs_a": s["epochs_a"], "epochs_b": s["epochs_b"], "batch_size": s["batch_size"],
                     "window": s["window"], "phase_b_input": s["phase_b_input"]},
        "evaluation": {"n_samples": s["eval_samples"], "steps": s["eval_steps"], "method": "ddim",
                       "antithetic": s.get("antithetic", False)},
    }
    return parse_config(raw, ExperimentConfig, f"paper_grid {raw['name']}")


def _drop_words(s: dict[str, Any]) -> str:
    p_drop = s.get("p_drop", 0.0)
    return f"with modality drops (p_drop {p_drop:g})" if p_drop > 0 else "without modality drops (p_drop 0)"


def cell_key(method: Variant, ps: float, pw: float) -> str:
    return f"{method.value}/ps{ps:g}/pw{pw:g}"


def run_cell(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Simulate one cell; the test figures of its final global model."""
    t0 = time.perf_counter()
    rounds = cfg.federation.rounds

    def progress(row: dict[str, Any]) -> None:
        log(f"    round {row['round']}/{rounds}: {row['seconds']:.0f} s")

    result = run_simulation(cfg, run_dir=run_dir, origin=cfg.name, progress=progress)
    test = result.final["test"]
    full = result.final["test_full"]["classification"]
    n = full["n_samples"]
    binary = full.get("binary") or {}
    last = result.rounds[-1]
    return {
        "accuracy": test["accuracy"],
        "accuracy_se": math.sqrt(test["accuracy"] * (1 - test["accuracy"]) / n) if n else None,
        "macro_f1": test["macro_f1"],
        "macro_auroc": test["macro_auroc"],
        "auroc": binary.get("auroc"),
        "positive_f1": binary.get("f1"),
        "imputation_mae": test.get("imputation_mae"),
        "imputation_rmse": test.get("imputation_rmse"),
        "n_test": n,
        "silo_sizes": result.final["silo_sizes"],
        "phase_a_loss": last["phase_a_loss"],
        "phase_b_loss": last["phase_b_loss"],
        "val": last.get("val"),
        "seconds": round(time.perf_counter() - t0, 1),
        "run_dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir),
    }


def primary(dataset: str, cell: dict[str, Any]) -> float | None:
    """The headline metric in percent: AUROC for MIMIC-IV, accuracy otherwise."""
    value = cell.get("auroc") if dataset == "mimic" else cell.get("accuracy")
    return None if value is None else 100.0 * value


def checks(dataset: str, cells: dict[str, Any], pattern: str) -> list[Target]:
    """The issue's checks on the primary metric, in percentage points."""

    def get(method: Variant, ps: float, pw: float) -> float | None:
        cell = cells.get(cell_key(method, ps, pw))
        return None if cell is None else primary(dataset, cell)

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    condi = get(Variant.CONDI, 0.8, 0.8)
    metric = "AUROC" if dataset == "mimic" else "accuracy"
    return [
        Target(f"{dataset} ps=pw=0.8: CondI - FedAvg zero-fill ({metric}, {pattern})",
               diff(condi, get(Variant.FEDAVG_ZERO_FILL, 0.8, 0.8)), 3.0, "min", " pts", False),
        Target(f"{dataset} ps=pw=0.8: CondI - PEPSY-style ({metric}, {pattern})",
               diff(condi, get(Variant.PEPSY, 0.8, 0.8)), 0.0, "min", " pts", False),
        Target(f"{dataset}: CondI drop from (0.2, 0.2) to (0.8, 0.8) ({metric}, {pattern})",
               diff(get(Variant.CONDI, 0.2, 0.2), condi), 2.0, "max", " pts", False),
    ]


def table(dataset: str, cells: dict[str, Any]) -> str:
    """The paper's layout: rows ps x method, columns pw (MIMIC: AUROC and F1 per pw; else accuracy and
    macro AUROC, which still ranks methods where every one predicts the majority class)."""
    mimic = dataset == "mimic"
    header = ["ps", "method"]
    for pw in (0.2, 0.8):
        header += [f"AUROC pw={pw}", f"F1 pw={pw}"] if mimic else [f"accuracy pw={pw}", f"macro AUROC pw={pw}"]
    rows = []
    for ps in (0.2, 0.8):
        for method in METHODS:
            row = [f"{ps}", LABELS[method]]
            for pw in (0.2, 0.8):
                cell = cells.get(cell_key(method, ps, pw))
                if mimic:
                    row += [fmt(primary(dataset, cell), 2) if cell else "–",
                            fmt(100 * cell["macro_f1"], 2) if cell else "–"]
                else:
                    row += [fmt(primary(dataset, cell), 2) if cell else "–",
                            fmt(100 * cell["macro_auroc"], 2) if cell and cell["macro_auroc"] is not None else "–"]
            rows.append(row)
    return markdown_table(header, rows)


def run_dataset(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every requested cell of one dataset, resuming from and writing to its JSON after each cell."""
    suffix = "_quick" if args.quick else ""
    out = Path(args.out_dir) / f"paper_grid_{name}{suffix}.json"
    s = settings(name, args)
    stored = {} if args.restart else read_json(out)
    if stored and stored.get("settings") != s:
        old = stored.get("settings") or {}
        changed = {k: (old.get(k), s.get(k)) for k in sorted(set(old) | set(s)) if old.get(k) != s.get(k)}
        raise SystemExit(
            f"{out} holds a grid with other settings (stored, now: {changed}); rerun with the same flags "
            f"or pass --restart to discard it"
        )
    results: dict[str, Any] = stored or {"dataset": name, "settings": s, "cells": {}}
    cells = results["cells"]
    todo = [(m, ps, pw) for ps, pw in args.cell_list for m in METHODS if m in args.method_list]
    for i, (method, ps, pw) in enumerate(todo, 1):
        key = cell_key(method, ps, pw)
        if key in cells:
            log(f"[{name} {i}/{len(todo)}] {key}: done earlier, skipped")
            continue
        log(f"[{name} {i}/{len(todo)}] {key}")
        cfg = experiment(s, method, ps, pw, args.device)
        run_dir = Path(args.runs) / f"{name}{suffix}" / cfg.name
        cells[key] = {**run_cell(cfg, run_dir), "device": str(device)}
        c = cells[key]
        log(f"  {key}: accuracy {c['accuracy']:.3f}, macro-F1 {c['macro_f1']:.3f}, "
            f"AUROC {fmt(c['auroc'] if c['auroc'] is not None else c['macro_auroc'])}, {c['seconds']:.0f} s")
        results["machine"] = machine(device)
        results["checks"] = [t.to_dict() for t in checks(name, cells, s["pattern"])]
        write_json(out, results)
    results["checks"] = [t.to_dict() for t in checks(name, cells, s["pattern"])]
    results["seconds_total"] = round(sum(c["seconds"] for c in cells.values()), 1)
    write_json(out, results)
    log(f"wrote {out}")
    return results


def prior_words(s: dict[str, Any]) -> str:
    """How a grid's settings describe the imputer's prior (grids stored before lags had none)."""
    if not s.get("gaussian_prior"):
        return "off"
    lags = s.get("prior_lags", 0)
    return f"on (+/- {lags} instants)" if lags else "on (same instant)"


def draws_words(s: dict[str, Any]) -> str:
    """How a grid's settings describe the imputation draws at evaluation (grids stored before had independent ones)."""
    n, steps = s.get("eval_samples", 1), s.get("eval_steps", 10)
    if not s.get("antithetic", False):
        return f"evaluated on {n} independent DDIM-{steps} draw{'s' if n > 1 else ''}"
    if n == 1:
        return f"evaluated on the DDIM-{steps} centre path"
    return f"evaluated on {n} antithetic DDIM-{steps} draws"


def report(name: str, results: dict[str, Any]) -> str:
    s = results["settings"]
    cells = results["cells"]
    n_test = sorted({c["n_test"] for c in cells.values()})
    ses = [c["accuracy_se"] for c in cells.values() if c.get("accuracy_se") is not None]
    metric = "AUROC and macro-F1" if name == "mimic" else "test accuracy"
    head = (
        f"**{name}** — {metric} (%) of the exported global model; {s['pattern']} missingness "
        f"{_drop_words(s)}, K = {s['silos']}, "
        f"{s['silos_per_round']} per round, Dirichlet {s['alpha']}, {s['rounds']} rounds of {s['epochs_a']} + "
        f"{s['epochs_b']} local epochs (Phase A + B), model size '{s['model_size']}', seed {s['seed']}; "
        f"imputer Gaussian prior {prior_words(s)}, classifier trained on "
        f"{s.get('phase_b_input', 'observed')} data; {draws_words(s)}; "
        f"test set of {'/'.join(str(n) for n in n_test)} samples"
        + (f" (accuracy standard error up to {100 * max(ses):.1f} points)" if ses else "")
        + f"; {results.get('seconds_total', 0) / 60:.0f} min in all."
    )
    return "\n\n".join([head, table(name, cells), targets_table(checks(name, cells, s["pattern"]))])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, tiny model and data")
    parser.add_argument("--datasets", help=f"comma-separated, from {','.join(DATASETS)} "
                        "(default: synthetic_ecg, synthetic_psg, and ptbxl / mimic when their paths are given)")
    parser.add_argument("--methods", default=",".join(m.value for m in METHODS), help="comma-separated variants")
    parser.add_argument("--cells", default=",".join(f"{ps}:{pw}" for ps, pw in CELLS),
                        help="comma-separated ps:pw pairs to run, in this order")
    parser.add_argument("--ptbxl", help="PTB-XL folder (ptbxl_database.csv, records100/)")
    parser.add_argument("--mimic", help="MIMIC-IV folder (hosp/, icu/)")
    parser.add_argument("--ecg-records", type=int, default=600, help="synthetic ECG records (one per patient)")
    parser.add_argument("--psg-nights", type=int, default=36, help="synthetic PSG nights (two per subject)")
    parser.add_argument("--psg-epochs", type=int, default=60, help="30 s epochs per synthetic night, from lights-off")
    parser.add_argument("--psg-fs", type=float, default=25.0, help="synthetic PSG sampling rate (Hz)")
    parser.add_argument("--window", type=int, default=250, help="ECG window (steps)")
    parser.add_argument("--pattern", choices=["points", "blocks"], default="points")
    parser.add_argument("--p-drop", type=float, default=0.5,
                        help="an affected modality is dropped whole with this probability (the paper's ps counts "
                             "samples missing a modality; 0 keeps every modality partly observed)")
    parser.add_argument("--rounds", type=int, help=f"federated rounds (default per dataset: {DEFAULT_ROUNDS})")
    parser.add_argument("--epochs-a", type=int, default=1, help="local Phase A epochs per round")
    parser.add_argument("--epochs-b", type=int, default=1, help="local Phase B epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--phase-b-input", choices=["observed", "imputed", "prior"], default="observed",
                        help="what the classifier trains on: the observed entries (the paper) or the imputed sample")
    parser.add_argument("--no-prior", action="store_true",
                        help="diffusion imputers without their Gaussian prior (the imputer before it existed)")
    parser.add_argument("--prior-lags", type=int, default=ModelSpec().prior_lags,
                        help="neighbouring instants on each side the prior conditions on (0: the same instant only)")
    parser.add_argument("--eval-samples", type=int, default=1, help="imputation draws per window at evaluation")
    parser.add_argument("--eval-steps", type=int, default=10, help="DDIM steps at evaluation")
    parser.add_argument("--independent-draws", action="store_true",
                        help="independent imputation draws at evaluation (default: antithetic, one draw = centre path)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="discard stored cells of these datasets")
    parser.add_argument("--report-only", action="store_true", help="print the tables of the stored cells, run nothing")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the paper_grid_<dataset>.json files go")
    parser.add_argument("--runs", default=str(REPO / "runs" / "paper_grid"), help="simulation run directories")
    quick, _ = parser.parse_known_args(argv)
    if quick.quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.datasets is None:
        chosen = ["synthetic_ecg", "synthetic_psg"]
        chosen[1:1] = ["ptbxl"] if args.ptbxl else []
        chosen += ["mimic"] if args.mimic else []
    else:
        chosen = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(chosen) - set(DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; expected some of {list(DATASETS)}")
    if "ptbxl" in chosen and not args.ptbxl:
        parser.error("dataset ptbxl needs --ptbxl PATH")
    if "mimic" in chosen and not args.mimic:
        parser.error("dataset mimic needs --mimic PATH")
    args.dataset_list = chosen
    try:
        args.cell_list = [tuple(float(v) for v in c.split(":")) for c in args.cells.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--cells: expected ps:pw pairs such as 0.8:0.8, got {args.cells!r}")
    if any(len(c) != 2 or not all(0.0 <= v <= 1.0 for v in c) for c in args.cell_list):
        parser.error(f"--cells: expected ps:pw pairs of fractions in [0, 1], got {args.cells!r}")
    try:
        args.method_list = [Variant(m.strip()) for m in args.methods.split(",") if m.strip()]
    except ValueError as err:
        parser.error(f"--methods: {err}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for name in args.dataset_list:
        if args.report_only:
            stored = read_json(Path(args.out_dir) / f"paper_grid_{name}{'_quick' if args.quick else ''}.json")
            if not stored:
                log(f"{name}: no stored grid")
                continue
            stored.setdefault("seconds_total", round(sum(c["seconds"] for c in stored["cells"].values()), 1))
            print(report(name, stored) + "\n", flush=True)
            continue
        results = run_dataset(name, args, device)
        print(report(name, results) + "\n", flush=True)


if __name__ == "__main__":
    main()
