"""The Gaussian prior under the diffusion imputer: a per-instant cross-channel conditional mean.

Phase A's diffusion model does not generate a missing entry from scratch; it generates the
standardized residual (x - m(x_O)) / s(x_O) around a cheap estimate. Here m is the conditional
mean of a Gaussian over the F channels at one time step, given the channels observed at that
step, m_miss = mu_m + C_mo (C_oo + ridge I)^-1 (x_o - mu_o), i.e. ridge regression of each
missing channel on the observed ones, and s is the conditional standard deviation under the
same Gaussian, so the residual the network learns is on the unit scale the noise schedule
assumes, whatever the prior already explains. The leads of an ECG (and the co-recorded channels
of a PSG or an ICU stay, to a lesser degree) are near-linear functions of one another at each
instant, so m recovers much of a missing channel, and what is left for the network (shape in
time, nonlinear relations, the spread of the posterior) lies at a scale far below the signal's.
Without it a network trained for the few hundred steps a CPU allows imputes worse than the
channel mean.

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

# Rows (sample, time step) solved per batched call: bounds the (rows, F, F) systems in memory.
_ROWS_PER_SOLVE = 1 << 14
# Smallest conditional standard deviation a residual is divided by (standardized units).
SCALE_FLOOR = 0.1


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

    def repeat(self, k: int) -> PriorEstimate:
        """The estimate for a batch repeated ``k`` times along its first axis (one copy per draw)."""
        return PriorEstimate(self.mean.repeat(k, 1, 1), self.scale.repeat(k, 1, 1))


class GaussianPrior(nn.Module):
    """Mean (F,) and second moment (F, F) of the channels at one instant; frozen, but aggregated."""

    def __init__(self, n_features: int, ridge: float = 1e-3) -> None:
        super().__init__()
        if not ridge > 0:
            raise ValueError(f"prior ridge must be positive, got {ridge}")
        self.ridge = ridge
        self.mean = nn.Parameter(torch.zeros(n_features), requires_grad=False)
        self.second_moment = nn.Parameter(torch.eye(n_features), requires_grad=False)

    def covariance(self) -> torch.Tensor:
        """C = E[x x^T] - mu mu^T, symmetrized (an average of moments may be off by rounding)."""
        cov = self.second_moment - torch.outer(self.mean, self.mean)
        return (cov + cov.T) / 2.0

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) as float64 arrays, the start of a refit."""
        return self.mean.detach().cpu().double().numpy(), self.covariance().detach().cpu().double().numpy()

    def set_moments(self, mean: np.ndarray, cov: np.ndarray) -> None:
        """Store a fitted mean and covariance (as mean and second moment, which average exactly)."""
        f = self.mean.shape[0]
        if mean.shape != (f,) or cov.shape != (f, f):
            raise ValueError(f"prior moments must be shaped ({f},) and ({f}, {f}), got {mean.shape} and {cov.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ValueError("prior moments must be finite")
        second = cov + np.outer(mean, mean)
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean).to(self.mean))
            self.second_moment.copy_(torch.from_numpy(second).to(self.second_moment))

    @torch.no_grad()
    def conditional(self, values: torch.Tensor, mask: torch.Tensor) -> PriorEstimate:
        """m(x_O) and the conditional standard deviation, per entry of (B, F, L) data.

        Observed entries keep their value (scale 1, unused); an instant with no observed channel
        gets the mean and the channel's standard deviation. Entries of ``values`` outside ``mask``
        are never read. The scale is floored at ``SCALE_FLOOR``: leads that are exact sums of
        others leave a conditional variance of ~0, and dividing a residual by it would amplify
        noise and rounding.
        """
        b, f, length = values.shape
        rows = values.permute(0, 2, 1).reshape(-1, f)
        obs = mask.permute(0, 2, 1).reshape(-1, f)
        cov = self.covariance()
        eye = torch.eye(f, dtype=cov.dtype, device=cov.device)
        means, scales = [], []
        for r, o in zip(rows.split(_ROWS_PER_SOLVE), obs.split(_ROWS_PER_SOLVE), strict=True):
            # Identity on the missing block keeps every row's system F x F, so one batched solve
            # covers all observed subsets; the gain's rows outside o and columns outside m are 0.
            lhs = torch.where(o[:, :, None] & o[:, None, :], cov + self.ridge * eye, eye)
            rhs = torch.where(o[:, :, None] & ~o[:, None, :], cov, 0.0)
            gain = torch.linalg.solve(lhs, rhs)
            centered = torch.where(o, r - self.mean, 0.0)
            pred = self.mean + (centered[:, None, :] @ gain)[:, 0, :]
            means.append(torch.where(o, r, pred))
            var = torch.diagonal(cov) - (rhs * gain).sum(dim=1)
            scales.append(torch.where(o, 1.0, var.clamp_min(SCALE_FLOOR**2).sqrt()))
        return PriorEstimate(
            mean=torch.cat(means).view(b, length, f).permute(0, 2, 1),
            scale=torch.cat(scales).view(b, length, f).permute(0, 2, 1),
        )
