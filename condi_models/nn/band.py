"""The imputer's band calibration: how far to widen the draws' quantiles around their median.

A band from a few draws is too narrow even when the imputer's distribution is right: the
extremes of five independent draws hold a sixth only 4 times in 6, and the 0.05..0.95 quantiles
of five draws (interpolated just inside the extremes) less often still. The imputer's spread may
also be off. So each reported quantile is moved away from the median by a factor fitted on
observed entries the imputer was not shown (:func:`condi_models.training.fit_band`): the factor
of the central band, 50 % or 90 % (``condi_models.metrics.BAND_LEVELS``), that has the quantile at
one end, interpolated linearly in the band level between them (and held at the nearer end's
factor outside).

A factor is fitted for one number of draws, and most of it is the small-sample shortfall, which
shrinks as draws are added (ideal Gaussian draws need 2.5 at 90 % with five, 1.3 with twenty).
So the calibration also keeps the draw count it was fitted with, and a band from another count
gets the fitted factor times the ratio of the ideal factors of the two counts
(:func:`ideal_factor`): the imputer's own miscalibration carries over, the shortfall is that of
the draws actually taken.

Like the Gaussian prior's moments, the factors are a parameter outside every optimizer: a silo
fits them on its own training data after Phase A, and federated averaging merges the silos'
factors by sample count. A fresh model (and a checkpoint from before the calibration) holds 1,
under which the band is the plain sample quantiles; a draw count of 0 (fresh, or a checkpoint
from before the count was kept) applies the factors as they are, for any number of draws.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from condi_models.metrics import BAND_LEVELS, band_factor

# Monte Carlo budget (draws x trials) and seed of ideal_factor: up to 20 draws its relative error
# is about 0.5 %, and a fixed seed makes it the same number in every process.
_IDEAL_TRIALS = 200_000
_IDEAL_ENTRIES = 4_000_000
_IDEAL_SEED = 0
# Draw counts beyond this are taken as this many (the ideal factor is within 10 % of 1 there).
MAX_TRANSFER_DRAWS = 64


@functools.lru_cache(maxsize=64)
def ideal_factor(draws: int, level: float) -> float:
    """The band factor that ``draws`` independent draws from the truth's own distribution need.

    The factor under which the central ``level`` band of ``draws`` standard normal draws (the
    :func:`condi_models.metrics.central_band` of them) holds a further draw with probability
    ``level``: what an imputer with exactly the right spread is fitted, by Monte Carlo with a
    fixed seed. ``draws`` must be 2 or more.
    """
    if draws < 2:
        raise ValueError(f"a band needs at least 2 draws, got {draws}")
    draws = min(draws, MAX_TRANSFER_DRAWS)
    trials = min(_IDEAL_TRIALS, _IDEAL_ENTRIES // draws)
    rng = np.random.default_rng(_IDEAL_SEED)
    samples = rng.standard_normal((draws, trials))
    return band_factor(rng.standard_normal(trials), samples, level)


class BandCalibration(nn.Module):
    """A spread factor per band level of ``BAND_LEVELS``, and the draws they were fitted for; frozen, aggregated."""

    def __init__(self) -> None:
        super().__init__()
        self.factors = nn.Parameter(torch.ones(len(BAND_LEVELS)), requires_grad=False)
        self.draws = nn.Parameter(torch.zeros(1), requires_grad=False)

    def values(self) -> tuple[float, ...]:
        """The factors as fitted, in the order of ``BAND_LEVELS``."""
        return tuple(float(f) for f in self.factors.detach().cpu())

    def fitted_draws(self) -> int:
        """The draw count the factors were fitted for (0: unknown, the factors hold for any count).

        A silo's update may carry any number here; it is read clamped and rounded.
        """
        draws = float(self.draws.detach().cpu().nan_to_num(0.0).clamp(0.0, MAX_TRANSFER_DRAWS))
        return int(round(draws))

    def set_factors(self, factors: Sequence[float], draws: int) -> None:
        """Store factors fitted with ``draws`` draws (0: unknown), one per level of ``BAND_LEVELS``, each positive."""
        f = np.asarray(factors, dtype=np.float64)
        if f.shape != (len(BAND_LEVELS),) or not np.all(np.isfinite(f)) or not np.all(f > 0):
            raise ValueError(f"band factors must be {len(BAND_LEVELS)} finite positive numbers, got {list(factors)}")
        if draws < 0:
            raise ValueError(f"band factors' draw count must be >= 0, got {draws}")
        with torch.no_grad():
            self.factors.copy_(torch.from_numpy(f).to(self.factors))
            self.draws.fill_(float(min(draws, MAX_TRANSFER_DRAWS)))

    def factors_for(self, draws: int) -> tuple[float, ...]:
        """The factors of a band from ``draws`` draws, in the order of ``BAND_LEVELS``.

        The fitted ones, each times ``ideal_factor(draws) / ideal_factor(fitted draws)`` at its
        level; as fitted where either count is below 2 or they are the same.
        """
        fitted = self.fitted_draws()
        if fitted < 2 or draws < 2 or min(draws, MAX_TRANSFER_DRAWS) == fitted:
            return self.values()
        return tuple(
            f * ideal_factor(min(draws, MAX_TRANSFER_DRAWS), level) / ideal_factor(fitted, level)
            for f, level in zip(self.values(), BAND_LEVELS, strict=True)
        )

    def factor(self, quantile: float, draws: int) -> float:
        """The factor for the ``quantile`` level from ``draws`` draws: that of the central band with it at one end."""
        return float(_interpolate(quantile, self.factors_for(draws)))

    def widen(self, median: torch.Tensor, quantiles: torch.Tensor, levels: Sequence[float], draws: int) -> torch.Tensor:
        """``quantiles`` (Q, ...) at ``levels`` of ``draws`` draws, moved from ``median`` by each :meth:`factor`."""
        factors = self.factors_for(draws)
        scale = torch.tensor([_interpolate(q, factors) for q in levels], dtype=quantiles.dtype, device=quantiles.device)
        return median + scale.view(-1, *([1] * median.dim())) * (quantiles - median)


def _interpolate(quantile: float, factors: Sequence[float]) -> float:
    """The factor of ``BAND_LEVELS``'s ``factors`` for the central band with ``quantile`` at one end."""
    return float(np.interp(abs(1.0 - 2.0 * quantile), BAND_LEVELS, factors))
