"""The imputer's band calibration: how far to widen the draws' quantiles around their median.

A band from a few draws is too narrow even when the imputer's distribution is right: the
extremes of five independent draws hold a sixth only 4 times in 6, and the 0.05..0.95 quantiles
of five draws (interpolated just inside the extremes) less often still. The imputer's spread may
also be off. So each reported quantile is moved away from the median by a factor fitted on
observed entries the imputer was not shown (:func:`condi_models.training.fit_band`): the factor
of the central band, 50 % or 90 % (``condi_models.metrics.BAND_LEVELS``), that has the quantile at
one end, interpolated linearly in the band level between them (and held at the nearer end's
factor outside). A factor holds for the number of draws it was fitted with.

Like the Gaussian prior's moments, the factors are a parameter outside every optimizer: a silo
fits them on its own training data after Phase A, and federated averaging merges the silos'
factors by sample count. A fresh model (and a checkpoint from before the calibration) holds 1,
under which the band is the plain sample quantiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from condi_models.metrics import BAND_LEVELS


class BandCalibration(nn.Module):
    """One spread factor per band level of ``BAND_LEVELS``; frozen, but aggregated."""

    def __init__(self) -> None:
        super().__init__()
        self.factors = nn.Parameter(torch.ones(len(BAND_LEVELS)), requires_grad=False)

    def values(self) -> tuple[float, ...]:
        """The factors, in the order of ``BAND_LEVELS``."""
        return tuple(float(f) for f in self.factors.detach().cpu())

    def set_factors(self, factors: Sequence[float]) -> None:
        """Store fitted factors, one per level of ``BAND_LEVELS``; each must be finite and positive."""
        f = np.asarray(factors, dtype=np.float64)
        if f.shape != (len(BAND_LEVELS),) or not np.all(np.isfinite(f)) or not np.all(f > 0):
            raise ValueError(f"band factors must be {len(BAND_LEVELS)} finite positive numbers, got {list(factors)}")
        with torch.no_grad():
            self.factors.copy_(torch.from_numpy(f).to(self.factors))

    def factor(self, quantile: float) -> float:
        """The factor for the ``quantile`` level: that of the central band with it at one end."""
        return float(np.interp(abs(1.0 - 2.0 * quantile), BAND_LEVELS, self.values()))

    def widen(self, median: torch.Tensor, quantiles: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
        """``quantiles`` (Q, ...) at ``levels``, each moved away from ``median`` by its :meth:`factor`."""
        scale = torch.tensor([self.factor(q) for q in levels], dtype=quantiles.dtype, device=quantiles.device)
        return median + scale.view(-1, *([1] * median.dim())) * (quantiles - median)
