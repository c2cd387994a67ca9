"""Cross-validated comparison of the methods that matter, on the shared PTB-XL sample or the
MIMIC-IV demo (issue 12).

Run from the repository root:
    .venv/bin/python benchmarks/cv_grid.py [--dataset ptbxl|mimic] [--ptbxl ../shared/data/ptbxl]
        [--mimic ../shared/data/mimic-iv-demo] [--seeds 0,1] [--splits 0,1,2,3]
        [--methods central,condi,fedavg_zero_fill,pepsy] [--cells 0.8,0.2] [--rounds 30] [--restart]

Four cross-validation splits over eight folds: PTB-XL's ``strat_fold``, or for the MIMIC-IV demo
(IHM-48; it has no folds) eight patient folds made once with a fixed seed. Test folds {1,2},
{3,4}, {5,6}, {7,8}, each with the next pair as validation ({3,4}, {5,6}, {7,8}, {1,2}) and the
other four folds for training.
Every run is one ``run_simulation`` (the code ``condi sim`` runs) with the library's training
defaults: 6 silos, 3 per round, Dirichlet(0.5) label skew, the ``small`` model, record-level
evaluation (the mean class probabilities of a record's four 250-step windows), and the round
with the best validation macro AUROC exported; the test folds are read once, on that model.

Methods: ``central`` (one silo holding all training records, complete data: the ceiling),
``condi``, ``fedavg_zero_fill`` and ``pepsy`` (PEPSY-style) at ps = pw in ``--cells`` with
modality drops (``--p-drop``, default 0.5: an affected lead is dropped whole with that
probability, else loses pw of its time steps as scattered points).

Results go to benchmarks/results/cv_<dataset>.json after every run (a rerun with the same settings
resumes: only missing runs are computed). The summary gives, per method and cell, the mean and
standard deviation over the runs of record-level accuracy, macro AUROC, macro-F1 and per-class
recall, and a paired bootstrap 95 % CI of each method's difference to CondI in accuracy and
macro AUROC (records resampled within each run, the same draws for both methods).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from _common import MODEL_SIZES, RESULTS, fmt, machine, markdown_table, read_json, write_json

from condi_models.configfile import parse_config
from condi_models.metrics import classification_metrics
from condi_models.nn.model import resolve_device
from condi_models.simulation import ExperimentConfig, run_simulation

# (test folds, validation folds) of each cross-validation split.
CV_SPLITS = (((1, 2), (3, 4)), ((3, 4), (5, 6)), ((5, 6), (7, 8)), ((7, 8), (1, 2)))
METHODS = ("central", "condi", "fedavg_zero_fill", "pepsy")
LABELS = {"central": "central (complete data)", "condi": "CondI", "fedavg_zero_fill": "FedAvg zero-fill",
          "pepsy": "PEPSY-style"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run's result depends on; a stored grid is resumed only when these match."""
    if args.dataset == "ptbxl":
        data: dict[str, Any] = {"source": "ptbxl", "path": str(Path(args.ptbxl).resolve())}
        split: dict[str, Any] = {"scheme": "folds"}
    else:
        data = {"source": "mimic", "path": str(Path(args.mimic).resolve()), "task": "ihm48"}
        split = {"scheme": "patient_folds", "n_folds": 8, "fold_seed": 0}
    return {
        "data": data,
        "split": split,
        "rounds": args.rounds,
        "eval_every": args.eval_every,
        "p_drop": args.p_drop,
        "pattern": args.pattern,
        "model_size": args.model_size,
        "training": args.training,
        "eval_steps": args.eval_steps,
    }


def experiment(s: dict[str, Any], method: str, cell: float, split: int, seed: int, device: str) -> ExperimentConfig:
    """One run as an experiment.yaml would state it, validated the same way."""
    test, val = CV_SPLITS[split]
    train = [f for f in range(1, 9) if f not in (*test, *val)]
    central = method == "central"
    raw = {
        "name": f"cv{split}-s{seed}-{method}-{cell:g}",
        "seed": seed,
        "device": device,
        "data": s["data"],
        "split": {**s["split"], "train_folds": train, "val_folds": list(val), "test_folds": list(test)},
        "missingness": None if central else {
            "ps": cell, "pw": cell, "p_drop": s["p_drop"], "pattern": s["pattern"], "seed": seed,
        },
        "federation": {
            "silos": 1 if central else 6, "silos_per_round": 1 if central else 3, "rounds": s["rounds"],
            "partition": "dirichlet", "alpha": 0.5, "eval_every": s["eval_every"],
        },
        "model": {"variant": "condi" if central else method, **MODEL_SIZES[s["model_size"]]},
        "training": dict(s["training"]),
        "evaluation": {"n_samples": 1, "steps": s["eval_steps"], "method": "ddim"},
    }
    return parse_config(raw, ExperimentConfig, f"cv_grid {raw['name']}")


def run_key(method: str, cell: float, split: int, seed: int) -> str:
    return f"{method}/{cell:g}/cv{split}/seed{seed}"


def run_one(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = run_simulation(cfg, run_dir=run_dir, origin=cfg.name)
    test = result.final["test"]
    return {
        "accuracy": test["accuracy"],
        "macro_auroc": test["macro_auroc"],
        "macro_f1": test["macro_f1"],
        "recall": test["recall"],
        "window_accuracy": test.get("window_accuracy"),
        "window_macro_auroc": test.get("window_macro_auroc"),
        "selected_round": result.final["selected_round"],
        "val_auroc_curve": [(r["round"], r["val"]["macro_auroc"]) for r in result.rounds if "val" in r],
        "classes": list(test["recall"]),
        "labels": result.test_labels.tolist(),
        "probs": np.round(result.test_probs, 5).tolist(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes with positives and negatives (Mann-Whitney ranks)."""
    scores = []
    for c in range(p.shape[1]):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = np.argsort(np.argsort(p[:, c], kind="stable"), kind="stable") + 1.0
        scores.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(scores)) if scores else float("nan")


def paired_bootstrap(
    runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], draws: int, seed: int
) -> dict[str, list[float]]:
    """95 % CIs of mean(a) - mean(b) over paired runs, in accuracy and macro AUROC points (x 100).

    Each draw resamples every run's test records with replacement (the same indices for a and b,
    which saw the same records) and averages the per-run differences.
    """
    rng = np.random.default_rng(seed)
    acc, auc = [], []
    data = []
    for a, b in zip(runs_a, runs_b, strict=True):
        y = np.asarray(a["labels"])
        if y.tolist() != b["labels"]:
            raise ValueError("paired runs must score the same test records in the same order")
        data.append((y, np.asarray(a["probs"]), np.asarray(b["probs"])))
    for _ in range(draws):
        d_acc, d_auc = [], []
        for y, pa, pb in data:
            idx = rng.integers(0, len(y), len(y))
            yy = y[idx]
            d_acc.append(np.mean(pa[idx].argmax(1) == yy) - np.mean(pb[idx].argmax(1) == yy))
            d_auc.append(_macro_auroc(yy, pa[idx]) - _macro_auroc(yy, pb[idx]))
        acc.append(np.mean(d_acc))
        auc.append(np.nanmean(d_auc))
    return {
        "accuracy_ci": [100 * float(np.percentile(acc, 2.5)), 100 * float(np.percentile(acc, 97.5))],
        "macro_auroc_ci": [100 * float(np.percentile(auc, 2.5)), 100 * float(np.percentile(auc, 97.5))],
    }


def summarize(runs: dict[str, Any], cells: list[float], classes: tuple[str, ...]) -> dict[str, Any]:
    """Mean and sd per (method, cell) and the paired bootstrap CI of each difference to CondI."""
    out: dict[str, Any] = {}
    for method in METHODS:
        for cell in [0.0] if method == "central" else cells:
            keys = sorted(k for k in runs if k.startswith(f"{method}/{cell:g}/"))
            if not keys:
                continue
            rows = [runs[k] for k in keys]
            pooled = classification_metrics(
                np.concatenate([r["labels"] for r in rows]), np.concatenate([r["probs"] for r in rows]), classes
            )
            entry = {
                "runs": len(rows),
                **{f"{m}_mean": float(np.mean([r[m] for r in rows])) for m in ("accuracy", "macro_auroc", "macro_f1")},
                **{f"{m}_sd": float(np.std([r[m] for r in rows], ddof=1)) if len(rows) > 1 else None
                   for m in ("accuracy", "macro_auroc", "macro_f1")},
                "recall": {c.name: c.recall for c in pooled.per_class},
                "confusion_matrix": pooled.confusion_matrix,
                "single_class": any(sum(1 for v in r["recall"].values() if v > 0) <= 1 for r in rows),
            }
            out[f"{method}/{cell:g}"] = entry
    for key, entry in out.items():
        method, cell = key.split("/")
        if method == "condi":
            continue
        # The central run is the ceiling: CondI at the most severe cell is set against it.
        condi_cell = f"{cells[0]:g}" if method == "central" else cell
        suffixes = {k.split("/", 2)[2] for k in runs if k.startswith(f"{method}/{cell}/")}
        suffixes &= {k.split("/", 2)[2] for k in runs if k.startswith(f"condi/{condi_cell}/")}
        pairs = sorted(suffixes)
        if pairs:
            entry["condi_minus_this"] = paired_bootstrap(
                [runs[f"condi/{condi_cell}/{p}"] for p in pairs], [runs[f"{method}/{cell}/{p}"] for p in pairs], 1000, 0
            )
            entry["condi_minus_this"].update(pairs=len(pairs), condi_cell=condi_cell)
    return out


def table(summary: dict[str, Any]) -> str:
    classes = "/".join(next(iter(summary.values()))["recall"]) if summary else ""
    header = ["method", "ps = pw", "runs", "accuracy %", "macro AUROC", "macro-F1", f"recall {classes}",
              "CondI - this, accuracy (95 % CI)", "CondI - this, AUROC x 100 (95 % CI)", "pairs"]
    rows = []
    for key, e in summary.items():
        method, cell = key.split("/")

        def pm(m: str, scale: float, digits: int, e: dict[str, Any] = e) -> str:
            sd = e[f"{m}_sd"]
            return fmt(scale * e[f"{m}_mean"], digits) + ("" if sd is None else f" ± {fmt(scale * sd, digits)}")

        diff = e.get("condi_minus_this")
        rows.append([
            LABELS[method], "complete" if method == "central" else cell, str(e["runs"]),
            pm("accuracy", 100, 1), pm("macro_auroc", 1, 3), pm("macro_f1", 1, 3),
            "/".join(fmt(v, 2) for v in e["recall"].values()),
            "–" if diff is None else f"[{diff['accuracy_ci'][0]:+.1f}, {diff['accuracy_ci'][1]:+.1f}]",
            "–" if diff is None else f"[{diff['macro_auroc_ci'][0]:+.1f}, {diff['macro_auroc_ci'][1]:+.1f}]",
            "–" if diff is None else f"{diff['pairs']} (CondI at {diff['condi_cell']})",
        ])
    return markdown_table(header, rows)


def training_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a ``training:`` mapping; values are read as YAML scalars."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--training {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ptbxl", "mimic"], default="ptbxl")
    p.add_argument("--ptbxl", default="../shared/data/ptbxl")
    p.add_argument("--mimic", default="../shared/data/mimic-iv-demo")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--splits", default="0,1,2,3", help="which of the four CV splits to run")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cells", default="0.8,0.2", help="ps = pw values")
    p.add_argument("--p-drop", type=float, default=0.5)
    p.add_argument("--pattern", choices=["points", "blocks"], default="points")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="results JSON (default benchmarks/results/cv_<dataset>.json)")
    p.add_argument("--runs-dir", help="simulation run directories (default runs/cv_<dataset>)")
    p.add_argument("--restart", action="store_true", help="discard stored runs")
    p.add_argument("--report-only", action="store_true", help="summarize the stored runs, run nothing")
    p.add_argument(
        "--training", action="append", default=[], metavar="KEY=VALUE",
        help="override one training default (repeatable; a YAML value, e.g. weight_decay=0.05); "
        "the overrides are part of the stored settings, so give such a grid its own --out",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    args.training = training_overrides(args.training)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    s = settings(args)
    out = Path(args.out or RESULTS / f"cv_{args.dataset}.json")
    runs_dir = Path(args.runs_dir or f"runs/cv_{args.dataset}")
    stored = {} if args.restart else read_json(out)
    if stored and stored.get("settings") != s:
        raise SystemExit(f"{out} holds runs with other settings ({stored.get('settings')}); pass --restart")
    results = stored or {"settings": s, "runs": {}}
    runs = results["runs"]
    cells = [float(c) for c in args.cells.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: {unknown} not in {list(METHODS)}")
    # The first cell's comparison over every split first, so a grid cut short can already be read.
    todo = []
    for seed in (int(x) for x in args.seeds.split(",")):
        for i, cell in enumerate(cells):
            for split in (int(x) for x in args.splits.split(",")):
                for method in methods:
                    if method == "central" and i == 0:
                        todo.append((method, 0.0, split, seed))
                    elif method != "central":
                        todo.append((method, cell, split, seed))
    for i, (method, cell, split, seed) in enumerate(todo, 1):
        key = run_key(method, cell, split, seed)
        if key in runs or args.report_only:
            continue
        cfg = experiment(s, method, cell, split, seed, args.device)
        log(f"[{i}/{len(todo)}] {key}")
        runs[key] = run_one(cfg, runs_dir / cfg.name)
        r = runs[key]
        log(f"  accuracy {r['accuracy']:.3f}, macro AUROC {fmt(r['macro_auroc'])}, round {r['selected_round']}, "
            f"{r['seconds']:.0f} s")
        results["machine"] = machine(device)
        write_json(out, results)
    classes = next(iter(runs.values()))["classes"] if runs else []
    results["summary"] = summarize(runs, cells, tuple(classes))
    write_json(out, results)
    print(table(results["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
