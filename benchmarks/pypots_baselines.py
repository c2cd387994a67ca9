"""PyPOTS SAITS and BRITS as external imputation baselines (issue 15).

Optional: needs the ``bench`` extra (``pip install -e '.[bench]'``, PyPOTS), which nothing at run
time or in ``make test`` requires. ``benchmarks/imputation.py --pypots`` adds their rows to its
tables; this module alone trains one of them centrally and imputes windows:

    fitted = fit("saits", train.x, train.observed, window=250, seed=0)
    x_hat = fitted.impute(win.x, win.observed)          # (N, F, L), observed entries unchanged

Arrays are the benchmark's own: (N, F, L), standardized with the training split's statistics,
0.0 and ``observed`` False where an entry is not seen. PyPOTS reads (N, L, F) with NaN there.
Training reads only the training split's observed entries (after the simulated missingness, as
CondI does): each training record is cut into non-overlapping windows of the evaluation window's
length (CondI draws a random crop per record and epoch instead), and PyPOTS's own masked
imputation task hides a further 20 % of them as its training target. The test windows' hidden
entries are NaN in what the model gets, and are scored by the caller.

Hyperparameters (``SETTINGS``), sized for 12 leads x 250 steps on two CPU cores and a training
budget near CondI's (25 Phase A epochs of 264 random crops, batch 32: about 135 s per model and
pattern on the PTB-XL sample, two quiet cores):

- SAITS: 2 layers (PyPOTS's n_layers, in each of its two DMSA blocks), d_model 64, 4 heads of
  d_k = d_v = 16, d_ffn 128, dropout 0.1; Adam lr 1e-3, batch 32, 16 epochs.
- BRITS: rnn_hidden_size 64; Adam lr 1e-3, batch 64, 16 epochs.

Both use PyPOTS's default losses (MAE on the artificially masked and on the observed entries) and,
without a validation set, keep the epoch of lowest training loss. The sizes are those of PyPOTS's
examples scaled down until a SAITS epoch over the PTB-XL sample's 1056 training windows takes
about 10 s on two quiet cores (d_model 128 took three times as long). BRITS's recurrence runs
step by step over the 250 steps, so its time grows with the number of batches more than with
their size; it takes batches of 64. The epochs were chosen with ``--validate`` (train on strat_folds 1-5, score the
held-out fold 6 of the benchmark's training folds, hidden as the test windows are; never the test
folds 7-8): SAITS's validation MSE on the hidden entries (points) still fell at epoch 16 (0.50
after one epoch, 0.20 after 8, 0.147 after 16), and 16 epochs is where its time reaches CondI's.
BRITS got the same epoch count without a validation run of its own (the machine was shared and
slow at the time). The curve: ``benchmarks/results/imputation_pypots.json``, section
``validation`` (``--validate`` logs every epoch's training loss and validation MSE).

Seeded: the same seed gives the same weights and imputations on the same machine and thread count
(the global torch, numpy and random states are set for the fit and restored after it).
``torch.set_num_threads`` is left as the caller set it.

Run from the repository root:
    .venv/bin/python benchmarks/pypots_baselines.py --ptbxl ../shared/data/ptbxl            # PTB-XL rows
    .venv/bin/python benchmarks/pypots_baselines.py --ptbxl ../shared/data/ptbxl --validate # selection
Both write into ``--out`` (default benchmarks/results/imputation_pypots.json): the PTB-XL rows of
``benchmarks/imputation.py`` (same splits, normalization, masks and test windows) for SAITS, BRITS
and, for reference, the simple baselines, without training CondI.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condi_models.batches import PreparedSplit, record_window_starts

METHODS = ("saits", "brits")
LABELS = {"saits": "SAITS (PyPOTS)", "brits": "BRITS (PyPOTS)"}
INSTALL_HINT = "PyPOTS is not installed: pip install -e '.[bench]' (the optional bench extra)"


@dataclass(frozen=True)
class Settings:
    """Training budget and size of one PyPOTS model; fields a model does not use are ignored."""

    epochs: int = 16
    batch_size: int = 32
    lr: float = 1e-3
    # SAITS
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_ffn: int = 128
    dropout: float = 0.1
    # BRITS
    rnn_hidden_size: int = 64


SETTINGS = {"saits": Settings(), "brits": Settings(batch_size=64)}


def available() -> bool:
    """Whether PyPOTS can be imported (the ``bench`` extra is installed)."""
    return importlib.util.find_spec("pypots") is not None


def require() -> None:
    """Raise ImportError, saying how to install it, when PyPOTS is missing."""
    if not available():
        raise ImportError(INSTALL_HINT)


def record_windows(x: np.ndarray, observed: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Every record of (N, F, L) arrays cut into consecutive windows of ``window`` steps (the last
    one ending at the record's end), keeping those with any observed entry: (x, observed) of
    shape (N', F, window)."""
    starts = record_window_starts(x.shape[2], window)
    steps = starts[:, None] + np.arange(window)[None, :]  # (W, window)
    # (N, F, W, window) -> (N, W, F, window) -> (N * W, F, window), record-major.
    xs = x[:, :, steps].transpose(0, 2, 1, 3).reshape(-1, x.shape[1], window)
    obs = observed[:, :, steps].transpose(0, 2, 1, 3).reshape(-1, x.shape[1], window)
    keep = obs.any(axis=(1, 2))
    return xs[keep], obs[keep]


def to_pypots(x: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """(N, F, L) values and mask as PyPOTS reads them: (N, L, F) float32, NaN where not observed."""
    return np.where(observed, x, np.nan).transpose(0, 2, 1).astype(np.float32)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch, numpy and random (PyPOTS and its data loaders draw from the global states) and
    restore those states afterwards, so a fit leaves the caller's random streams as they were."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PyPOTS logs every model's size and a warning that nothing is saved; only errors are kept.
    A filter, not a level: PyPOTS sets its logger's level itself when a model is built."""
    log = logging.getLogger("PyPOTS running log")

    def errors(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    log.addFilter(errors)
    try:
        yield
    finally:
        log.removeFilter(errors)


def build(method: str, n_features: int, window: int, settings: Settings, verbose: bool = False) -> Any:
    """A fresh PyPOTS SAITS or BRITS on the CPU (draws its initial weights from torch's global state);
    ``verbose`` logs every epoch's losses."""
    require()
    from pypots.imputation import BRITS, SAITS
    from pypots.optim import Adam

    common = {"n_steps": window, "n_features": n_features, "batch_size": settings.batch_size,
              "epochs": settings.epochs, "optimizer": Adam(lr=settings.lr), "device": "cpu", "verbose": verbose}
    if method == "saits":
        d_k = settings.d_model // settings.n_heads
        return SAITS(n_layers=settings.n_layers, d_model=settings.d_model, n_heads=settings.n_heads, d_k=d_k,
                     d_v=d_k, d_ffn=settings.d_ffn, dropout=settings.dropout, **common)
    if method == "brits":
        return BRITS(rnn_hidden_size=settings.rnn_hidden_size, **common)
    raise ValueError(f"unknown PyPOTS method {method!r}; expected one of {METHODS}")


@dataclass
class Fitted:
    """A trained PyPOTS imputer and what its training cost."""

    method: str
    model: Any
    settings: Settings
    windows: int
    seconds: float
    best_epoch: int
    best_loss: float  # validation MSE on the hidden entries, or training loss when no validation set

    def impute(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """Imputations of (N, F, L) windows: the model's values where ``observed`` is False, ``x`` elsewhere."""
        with quiet():
            out = self.model.impute({"X": to_pypots(x, observed)})
        est = np.asarray(out, dtype=np.float32).transpose(0, 2, 1)
        return np.where(observed, x, est).astype(np.float32)

    def training_entry(self, records: int) -> dict[str, Any]:
        """A row of ``imputation.py``'s training table (its Phase A columns hold PyPOTS's epochs, its
        best training loss, an MAE on masked and observed entries, and its training time)."""
        batches = -(-self.windows // self.settings.batch_size)
        return {"samples": records, "epochs_a": self.settings.epochs, "phase_a_loss": self.best_loss,
                "seconds_a": round(self.seconds, 2),
                "seconds_per_batch_a": round(self.seconds / (self.settings.epochs * batches), 3),
                "pypots": self.summary()}

    def summary(self) -> dict[str, Any]:
        """What the JSON keeps of a fit."""
        return {"method": self.method, "windows": self.windows, "seconds": round(self.seconds, 2),
                "best_epoch": self.best_epoch, "best_loss": self.best_loss, "settings": asdict(self.settings)}


def fit(
    method: str,
    x: np.ndarray,
    observed: np.ndarray,
    *,
    window: int,
    seed: int,
    settings: Settings | None = None,
    validation: PreparedSplit | None = None,
    verbose: bool = False,
) -> Fitted:
    """Train ``method`` on the observed entries of training records ``x`` / ``observed`` (N, F, L).

    ``validation``: windows of ``window`` steps from training records (never test windows) with
    entries hidden as at test; PyPOTS then keeps the epoch with the lowest MSE on them.
    ``verbose``: PyPOTS logs each epoch's training loss (and validation MSE).
    """
    if method not in METHODS:
        raise ValueError(f"unknown PyPOTS method {method!r}; expected one of {METHODS}")
    settings = settings or SETTINGS[method]
    xs, obs = record_windows(x, observed, window)
    train_set = {"X": to_pypots(xs, obs)}
    val_set = None
    if validation is not None:
        seen = validation.observed | validation.hidden
        val_set = {"X": to_pypots(validation.x, validation.observed),
                   "X_ori": to_pypots(validation.truth, seen)}
    with seeded(seed), quiet() if not verbose else contextlib.nullcontext():
        model = build(method, x.shape[1], window, settings, verbose)
        t0 = time.perf_counter()
        model.fit(train_set, val_set)
        seconds = time.perf_counter() - t0
    return Fitted(method=method, model=model, settings=settings, windows=len(xs), seconds=seconds,
                  best_epoch=int(model.best_epoch), best_loss=float(model.best_loss))


# ---- PTB-XL rows without CondI -------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _section(train_ds: Any, test_ds: Any, methods: list[str], bargs: argparse.Namespace,
             settings: dict[str, Settings], validate: bool, save: Callable[[dict[str, Any]], None]) -> None:
    """The rows of ``imputation.imputation_table`` at pw = 0.8 for the simple baselines and ``methods``,
    handed to ``save`` after every fit (a run of several fits on a shared machine is long).

    With ``validate``, ``test_ds`` is held-out training records, and each fit also keeps the epoch
    with the lowest validation MSE on them and logs every epoch's (the curve the epochs are chosen from).
    """
    import imputation as bench

    from condi_models.batches import prepare_split
    from condi_models.data.missingness import MissingnessSpec
    from condi_models.data.normalize import ChannelNormalizer
    from condi_models.imputers import make_imputer

    norm = ChannelNormalizer.fit(train_ds.x, train_ds.observed)
    section: dict[str, Any] = {"train_records": len(train_ds), "test_records": len(test_ds), "training": {},
                               "rows": []}
    for pattern in bench.PATTERNS:
        miss = MissingnessSpec(ps=bench.TRAIN_PS, pw=bench.TRAIN_PW, pattern=pattern, seed=bargs.seed)
        train_split = prepare_split(train_ds, norm, miss)
        test_miss = MissingnessSpec(ps=bargs.eval_ps, pw=bench.TRAIN_PW, pattern=pattern, seed=bargs.seed)
        win = bench.centre_windows(prepare_split(test_ds, norm, test_miss), bargs.window, bargs.test_windows)
        base = {"pattern": pattern, "pw": bench.TRAIN_PW, "ps": bargs.eval_ps, "windows": len(win)}
        for b in bench.SIMPLE_BASELINES:
            est = make_imputer(b).fit(train_split.x, train_split.observed).impute(win.x, win.observed)
            section["rows"].append({**base, "method": b, **bench.score(win, est, None)})
        for method in methods:
            _log(f"{method} {pattern}: training on {len(train_split)} records")
            fitted = fit(method, train_split.x, train_split.observed, window=bargs.window, seed=bargs.seed,
                         settings=settings[method], validation=win if validate else None, verbose=validate)
            t0 = time.perf_counter()
            est = fitted.impute(win.x, win.observed)
            row = {**base, "method": LABELS[method], "seconds": round(time.perf_counter() - t0, 3),
                   **bench.score(win, est, None)}
            section["rows"].append(row)
            section["training"][f"{method}/{pattern}"] = {"records": len(train_split), **fitted.summary()}
            _log(f"{method} {pattern}: MAE {row['mae']:.3f} RMSE {row['rmse']:.3f} "
                 f"({fitted.seconds:.0f} s, best epoch {fitted.best_epoch})")
            save(section)


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: rows and fits of methods only ``old`` has are kept, so methods run
    one at a time fill one section."""
    fresh = {(r["pattern"], r["method"]) for r in new["rows"]}
    rows = [r for r in old.get("rows", []) if (r["pattern"], r["method"]) not in fresh] + new["rows"]
    return {**old, **new, "rows": rows, "training": {**old.get("training", {}), **new["training"]}}


def main(argv: list[str] | None = None) -> None:
    """PTB-XL rows of SAITS and BRITS (or, with --validate, their selection on training folds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptbxl", required=True, help="PTB-XL folder (ptbxl_database.csv, records100/)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--validate", action="store_true",
                        help="train on strat_folds 1-5, score fold 6 (the benchmark's training folds only)")
    parser.add_argument("--epochs", type=int, help="override every method's epochs")
    parser.add_argument("--batch-size", type=int, help="override every method's batch size")
    parser.add_argument("--lr", type=float, help="override every method's learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results JSON (default benchmarks/results/imputation_pypots.json)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    require()
    import imputation as bench
    from _common import RESULTS, machine, read_json, write_json

    from condi_models.data.partition import split_by_folds
    from condi_models.data.ptbxl import load_ptbxl

    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
                 if v is not None}
    settings = {m: replace(SETTINGS[m], **overrides) for m in METHODS}
    # The benchmark's own defaults (window, eval ps, test windows, seed) for its PTB-XL section.
    bargs = bench.parse_args(["--ptbxl", args.ptbxl, "--seed", str(args.seed)])
    if args.validate:
        ds = load_ptbxl(Path(args.ptbxl))
        split = split_by_folds(ds.folds, [1, 2, 3, 4, 5], [], [6])
        train_ds, test_ds = ds.subset(split.train), ds.subset(split.test)
    else:
        train_ds, test_ds = bench.ptbxl_splits(bargs)
    out = Path(args.out) if args.out else RESULTS / "imputation_pypots.json"
    t0 = time.perf_counter()
    run = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "threads": args.threads, "seed": args.seed, "machine": machine(torch.device("cpu"))}

    last: dict[str, Any] = {}

    def save(section: dict[str, Any]) -> None:
        last.update(section)
        results = read_json(out)
        section = {**section, **run, "seconds": round(time.perf_counter() - t0, 1),
                   "load_average": list(os.getloadavg())}
        if args.validate:
            # Settings are compared on the same fold: each run is kept under its own name.
            name = ",".join(f"{m}:{'/'.join(f'{k}={v}' for k, v in overrides.items()) or 'default'}" for m in methods)
            results.setdefault("validation", {})[name] = {**section, "folds": {"train": [1, 2, 3, 4, 5],
                                                                              "validation": [6]}}
        else:
            results["ptbxl"] = _merge(results.get("ptbxl", {}), section)
        write_json(out, results)

    _section(train_ds, test_ds, methods, bargs, settings, args.validate, save)
    for r in last.get("rows", []):
        print(f"{r['pattern']:6} {r['method']:15} MAE {r['mae']:.3f} RMSE {r['rmse']:.3f}")
    _log(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
