"""Batched inference: the sampler's fast path gives what the plain forward pass gives (tiny models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from condi_models.nn import CondIModel, SamplingOptions
from condi_models.nn import parts as parts_module
from condi_models.nn.diffusion import antithetic_noise, ddim_sample, ddpm_sample, iid_noise, sample_quantiles
from condi_models.nn.parts import denoise_in_parts, split_rows
from condi_models.nn.prior import PriorEstimate
from condi_models.nn.sampling import RowGenerators
from tests.test_nn import random_batch, tiny_config

torch.set_num_threads(1)

# What the fast path may differ by from the plain one: the same arithmetic summed in another order
# (float32, standardized units; the tiny models' outputs are of order 1).
TOLERANCE = 1e-5


def trained_looking(variant: str = "condi", mixer: bool = True) -> CondIModel:
    """A tiny model whose denoiser head is not zero, so the network's output reaches the draws."""
    torch.manual_seed(0)
    cfg = tiny_config(variant)
    if not mixer:
        cfg = dataclasses.replace(cfg, denoiser=dataclasses.replace(cfg.denoiser, point_mixer_dim=0))
    model = CondIModel(cfg)
    with torch.no_grad():
        model.denoiser.head.weight.normal_(0.0, 0.3)
        model.denoiser.head.bias.normal_(0.0, 0.1)
    return model.eval()


def repeated(prior: PriorEstimate | None, k: int) -> PriorEstimate | None:
    """The prior's estimate for a batch stacked ``k`` times."""
    return None if prior is None else PriorEstimate(prior.mean.repeat(k, 1, 1), prior.scale.repeat(k, 1, 1))


def reference_impute(
    model: CondIModel, x: torch.Tensor, observed: torch.Tensor, opts: SamplingOptions, generator: torch.Generator
) -> torch.Tensor:
    """The draws (n, B, F, L) as impute computed them before it was batched: every window through the
    plain forward pass at every step, its inputs repeated once per draw."""
    b, f, length = x.shape
    k = opts.n_samples
    with torch.no_grad():
        values = x * observed
        context = model.diffusion_context(values, observed)
        prior = model.prior_estimate(values, observed)
        rep_values, rep_cond = values.repeat(k, 1, 1), observed.repeat(k, 1, 1)
        rep_context = None if context is None else context.repeat(k, 1, 1)
        rep_prior = repeated(prior, k)

        def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model._eps(model.denoiser, z, rep_values, rep_cond, t, rep_context, rep_prior)

        noise = antithetic_noise(k, generator) if opts.antithetic else iid_noise(generator)
        if opts.method == "ddpm":
            z = ddpm_sample(eps_fn, model.schedule, ~rep_cond, noise, opts.clip_x0)
        else:
            z = ddim_sample(eps_fn, model.schedule, ~rep_cond, opts.steps, noise, opts.eta, opts.clip_x0)
        if rep_prior is not None:
            z = rep_prior.from_residual(z)
        return torch.where(observed[None], x[None], z.view(k, b, f, length))


@pytest.mark.parametrize(
    ("variant", "mixer"), [("condi", True), ("condi", False), ("csdi_unimodal", True)],
    ids=["condi", "no-point-mixer", "no-prior-no-context"],
)
def test_conditioned_denoiser_matches_its_forward_pass(variant, mixer, monkeypatch):
    model = trained_looking(variant, mixer)
    x, observed, _ = random_batch(model.cfg, 3, 0)
    values = x * observed
    with torch.no_grad():
        context = model.diffusion_context(values, observed)
        prior = model.prior_estimate(values, observed)
        condition = model.denoiser.condition(values, observed, context, prior)
        for copies in (1, 3):
            z = torch.randn(copies * 3, *x.shape[1:], generator=torch.Generator().manual_seed(copies))
            t = torch.full((copies * 3,), 17)
            plain = model.denoiser(
                z, values.repeat(copies, 1, 1), observed.repeat(copies, 1, 1), t,
                None if context is None else context.repeat(copies, 1, 1), repeated(prior, copies),
            )
            assert float(plain.abs().max()) > 0.1  # the head is live
            torch.testing.assert_close(model.denoiser.denoise(z, t, condition), plain, atol=TOLERANCE, rtol=0)
            # In parts of two rows: several copies of all windows, or some windows of one copy.
            monkeypatch.setattr(parts_module, "CPU_ROWS_PER_PART", 2)
            parts = denoise_in_parts(model.denoiser, z, t, condition)
            monkeypatch.undo()
            torch.testing.assert_close(parts, plain, atol=TOLERANCE, rtol=0)
        with pytest.raises(ValueError, match="not copies of the 3 conditioned windows"):
            model.denoiser.denoise(z[:4], t[:4], condition)


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(n_samples=1, steps=5),
        SamplingOptions(n_samples=5, steps=5),
        SamplingOptions(n_samples=3, steps=4, antithetic=False),
        SamplingOptions(n_samples=2, method="ddpm", antithetic=False),
        SamplingOptions(n_samples=2, steps=4, eta=1.0),
    ],
    ids=["one-draw", "five-antithetic", "independent", "ddpm", "ddim-eta1"],
)
def test_impute_gives_the_unbatched_draws(opts):
    model = trained_looking()
    x, observed, _ = random_batch(model.cfg, 4, 1)
    observed[2] = True  # a complete window: nothing to sample, left out of the sampler
    want = reference_impute(model, x, observed, opts, torch.Generator().manual_seed(3))
    got = model.impute(x, observed, opts, generator=torch.Generator().manual_seed(3), return_samples=True)
    torch.testing.assert_close(got.samples, want, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got.median, sample_quantiles(want, (0.5,))[0], atol=TOLERANCE, rtol=0)
    assert torch.equal(got.samples[:, 2], x[2].expand(opts.n_samples, -1, -1))
    # The generator was drawn from as for the whole batch, so what follows is unchanged too.
    g_got, g_want = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    model.impute(x, observed, opts, generator=g_got)
    reference_impute(model, x, observed, opts, g_want)
    assert torch.equal(torch.randn(4, generator=g_got), torch.randn(4, generator=g_want))


def test_a_batch_of_complete_windows_draws_its_noise_and_returns_its_values():
    model = trained_looking()
    x, observed, _ = random_batch(model.cfg, 2, 2)
    observed[:] = True
    g, fresh = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = model.impute(x, observed, SamplingOptions(n_samples=3, steps=3), generator=g, return_samples=True)
    assert torch.equal(out.x_hat, x) and torch.equal(out.samples, x.expand(3, -1, -1, -1))
    antithetic_noise(3, fresh)(torch.zeros(6, *x.shape[1:]))
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=fresh))


@pytest.mark.parametrize("opts", [SamplingOptions(n_samples=5, steps=4), SamplingOptions(n_samples=2, method="ddpm")])
def test_row_generators_make_each_group_independent_of_its_batch(opts):
    model = trained_looking()
    x, observed, _ = random_batch(model.cfg, 5, 3)
    groups = [(0, 2), (2, 3), (3, 5)]  # three "records" of 2, 1 and 2 windows

    def alone(i: int) -> torch.Tensor:
        lo, hi = groups[i]
        gen = torch.Generator().manual_seed(100 + i)
        return model.impute(x[lo:hi], observed[lo:hi], opts, generator=gen, return_samples=True).samples

    together = model.impute(
        x, observed, opts, return_samples=True,
        generator=RowGenerators([torch.Generator().manual_seed(100 + i) for i in range(3)], [2, 1, 2]),
    ).samples
    for i, (lo, hi) in enumerate(groups):
        torch.testing.assert_close(together[:, lo:hi], alone(i), atol=TOLERANCE, rtol=0)
    # Another batch composition: the last record with the first, in the other order.
    order = torch.tensor([3, 4, 0, 1])
    swapped = model.impute(
        x[order], observed[order], opts, return_samples=True,
        generator=RowGenerators([torch.Generator().manual_seed(102), torch.Generator().manual_seed(100)], [2, 2]),
    ).samples
    torch.testing.assert_close(swapped[:, :2], alone(2), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(swapped[:, 2:], alone(0), atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="cover 3 rows of a batch of 5"):
        model.impute(x, observed, opts, generator=RowGenerators([None, None], [1, 2]))
    with pytest.raises(ValueError, match="one generator and a positive row count"):
        RowGenerators([None], [1, 2])


def test_rows_split_into_parts_cover_each_row_once():
    for copies, windows, per_part in ((1, 16, 8), (5, 16, 8), (5, 3, 8), (3, 4, 2), (1, 5, 2), (2, 7, 7)):
        parts = split_rows(copies, windows, per_part)
        seen = torch.zeros(copies, windows, dtype=torch.int64)
        for c0, c1, lo, hi in parts:
            assert 0 < (c1 - c0) * (hi - lo) <= per_part
            seen[c0:c1, lo:hi] += 1
        assert torch.equal(seen, torch.ones_like(seen)), (copies, windows, per_part)
