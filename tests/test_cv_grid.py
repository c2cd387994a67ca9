"""benchmarks/cv_grid.py: its rank AUROC and its paired bootstrap of differences between methods."""

from __future__ import annotations

import sys

import numpy as np

from condi_models.metrics import classification_metrics
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import cv_grid


def _run(labels: np.ndarray, probs: np.ndarray) -> dict:
    return {"labels": labels.tolist(), "probs": probs.tolist()}


def test_rank_auroc_matches_the_library_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet(np.ones(3), 200) + np.eye(3)[y] * 0.3
    want = classification_metrics(y, p / p.sum(1, keepdims=True), ("a", "b", "c")).macro_auroc
    assert abs(cv_grid._macro_auroc(y, p) - want) < 1e-9


def test_paired_bootstrap_brackets_the_difference_and_is_zero_for_equal_runs():
    rng = np.random.default_rng(1)
    runs_a, runs_b = [], []
    for _ in range(3):
        y = rng.integers(0, 2, 300)
        good = np.eye(2)[y] * 0.8 + 0.1  # right 100 % of the time
        noisy = np.where(rng.random(300)[:, None] < 0.7, good, 1.0 - good)  # right about 70 %
        runs_a.append(_run(y, good))
        runs_b.append(_run(y, noisy))
    ci = cv_grid.paired_bootstrap(runs_a, runs_b, draws=200, seed=0)
    assert 20.0 < ci["accuracy_ci"][0] < 30.0 < ci["accuracy_ci"][1] < 40.0
    same = cv_grid.paired_bootstrap(runs_a, runs_a, draws=50, seed=0)
    assert same["accuracy_ci"] == [0.0, 0.0] and same["macro_auroc_ci"] == [0.0, 0.0]
