"""The Gaussian prior under the diffusion imputer: conditional mean, federated EM, where it is refitted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from condi_models.aggregation import ParameterGroups, SiloUpdate, fedavg
from condi_models.data.synthetic_ecg import generate_ecg
from condi_models.imputers import gaussian_em
from condi_models.nn.config import ModelConfig, Variant
from condi_models.nn.model import CondIModel
from condi_models.nn.prior import (
    DEFAULT_INTERPOLATION_SPAN,
    DEFAULT_PRIOR_RIDGE,
    SCALE_FLOOR,
    GaussianPrior,
    interpolate_within,
)
from condi_models.simulation import SLOW_SERIES_PRIOR_RIDGE, ModelSpec
from tests.test_nn import tiny_config


def low_rank_series(rng: np.random.Generator, n: int, f: int = 6, length: int = 40) -> np.ndarray:
    """(n, f, length): every channel a fixed mix of two latent sinusoids plus a little noise."""
    mix = rng.normal(size=(f, 2))
    t = np.arange(length) / length
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    latent = np.stack([np.sin(2 * np.pi * 3 * t + phase), np.cos(2 * np.pi * 5 * t + 2 * phase)], axis=1)
    return (np.einsum("fk,nkl->nfl", mix, latent) + 0.05 * rng.normal(size=(n, f, length))).astype(np.float32)


def test_conditional_mean_and_scale_are_the_ridge_regression_on_the_observed_channels_of_each_instant():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    cov, mu = a @ a.T + 0.1 * np.eye(4), rng.normal(size=4)
    prior = GaussianPrior(4)
    prior.set_moments(mu, cov)
    x = torch.randn(3, 4, 7)
    mask = torch.rand(3, 4, 7) > 0.5
    est = prior.conditional(x * mask, mask)
    got, got_scale = est.mean.double().numpy(), est.scale.double().numpy()
    for b in range(3):
        for t in range(7):
            o = mask[b, :, t].numpy()
            want, var = mu.copy(), np.diag(cov).copy()
            if o.any():
                gain = np.linalg.solve(cov[np.ix_(o, o)] + prior.ridge * np.eye(o.sum()), cov[np.ix_(o, ~o)])
                want[~o] = mu[~o] + (x[b, o, t].double().numpy() - mu[o]) @ gain
                want[o] = x[b, o, t].double().numpy()
                var[~o] -= np.einsum("om,om->m", cov[np.ix_(o, ~o)], gain)
            want_scale = np.where(o, 1.0, np.sqrt(np.maximum(var, SCALE_FLOOR**2)))
            np.testing.assert_allclose(got[b, :, t], want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got_scale[b, :, t], want_scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(est.from_residual(est.to_residual(x)).numpy(), x.numpy(), atol=1e-5)


def test_stack_lays_out_neighbouring_instants_with_the_edges_missing():
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    sv, sm = GaussianPrior(3, lags=1).stack(x, mask)
    assert sv.shape == sm.shape == (2, 9, 5)
    assert torch.equal(sv[:, 3:6], x)  # the centre block is the instant itself
    assert torch.equal(sv[:, 0:3, 1:], x[:, :, :-1])  # block 0 is the instant before
    assert torch.equal(sv[:, 6:9, :-1], x[:, :, 1:])  # block 2 the instant after
    assert not sm[:, 0:3, 0].any() and not sm[:, 6:9, -1].any()  # beyond the record: missing


def test_lagged_conditional_is_the_gaussian_conditional_given_the_observed_entries_of_the_window():
    rng = np.random.default_rng(3)
    f, lags, length = 3, 1, 6
    d = f * (2 * lags + 1)
    a = rng.normal(size=(d, d))
    cov, mu = a @ a.T + 0.1 * np.eye(d), rng.normal(size=d)
    prior = GaussianPrior(f, lags=lags).double()
    prior.set_moments(mu, cov)
    x = torch.randn(2, f, length, dtype=torch.float64)
    mask = torch.rand(2, f, length) > 0.5
    est = prior.conditional(x * mask, mask)
    xn, mn = x.numpy(), mask.numpy()
    centre = np.arange(lags * f, (lags + 1) * f)
    for b in range(2):
        for t in range(length):
            window, obs = np.zeros(d), np.zeros(d, dtype=bool)
            for j in range(2 * lags + 1):
                if 0 <= t + j - lags < length:
                    window[j * f:(j + 1) * f] = xn[b, :, t + j - lags]
                    obs[j * f:(j + 1) * f] = mn[b, :, t + j - lags]
            want, var = mu[centre].copy(), np.diag(cov)[centre].copy()
            miss = centre[~obs[centre]]
            if obs.any() and miss.size:
                gain = np.linalg.solve(cov[np.ix_(obs, obs)] + prior.ridge * np.eye(obs.sum()), cov[np.ix_(obs, miss)])
                want[miss - lags * f] = mu[miss] + (window[obs] - mu[obs]) @ gain
                var[miss - lags * f] -= np.einsum("om,om->m", cov[np.ix_(obs, miss)], gain)
            want = np.where(obs[centre], window[centre], want)
            want_scale = np.where(obs[centre], 1.0, np.sqrt(np.maximum(var, SCALE_FLOOR**2)))
            np.testing.assert_allclose(est.mean[b, :, t].numpy(), want, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(est.scale[b, :, t].numpy(), want_scale, rtol=1e-8, atol=1e-10)


def test_neighbouring_instants_recover_scattered_missing_entries_better_than_the_instant_alone():
    rng = np.random.default_rng(4)
    series = low_rank_series(rng, 80)
    train, test = series[:60], series[60:]
    obs_train, obs_test = rng.random(train.shape) > 0.85, rng.random(test.shape) > 0.85
    errors = {}
    for lags in (0, 2):
        prior = GaussianPrior(6, lags=lags)
        x, o = prior.stack(torch.from_numpy(np.where(obs_train, train, 0.0)), torch.from_numpy(obs_train))
        prior.set_moments(*gaussian_em(x.numpy(), o.numpy(), *prior.moments(), 30)[:2])
        est = prior.conditional(torch.from_numpy(np.where(obs_test, test, 0.0)), torch.from_numpy(obs_test)).mean
        errors[lags] = np.abs(test - est.numpy())[~obs_test].mean()
    # One observed channel in seven per instant cannot pin two latent signals; its neighbours can.
    assert errors[2] < 0.6 * errors[0]


def test_a_fresh_prior_is_the_channel_mean_and_keeps_observed_entries():
    x = torch.randn(2, 5, 9)
    mask = torch.rand(2, 5, 9) > 0.4
    out = GaussianPrior(5).conditional(x * mask, mask).mean
    assert torch.equal(out[mask], x[mask])
    assert torch.all(out[~mask] == 0.0)


def test_averaged_em_moments_from_silos_are_one_em_step_on_the_pooled_records():
    rng = np.random.default_rng(1)
    x = low_rank_series(rng, 30)
    observed = rng.random(x.shape) > 0.6
    x = np.where(observed, x, 0.0).astype(np.float32)
    start_mu, start_cov = np.zeros(6), np.eye(6)
    pooled_mu, pooled_cov, _ = gaussian_em(x, observed, start_mu, start_cov, 1)

    parts = [slice(0, 8), slice(8, 30)]
    updates = []
    for part in parts:
        mu, cov, _ = gaussian_em(x[part], observed[part], start_mu, start_cov, 1)
        prior = GaussianPrior(6)
        prior.set_moments(mu, cov)
        params = {n: p.detach().double().numpy() for n, p in prior.named_parameters()}
        updates.append(SiloUpdate(params=params, weights={"all": float(x[part].shape[0])}))
    groups = ParameterGroups({"mean": "all", "second_moment": "all"})
    fresh = {n: p.detach().double().numpy() for n, p in GaussianPrior(6).named_parameters()}
    merged = fedavg(fresh, updates, groups)
    global_prior = GaussianPrior(6).double()
    global_prior.load_state_dict({n: torch.from_numpy(v) for n, v in merged.items()})
    got_mu, got_cov = global_prior.moments()
    np.testing.assert_allclose(got_mu, pooled_mu, atol=1e-9)
    np.testing.assert_allclose(got_cov, pooled_cov, atol=1e-9)


def test_fitted_prior_recovers_missing_channels_of_correlated_series():
    rng = np.random.default_rng(2)
    series = low_rank_series(rng, 80)
    train, test = series[:60], series[60:]
    obs_train, obs_test = rng.random(train.shape) > 0.5, rng.random(test.shape) > 0.5
    mu, cov, _ = gaussian_em(np.where(obs_train, train, 0.0), obs_train, np.zeros(6), np.eye(6), 30)
    prior = GaussianPrior(6)
    prior.set_moments(mu, cov)
    est = prior.conditional(torch.from_numpy(np.where(obs_test, test, 0.0)), torch.from_numpy(obs_test)).mean
    hidden = ~obs_test
    mean_fill_mae = np.abs(test[hidden] - train.mean(axis=(0, 2), keepdims=True).repeat(20, 0).repeat(40, 2)[hidden])
    prior_mae = np.abs(test[hidden] - est.numpy()[hidden])
    # Two latent signals, half of 6 channels observed: nine instants in ten pin both down.
    assert prior_mae.mean() < 0.35 * mean_fill_mae.mean()


def test_set_moments_refuses_wrong_shapes_and_non_finite_values():
    with pytest.raises(ValueError, match="lags must be >= 0"):
        GaussianPrior(3, lags=-1)
    with pytest.raises(ValueError, match=r"shaped \(9,\) and \(9, 9\)"):
        GaussianPrior(3, lags=1).set_moments(np.zeros(3), np.eye(3))
    prior = GaussianPrior(3)
    with pytest.raises(ValueError, match=r"shaped \(3,\) and \(3, 3\)"):
        prior.set_moments(np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        prior.set_moments(np.array([0.0, np.nan, 0.0]), np.eye(3))


@pytest.mark.parametrize(("variant", "enabled", "has_prior"), [
    (Variant.CONDI, True, True),
    (Variant.CONDI, False, False),
    (Variant.CSDI_UNIMODAL, True, False),
    (Variant.FEDAVG_ZERO_FILL, True, False),
])
def test_which_models_carry_a_prior(variant, enabled, has_prior):
    cfg = dataclasses.replace(tiny_config(variant), gaussian_prior=enabled)
    model = CondIModel(cfg)
    assert (model.prior is not None) == has_prior
    if model.denoiser is not None:
        assert model.denoiser.prior_input == has_prior


def test_prior_lags_reach_the_model_from_an_experiment_config_and_survive_a_round_trip():
    info = generate_ecg(2, seed=0).info
    cfg = ModelSpec(prior_lags=2).build(info, 100)
    assert cfg.prior_lags == 2 and ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = CondIModel(cfg)
    # The five instants, the beat template and the interpolation.
    assert model.prior.mean.shape == (12 * (5 + 2),) and model.prior.lags == 2
    assert ModelSpec().build(info, 100).prior_lags == 0  # opt-in: the window costs D^3


def test_hourly_series_get_a_whole_window_span_held_edges_and_a_stronger_ridge_and_ecg_keeps_its_own():
    ecg = generate_ecg(2, seed=0).info
    hourly = dataclasses.replace(ecg, sampling_rate_hz=1.0 / 3600.0)
    ecg_cfg, cfg = ModelSpec().build(ecg, 100), ModelSpec().build(hourly, 48)
    assert (ecg_cfg.prior_interpolation_span, ecg_cfg.prior_interpolation_edges, ecg_cfg.prior_ridge) == (
        DEFAULT_INTERPOLATION_SPAN, False, DEFAULT_PRIOR_RIDGE
    )
    assert (cfg.prior_interpolation_span, cfg.prior_interpolation_edges, cfg.prior_ridge) == (
        48, True, SLOW_SERIES_PRIOR_RIDGE
    )
    spelled = ModelSpec(prior_interpolation_span=3, prior_interpolation_edges=False, prior_ridge=0.5).build(hourly, 48)
    assert (spelled.prior_interpolation_span, spelled.prior_interpolation_edges, spelled.prior_ridge) == (3, False, 0.5)
    prior = CondIModel(cfg).prior
    assert (prior.interpolation_span, prior.hold_edges, prior.ridge) == (48, True, SLOW_SERIES_PRIOR_RIDGE)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # A config written before these were settings gets what the prior did then.
    older = ModelConfig.from_dict({
        k: v for k, v in cfg.to_dict().items()
        if k not in ("prior_interpolation_span", "prior_interpolation_edges", "prior_ridge")
    })
    assert (older.prior_interpolation_span, older.prior_interpolation_edges, older.prior_ridge) == (10, False, 1e-3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prior_ridge"):
            dataclasses.replace(cfg, prior_ridge=bad)
        with pytest.raises(ValueError, match="prior_ridge"):
            ModelSpec(prior_ridge=bad)
    # The prior bridges a gap of 20 steps only where its span allows it.
    values = torch.zeros(1, 12, 48)
    mask = torch.ones(1, 12, 48, dtype=torch.bool)
    mask[..., 10:30] = False
    for span, bridged in ((48, True), (10, False)):
        prior = CondIModel(dataclasses.replace(cfg, prior_interpolation_span=span)).prior
        _, available = prior.stack(values, mask)
        assert bool(available[0, -12:, 20].all()) == bridged  # the interpolation block, mid-gap
    with pytest.raises(ValueError, match="prior_interpolation_span"):
        dataclasses.replace(cfg, prior_interpolation_span=0)


def test_interpolation_uses_the_nearest_observed_neighbours_never_the_entry_itself():
    values = torch.tensor([[[1.0, 0.0, 0.0, 4.0, 5.0, 0.0, 9.0]]])
    mask = torch.tensor([[[True, False, False, True, True, False, True]]])
    got, available = interpolate_within(values, mask, max_span=10)
    # Observed entries 3 and 4 get their leave-one-out interpolation; the ends have one neighbour only.
    np.testing.assert_allclose(got[0, 0].numpy(), [0.0, 2.0, 3.0, 4.0, 4.0 + 5.0 / 3.0, 7.0, 0.0], atol=1e-6)
    assert available[0, 0].tolist() == [False, True, True, True, True, True, False]
    _, short = interpolate_within(values, mask, max_span=2)
    assert short[0, 0].tolist() == [False, False, False, False, False, True, False]
    poisoned = torch.where(mask, values, torch.tensor(1e6))
    assert torch.equal(interpolate_within(poisoned, mask, 10)[0], got)  # unobserved entries are never read
    # Holding the edges: the ends (left out, as every entry is) take their one neighbour's value, within the span.
    held, edge_available = interpolate_within(values, mask, max_span=10, hold_edges=True)
    np.testing.assert_allclose(held[0, 0].numpy(), [4.0, 2.0, 3.0, 4.0, 4.0 + 5.0 / 3.0, 7.0, 5.0], atol=1e-6)
    assert edge_available[0, 0].tolist() == [True] * 7
    late = torch.tensor([[[False, False, False, False, True, False, False]]])
    got, available = interpolate_within(values, late, max_span=2, hold_edges=True)
    assert available[0, 0].tolist() == [False, False, True, True, False, True, True]
    np.testing.assert_allclose(got[0, 0].numpy(), [0.0, 0.0, 5.0, 5.0, 0.0, 5.0, 5.0])
    assert torch.equal(interpolate_within(poisoned, mask, 10, hold_edges=True)[0], held)


def test_the_interpolation_prior_beats_the_other_channels_alone_on_scattered_points():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(low_rank_series(rng, 60, length=80))
    mask = torch.from_numpy(rng.random(x.shape) > 0.6)
    errors = {}
    for interpolation in (False, True):
        prior = GaussianPrior(6, interpolation=interpolation)
        sv, sm = prior.stack(x * mask, mask)
        mu, cov = prior.moments()
        mu, cov, _ = gaussian_em(sv.numpy(), sm.numpy(), mu, cov, 10)
        prior.set_moments(mu, cov)
        errors[interpolation] = (prior.conditional(x * mask, mask).mean - x).abs()[~mask].mean().item()
    assert errors[True] < 0.8 * errors[False]
