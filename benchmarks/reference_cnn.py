"""The issue-12 reference classifier on the CV splits of benchmarks/cv_grid.py: how high can a plain
model go on the shared PTB-XL sample's training folds?

Run from the repository root:
    .venv/bin/python benchmarks/reference_cnn.py [--ptbxl ../shared/data/ptbxl] [--seeds 0,1]
        [--splits 0,1,2,3] [--window 250] [--epochs 40] [--threads 1]

The model is the one issue 12 measured as its reference: a 12-lead 1-D CNN, three blocks of
convolution (kernel 7), GroupNorm, ReLU and max-pooling with 64, 64 and 128 channels, global average
pooling, dropout 0.3 and a linear layer; AdamW (1e-3, weight decay 1e-2), batch 32, random
``--window``-step crops, trained centrally on complete data with plain cross-entropy. Inputs are
scaled per channel with the training folds' moments. Every fifth epoch the model is scored on the
validation folds at record level (class probabilities averaged over the record's windows, as
cv_grid.py does); the epoch with the best validation macro AUROC is kept and the test folds are
read once, on it. No CondI code trains here: this is the ceiling of a different, standard model on
the same records, splits and metrics, so a shortfall of the central CondI run can be told apart
from a shortfall of the data.

Results: benchmarks/results/reference_cnn.json (every record's probabilities) and a summary table,
with the paired bootstrap 95 % CI of (central CondI - this model) over the runs that
benchmarks/results/cv_ptbxl.json holds for the same splits and seeds.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, fmt, machine, markdown_table, read_json, write_json
from cv_grid import CV_SPLITS, paired_bootstrap, run_key
from torch import nn

from condi_models.batches import record_window_starts
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.ptbxl import load_ptbxl
from condi_models.metrics import classification_metrics


def reference_cnn(n_leads: int, n_classes: int) -> nn.Module:
    """Three conv blocks (64, 64, 128 channels, kernel 7, GroupNorm) and a linear head."""

    def block(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(c_in, c_out, 7, padding=3), nn.GroupNorm(8, c_out), nn.ReLU(), nn.MaxPool1d(2)
        )

    return nn.Sequential(
        block(n_leads, 64), block(64, 64), block(64, 128),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, n_classes),
    )


@torch.inference_mode()
def record_probs(model: nn.Module, x: np.ndarray, window: int) -> np.ndarray:
    """Class probabilities of each record, averaged over the windows that cover it."""
    model.eval()
    starts = record_window_starts(x.shape[2], window)
    xs = torch.from_numpy(x)
    return np.mean([torch.softmax(model(xs[:, :, s : s + window]), -1).numpy() for s in starts], axis=0)


def run_split(x: np.ndarray, observed: np.ndarray, y: np.ndarray, folds: np.ndarray, classes: list[str],
              split: int, seed: int, window: int, epochs: int) -> dict:
    """Train on one CV split's training folds, select the epoch on validation, score test once."""
    test_folds, val_folds = CV_SPLITS[split]
    train = ~np.isin(folds, (*test_folds, *val_folds))
    val, test = np.isin(folds, val_folds), np.isin(folds, test_folds)
    norm = ChannelNormalizer.fit(x[train], observed[train])
    xn = norm.apply(x, observed).astype(np.float32)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = reference_cnn(x.shape[1], len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    x_train, y_train = torch.from_numpy(xn[train]), torch.from_numpy(y[train])
    length = x.shape[2]
    best: tuple[float, int, dict] = (-1.0, 0, {})
    curve = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(x_train))
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            starts = rng.integers(0, length - window + 1, len(idx))
            batch = torch.stack([x_train[j, :, s : s + window] for j, s in zip(idx, starts, strict=True)])
            loss = nn.functional.cross_entropy(model(batch), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0:
            auroc = classification_metrics(y[val], record_probs(model, xn[val], window), classes).macro_auroc
            curve.append((epoch, auroc))
            if auroc is not None and auroc > best[0]:
                best = (auroc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    probs = record_probs(model, xn[test], window)
    report = classification_metrics(y[test], probs, classes)
    return {
        "accuracy": report.accuracy,
        "macro_auroc": report.macro_auroc,
        "macro_f1": report.macro_f1,
        "recall": {c.name: c.recall for c in report.per_class},
        "selected_epoch": best[1],
        "val_auroc_curve": curve,
        "labels": y[test].tolist(),
        "probs": np.round(probs, 5).tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ptbxl", default="../shared/data/ptbxl")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--splits", default="0,1,2,3")
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default=str(RESULTS / "reference_cnn.json"))
    p.add_argument("--compare", default=str(RESULTS / "cv_ptbxl.json"), help="cv_grid.py results holding central runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_ptbxl(Path(args.ptbxl))
    classes = list(ds.info.classes)
    runs = {}
    t0 = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        for split in (int(s) for s in args.splits.split(",")):
            r = run_split(ds.x, ds.observed, ds.y, ds.folds, classes, split, seed, args.window, args.epochs)
            runs[run_key("central", 0.0, split, seed)] = r
            print(f"split {split} seed {seed}: accuracy {r['accuracy']:.3f}, macro AUROC {fmt(r['macro_auroc'])}, "
                  f"epoch {r['selected_epoch']}", flush=True)
    acc = np.array([r["accuracy"] for r in runs.values()])
    auroc = np.array([r["macro_auroc"] for r in runs.values()])
    f1 = np.array([r["macro_f1"] for r in runs.values()])
    recall = "/".join(fmt(float(np.mean([r["recall"][c] for r in runs.values()])), 2) for c in classes)
    write_json(Path(args.out), {
        "settings": vars(args), "machine": machine(torch.device("cpu")),
        "seconds": round(time.perf_counter() - t0, 1), "runs": runs,
    })
    print(markdown_table(
        ["model", "runs", "accuracy %", "macro AUROC", "macro-F1", "recall " + "/".join(classes)],
        [["reference CNN (central, complete data)", str(len(runs)),
          f"{100 * acc.mean():.1f} ± {100 * acc.std(ddof=1):.1f}", f"{auroc.mean():.3f} ± {auroc.std(ddof=1):.3f}",
          f"{f1.mean():.3f} ± {f1.std(ddof=1):.3f}", recall]],
    ))
    central = read_json(Path(args.compare)).get("runs", {})
    pairs = [(central[key], r) for key, r in runs.items() if key in central]
    if pairs:
        ci = paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs], draws=1000, seed=0)
        print(f"central CondI - reference CNN over {len(pairs)} paired runs: accuracy points "
              f"[{ci['accuracy_ci'][0]:+.1f}, {ci['accuracy_ci'][1]:+.1f}], macro AUROC x 100 "
              f"[{ci['macro_auroc_ci'][0]:+.1f}, {ci['macro_auroc_ci'][1]:+.1f}] (95 % CI)")


if __name__ == "__main__":
    main()
