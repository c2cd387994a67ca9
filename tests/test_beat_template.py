"""The beat template (condi_models.data.beat_template) and the prior that conditions on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condi_models.batches import iterate_batches, prepare_split
from condi_models.data.beat_template import beat_template, is_ecg, r_peaks
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.synthetic_ecg import generate_ecg
from condi_models.imputers import gaussian_em
from condi_models.nn.config import ModelConfig
from condi_models.nn.model import CondIModel
from condi_models.nn.prior import GaussianPrior
from condi_models.nn.sampling import SamplingOptions
from condi_models.simulation import ModelSpec

RATE = 100.0


def beating(n: int, f: int = 4, length: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, f, length) records of sharp beats every 70-90 steps, a lead-specific shape per channel
    (a QRS spike and a slower T wave of random signs and sizes) plus a little noise, and the beat
    positions of each record."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    x = np.zeros((n, f, length))
    peaks = []
    for i in range(n):
        period = rng.integers(70, 91)
        first = rng.integers(10, 40)
        beats = np.arange(first, length, period)
        peaks.append(beats)
        spike, wave = rng.normal(size=f) + 2.0, rng.normal(size=f)
        for b in beats:
            x[i] += spike[:, None] * np.exp(-0.5 * ((t - b) / 2.0) ** 2)
            x[i] += wave[:, None] * np.exp(-0.5 * ((t - b - 25) / 6.0) ** 2)
    x += 0.02 * rng.normal(size=x.shape)
    return x.astype(np.float32), peaks


def test_r_peaks_are_the_beats_of_the_observed_leads():
    x, peaks = beating(3)
    observed = np.ones(x.shape, dtype=bool)
    observed[:, 1, 200:450] = False  # one lead missing for a stretch: the others still show the beats
    for i in range(3):
        found = r_peaks(x[i], observed[i], RATE)
        assert len(found) == len(peaks[i])
        assert np.abs(found - peaks[i]).max() <= 2


def test_the_template_restores_a_lead_missing_for_a_stretch_from_its_own_other_beats():
    x, _ = beating(4)
    observed = np.ones(x.shape, dtype=bool)
    observed[:, 2, 150:400] = False
    t = beat_template(x, observed, RATE)
    gap = ~observed
    assert t.available[gap].all()
    truth = x[gap] - x[gap].mean()
    got = t.values[gap] - t.values[gap].mean()
    assert np.corrcoef(truth, got)[0, 1] > 0.9
    # The baseline is removed: a constant offset of the lead does not reach its template.
    shifted = x.copy()
    shifted[:, 2] += 5.0
    np.testing.assert_allclose(beat_template(shifted, observed, RATE).values[gap], t.values[gap], atol=1e-3)


def test_the_template_never_reads_an_unobserved_entry_and_is_empty_without_beats():
    x, _ = beating(2)
    observed = np.random.default_rng(1).random(x.shape) > 0.3
    poisoned = np.where(observed, x, np.float32(1e6))
    a, b = beat_template(np.where(observed, x, 0.0), observed, RATE), beat_template(poisoned, observed, RATE)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.available, b.available)
    nothing = beat_template(x, np.zeros(x.shape, dtype=bool), RATE)
    assert not nothing.available.any() and not nothing.values.any()
    with pytest.raises(ValueError, match="sampling rate"):
        beat_template(x, observed, 0.0)


def test_the_prior_with_a_template_imputes_a_long_gap_better_than_the_other_leads_alone():
    x, _ = beating(40, seed=2)
    observed = np.ones(x.shape, dtype=bool)
    rng = np.random.default_rng(3)
    for i in range(40):
        lead, start = rng.integers(4), rng.integers(0, 300)
        observed[i, lead, start : start + 250] = False
    template = beat_template(x, observed, RATE)
    tt = (torch.from_numpy(template.values), torch.from_numpy(template.available))
    xt, mt = torch.from_numpy(np.where(observed, x, 0.0).astype(np.float32)), torch.from_numpy(observed)
    errors = {}
    for with_template in (False, True):
        prior = GaussianPrior(4, template=with_template)
        sv, sm = prior.stack(xt, mt, tt)
        mu, cov = prior.moments()
        mu, cov, _ = gaussian_em(sv.numpy(), sm.numpy(), mu, cov, 10)
        prior.set_moments(mu, cov)
        est = prior.conditional(xt, mt, tt).mean.numpy()
        errors[with_template] = np.abs(est - x)[~observed].mean()
    assert errors[True] < 0.75 * errors[False]


def test_the_template_is_on_by_default_for_ecg_leads_only_and_old_configs_have_none():
    ecg = generate_ecg(2, seed=0).info
    assert is_ecg(ecg.channel_names) and not is_ecg(("HR", "SBP")) and not is_ecg(())
    cfg = ModelSpec().build(ecg, 100)
    assert cfg.prior_template and ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert CondIModel(cfg).prior.mean.shape == (12 * 3,)  # leads, templates, interpolations
    assert not ModelSpec(prior_template=False).build(ecg, 100).prior_template
    older = {k: v for k, v in cfg.to_dict().items() if k != "prior_template"}
    assert ModelConfig.from_dict(older).prior_template is False  # written before the template existed


def test_batches_carry_the_whole_records_template_cut_like_their_windows():
    ds = generate_ecg(6, seed=0)
    spec = MissingnessSpec(ps=1.0, pw=0.6, pattern="blocks", seed=0)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), spec)
    whole = beat_template(split.x, split.observed, ds.info.sampling_rate_hz)
    rng = np.random.default_rng(0)
    batch = next(iterate_batches(split, 6, window=250, rng=rng, device=torch.device("cpu"), template=True))
    for row, (i, s) in enumerate(zip(batch.index, batch.start, strict=True)):
        np.testing.assert_array_equal(batch.template[0][row].numpy(), whole.values[i, :, s : s + 250])
        np.testing.assert_array_equal(batch.template[1][row].numpy(), whole.available[i, :, s : s + 250])
    assert next(iterate_batches(split, 6, window=250, rng=None, device=torch.device("cpu"))).template is None
    # A model with a template prior imputes with or without one (without: the template is missing).
    model = CondIModel(ModelSpec(embed_dim=8, cond_dim=8).build(ds.info, 250)).eval()
    opts = SamplingOptions(n_samples=1, steps=2)
    for template in (batch.template, None):
        imp = model.impute(batch.x, batch.observed, opts, generator=torch.Generator().manual_seed(0), template=template)
        assert torch.isfinite(imp.x_hat).all()


def test_rows_of_a_split_keep_their_cut_of_a_template_already_built():
    ds = generate_ecg(6, seed=0)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), MissingnessSpec(ps=1.0, pattern="blocks"))
    assert split.rows(np.array([4, 1])).template is None  # nothing built yet: the rows build their own
    whole = split.beat_template()
    part = split.rows(np.array([4, 1]))
    np.testing.assert_array_equal(part.template.values, whole.values[[4, 1]])
    np.testing.assert_array_equal(part.x, split.x[[4, 1]])
    assert part.sample_ids == (split.sample_ids[4], split.sample_ids[1])
