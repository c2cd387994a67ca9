"""Imputation baselines: exactness where the method should be exact, invariants everywhere."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from condi_models import imputers
from condi_models.imputers import (
    LinearInterpolationImputer,
    MeanImputer,
    RidgeImputer,
    make_imputer,
)

NAMES = ("mean", "interpolation", "ridge")


def _hide(x: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The data interface's convention: 0.0 wherever nothing was observed."""
    return np.where(observed, x, 0.0).astype(np.float32)


def _smooth_signals(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """Two independent wiggly channels per sample (sums of sines with random frequency and phase)."""
    t = np.arange(length)[None, None, :]
    freq = rng.uniform(0.05, 0.3, size=(n, 2, 3, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2, 3, 1))
    return np.sin(freq * t[:, :, None] + phase).sum(axis=2)


def test_mean_imputer_uses_observed_training_entries_only() -> None:
    x = np.array([[[1.0, 100.0, 3.0], [2.0, 2.0, 50.0]]], dtype=np.float32)
    obs = np.array([[[True, False, True], [True, True, False]]])
    imp = MeanImputer().fit(_hide(x, obs), obs)
    assert imp.means == pytest.approx([2.0, 2.0])
    test_obs = np.array([[[False, True, False], [False, False, True]]])
    out = imp.impute(_hide(np.full((1, 2, 3), 7.0), test_obs), test_obs)
    assert out.tolist() == [[[2.0, 7.0, 2.0], [2.0, 2.0, 7.0]]]
    assert out.dtype == np.float32


def test_interpolation_exact_on_linear_signal_and_holds_edges() -> None:
    t = np.arange(12, dtype=np.float32)
    x = np.stack([2.0 * t - 3.0, -0.5 * t + 1.0])[None]
    obs = np.zeros_like(x, dtype=bool)
    obs[0, 0, [2, 5, 6, 10]] = True
    obs[0, 1, [0, 11]] = True
    imp = LinearInterpolationImputer().fit(_hide(x, obs), obs)
    out = imp.impute(_hide(x, obs), obs)
    np.testing.assert_allclose(out[0, 0, 2:11], x[0, 0, 2:11], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[0, 1], x[0, 1], rtol=0, atol=1e-5)
    # Before the first and after the last observed point the nearest value is held.
    assert out[0, 0, :2].tolist() == [x[0, 0, 2]] * 2
    assert out[0, 0, 11] == x[0, 0, 10]


def test_interpolation_empty_row_falls_back_to_training_mean() -> None:
    train = np.array([[[1.0, 3.0], [10.0, 20.0]]], dtype=np.float32)
    train_obs = np.ones_like(train, dtype=bool)
    imp = LinearInterpolationImputer().fit(train, train_obs)
    obs = np.array([[[False, False], [True, False]]])
    out = imp.impute(_hide(np.array([[[0.0, 0.0], [4.0, 0.0]]]), obs), obs)
    assert out.tolist() == [[[2.0, 2.0], [4.0, 4.0]]]


def _linear_combination_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channel 2 = channel 0 - channel 1, with contiguous gaps in channel 2 only."""
    rng = np.random.default_rng(seed)
    n, length = 24, 80
    base = _smooth_signals(rng, n, length)
    full = np.concatenate([base, (base[:, 0] - base[:, 1])[:, None]], axis=1).astype(np.float32)
    obs = np.ones(full.shape, dtype=bool)
    for i in range(n):
        start = rng.integers(0, length - 25)
        obs[i, 2, start : start + 25] = False
    return full, obs, ~obs


def test_ridge_recovers_linear_combination_where_interpolation_fails() -> None:
    full, obs, hidden = _linear_combination_data(seed=3)
    train_full, train_obs, _ = _linear_combination_data(seed=4)
    x = _hide(full, obs)
    ridge = RidgeImputer().fit(_hide(train_full, train_obs), train_obs)
    interp = LinearInterpolationImputer().fit(_hide(train_full, train_obs), train_obs)
    ridge_err = np.abs(ridge.impute(x, obs) - full)[hidden].mean()
    interp_err = np.abs(interp.impute(x, obs) - full)[hidden].mean()
    scale = np.abs(full[hidden]).mean()
    assert ridge_err < 0.01 * scale
    assert interp_err > 0.2 * scale


def test_ridge_em_removes_the_bias_of_pairwise_estimates() -> None:
    full, obs, hidden = _linear_combination_data(seed=3)
    train_full, train_obs, _ = _linear_combination_data(seed=4)
    x, train = _hide(full, obs), _hide(train_full, train_obs)
    pairwise_only = RidgeImputer(max_iter=0).fit(train, train_obs)
    em = RidgeImputer().fit(train, train_obs)
    assert pairwise_only.fitted is not None and pairwise_only.fitted.em_iterations == 0
    assert em.fitted is not None and em.fitted.em_iterations > 1
    pairwise_err = np.abs(pairwise_only.impute(x, obs) - full)[hidden].mean()
    em_err = np.abs(em.impute(x, obs) - full)[hidden].mean()
    assert em_err < 0.2 * pairwise_err


def _gaussian_data(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.eye(shape[1]) + 0.6 * rng.normal(size=(shape[1], shape[1]))
    return np.einsum("fg,ngl->nfl", mix, rng.normal(size=shape)) + rng.normal(size=(1, shape[1], 1))


def test_ridge_em_on_complete_data_is_the_sample_moments() -> None:
    x = _gaussian_data(9, (20, 4, 30)).astype(np.float32)
    obs = np.ones(x.shape, dtype=bool)
    imp = RidgeImputer().fit(x, obs)
    g = imp.fitted
    assert g is not None
    z = ((x - g.means[None, :, None]) / g.scales[None, :, None]).transpose(1, 0, 2).reshape(4, -1)
    np.testing.assert_allclose(g.mu, 0.0, atol=1e-6)
    np.testing.assert_allclose(g.cov, np.cov(z, bias=True), atol=1e-6)


def test_ridge_em_recovers_complete_data_moments_from_missing_entries() -> None:
    full = _gaussian_data(10, (200, 4, 50))
    obs = np.random.default_rng(11).random(full.shape) < 0.7
    g = RidgeImputer().fit(_hide(full, obs), obs).fitted
    assert g is not None
    z = ((full - g.means[None, :, None]) / g.scales[None, :, None]).transpose(1, 0, 2).reshape(4, -1)
    np.testing.assert_allclose(g.mu, z.mean(axis=1), atol=0.03)
    np.testing.assert_allclose(g.cov, np.cov(z, bias=True), atol=0.03)


def test_ridge_em_on_sampled_time_steps_is_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    full = _gaussian_data(12, (50, 3, 40))
    obs = np.random.default_rng(13).random(full.shape) < 0.6
    x = _hide(full, obs)
    whole = RidgeImputer().fit(x, obs).fitted
    # 7 observed subsets occur but statistics fit 5 x 3 x 3: EM must run on 5 sampled time steps.
    monkeypatch.setattr(imputers, "_STATS_BUDGET_ENTRIES", 5 * 9)
    a = RidgeImputer(seed=1).fit(x, obs).fitted
    b = RidgeImputer(seed=1).fit(x, obs).fitted
    c = RidgeImputer(seed=2).fit(x, obs).fitted
    assert whole is not None and a is not None and b is not None and c is not None
    np.testing.assert_array_equal(a.cov, b.cov)
    assert not np.array_equal(a.cov, c.cov)
    assert not np.array_equal(a.cov, whole.cov)


def test_ridge_matches_gaussian_conditional_formula() -> None:
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(4, 4))
    x = np.einsum("fg,ngl->nfl", mix, rng.normal(size=(30, 4, 20))).astype(np.float32) + 3.0
    obs = rng.random(x.shape) < 0.6
    x = _hide(x, obs)
    imp = RidgeImputer(alpha=0.05).fit(x, obs)
    out = imp.impute(x, obs)
    g = imp.fitted
    assert g is not None
    checked = 0
    for n, t in zip(*np.nonzero(obs.any(axis=1) & ~obs.all(axis=1)), strict=True):
        o, m = np.flatnonzero(obs[n, :, t]), np.flatnonzero(~obs[n, :, t])
        z_o = (x[n, o, t] - g.means[o]) / g.scales[o] - g.mu[o]
        gain = np.linalg.solve(g.cov[np.ix_(o, o)] + 0.05 * np.eye(o.size), g.cov[np.ix_(o, m)])
        z_m = g.mu[m] + z_o @ gain
        np.testing.assert_allclose(out[n, m, t], g.means[m] + g.scales[m] * z_m, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked > 100


def test_ridge_batched_gains_equal_unbatched(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 5, 30)).astype(np.float32)
    obs = rng.random(x.shape) < 0.5
    x = _hide(x, obs)
    imp = RidgeImputer().fit(x, obs)
    whole = imp.impute(x, obs)
    # Room for 2 patterns' gains at a time: many batches.
    monkeypatch.setattr(imputers, "_GAIN_BATCH_ENTRIES", 2 * 5 * 5)
    np.testing.assert_array_equal(imp.impute(x, obs), whole)


def test_ridge_time_steps_without_observed_channel_fall_back_to_interpolation() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 3, 16)).astype(np.float32)
    obs = rng.random(x.shape) < 0.7
    obs[:, :, 5:8] = False
    x = _hide(x, obs)
    ridge = RidgeImputer().fit(x, obs)
    interp = LinearInterpolationImputer().fit(x, obs)
    np.testing.assert_array_equal(ridge.impute(x, obs)[:, :, 5:8], interp.impute(x, obs)[:, :, 5:8])


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 12)),
    name=st.sampled_from(NAMES),
)
def test_imputers_keep_observed_values_and_never_return_nan(
    data: st.DataObject, shape: tuple[int, int, int], name: str
) -> None:
    values = data.draw(arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))
    obs = data.draw(arrays(np.bool_, shape))
    train_obs = obs.copy()
    train_obs.flat[0] = True  # fitting needs at least one observed entry
    imp = make_imputer(name).fit(_hide(values, train_obs), train_obs)
    x = _hide(values, obs)
    out = imp.impute(x, obs)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not np.any(np.isnan(out))
    np.testing.assert_array_equal(out[obs], x[obs])
    assert out[obs].tobytes() == x[obs].tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_imputer_errors_are_clear(name: str) -> None:
    x = np.zeros((2, 3, 4), dtype=np.float32)
    obs = np.ones_like(x, dtype=bool)
    with pytest.raises(RuntimeError, match="before fit"):
        make_imputer(name).impute(x, obs)
    with pytest.raises(ValueError, match="no observed entry"):
        make_imputer(name).fit(x, np.zeros_like(obs))
    imp = make_imputer(name).fit(x, obs)
    with pytest.raises(ValueError, match="fitted on 3 channels, got 2"):
        imp.impute(x[:, :2], obs[:, :2])
    with pytest.raises(ValueError, match="observed: expected a bool array"):
        imp.impute(x, obs.astype(np.float32))
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        imp.impute(bad, obs)


def test_unobserved_input_values_are_never_read() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4, 10)).astype(np.float32)
    obs = rng.random(x.shape) < 0.6
    clean = _hide(x, obs)
    dirty = np.where(obs, x, 1e6).astype(np.float32)
    for name in NAMES:
        from_clean = make_imputer(name).fit(clean, obs).impute(clean, obs)
        from_dirty = make_imputer(name).fit(dirty, obs).impute(dirty, obs)
        np.testing.assert_array_equal(from_dirty, from_clean)


def test_make_imputer_names() -> None:
    assert isinstance(make_imputer("mean"), MeanImputer)
    assert isinstance(make_imputer("interpolation"), LinearInterpolationImputer)
    assert isinstance(make_imputer("ridge"), RidgeImputer)
    with pytest.raises(ValueError, match=r"unknown imputer 'knn'.*interpolation"):
        make_imputer("knn")
    with pytest.raises(ValueError, match="alpha"):
        RidgeImputer(alpha=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        RidgeImputer(max_iter=-1)
