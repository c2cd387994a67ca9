"""Tests of the CondI networks: eq. 4 routing, diffusion mechanics, variants, Opacus, parameter exchange."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from condi_models.data.dataset import DatasetInfo, Modality
from condi_models.imputers import gaussian_em
from condi_models.metrics import BAND_LEVELS, band_coverage, band_factor
from condi_models.nn import (
    ClassifierConfig,
    CondIModel,
    ContextConfig,
    DenoiserConfig,
    ModelConfig,
    PhaseADraw,
    SamplingOptions,
    Variant,
    make_training_mask,
    resolve_device,
)
from condi_models.nn.band import BandCalibration
from condi_models.nn.diffusion import (
    DiffusionConfig,
    NoiseSchedule,
    antithetic_noise,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    iid_noise,
    sample_quantiles,
)
from condi_models.nn.embeddings import ConditionEmbedding, condition_routing, modality_availability
from condi_models.training import aggregation_groups

torch.set_num_threads(1)


def tiny_config(variant: Variant | str = Variant.CONDI, channel_modality=(0, 0, 1, 2), length=24) -> ModelConfig:
    return ModelConfig(
        channel_modality=channel_modality,
        n_classes=3,
        length=length,
        variant=variant,
        embed_dim=8,
        cond_dim=8,
        denoiser=DenoiserConfig(hidden=16, n_blocks=1, n_heads=2, patch_size=4, conv_channels=4,
                                conv_kernel=3, out_channels=4, time_embed_dim=8, channel_embed_dim=4,
                                step_embed_dim=16),
        context=ContextConfig(stem_dim=8, n_experts=2, expert_hidden=16, out_dim=8),
        classifier=ClassifierConfig(hidden=16, n_blocks=1, n_heads=2, patch_size=4, conv_channels=2,
                                    conv_kernel=3, pos_embed_dim=8, head_hidden=16, dropout=0.0),
    )


def random_batch(cfg: ModelConfig, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    observed = torch.rand(b, cfg.n_features, cfg.length, generator=g) > 0.3
    observed[0, cfg.n_features - 1] = False  # one sample with a whole modality missing
    x = torch.randn(b, cfg.n_features, cfg.length, generator=g) * observed
    y = torch.randint(0, cfg.n_classes, (b,), generator=g)
    return x, observed, y


# ---- equation 4 ------------------------------------------------------------------------------


def test_condition_routing_matches_equation_4_exactly():
    m, d = 4, 3
    emb = ConditionEmbedding(m, d)
    with torch.no_grad():
        emb.table.weight.copy_(torch.arange(m * m * d, dtype=torch.float32).view(m * m, d))
    w = emb.matrix()
    r = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = emb(r)
    expected = torch.stack([
        torch.stack([w[0, 0], w[1, 1], w[2, 2], w[3, 3]]),
        torch.stack([w[0, 0], w[0, 1], w[0, 2], w[0, 3]]),
        torch.stack([w[0, 0], (w[0, 1] + w[2, 1]) / 2, w[2, 2], (w[0, 3] + w[2, 3]) / 2]),
        torch.stack([w[:, j].sum(0) / 4 for j in range(m)]),  # nothing observed: mean over all sources
    ])
    assert torch.equal(got, expected)


def test_condition_routing_three_sources_is_their_mean():
    emb = ConditionEmbedding(4, 2)
    r = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)
    w = emb.matrix()
    assert torch.allclose(emb(r)[0, 2], (w[0, 2] + w[1, 2] + w[3, 2]) / 3)
    assert torch.equal(condition_routing(r)[0].sum(0), torch.ones(4))


def test_availability_from_hand_built_mask():
    channel_modality = torch.tensor([0, 0, 1, 2])
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1, 3] = True  # modality 0 through its second channel
    mask[0, 3, 0] = True
    mask[1, 2, 4] = True
    r = modality_availability(mask, channel_modality, 3)
    assert r.tolist() == [[True, False, True], [False, True, False]]


def test_wcond_rows_get_gradient_only_from_observed_sources():
    model = CondIModel(tiny_config())
    x, observed, y = random_batch(model.cfg, 1, 0)
    observed[:, model.cfg.channel_modality.index(1) :] = False  # only modality 0 observed
    model.phase_b_loss(x * observed, observed, y).backward()
    grad = model.w_cond.table.weight.grad.view(3, 3, -1).abs().sum(-1)
    assert torch.all(grad[0] > 0)  # W_cond[0, m] used for m = 0 (self) and m = 1, 2 (routing)
    assert torch.all(grad[1:] == 0)
    owners = model.parameter_groups().modality_rows["w_cond.table.weight"]
    assert owners == (0, 0, 0, 1, 1, 1, 2, 2, 2)


# ---- training masks and loss ------------------------------------------------------------------


def test_training_mask_is_inside_observed_and_seeded():
    g = torch.Generator().manual_seed(3)
    observed = torch.rand(16, 3, 30, generator=g) > 0.2
    a = make_training_mask(observed, torch.Generator().manual_seed(1))
    b = make_training_mask(observed, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.any(a & ~observed)
    assert torch.any(observed & ~a)


def test_historical_mask_borrows_pattern_and_falls_back_when_it_hides_nothing():
    observed = torch.ones(2, 2, 10, dtype=torch.bool)
    borrowed = observed.clone()
    borrowed[0, 1] = False  # sample 0 borrows "channel 1 missing"
    cond = make_training_mask(observed, torch.Generator().manual_seed(0), borrowed, strategy="historical")
    assert torch.equal(cond[0], borrowed[0])
    assert torch.any(~cond[1])  # sample 1's borrowed pattern hides nothing: random draw instead


@pytest.mark.parametrize(("prior", "lags"), [(False, 0), (True, 0), (True, 2)])
def test_phase_a_loss_decreases_on_correlated_sines(prior, lags):
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        tiny_config(channel_modality=(0, 1), length=32), gaussian_prior=prior, prior_lags=lags
    )
    model = CondIModel(cfg)
    g = torch.Generator().manual_seed(0)
    phase = torch.rand(64, 1, 1, generator=g) * 2 * math.pi
    t = torch.arange(32) / 32 * 4 * math.pi
    x = torch.cat([torch.sin(t + phase), torch.sin(t + phase + 0.5)], dim=1)
    observed = torch.ones_like(x, dtype=torch.bool)
    if prior:
        xs, obs = model.prior.stack(x, observed)
        mu, cov, _ = gaussian_em(xs.numpy(), obs.numpy(), *model.prior.moments(), 20)
        model.prior.set_moments(mu, cov)

    def eval_loss() -> float:
        fixed = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(sum(model.phase_a_loss(x, observed, fixed) for _ in range(4)) / 4)

    before = eval_loss()
    opt = torch.optim.Adam(model.phase_parameters("a"), lr=3e-3)
    for step in range(100):
        idx = torch.randint(0, 64, (16,), generator=g)
        loss = model.phase_a_loss(x[idx], observed[idx], torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # With the prior the untrained network already gives the noise estimate that is exact for a
    # Gaussian residual; training must still find the structure in time the prior lacks.
    assert after < (0.9 if prior else 0.6) * before, (before, after)


# ---- samplers ------------------------------------------------------------------------------------


def gaussian_eps(schedule: NoiseSchedule, mean: torch.Tensor, var: float):
    """The exact noise predictor E[eps | z_t] when the target is N(mean, var) entrywise."""

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bars[t].view(-1, 1, 1)
        return (1 - ab).sqrt() * (z - ab.sqrt() * mean) / (ab * var + 1 - ab)

    return eps_fn


def test_ddpm_and_ddim_agree_with_the_known_gaussian_conditional():
    # x2 | x1 ~ N(rho * x1, 1 - rho^2): the conditional a bivariate normal implies.
    schedule = NoiseSchedule(DiffusionConfig())
    rho, n = 0.8, 4000
    x1 = torch.tensor([-1.5, 0.0, 0.7, 2.0])
    mean = (rho * x1).view(1, 1, -1).expand(n, 1, -1)
    var = 1 - rho**2
    eps_fn = gaussian_eps(schedule, mean, var)
    target = torch.ones(n, 1, 4, dtype=torch.bool)
    ddpm = ddpm_sample(eps_fn, schedule, target, iid_noise(torch.Generator().manual_seed(0)))
    ddim = ddim_sample(eps_fn, schedule, target, 50, iid_noise(torch.Generator().manual_seed(1)))
    ddim10 = ddim_sample(eps_fn, schedule, target, 10, iid_noise(torch.Generator().manual_seed(2)))
    sd = math.sqrt(var)
    for samples in (ddpm, ddim, ddim10):
        assert torch.allclose(samples.median(0).values[0], rho * x1, atol=0.05)
    # Both full-length samplers carry the right spread (finite-step error is a few percent).
    for samples in (ddpm, ddim):
        assert 0.85 * sd < float(samples.std(0).mean()) < 1.05 * sd
    q = torch.tensor([0.1, 0.25, 0.75, 0.9])
    z = torch.distributions.Normal(0.0, 1.0).icdf(q).view(-1, 1, 1, 1)
    truth = rho * x1.view(1, 1, 1, -1) + sd * z
    for samples in (ddpm, ddim):
        assert torch.allclose(torch.quantile(samples, q, dim=0)[:, None], truth, atol=0.1)


def test_ddim_with_a_wrong_sign_noise_model_is_far_off():
    # The agreement above is not vacuous: a broken predictor gives a different answer.
    schedule = NoiseSchedule(DiffusionConfig())
    mean = torch.full((500, 1, 1), 1.0)
    good = gaussian_eps(schedule, mean, 0.1)
    out = ddim_sample(lambda z, t: -good(z, t), schedule, torch.ones(500, 1, 1), 10, iid_noise(torch.Generator()))
    assert abs(float(out.median()) - 1.0) > 0.5


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clipping_bounds_a_bad_noise_model(sampler):
    schedule = NoiseSchedule(DiffusionConfig())
    target = torch.ones(200, 1, 3)

    def bad(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -3.0 * z

    noise = iid_noise(torch.Generator().manual_seed(0))
    if sampler == "ddim":
        free, bounded = (ddim_sample(bad, schedule, target, 10, noise, clip=c) for c in (None, 4.0))
    else:
        free, bounded = (ddpm_sample(bad, schedule, target, noise, clip=c) for c in (None, 4.0))
    assert float(free.abs().max()) > 4.0
    assert float(bounded.abs().max()) <= 4.0 + 1e-5


def test_antithetic_noise_pairs_the_copies_and_keeps_one_centre_path():
    noise = antithetic_noise(5, torch.Generator().manual_seed(0))
    e = noise(torch.zeros(5 * 3, 2, 4))  # five stacked copies of a batch of three
    assert torch.equal(e[6:12], -e[0:6]) and torch.equal(e[12:], torch.zeros(3, 2, 4))
    assert not torch.equal(e[0:3], e[3:6])
    assert not torch.equal(noise(torch.zeros(15, 2, 4)), e)  # every call draws afresh
    with pytest.raises(ValueError, match="do not split into 5 stacked copies"):
        noise(torch.zeros(7, 2, 4))
    with pytest.raises(ValueError, match="at least one copy"):
        antithetic_noise(0, None)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_antithetic_draws_of_a_centred_gaussian_have_median_zero(sampler):
    # For a zero-mean Gaussian target (the prior's standardized residual under an untrained head)
    # both samplers are odd maps of their noise, so pairs mirror about zero and the median of an
    # odd antithetic set is zero exactly; the median of independent draws scatters.
    schedule = NoiseSchedule(DiffusionConfig())
    copies, rows, var = 5, 300, 0.5
    eps_fn = gaussian_eps(schedule, torch.zeros(copies * rows, 1, 1), var)
    target = torch.ones(copies * rows, 1, 1, dtype=torch.bool)

    def draws(noise) -> torch.Tensor:
        if sampler == "ddim":
            return ddim_sample(eps_fn, schedule, target, 50, noise).view(copies, rows)
        return ddpm_sample(eps_fn, schedule, target, noise).view(copies, rows)

    anti = draws(antithetic_noise(copies, torch.Generator().manual_seed(0)))
    iid = draws(iid_noise(torch.Generator().manual_seed(0)))
    assert float(anti.median(0).values.abs().max()) < 1e-6
    assert float(iid.median(0).values.abs().mean()) > 0.1
    # The paired draws still carry the target's spread.
    sd = math.sqrt(var)
    assert 0.8 * sd < float(anti[:4].pow(2).mean().sqrt()) < 1.2 * sd


def test_schedule_is_quadratic_and_ends_near_pure_noise():
    s = NoiseSchedule(DiffusionConfig())
    assert s.betas.shape == (50,)
    assert math.isclose(float(s.betas[0]), 1e-4, rel_tol=1e-5)
    assert math.isclose(float(s.betas[-1]), 0.5, rel_tol=1e-5)
    assert float(s.alpha_bars[-1]) < 1e-3
    assert ddim_timesteps(50, 10)[0] == 49 and ddim_timesteps(50, 10)[-1] == 0
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(50, 0)


def test_sample_quantiles_match_numpy():
    s = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(0))
    levels = (0.05, 0.5, 0.9)
    np.testing.assert_allclose(sample_quantiles(s, levels).numpy(), np.quantile(s.numpy(), levels, axis=0),
                               rtol=1e-5, atol=1e-6)


# ---- imputation --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_impute_keeps_observed_entries_and_is_seeded(method):
    model = CondIModel(tiny_config())
    x, observed, _ = random_batch(model.cfg, 3, 1)
    opts = SamplingOptions(n_samples=4, steps=5, method=method, quantiles=(0.1, 0.9))
    a = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(7), return_samples=True)
    b = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(7), return_samples=True)
    c = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(8), return_samples=True)
    assert torch.equal(a.x_hat[observed], x[observed])
    assert torch.equal(a.quantiles[:, observed], x[observed].expand(2, -1))
    assert torch.equal(a.samples[:, observed], x[observed].expand(4, -1))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.x_hat, b.x_hat)
    assert not torch.equal(a.samples[:, ~observed], c.samples[:, ~observed])
    assert torch.all(a.quantiles[0] <= a.median) and torch.all(a.median <= a.quantiles[1])
    assert model.training  # impute restores the mode it found


def test_band_factors_widen_the_quantiles_and_are_optional_in_a_loaded_state():
    model = CondIModel(tiny_config())
    x, observed, _ = random_batch(model.cfg, 3, 1)
    opts = SamplingOptions(n_samples=5, steps=3, quantiles=(0.05, 0.25, 0.75, 0.95), antithetic=False)

    def impute():
        return model.impute(x, observed, opts, generator=torch.Generator().manual_seed(7), return_samples=True)

    plain = impute()
    raw = sample_quantiles(plain.samples, opts.quantiles)
    assert torch.allclose(plain.quantiles, raw)  # a fresh model's factors are 1
    state = {n: t for n, t in model.state_to_named_tensors().items() if not n.startswith("band.")}
    model.band.set_factors([2.0, 3.0], draws=5)  # 50 % band, 90 % band, for the 5 draws drawn here
    widened = impute()
    expect = torch.tensor([3.0, 2.0, 2.0, 3.0]).view(-1, 1, 1, 1)
    assert torch.allclose(widened.quantiles, plain.median + expect * (raw - plain.median), atol=1e-6)
    assert torch.equal(widened.median, plain.median)
    assert model.band.factor(0.15, 5) == pytest.approx(2.5)  # a 70 % band: halfway between
    # A state from before the calibration loads, and leaves the factors as they are.
    model.load_named_tensors(state)
    assert model.band.values() == (2.0, 3.0)
    with pytest.raises(ValueError, match="missing"):
        model.load_named_tensors({n: t for n, t in state.items() if n != "prior.mean"})
    with pytest.raises(ValueError, match="finite positive"):
        model.band.set_factors([1.0, 0.0], draws=5)


def test_band_factors_fitted_on_five_draws_carry_over_to_twenty():
    """An imputer half as spread as the truth: fitted on 5 draws, its band still covers as asked from 20."""
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(40_000)

    def draws(n: int) -> np.ndarray:
        return 0.5 * rng.standard_normal((n, truth.size))

    band = BandCalibration()
    band.set_factors([band_factor(truth, draws(5), level) for level in BAND_LEVELS], draws=5)
    many = draws(20)
    as_fitted = band.values()
    carried = band.factors_for(20)
    for level, fitted, factor in zip(BAND_LEVELS, as_fitted, carried, strict=True):
        assert band_coverage(truth, many, level, factor)[0] == pytest.approx(level, abs=0.015)
        # The five-draw factor itself is mostly their small-sample shortfall: from 20 it over-covers.
        assert band_coverage(truth, many, level, fitted)[0] > level + 0.07
    assert band.factors_for(5) == as_fitted and band.factors_for(1) == as_fitted
    # Hostile or stale counts are read clamped: a NaN is "unknown", the factors apply as they are.
    with torch.no_grad():
        band.draws.fill_(float("nan"))
    assert band.fitted_draws() == 0 and band.factors_for(20) == as_fitted


def test_impute_in_chunks_gives_the_requested_number_of_samples():
    model = CondIModel(tiny_config())
    x, observed, _ = random_batch(model.cfg, 2, 2)
    out = model.impute(x, observed, SamplingOptions(n_samples=5, steps=3, chunk_size=2), return_samples=True,
                       generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (5, 2, 4, 24)


def test_antithetic_imputation_of_a_fresh_model_is_its_prior_mean():
    # An untrained head samples the prior's Gaussian posterior exactly, so the antithetic median
    # is the prior's conditional mean; one draw is the centre path alone, and chunking keeps pairs.
    model = CondIModel(tiny_config())
    f = model.cfg.n_features
    a = torch.randn(f, f, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model.prior.set_moments(np.linspace(-1.0, 1.0, f), (a @ a.T + 0.5 * torch.eye(f, dtype=torch.float64)).numpy())
    x, observed, _ = random_batch(model.cfg, 3, 5)
    prior_mean = model.prior_estimate(x * observed, observed).mean
    hidden = ~observed

    def median(**kwargs) -> torch.Tensor:
        opts = SamplingOptions(steps=4, **kwargs)
        return model.impute(x, observed, opts, generator=torch.Generator().manual_seed(6)).median

    five = median(n_samples=5)
    assert torch.allclose(five[hidden], prior_mean[hidden], atol=1e-4)
    assert torch.allclose(median(n_samples=1)[hidden], prior_mean[hidden], atol=1e-4)
    assert torch.allclose(median(n_samples=5, chunk_size=3)[hidden], prior_mean[hidden], atol=1e-4)
    independent = median(n_samples=5, antithetic=False)
    assert float((independent[hidden] - prior_mean[hidden]).abs().mean()) > 0.05


def test_imputation_does_not_see_hidden_values():
    model = CondIModel(tiny_config())
    x, observed, _ = random_batch(model.cfg, 2, 3)
    leaked = torch.where(observed, x, torch.full_like(x, 100.0))
    opts = SamplingOptions(n_samples=2, steps=3)
    a = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(0))
    b = model.impute(leaked, observed, opts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.median[~observed], b.median[~observed])


# ---- variants ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(Variant))
def test_every_variant_trains_and_predicts(variant):
    torch.manual_seed(0)
    model = CondIModel(tiny_config(variant))
    x, observed, y = random_batch(model.cfg, 4, 4)
    spec = model.spec
    feats = model.features(x, observed)
    assert feats.shape == (4, model.cfg.n_modalities * spec.fusion_parts * model.cfg.embed_dim)
    model.phase_b_loss(x, observed, y).backward()
    if spec.diffusion:
        model.phase_a_loss(x, observed, torch.Generator().manual_seed(0)).backward()
    else:
        with pytest.raises(RuntimeError, match="no diffusion"):
            model.phase_a_loss(x, observed)
    pred = model.predict(x, observed, generator=torch.Generator().manual_seed(0))
    assert pred.logits.shape == (4, 3)
    assert (pred.imputation is not None) == spec.impute_for_classification
    groups = model.parameter_groups()
    names = {n for n, _ in model.named_parameters()}
    assert set(groups.theta) | set(groups.w_mod) | set(groups.w_cond) == names
    assert not set(groups.theta) & (set(groups.w_mod) | set(groups.w_cond))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups.phase_a) | set(groups.phase_b) == trainable
    # What no optimizer trains is the Gaussian prior, fitted by EM, and the imputer's network gate
    # and band factors (with their draw count), fitted on held-out entries; all are averaged like theta.
    has_prior = spec.diffusion and spec.diffusion_prior
    frozen = {"prior.mean", "prior.second_moment", "network_gate"} if has_prior else set()
    frozen |= {"band.factors", "band.draws"} if spec.diffusion else set()
    assert names - trainable == frozen


def test_variant_parts():
    assert CondIModel(tiny_config(Variant.NO_WCOND)).w_cond is None
    assert CondIModel(tiny_config(Variant.FEDAVG_ZERO_FILL)).w_mod is None
    unimodal = CondIModel(tiny_config(Variant.CSDI_UNIMODAL))
    assert unimodal.context is None and unimodal.w_cond is None and unimodal.denoiser is not None
    assert CondIModel(tiny_config(Variant.PEPSY)).classifier.pool is not None


def test_omega_cond_in_features_follows_the_original_pattern_after_imputation():
    model = CondIModel(tiny_config())
    x, observed, _ = random_batch(model.cfg, 2, 5)
    full = torch.ones_like(observed)
    r = model.availability(observed)
    assert not torch.equal(model.features(x, full), model.features(x, full, availability=r))


def test_pepsy_fills_missing_modality_from_available_ones():
    model = CondIModel(tiny_config(Variant.PEPSY))
    feats = torch.randn(1, 3, 8)
    r = torch.tensor([[True, False, True]])
    out = model.classifier.pool(feats, r)
    expected = (feats[0, 0] + feats[0, 2]) / 2 + model.classifier.pool.table.weight[1]
    assert torch.allclose(out[0, 1], expected)
    assert torch.equal(out[0, 0], feats[0, 0])


# ---- Opacus ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(Variant))
def test_opacus_validates_every_variant(variant):
    model = CondIModel(tiny_config(variant))
    assert ModuleValidator.validate(model, strict=False) == []
    assert GradSampleModule.validate(model, strict=False) == []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            assert type(module) in GradSampleModule.GRAD_SAMPLERS, f"{name} needs functorch: {type(module)}"


def per_sample_reference(model, loss_fn, b: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(slice(b, b + 1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("phase", ["a", "b"])
def test_opacus_private_step_and_exact_per_sample_gradients(phase):
    torch.manual_seed(0)
    model = CondIModel(tiny_config())
    x, observed, y = random_batch(model.cfg, 4, 6)
    draw = model.phase_a_draw(x, observed, torch.Generator().manual_seed(0))

    def loss_fn(sl: slice) -> torch.Tensor:
        if phase == "a":
            part = PhaseADraw(draw.cond_mask[sl], draw.t[sl], draw.noise[sl])
            return model.phase_a_loss_for(x[sl], observed[sl], part)
        return model.phase_b_loss(x[sl], observed[sl], y[sl])

    reference = per_sample_reference(model, loss_fn, 2)
    params = model.phase_parameters(phase)
    optimizer = torch.optim.SGD(params, lr=0.1)
    loader = DataLoader(TensorDataset(x, observed, y), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        )
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        loss_fn(slice(0, 4)).backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        assert p.grad_sample.shape == (4, *p.shape), names[id(p)]
        ref = reference.get(names[id(p)], torch.zeros_like(p))
        assert torch.allclose(p.grad_sample[2], ref, rtol=1e-3, atol=1e-5), names[id(p)]
    optimizer.step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert engine.get_epsilon(1e-5) > 0
    private.remove_hooks()


# ---- parameters, exchange, configuration, devices ------------------------------------------------


def test_named_tensor_round_trip_reproduces_outputs():
    a = CondIModel(tiny_config())
    torch.manual_seed(99)
    b = CondIModel(tiny_config())
    x, observed, _ = random_batch(a.cfg, 2, 7)
    a.eval()
    b.eval()
    assert not torch.equal(a.classify(x, observed), b.classify(x, observed))
    tensors = a.state_to_named_tensors()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    b.load_named_tensors(tensors)
    assert torch.equal(a.classify(x, observed), b.classify(x, observed))


def test_import_errors_name_the_tensor():
    model = CondIModel(tiny_config())
    tensors = model.state_to_named_tensors()
    bad = dict(tensors, **{"w_cond.table.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"w_cond\.table\.weight.*shape"):
        model.load_named_tensors(bad)
    bad = dict(tensors, **{"w_mod.table.weight": tensors["w_mod.table.weight"].double()})
    with pytest.raises(ValueError, match=r"w_mod\.table\.weight.*dtype"):
        model.load_named_tensors(bad)
    missing = {k: v for k, v in tensors.items() if k != "classifier.head.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing \['classifier\.head\.fc2\.bias'\]"):
        model.load_named_tensors(missing)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_named_tensors(dict(tensors, extra=torch.zeros(1)))


def test_aggregation_weights_follow_modality_ownership():
    model = CondIModel(tiny_config())
    groups = aggregation_groups(model)
    holds = {"all": 10.0, "modality/0": 4.0, "modality/1": 0.0, "modality/2": 7.0}
    params = dict(model.named_parameters())
    weights = {n: groups.weight_array(n, tuple(params[n].shape), holds) for n in groups.assignment}
    for name, w in weights.items():
        assert (w * params[name].detach().numpy()).shape == tuple(params[name].shape)
    assert weights["w_mod.table.weight"].flatten().tolist() == [4.0, 0.0, 7.0]
    assert weights["w_cond.table.weight"].flatten().tolist() == [4, 4, 4, 0, 0, 0, 7, 7, 7]
    assert float(weights["context.stems.1.weight"]) == 0.0
    assert float(weights["classifier.encoder.stems.2.weight"]) == 7.0
    assert float(weights["denoiser.patch_in.weight"]) == 10.0
    groups = model.parameter_groups().as_dict()
    assert "context.stems.1.weight" in groups["modality:1"]


def test_config_round_trip_and_errors():
    cfg = tiny_config(Variant.PEPSY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    older = {k: v for k, v in tiny_config().to_dict().items() if k != "gaussian_prior"}
    assert ModelConfig.from_dict(older).gaussian_prior is False  # written before the prior existed
    one_instant = {k: v for k, v in tiny_config().to_dict().items() if k != "prior_lags"}
    assert ModelConfig.from_dict(one_instant).prior_lags == 0  # written before the prior had lags
    with pytest.raises(ValueError, match="prior_lags must be >= 0"):
        dataclasses.replace(cfg, prior_lags=-1)
    assert cfg.to_dict()["channel_modality"] == [0, 0, 1, 2] and cfg.to_dict()["variant"] == "pepsy"
    with pytest.raises(ValueError, match="model config: hiddn: unknown key"):
        ModelConfig.from_dict({**cfg.to_dict(), "hiddn": 3})
    with pytest.raises(ValueError, match=r"model config: denoiser\.hiden: unknown key"):
        ModelConfig.from_dict({**cfg.to_dict(), "denoiser": {"hiden": 3}})
    with pytest.raises(ValueError, match="model config: n_classes: required key is missing"):
        ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "n_classes"})
    with pytest.raises(ValueError, match=r"model config: denoiser: .*divisible by n_heads"):
        ModelConfig.from_dict({**cfg.to_dict(), "denoiser": {"hidden": 30}})
    with pytest.raises(ValueError, match="variant"):
        ModelConfig(channel_modality=(0,), n_classes=2, length=4, variant="fancy")
    with pytest.raises(ValueError, match="modalities without channels"):
        ModelConfig(channel_modality=(0, 2), n_classes=2, length=4)
    with pytest.raises(ValueError, match="divisible"):
        DenoiserConfig(hidden=30, n_heads=4)


def test_bad_inputs_get_clear_errors():
    model = CondIModel(tiny_config())
    x, observed, _ = random_batch(model.cfg, 2, 8)
    with pytest.raises(ValueError, match=r"x must be a float tensor shaped \(B, 4, L\)"):
        model.classify(x[:, :3], observed[:, :3])
    with pytest.raises(ValueError, match="observed must be a bool tensor"):
        model.classify(x, observed.float())


def test_sleep_edf_sized_windows_are_workable():
    info = DatasetInfo(
        name="sleep-edf",
        modalities=tuple(Modality(n, (n,)) for n in ("fpz", "pz", "eog", "resp", "emg")),
        sampling_rate_hz=100.0, length=3000, classes=("W", "N1", "N2", "N3", "REM"), task="stage",
    )
    cfg = ModelConfig.for_dataset(info)
    assert cfg.denoiser.patch_size == 120 and cfg.n_modalities == 5
    model = CondIModel(cfg)
    x, observed, _ = random_batch(cfg, 2, 9)
    assert torch.isfinite(model.phase_a_loss(x, observed, torch.Generator().manual_seed(0)))
    assert model.classify(x, observed).shape == (2, 5)


def test_uneven_length_is_padded_and_cropped():
    model = CondIModel(tiny_config(length=22))
    x, observed, _ = random_batch(model.cfg, 2, 10)
    out = model.impute(x, observed, SamplingOptions(n_samples=2, steps=2), generator=torch.Generator().manual_seed(0))
    assert out.x_hat.shape == x.shape


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_runs_on_cuda_with_a_cpu_generator():
    device = resolve_device("cuda")
    model = CondIModel(tiny_config()).to(device)
    x, observed, y = random_batch(model.cfg, 3, 11)
    x, observed, y = x.to(device), observed.to(device), y.to(device)
    model.phase_a_loss(x, observed, torch.Generator().manual_seed(0)).backward()
    model.phase_b_loss(x, observed, y).backward()
    opts = SamplingOptions(n_samples=2, steps=3)
    a = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(1))
    b = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(1))
    assert a.x_hat.device.type == "cuda"
    assert torch.equal(a.x_hat[observed], x[observed])
    assert torch.allclose(a.x_hat, b.x_hat)
