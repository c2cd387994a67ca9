"""benchmarks/imputation.py scores CRPS on independent draws, whatever draws its point estimate uses."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from condi_models.batches import prepare_split
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.evaluation import impute_split
from condi_models.metrics import imputation_metrics
from condi_models.nn import Variant
from tests.helpers import REPO, toy_dataset

sys.path.insert(0, str(REPO / "benchmarks"))
import imputation as bench


def tiny_args(*extra: str):
    return bench.parse_args(["--quick", "--window", "24", "--samples", "3", "--steps", "2", "--eval-batch", "4",
                             *extra])


def test_crps_options_are_independent_draws() -> None:
    args = bench.parse_args([])
    opts = bench.sampling(args)
    assert opts.antithetic and opts.n_samples == 5
    want = bench.crps_options(opts, args)
    assert not want.antithetic and want.n_samples == 5 and want.steps == opts.steps
    assert bench.crps_settings(args) == {"draws": "independent", "n_samples": 5, "estimator": "fair",
                                         "separate_from_point_estimate": True}
    indep = bench.parse_args(["--independent-draws"])
    assert bench.crps_options(bench.sampling(indep), indep) == bench.sampling(indep)
    assert bench.parse_args(["--samples", "1"]).crps_samples == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--crps-samples", "1"])


def test_model_imputation_scores_crps_on_independent_draws() -> None:
    args = tiny_args()
    ds = toy_dataset(12, length=48)
    norm = ChannelNormalizer.fit(ds.x, ds.observed)
    win = bench.centre_windows(prepare_split(ds, norm, MissingnessSpec(ps=1.0, pw=0.5, seed=0)), 24, 4)
    hidden = win.hidden
    model = bench.build_model(Variant.CONDI, ds, args)
    cpu = torch.device("cpu")
    est, draws, _, crps_seconds = bench.model_imputation(model, win, bench.sampling(args), args, cpu)
    assert draws.shape == (3, *win.x.shape) and crps_seconds > 0
    # A fresh head samples the prior exactly and the sampler is odd in its noise there, so an
    # antithetic pair mirrors about the median (the centre path); the CRPS draws must not.
    anti = impute_split(model, win, sampling=bench.sampling(args), batch_size=4, seed=args.seed, device=cpu,
                        keep_samples=True).samples
    mirrored = np.abs(anti[0] + anti[1] - 2 * est)[hidden].mean()
    spread = np.abs(draws[0] - est)[hidden].mean()
    assert spread > 1e-3 and mirrored < 1e-3 * spread
    assert np.abs(draws[0] + draws[1] - 2 * est)[hidden].mean() > 0.1 * spread
    row = bench.score(win, est, draws)
    r = imputation_metrics(win.truth, est, hidden, draws)
    assert row["crps"] == pytest.approx(r.crps_fair) and row["crps_plain"] == pytest.approx(r.crps_empirical)
    assert row["crps_draws"] == "independent" and row["crps_samples"] == 3
    assert row["mae"] == pytest.approx(r.mae)
    point = bench.score(win, est, None)
    assert point["crps"] == pytest.approx(point["mae"]) and point["crps_draws"] == "point estimate"
    # With independent draws for the point estimate too, one set serves both.
    indep = tiny_args("--independent-draws")
    _, same, _, crps_seconds = bench.model_imputation(model, win, bench.sampling(indep), indep, cpu)
    assert same.shape == draws.shape and crps_seconds == 0.0


def test_report_names_the_draws_crps_was_scored_on() -> None:
    row = {"pattern": "points", "pw": 0.8, "method": "condi", "mae": 0.1, "rmse": 0.2, "crps": 0.08, "windows": 3}
    old = {"eval_ps": 0.8, "sampling": {"n_samples": 5, "steps": 10, "antithetic": True}, "rows": [row],
           "training": {}}
    assert "CRPS (antithetic, biased low)" in bench.report({"synthetic": old})
    new = {**old, "crps": {"draws": "independent", "n_samples": 5, "estimator": "fair",
                           "separate_from_point_estimate": True}}
    text = bench.report({"synthetic": new})
    assert "CRPS (5 indep. draws)" in text and "fair estimate from 5 independent draws" in text


def test_cross_validated_imputation_splits_folds_and_summarises_ratios_per_split() -> None:
    import imputation_cv as cv

    folds = np.repeat(np.arange(1, 9), 3)
    train, test = cv.split_sets(folds, 0)  # test folds 1-2, validation 3-4 left out
    assert set(folds[test]) == {1, 2} and set(folds[train]) == {5, 6, 7, 8}

    def section(condi: float, ridge: float, saits: float) -> dict:
        rows = [{"pattern": "blocks", "method": m, "mae": v, "rmse": v, "crps": v,
                 "coverage_50": 0.5 if m == "condi" else None, "coverage_90": 0.9 if m == "condi" else None}
                for m, v in (("mean", 0.5), ("interpolation", 0.6), ("ridge", ridge), ("condi", condi),
                             ("SAITS (PyPOTS)", saits))]
        return {"rows": rows}

    s = cv.summary("ptbxl", {"0": section(0.15, 0.2, 0.3), "1": section(0.18, 0.2, 0.2)}, ["blocks"])["blocks"]
    np.testing.assert_allclose(s["condi_over_best_simple"], [0.75, 0.9])
    np.testing.assert_allclose(s["condi_over_saits"], [0.5, 0.9])
    assert s["best_simple"] == ["ridge", "ridge"] and s["metrics"]["condi"]["coverage_90"][0] == 0.9
    met = {t.name: t.met for t in cv.targets({"summary": {"ptbxl": {"blocks": s}}})}
    assert met["PTB-XL blocks: CondI MAE / best simple baseline (mean over splits)"] is False  # 0.825 > 0.8
    assert met["PTB-XL blocks: CondI MAE / SAITS MAE (mean over splits)"] is True
    with pytest.raises(SystemExit):
        cv.parse_args(["--ptbxl", "x", "--patterns", "stripes"])


def test_cross_validation_runs_made_apart_merge_only_with_the_same_settings() -> None:
    import imputation_cv as cv

    row = {"pattern": "points", "method": "ridge", "mae": 0.2, "rmse": 0.3, "crps": 0.2}
    mine = {"settings": {"patterns": ["points"]}, "splits": {"ptbxl": {"0": {"rows": [row]}}}}
    other = {"settings": {"patterns": ["points"]}, "splits": {"ptbxl": {"2": {"rows": [row]}}}}
    cv.merge(mine, [other], ["other.json"])
    assert sorted(mine["splits"]["ptbxl"]) == ["0", "2"] and mine["summary"]["ptbxl"]["points"]["splits"] == 2
    with pytest.raises(SystemExit, match="settings differ"):
        cv.merge(mine, [{"settings": {"patterns": ["blocks"]}}], ["bad.json"])


def test_the_prior_check_sorts_hidden_entries_by_where_they_lie_and_takes_either_dataset() -> None:
    import prior_variants

    observed = np.array([[[False, True, False, False, True, False], [False] * 6]])
    hidden = np.array([[[True, False, True, True, False, True], [True, False, False, False, False, True]]])
    kinds = prior_variants.entry_kinds(observed, hidden)
    assert kinds["between"][0, 0].tolist() == [False, False, True, True, False, False]
    assert kinds["edge"][0, 0].tolist() == [True, False, False, False, False, True]
    assert kinds["none"][0, 1].tolist() == hidden[0, 1].tolist() and not kinds["none"][0, 0].any()
    assert prior_variants.parse_args(["--mimic", "m"]).mimic == "m"
    with pytest.raises(SystemExit):
        prior_variants.parse_args(["--mimic", "m", "--ptbxl", "p"])
