"""Classification and imputation metrics against hand-computed cases and known properties."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condi_models.feature_analysis import feature_reconstruction, scatter_plot
from condi_models.metrics import (
    auroc,
    average_precision,
    band_coverage,
    band_factor,
    central_band,
    classification_metrics,
    empirical_crps,
    imputation_metrics,
    quantile_crps_sum,
)

# Six samples, three classes; every number below was worked out by hand.
Y3 = np.array([0, 0, 1, 1, 2, 2])
P3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.8, 0.1],
        [0.4, 0.1, 0.5],
        [0.5, 0.2, 0.3],
    ]
)


def test_three_class_report_matches_hand_computation() -> None:
    r = classification_metrics(Y3, P3, ["a", "b", "c"])
    assert r.n_samples == 6
    assert r.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r.accuracy == pytest.approx(4 / 6)
    a, b, c = r.per_class
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert (c.precision, c.recall, c.f1, c.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert r.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Class c's column has a positive tied with a negative at 0.3: that pair counts one half.
    assert (a.auroc, b.auroc, c.auroc) == pytest.approx((6 / 8, 7 / 8, 7.5 / 8))
    assert (a.auprc, b.auprc, c.auprc) == pytest.approx((0.75, 5 / 6, 5 / 6))
    assert r.macro_auroc == pytest.approx((0.75 + 0.875 + 0.9375) / 3)
    assert r.macro_auprc == pytest.approx((0.75 + 5 / 6 + 5 / 6) / 3)
    assert r.skipped_auroc_classes == ()
    assert r.binary is None


def test_class_absent_from_labels_is_skipped_and_named() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.4, 0.5]])
    r = classification_metrics(y, p, ["x", "y", "z"])
    assert r.skipped_auroc_classes == ("z",)
    assert r.per_class[2].auroc is None and r.per_class[2].auprc is None
    assert r.per_class[0].auroc == pytest.approx(1.0)
    assert r.per_class[1].auroc == pytest.approx(1.0)
    assert r.macro_auroc == pytest.approx(1.0)
    # z is predicted once (wrongly), so it is in play for macro-F1 with F1 0.
    assert r.per_class[2].f1 == 0.0
    assert r.macro_f1 == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_class_neither_present_nor_predicted_is_left_out_of_macro_f1() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    r = classification_metrics(y, p, ["x", "y", "z"])
    assert r.macro_f1 == pytest.approx(1.0)
    assert r.accuracy == 1.0


def test_single_class_present_has_no_auroc() -> None:
    r = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ["neg", "pos"])
    assert r.macro_auroc is None and r.macro_auprc is None
    assert r.skipped_auroc_classes == ("neg", "pos")
    assert r.binary is not None and r.binary.auroc is None


def test_binary_task_reports_positive_class() -> None:
    y = np.array([0, 0, 0, 1, 1])
    pos = np.array([0.1, 0.6, 0.3, 0.7, 0.4])
    r = classification_metrics(y, np.stack([1 - pos, pos], axis=1), ["alive", "dead"])
    assert r.binary is not None
    assert r.binary.positive_class == "dead"
    # Positives 0.7 and 0.4 beat negatives {0.1, 0.6, 0.3} 3 and 2 times.
    assert r.binary.auroc == pytest.approx(5 / 6)
    # Ranked: 0.7 P, 0.6 N, 0.4 P -> AP = 0.5 * 1 + 0.5 * 2/3.
    assert r.binary.auprc == pytest.approx(0.5 + 1 / 3)
    # Argmax predicts dead for 0.6 and 0.7 only: precision 1/2, recall 1/2.
    assert r.binary.f1 == pytest.approx(0.5)


def test_report_is_json_ready() -> None:
    d = classification_metrics(Y3, P3, ["a", "b", "c"]).to_dict()
    back = json.loads(json.dumps(d))
    assert back["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert back["confusion_matrix"][2] == [1, 0, 1]


def test_auroc_known_properties() -> None:
    labels = np.array([False, False, True, True])
    assert auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auroc(labels, np.full(4, 0.5)) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc(np.array([True, True]), np.array([0.1, 0.2]))


def test_average_precision_known_properties() -> None:
    labels = np.array([False, True, False, True, False])
    assert average_precision(labels, np.array([0.1, 0.9, 0.2, 0.8, 0.3])) == 1.0
    # All tied: one threshold, precision = prevalence at full recall.
    assert average_precision(labels, np.zeros(5)) == pytest.approx(0.4)
    # Fully reversed: positives come last, at precision 1/4 and 2/5.
    assert average_precision(labels, np.array([0.9, 0.1, 0.8, 0.2, 0.7])) == pytest.approx(
        0.5 * 0.25 + 0.5 * 0.4
    )
    with pytest.raises(ValueError, match="at least one positive"):
        average_precision(np.zeros(3, dtype=bool), np.arange(3.0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=2, max_size=25).filter(
        lambda rows: 0 < sum(r[0] for r in rows) < len(rows)
    )
)
def test_auroc_and_ap_agree_with_brute_force(rows: list[tuple[bool, int]]) -> None:
    labels = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=float)
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(labels, scores) == pytest.approx(wins / (pos.size * neg.size))
    ap, recall_before = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = scores >= threshold
        tp = (chosen & labels).sum()
        ap += (tp / labels.sum() - recall_before) * tp / chosen.sum()
        recall_before = tp / labels.sum()
    assert average_precision(labels, scores) == pytest.approx(ap)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        (np.array([0, 1]), np.ones((3, 2)), "probs: expected shape"),
        (np.array([0, 2]), np.ones((2, 2)), r"labels must lie in \[0, 2\)"),
        (np.array([0.0, 1.0]), np.ones((2, 2)), "integer class indices"),
        (np.array([], dtype=np.int64), np.ones((0, 2)), "non-empty"),
        (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), "NaN"),
    ],
)
def test_classification_rejects_bad_input(y: np.ndarray, p: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, p, ["a", "b"])


def test_mae_rmse_only_over_eval_mask() -> None:
    truth = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    estimate = np.array([[2.0, 2.0, 100.0], [4.0, 2.0, 6.0]])
    mask = np.array([[True, True, False], [False, True, True]])
    r = imputation_metrics(truth, estimate, mask)
    assert r.n_entries == 4
    assert r.mae == pytest.approx((1 + 0 + 3 + 0) / 4)
    assert r.rmse == pytest.approx(np.sqrt((1 + 9) / 4))
    assert r.crps_normalized is None and r.crps_empirical is None and r.n_samples is None


def test_crps_of_point_mass_at_truth_is_zero() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(3, 4, 5))
    mask = rng.random(truth.shape) < 0.5
    samples = np.repeat(truth[None], 8, axis=0)
    r = imputation_metrics(truth, truth, mask, samples)
    assert r.crps_normalized == pytest.approx(0.0, abs=1e-12)
    assert r.crps_empirical == pytest.approx(0.0, abs=1e-12)
    assert r.crps_empirical_normalized == pytest.approx(0.0, abs=1e-12)
    assert r.n_samples == 8


def test_crps_single_sample_reduces_to_absolute_error() -> None:
    # Every quantile of one sample is the sample itself; 2 x pinball averaged over q in 0.05..0.95 is |d|.
    truth = np.array([2.0, -4.0])
    samples = np.array([[2.5, -5.0]])
    r = imputation_metrics(truth, samples[0], np.ones(2, dtype=bool), samples)
    assert r.crps_normalized == pytest.approx((0.5 + 1.0) / 6.0)
    assert r.crps_empirical == pytest.approx(0.75)
    assert r.crps_empirical_normalized == pytest.approx(1.5 / 6.0)


def test_band_coverage_hand_case() -> None:
    # Five draws 0..4 per entry: median 2; the 0.25/0.75 quantiles are 1 and 3, the 0.05/0.95 ones
    # 0.2 and 3.8. Widened by 2 around the median the 50 % band is [0, 4].
    samples = np.tile(np.arange(5.0)[:, None], (1, 4))
    truth = np.array([1.0, 2.5, 3.5, -0.1])
    assert [b.tolist() for b in central_band(samples, 0.5)] == [[1.0] * 4, [3.0] * 4]
    assert band_coverage(truth, samples, 0.5) == (pytest.approx(0.5), pytest.approx(2.0))
    assert band_coverage(truth, samples, 0.9) == (pytest.approx(0.75), pytest.approx(3.6))
    assert band_coverage(truth, samples, 0.5, factor=2.0) == (pytest.approx(0.75), pytest.approx(4.0))
    # In the report: the factors widen the bands of the levels 0.5 and 0.9 in turn.
    mask = np.ones(4, dtype=bool)
    r = imputation_metrics(truth, np.full(4, 2.0), mask, samples, band_factors=(2.0, 1.0))
    assert (r.coverage_50, r.coverage_90, r.width_50, r.width_90) == pytest.approx((0.75, 0.75, 4.0, 3.6))
    assert imputation_metrics(truth, truth, mask, samples[:1]).coverage_90 is None  # one draw, no band
    with pytest.raises(ValueError, match="one per band level"):
        imputation_metrics(truth, truth, mask, samples, band_factors=(1.0,))


def test_band_factor_makes_too_narrow_draws_cover_their_level() -> None:
    rng = np.random.default_rng(0)
    k = 20_000

    def draws(scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=k), rng.normal(scale=scale, size=(n, k))

    # The imputer's spread is half the truth's and there are five draws: the raw bands hold far
    # too little; the fitted factor brings fresh entries to their level.
    truth, samples = draws(0.5, 5)
    test_truth, test_samples = draws(0.5, 5)
    for level in (0.5, 0.9):
        factor = band_factor(truth, samples, level)
        assert band_coverage(test_truth, test_samples, level)[0] < level - 0.3
        assert band_coverage(test_truth, test_samples, level, factor)[0] == pytest.approx(level, abs=0.015)
        # On the entries it was fitted on, the coverage is at least the level.
        assert band_coverage(truth, samples, level, factor)[0] >= level
    # A calibrated imputer with enough draws for its quantiles needs no widening.
    truth, samples = draws(1.0, 400)
    assert band_factor(truth, samples, 0.9) == pytest.approx(1.0, abs=0.05)
    assert band_factor(truth, samples, 0.5) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="no spread"):
        band_factor(np.ones(3), np.zeros((5, 3)), 0.5)


def test_empirical_crps_hand_case() -> None:
    # Samples {0, 2}, truth 1: E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1, CRPS = 1 - 0.5.
    assert empirical_crps(np.array([1.0]), np.array([[0.0], [2.0]])) == pytest.approx([0.5])
    rng = np.random.default_rng(1)
    s = rng.normal(size=(9, 6))
    t = rng.normal(size=6)
    brute = np.abs(s - t).mean(axis=0) - 0.5 * np.abs(s[:, None] - s[None, :]).mean(axis=(0, 1))
    assert empirical_crps(t, s) == pytest.approx(brute)


def test_fair_crps_hand_case_and_brute_force() -> None:
    # Samples {0, 2}, truth 1: E|X - y| = 1, the mean gap over the 2 distinct ordered pairs is 2.
    assert empirical_crps(np.array([1.0]), np.array([[0.0], [2.0]]), fair=True) == pytest.approx([0.0])
    rng = np.random.default_rng(2)
    s = rng.normal(size=(7, 5))
    t = rng.normal(size=5)
    gaps = np.abs(s[:, None] - s[None, :]).sum(axis=(0, 1)) / (7 * 6)
    assert empirical_crps(t, s, fair=True) == pytest.approx(np.abs(s - t).mean(axis=0) - 0.5 * gaps)
    with pytest.raises(ValueError, match="at least 2 samples"):
        empirical_crps(t, s[:1], fair=True)
    r = imputation_metrics(t, t, np.ones(5, dtype=bool), s)
    fair = empirical_crps(t, s, fair=True)
    assert r.crps_fair == pytest.approx(fair.mean())
    assert r.crps_fair_normalized == pytest.approx(fair.sum() / np.abs(t).sum())
    one = imputation_metrics(t, t, np.ones(5, dtype=bool), s[:1])
    assert one.crps_fair is None and one.crps_fair_normalized is None


def test_crps_of_antithetic_draws_is_biased_low() -> None:
    # A calibrated N(0, 1) forecast of N(0, 1) truths: its exact CRPS is 1 / sqrt(pi) = 0.564.
    # Five independent draws score 0.677 on average with the plain (empirical) estimator, which is
    # biased high by E|X - X'| / 2m, and 0.564 with the fair one. Two antithetic pairs plus the
    # centre path, as antithetic_noise lays out five copies ([e1, e2, -e1, -e2, 0]), are draws of
    # the same forecast yet score 0.626 with the plain estimator: the "lower CRPS" of antithetic
    # draws is an artifact of scoring them as if independent, and the fair correction (0.517)
    # does not rescue them either, since a pair's gap |2e| is not an independent gap.
    rng = np.random.default_rng(12)
    k = 200_000
    root_pi = np.sqrt(np.pi)
    exact = 1.0 / root_pi
    truth = rng.standard_normal(k)
    independent = rng.standard_normal((5, k))
    e = rng.standard_normal((2, k))
    antithetic = np.concatenate([e, -e, np.zeros((1, k))])
    fair_independent = empirical_crps(truth, independent, fair=True).mean()
    plain_independent = empirical_crps(truth, independent).mean()
    plain_antithetic = empirical_crps(truth, antithetic).mean()
    fair_antithetic = empirical_crps(truth, antithetic, fair=True).mean()
    assert fair_independent == pytest.approx(exact, abs=0.01)
    assert plain_independent == pytest.approx(1.2 / root_pi, abs=0.01)  # 0.677
    half_normal = np.sqrt(2.0 / np.pi)
    assert plain_antithetic == pytest.approx((32.0 / root_pi - 3.0 * half_normal) / 25.0, abs=0.01)  # 0.626
    assert fair_antithetic == pytest.approx((24.0 / root_pi - 4.0 * half_normal) / 20.0, abs=0.01)  # 0.517
    # The artifact: same forecast, same estimator, about 7.5 % "better" from the pairing alone.
    assert plain_antithetic < 0.95 * plain_independent
    assert fair_antithetic < 0.95 * exact
    # CSDI's quantile CRPS has no such correction: from five draws its sample quantiles give 0.70,
    # so it only compares methods scored on the same number of independent draws.
    assert quantile_crps_sum(truth, independent) / k > plain_independent


def test_crps_grows_with_spread_around_truth() -> None:
    truth = np.array([1.0, -2.0, 3.0])
    offsets = np.linspace(-1.0, 1.0, 21)
    mask = np.ones(3, dtype=bool)
    quantile, exact = [], []
    for spread in (0.0, 0.25, 0.5, 1.0, 2.0):
        samples = truth[None, :] + spread * offsets[:, None]
        r = imputation_metrics(truth, truth, mask, samples)
        quantile.append(r.crps_normalized)
        exact.append(r.crps_empirical)
    assert quantile[0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(quantile) > 0)
    assert np.all(np.diff(exact) > 0)


def test_imputation_metrics_errors() -> None:
    truth = np.zeros((2, 3))
    with pytest.raises(ValueError, match="selects no entries"):
        imputation_metrics(truth, truth, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        imputation_metrics(truth, truth, np.ones((2, 3)))
    with pytest.raises(ValueError, match="share one shape"):
        imputation_metrics(truth, np.zeros((3, 2)), np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="samples: expected shape"):
        imputation_metrics(truth, truth, np.ones((2, 3), dtype=bool), np.zeros((4, 3, 2)))


def test_zero_truth_leaves_normalized_crps_undefined() -> None:
    truth = np.zeros(4)
    samples = np.stack([truth - 1, truth + 1])
    r = imputation_metrics(truth, truth, np.ones(4, dtype=bool), samples)
    assert r.crps_normalized is None and r.crps_empirical_normalized is None
    assert r.crps_empirical == pytest.approx(1.0 - 0.5 * 1.0)
    json.dumps(r.to_dict())


# Feature reconstruction (paper Section 4.4): three samples, distances worked out by hand.
CLEAN = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
ZERO_FILLED = np.array([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
IMPUTED = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])


def test_feature_reconstruction_hand_case() -> None:
    r = feature_reconstruction(CLEAN, ZERO_FILLED, IMPUTED)
    np.testing.assert_allclose(r.l2_zero_filled, [1.0, 1.0, 4.0])
    np.testing.assert_allclose(r.l2_imputed, [1.0, 0.0, 5.0])
    # A zero vector has no direction: similarity 0, distance 1. [3,0] vs [3,4]: cos = 9 / 15.
    np.testing.assert_allclose(r.cosine_zero_filled, [1.0, 0.0, 0.4], atol=1e-12)
    np.testing.assert_allclose(r.cosine_imputed, [1.0 - 1.0 / np.sqrt(2.0), 0.0, 1.0], atol=1e-12)
    summary = r.summary()
    # Sample 0 ties on L2, sample 1 ties on cosine; ties do not count as improved.
    assert summary.fraction_improved_l2 == pytest.approx(1 / 3)
    assert summary.fraction_improved_cosine == pytest.approx(1 / 3)
    assert summary.mean_l2_zero_filled == pytest.approx(2.0)
    assert summary.mean_l2_imputed == pytest.approx(2.0)
    assert summary.mean_cosine_zero_filled == pytest.approx(1.4 / 3)
    assert summary.mean_cosine_imputed == pytest.approx((2.0 - 1.0 / np.sqrt(2.0)) / 3)
    assert json.loads(json.dumps(summary.to_dict()))["n_samples"] == 3


def test_feature_reconstruction_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="imputed: shape"):
        feature_reconstruction(CLEAN, ZERO_FILLED, IMPUTED[:2])
    with pytest.raises(ValueError, match=r"clean: expected a non-empty \(N, d\)"):
        feature_reconstruction(CLEAN[0], ZERO_FILLED[0], IMPUTED[0])
    bad = IMPUTED.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="imputed: contains NaN"):
        feature_reconstruction(CLEAN, ZERO_FILLED, bad)


def test_scatter_plot_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(40, 16))
    zero = clean * (rng.random(clean.shape) < 0.8)
    imputed = clean + 0.1 * rng.normal(size=clean.shape)
    out = scatter_plot(feature_reconstruction(clean, zero, imputed), tmp_path / "figs" / "fig3.png")
    data = out.read_bytes()
    assert out == tmp_path / "figs" / "fig3.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
