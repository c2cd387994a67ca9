"""The Gaussian prior under the diffusion imputer: a conditional mean across channels and nearby instants.

Phase A's diffusion model does not generate a missing entry from scratch; it generates the
standardized residual (x - m(x_O)) / s(x_O) around a cheap estimate. Here m is the conditional
mean of a Gaussian over the F channels at the instants t - k .. t + k (k = ``lags``, 0 by
default), given the entries observed among them, m_miss = mu_m + C_mo (C_oo + ridge I)^-1
(x_o - mu_o): ridge regression of each missing entry on the observed channels at the same instant
and at its neighbours. s is the conditional standard deviation under the same Gaussian, so the
residual the network learns is on the unit scale the noise schedule assumes, whatever the prior
already explains. The leads of an ECG (and the co-recorded channels of a PSG or an ICU stay, to
a lesser degree) are near-linear functions of one another at each instant, and every channel is
smooth at the sampling rate, so m recovers much of a missing entry, and what is left for the
network (shape over longer spans, nonlinear relations, the spread of the posterior) lies at a
scale far below the signal's. Without it a network trained for the few hundred steps a CPU
allows imputes worse than the channel mean. With k = 0 the prior is the cross-channel ridge of
``condi_models.imputers``; the neighbours matter where single entries are missing (synthetic
ECG points at pw = 0.8: MAE of m 0.077 with k = 0, 0.053 with k = 2; PTB-XL 0.210 and 0.114)
and little in long gaps, where the neighbours are missing too. They cost: the Gaussian has
D = F (2k + 1) dimensions and its EM refit and per-row solves grow as D^3 (12 leads, k = 2: a
silo's refit takes seconds instead of a fraction of one, the prior of a batch of 32 windows
0.3 s instead of 0.03 s), so k is opt-in, ``model: {prior_lags: 2}``.

In a long gap (a detached electrode) the neighbours are missing too, and what the other leads do
not carry is lost to both. On an ECG the same lead's other beats still carry it: with
``template`` (``model: {prior_template: ...}``, on by default when the channels are ECG leads) the
Gaussian also holds each channel's beat template at t, the mean of that lead's observed values at
the same offset from the R peak in the record's other beats (``condi_models.data.beat_template``),
so D = F (2k + 2). The template is built on whole records, before they are cut into windows; a
caller that has none passes None and the template counts as missing.

The Gaussian's mean and second moment are parameters outside every optimizer. A silo refits
them by EM on its own training data at the start of a round, starting from the global values
(``condi_models.training``), and federated averaging merges the silos' moments by sample count.
With one local EM step that average is exactly one EM step over the pooled records; with several
(the default) it is EM's counterpart of FedAvg's local epochs. A fresh model holds mean 0 and
second moment I, under which m is 0, the channel mean of standardized data, and the imputer is
plain diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Rows (sample, time step) solved per batched call, and entries of the (rows, D, D) systems:
# together they bound the memory one solve takes.
_ROWS_PER_SOLVE = 1 << 14
_ENTRIES_PER_SOLVE = 1 << 23
# Smallest conditional standard deviation a residual is divided by (standardized units).
SCALE_FLOOR = 0.1

# A window's beat template as tensors: values (B, F, L) and where they are available (bool).
TemplateTensors = tuple[torch.Tensor, torch.Tensor]
# Longest span (steps between the observed neighbours) the interpolation variable is given over,
# unless the model says otherwise (``ModelConfig.prior_interpolation_span``): chosen on PTB-XL's
# validation folds among 5, 10 and 20 steps at 100 Hz.
DEFAULT_INTERPOLATION_SPAN = 10
# What the prior adds to the diagonal of the observed block before it solves, unless the model
# says otherwise (``ModelConfig.prior_ridge``): in standardized units, so against unit variances.
DEFAULT_PRIOR_RIDGE = 1e-3


def interpolate_within(
    values: torch.Tensor, mask: torch.Tensor, max_span: int, hold_edges: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry linearly interpolated from its channel's nearest observed entries before and after it.

    The entry itself is never used, observed or not, so on observed entries this is the
    leave-one-out interpolation EM learns its weight from. Available where both neighbours exist
    at most ``max_span`` steps apart; with ``hold_edges`` also before a channel's first and after
    its last observed entry, at most ``max_span`` steps from it, where that entry's value is held.
    Returns (values, available), each (B, F, L).
    """
    length = values.shape[-1]
    steps = torch.arange(length, device=values.device)
    seen = torch.where(mask, steps, -1)
    before = nn.functional.pad(seen.cummax(dim=-1).values[..., :-1], (1, 0), value=-1)
    seen_rev = torch.where(mask, steps, length).flip(-1)
    after = nn.functional.pad((-(-seen_rev).cummax(dim=-1).values).flip(-1)[..., 1:], (0, 1), value=length)
    has_before, has_after = before >= 0, after < length
    available = has_before & has_after & (after - before <= max_span)
    lo, hi = before.clamp(0, length - 1), after.clamp(0, length - 1)
    v_lo, v_hi = values.gather(-1, lo), values.gather(-1, hi)
    frac = (steps - lo).to(values.dtype) / (hi - lo).clamp_min(1).to(values.dtype)
    out = torch.where(available, v_lo + frac * (v_hi - v_lo), 0.0)
    if not hold_edges:
        return out, available
    held_before = has_before & ~has_after & (steps - before <= max_span)
    held_after = has_after & ~has_before & (after - steps <= max_span)
    out = torch.where(held_before, v_lo, torch.where(held_after, v_hi, out))
    return out, available | held_before | held_after


@dataclass(frozen=True)
class PriorEstimate:
    """The prior's view of the entries to impute, (B, F, L) each: conditional mean and std."""

    mean: torch.Tensor
    scale: torch.Tensor

    def to_residual(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / scale: what the diffusion model generates."""
        return (x - self.mean) / self.scale

    def from_residual(self, r: torch.Tensor) -> torch.Tensor:
        """mean + scale * r, the inverse of ``to_residual``."""
        return self.mean + self.scale * r


class GaussianPrior(nn.Module):
    """A Gaussian over the F channels at 2 * lags + 1 neighbouring instants; frozen, but aggregated.

    With ``lags`` = 0 the Gaussian is over one instant and m is ridge regression across channels.
    With lags = k it is over the window t - k .. t + k (stacked as ``stack`` lays it out), so a
    missing entry is also predicted from the entries observed just before and after it, in every
    channel: linear interpolation and cross-channel regression in one estimate. With ``template``
    it also holds each channel's beat template at t (``condi_models.data.beat_template``), so a
    lead missing for a long stretch is predicted from its own shape in the record's other beats.
    Its mean and second moment are of size D = F (2k + 1 + template).
    """

    def __init__(
        self,
        n_features: int,
        lags: int = 0,
        template: bool = False,
        interpolation: bool = False,
        ridge: float = DEFAULT_PRIOR_RIDGE,
        interpolation_span: int = DEFAULT_INTERPOLATION_SPAN,
        hold_edges: bool = False,
    ) -> None:
        super().__init__()
        if not ridge > 0:
            raise ValueError(f"prior ridge must be positive, got {ridge}")
        if lags < 0:
            raise ValueError(f"prior lags must be >= 0, got {lags}")
        if interpolation_span < 1:
            raise ValueError(f"prior interpolation span must be >= 1, got {interpolation_span}")
        self.ridge = ridge
        self.lags = lags
        self.template = template
        self.interpolation = interpolation
        self.interpolation_span = interpolation_span
        self.hold_edges = hold_edges
        dim = n_features * (2 * lags + 1 + int(template) + int(interpolation))
        self.mean = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.second_moment = nn.Parameter(torch.eye(dim), requires_grad=False)

    def stack(
        self, values: torch.Tensor, mask: torch.Tensor, template: TemplateTensors | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, L) data as (B, D, L): row block j at time t holds the channels at t + j - lags.

        Instants before the start or after the end of the record are missing. With a template
        prior the next block holds the beat template at t (all missing when ``template`` is None),
        and with interpolation the last one each channel's value at t interpolated from its nearest
        observed entries around t, at most ``interpolation_span`` steps apart, or with ``hold_edges``
        the nearest one held at a channel's edges (``interpolate_within``).
        """
        k = self.lags
        if k == 0 and not self.template and not self.interpolation:
            return values, mask
        length = values.shape[-1]
        padded_v = nn.functional.pad(values, (k, k))
        padded_m = nn.functional.pad(mask, (k, k))
        vs = [padded_v[..., j : j + length] for j in range(2 * k + 1)]
        ms = [padded_m[..., j : j + length] for j in range(2 * k + 1)]
        if self.template:
            if template is None:
                template = (torch.zeros_like(values), torch.zeros_like(mask))
            elif template[0].shape != values.shape or template[1].shape != mask.shape:
                raise ValueError(
                    f"beat template {tuple(template[0].shape)} does not match the data {tuple(values.shape)}"
                )
            vs.append(template[0].to(values.dtype))
            ms.append(template[1])
        if self.interpolation:
            iv, im = interpolate_within(
                torch.where(mask, values, 0.0), mask, self.interpolation_span, self.hold_edges
            )
            vs.append(iv)
            ms.append(im)
        return torch.cat(vs, dim=1), torch.cat(ms, dim=1)

    def covariance(self) -> torch.Tensor:
        """C = E[x x^T] - mu mu^T, symmetrized (an average of moments may be off by rounding)."""
        cov = self.second_moment - torch.outer(self.mean, self.mean)
        return (cov + cov.T) / 2.0

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) as float64 arrays, the start of a refit."""
        return self.mean.detach().cpu().double().numpy(), self.covariance().detach().cpu().double().numpy()

    def set_moments(self, mean: np.ndarray, cov: np.ndarray) -> None:
        """Store a fitted mean and covariance (as mean and second moment, which average exactly)."""
        d = self.mean.shape[0]
        if mean.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"prior moments must be shaped ({d},) and ({d}, {d}), got {mean.shape} and {cov.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ValueError("prior moments must be finite")
        second = cov + np.outer(mean, mean)
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean).to(self.mean))
            self.second_moment.copy_(torch.from_numpy(second).to(self.second_moment))

    @torch.no_grad()
    def conditional(
        self, values: torch.Tensor, mask: torch.Tensor, template: TemplateTensors | None = None
    ) -> PriorEstimate:
        """m(x_O) and the conditional standard deviation, per entry of (B, F, L) data.

        Observed entries keep their value (scale 1, unused); an entry with nothing observed in its
        window gets the mean and the channel's standard deviation. Entries of ``values`` outside
        ``mask`` are never read. The scale is floored at ``SCALE_FLOOR``: leads that are exact
        sums of others leave a conditional variance of ~0, and dividing a residual by it would
        amplify noise and rounding.
        """
        b, f, length = values.shape
        stacked_v, stacked_m = self.stack(values, mask, template)
        d = stacked_v.shape[1]
        rows = stacked_v.permute(0, 2, 1).reshape(-1, d)
        obs = stacked_m.permute(0, 2, 1).reshape(-1, d)
        centre = slice(self.lags * f, (self.lags + 1) * f)
        cov = self.covariance()
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        mean_c, cov_cc = self.mean[centre], torch.diagonal(cov)[centre]
        means, scales = [], []
        chunk = max(1, min(_ROWS_PER_SOLVE, _ENTRIES_PER_SOLVE // (d * d)))
        for r, o in zip(rows.split(chunk), obs.split(chunk), strict=True):
            # Identity on the missing block keeps every row's system D x D, so one batched solve
            # covers all observed subsets; the gain's rows outside o and columns of observed
            # centre entries are 0. Only the centre instant's entries are predicted.
            lhs = torch.where(o[:, :, None] & o[:, None, :], cov + self.ridge * eye, eye)
            rhs = torch.where(o[:, :, None] & ~o[:, None, centre], cov[:, centre], 0.0)
            gain = torch.linalg.solve(lhs, rhs)
            centered = torch.where(o, r - self.mean, 0.0)
            pred = mean_c + (centered[:, None, :] @ gain)[:, 0, :]
            means.append(torch.where(o[:, centre], r[:, centre], pred))
            var = cov_cc - (rhs * gain).sum(dim=1)
            scales.append(torch.where(o[:, centre], 1.0, var.clamp_min(SCALE_FLOOR**2).sqrt()))
        return PriorEstimate(
            mean=torch.cat(means).view(b, length, f).permute(0, 2, 1),
            scale=torch.cat(scales).view(b, length, f).permute(0, 2, 1),
        )
