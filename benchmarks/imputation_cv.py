"""Imputation by cross-validation over folds, on the shared PTB-XL sample and the MIMIC-IV demo (issue 15).

Run from the repository root:
    .venv/bin/python benchmarks/imputation_cv.py --ptbxl ../shared/data/ptbxl [--mimic ../shared/data/mimic-iv-demo]
        [--splits 0,1,2,3] [--patterns points,blocks,drop] [--pypots] [--restart] [--out FILE]
    .venv/bin/python benchmarks/imputation_cv.py --report-only [--out FILE]   # tables from a stored run
    .venv/bin/python benchmarks/imputation_cv.py --merge OTHER.json... [--out FILE]  # splits run apart, into FILE

The four cross-validation splits of ``benchmarks/cv_grid.py`` (issue 6): test folds {1,2}, {3,4},
{5,6}, {7,8}, each with the next pair as validation, and the other four folds for training. PTB-XL
uses its ``strat_fold``; the MIMIC-IV demo (IHM-48, hourly, natural missingness) eight patient
folds made once with a fixed seed. The validation pair is not read here: nothing is selected on
it, and every setting is fixed before the run (the beat template's settings were chosen on
validation folds 3-4 of split 0; ``condi_models/data/beat_template.py``).

Each split is one ``benchmarks/imputation.py`` imputation table (``imputation_table``): CondI
(and with ``--with-csdi`` the CSDI-style imputer) trained by Phase A on the training folds at
ps = pw = 0.8 of one pattern, the simple baselines (mean, linear interpolation, cross-channel
ridge) fitted there, and with ``--pypots`` SAITS (and with ``--brits`` BRITS) trained centrally on
the same records; all scored on the same centre windows and hidden entries of the test folds.
Patterns: ``points`` and ``blocks`` (80 % of an affected lead's time steps, scattered or in up to
three gaps) and ``drop`` (an affected lead removed whole). On MIMIC the hidden entries are those
the simulation removed from what the stay had observed; its natural gaps stay missing and are
never scored.

The summary gives, per dataset, pattern and method, the mean and standard deviation over splits
of MAE, RMSE, CRPS (independent draws, fair estimator) and the coverage of the 50 % and 90 %
bands, and CondI's MAE over the best simple baseline's and over SAITS's, per split. Results go
to ``--out`` (default benchmarks/results/imputation_cv.json) after every split; a rerun with the
same settings resumes, computing only the missing splits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imputation as bench
import numpy as np
import torch
from _common import RESULTS, Target, fmt, machine, markdown_table, read_json, targets_table, write_json
from cv_grid import CV_SPLITS

from condi_models.data.dataset import ClinicalDataset
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.partition import patient_folds
from condi_models.nn.config import Variant
from condi_models.nn.model import resolve_device
from condi_models.simulation import ModelSpec

# The bounds on CondI's MAE over the best simple baseline's, per pattern (PTB-XL).
BOUNDS = {"points": 0.7, "blocks": 0.8}
MIMIC_FOLD_SEED = 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(name: str, path: str) -> tuple[ClinicalDataset, np.ndarray]:
    """The dataset and a fold number 1..8 per record."""
    if name == "ptbxl":
        from condi_models.data.ptbxl import load_ptbxl

        ds = load_ptbxl(Path(path))
        if ds.folds is None:
            raise ValueError(f"{path}: PTB-XL records carry no strat_fold")
        return ds, ds.folds
    from condi_models.data.mimic import load_mimic

    ds = load_mimic(Path(path), task="ihm48")
    return ds, patient_folds(ds.patient_ids, 8, MIMIC_FOLD_SEED)


def split_sets(folds: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, test rows) of one cross-validation split; the validation pair is left out."""
    test, val = CV_SPLITS[split]
    train = [f for f in range(1, 9) if f not in (*test, *val)]
    return np.flatnonzero(np.isin(folds, train)), np.flatnonzero(np.isin(folds, test))


def design_parser(description: str, out_name: str) -> argparse.ArgumentParser:
    """The options of a check on split 0's validation folds of PTB-XL or the MIMIC-IV demo (``band_draws.py``, ...)."""
    p = argparse.ArgumentParser(description=description)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--ptbxl", help="PTB-XL folder (ptbxl_database.csv, records100/)")
    data.add_argument("--mimic", help="MIMIC-IV demo folder (hosp/, icu/)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / out_name))
    p.add_argument("--tokens-per-channel", type=int, default=ModelSpec().tokens_per_channel,
                   help="time patches per channel of the window (the patch is window / this, rounded up)")
    # What else benchmarks/imputation.py's model builder reads: the default model and prior.
    p.set_defaults(model_size="default", no_prior=False, prior_lags=0)
    return p


@dataclass(frozen=True)
class ValidationSplit:
    """A dataset's training and validation records of split 0, and the normalizer fitted on the training ones."""

    train: ClinicalDataset
    val: ClinicalDataset
    norm: ChannelNormalizer
    train_folds: list[int]
    val_folds: list[int]


def validation_setup(args: argparse.Namespace) -> tuple[torch.device, ValidationSplit]:
    """The device and torch threads of a ``design_parser`` check, and its data."""
    torch.set_num_threads(args.threads)
    ds, folds = load("ptbxl", args.ptbxl) if args.ptbxl else load("mimic", args.mimic)
    train_rows, _ = split_sets(folds, 0)
    val = list(CV_SPLITS[0][1])
    train = ds.subset(train_rows)
    train_folds = sorted(set(folds[train_rows].tolist()))
    split = ValidationSplit(train, ds.subset(np.flatnonzero(np.isin(folds, val))),
                            ChannelNormalizer.fit(train.x, train.observed), train_folds, val)
    return resolve_device(args.device), split


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a stored split's rows depend on; a stored run is resumed only when these match."""
    return {
        "patterns": args.pattern_list,
        "pypots": args.pypots,
        "brits": args.brits,
        "with_csdi": args.with_csdi,
        "epochs_a": args.epochs_a,
        "model_size": args.model_size,
        # Added to the settings only where it differs, so runs stored before it was an option still resume.
        **({"tokens_per_channel": args.tokens_per_channel}
           if args.tokens_per_channel != ModelSpec().tokens_per_channel else {}),
        "samples": args.samples,
        "crps_samples": args.crps_samples,
        "steps": args.steps,
        "seed": args.seed,
        "paths": {k: str(Path(v).resolve()) for k, v in (("ptbxl", args.ptbxl), ("mimic", args.mimic)) if v},
    }


def run_split(name: str, ds: ClinicalDataset, folds: np.ndarray, split: int, args: argparse.Namespace,
              device: torch.device) -> dict[str, Any]:
    """One split's imputation table (``benchmarks/imputation.py``) on the dataset's own window."""
    train_rows, test_rows = split_sets(folds, split)
    local = argparse.Namespace(**vars(args))
    # PTB-XL is cut into the model's 2.5 s windows; a MIMIC stay (48 hourly steps) is one window.
    local.window = min(args.window, ds.info.length)
    t0 = time.perf_counter()
    section, _ = bench.imputation_table(
        f"{name} cv{split}", ds.subset(train_rows), ds.subset(test_rows), [bench.TRAIN_PW], local, device,
        patterns=tuple(args.pattern_list),
        variants=bench.MODELS if args.with_csdi else (Variant.CONDI,),
        pypots_methods=("saits", "brits") if args.brits else ("saits",),
    )
    section["seconds"] = round(time.perf_counter() - t0, 1)
    section["window"] = local.window
    return section


# ---- summary ------------------------------------------------------------------------------------


def by_method(section: dict[str, Any], pattern: str) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in section["rows"] if r["pattern"] == pattern}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(name: str, splits: dict[str, dict[str, Any]], patterns: list[str]) -> dict[str, Any]:
    """Per pattern: each method's metrics over splits, and CondI's ratios to the best simple baseline and SAITS."""
    out: dict[str, Any] = {}
    for pattern in patterns:
        tables = [by_method(s, pattern) for s in splits.values()]
        tables = [t for t in tables if t]
        if not tables:
            continue
        methods = [m for m in tables[0] if all(m in t for t in tables)]
        metrics = {}
        for m in methods:
            metrics[m] = {}
            for key in ("mae", "rmse", "crps", "coverage_50", "coverage_90"):
                vals = [t[m][key] for t in tables if t[m].get(key) is not None]
                if vals:
                    metrics[m][key] = mean_sd(vals)
        condi = Variant.CONDI.value
        best = [min(t[b]["mae"] for b in bench.SIMPLE_BASELINES if b in t) for t in tables]
        ratios = [t[condi]["mae"] / b for t, b in zip(tables, best, strict=True)] if condi in methods else []
        saits = [t[condi]["mae"] / t["SAITS (PyPOTS)"]["mae"] for t in tables if "SAITS (PyPOTS)" in t and condi in t]
        out[pattern] = {
            "splits": len(tables),
            "metrics": metrics,
            "condi_over_best_simple": ratios,
            "best_simple": [min((t[b]["mae"], b) for b in bench.SIMPLE_BASELINES if b in t)[1] for t in tables],
            "condi_over_saits": saits,
            # fit_gate's choice per split (None: a split stored before the gate was recorded).
            "network_gate": [s.get("training", {}).get(f"{condi}/{pattern}", {}).get("network_gate")
                             for s in splits.values() if by_method(s, pattern)],
        }
    return out


def targets(results: dict[str, Any]) -> list[Target]:
    """Issue 15's PTB-XL targets, on the mean over splits (ratios: the mean of the per-split ratios)."""
    out: list[Target] = []
    s = results.get("summary", {}).get("ptbxl", {})
    for pattern, bound in BOUNDS.items():
        p = s.get(pattern)
        if not p:
            continue
        ratios = p["condi_over_best_simple"]
        out.append(Target(f"PTB-XL {pattern}: CondI MAE / best simple baseline (mean over splits)",
                          statistics.fmean(ratios) if ratios else None, bound, "max"))
        saits = p["condi_over_saits"]
        out.append(Target(f"PTB-XL {pattern}: CondI MAE / SAITS MAE (mean over splits)",
                          statistics.fmean(saits) if saits else None, 1.0, "max"))
        cov = p["metrics"].get(Variant.CONDI.value, {}).get("coverage_90")
        for bound_c, kind in ((0.85, "min"), (0.95, "max")):
            out.append(Target(f"PTB-XL {pattern}: CondI 90 % band coverage (mean over splits)",
                              cov[0] if cov else None, bound_c, kind, show_ratio=False))
    return out


def report(results: dict[str, Any]) -> str:
    """Markdown: one table per dataset (mean +/- sd over splits), CondI's ratios per split, the targets."""
    parts = []
    for name, title in (("ptbxl", "PTB-XL sample"), ("mimic", "MIMIC-IV demo (IHM-48)")):
        s = results.get("summary", {}).get(name)
        if not s:
            continue
        rows = []
        for pattern, p in s.items():
            for method, m in p["metrics"].items():
                def cell(key: str, m: dict[str, Any] = m) -> str:
                    return f"{fmt(m[key][0], 3)} +/- {fmt(m[key][1], 3)}" if key in m else ""
                rows.append([pattern, method, cell("mae"), cell("rmse"), cell("crps"), cell("coverage_50"),
                             cell("coverage_90")])
        parts.append(f"**{title}** — mean +/- sd over {max(p['splits'] for p in s.values())} CV splits; "
                     "hidden entries at ps = pw = 0.8, standardized units; CondI: median of 5 antithetic "
                     "DDIM-10 draws, CRPS and bands from 5 independent draws.")
        parts.append(markdown_table(["pattern", "method", "MAE", "RMSE", "CRPS", "50 % band cov.", "90 % band cov."],
                                    rows))
        ratio_rows = [[pattern, ", ".join(fmt(r, 2) for r in p["condi_over_best_simple"]),
                       ", ".join(p["best_simple"]), ", ".join(fmt(r, 2) for r in p["condi_over_saits"]),
                       ", ".join(fmt(g, 1) for g in p.get("network_gate", []))]
                      for pattern, p in s.items()]
        parts.append(markdown_table(["pattern", "CondI / best simple, per split", "best simple",
                                     "CondI / SAITS, per split", "network gate, per split"], ratio_rows))
    t = targets(results)
    if t:
        parts.append(targets_table(t))
    return "\n\n".join(parts)


def merge(results: dict[str, Any], others: list[dict[str, Any]], names: list[str]) -> None:
    """Add the splits of ``others`` (same settings) to ``results`` and recompute its summary and targets.

    Splits run in separate processes (two cores, one split each) end up in one file this way; a
    split both hold keeps ``results``'s.
    """
    for other, name in zip(others, names, strict=True):
        if other.get("settings") != results.get("settings"):
            raise SystemExit(f"--merge {name}: its settings differ from the stored run's; not merged")
        for dataset, splits in other.get("splits", {}).items():
            mine = results.setdefault("splits", {}).setdefault(dataset, {})
            for key, section in splits.items():
                mine.setdefault(key, section)
    results["merged_from"] = names
    for dataset, splits in results.get("splits", {}).items():
        results.setdefault("summary", {})[dataset] = summary(dataset, splits, results["settings"]["patterns"])
    results["targets"] = [t.to_dict() for t in targets(results)]


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptbxl", help="PTB-XL folder (ptbxl_database.csv, records100/)")
    parser.add_argument("--mimic", help="MIMIC-IV demo folder (hosp/, icu/)")
    parser.add_argument("--splits", default="0,1,2,3", help="cross-validation splits to run (default all four)")
    parser.add_argument("--patterns", default="points,blocks,drop", help="missingness patterns (default all three)")
    parser.add_argument("--restart", action="store_true", help="recompute splits already stored")
    parser.add_argument("--with-csdi", action="store_true",
                        help="also train the CSDI-style imputer (benchmarks/imputation.py has its figures)")
    parser.add_argument("--brits", action="store_true", help="with --pypots, BRITS beside SAITS (slower)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --out and stop")
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="add the splits of these result files (run with the same settings) to --out, then report")
    parser.add_argument("--out", type=Path, default=RESULTS / "imputation_cv.json")
    args, rest = parser.parse_known_args(argv)
    # Everything else (epochs, model size, draws, --pypots, threads, seed) is imputation.py's.
    shared = bench.parse_args(rest)
    for key, value in vars(shared).items():
        if key not in ("ptbxl", "out"):
            setattr(args, key, value)
    args.pattern_list = [p for p in args.patterns.split(",") if p]
    unknown = sorted(set(args.pattern_list) - set(bench.ALL_PATTERNS))
    if unknown:
        parser.error(f"--patterns: unknown {unknown}; expected some of {list(bench.ALL_PATTERNS)}")
    args.split_list = [int(s) for s in args.splits.split(",") if s]
    if not (args.report_only or args.merge) and not (args.ptbxl or args.mimic):
        parser.error("give --ptbxl and/or --mimic (or --report-only, --merge)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stored = read_json(args.out) if args.out.exists() else {}
    if args.report_only:
        print(report(stored))
        return
    if args.merge:
        merge(stored, [read_json(f) for f in args.merge], [str(f) for f in args.merge])
        write_json(args.out, stored)
        print(report(stored))
        return
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    s = settings(args)
    results = stored if stored.get("settings") == s and not args.restart else {}
    results.update(settings=s, machine=machine(device), command=" ".join(sys.argv))
    results.setdefault("splits", {})
    for name, path in (("ptbxl", args.ptbxl), ("mimic", args.mimic)):
        if not path:
            continue
        ds, folds = load(name, path)
        done = results["splits"].setdefault(name, {})
        for split in args.split_list:
            if str(split) in done:
                log(f"{name} cv{split}: stored, skipped")
                continue
            done[str(split)] = run_split(name, ds, folds, split, args, device)
            results.setdefault("summary", {})[name] = summary(name, done, args.pattern_list)
            write_json(args.out, results)
            log(f"{name} cv{split}: done in {done[str(split)]['seconds']:.0f} s")
        results.setdefault("summary", {})[name] = summary(name, done, args.pattern_list)
    results["targets"] = [t.to_dict() for t in targets(results)]
    write_json(args.out, results)
    print(report(results))


if __name__ == "__main__":
    main()
