"""How ``CondIModel.impute`` samples (``SamplingOptions``) and what imputation and prediction return."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """How to impute: sampler, its steps, number of samples and reported quantiles.

    ``method='ddim'`` uses ``steps`` of the T steps (deterministic given the start noise when
    eta = 0); ``'ddpm'`` runs all T ancestral steps and ignores ``steps``. Samples are drawn
    ``chunk_size`` copies of the batch at a time (all at once when None; an even number when
    ``antithetic``, so that pairs stay together). ``clip_x0`` bounds the sampler's intermediate
    clean-value estimates (standardized units; None: no bound). ``antithetic`` draws the samples
    in antithetic pairs, plus the centre path for an odd count (see ``antithetic_noise``); False
    draws them independently.
    """

    n_samples: int = 10
    method: str = "ddim"
    steps: int = 10
    quantiles: tuple[float, ...] = (0.05, 0.95)
    chunk_size: int | None = None
    eta: float = 0.0
    clip_x0: float | None = 10.0
    antithetic: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantiles", tuple(self.quantiles))
        if self.method not in ("ddim", "ddpm"):
            raise ValueError(f"sampling method must be 'ddim' or 'ddpm', got {self.method!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if self.clip_x0 is not None and not self.clip_x0 > 0:
            raise ValueError(f"clip_x0 must be positive or None, got {self.clip_x0}")


@dataclass(frozen=True)
class RowGenerators:
    """One random generator per group of consecutive rows of a batch (a record's windows, say).

    ``CondIModel.impute`` draws each group's noise from its own generator in the shapes it would
    draw for that group alone, so a group's imputation does not depend on the rows batched with it
    (up to the rounding of batched arithmetic).
    """

    generators: tuple[torch.Generator | None, ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))
        object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))
        if len(self.generators) != len(self.rows) or any(r < 1 for r in self.rows):
            raise ValueError(
                f"row groups need one generator and a positive row count each, got "
                f"{len(self.generators)} generators for rows {list(self.rows)}"
            )


@dataclass
class Imputation:
    """Result of ``impute``; observed entries hold the input values exactly everywhere.

    ``x_hat`` = R*x + (1-R)*median (``median`` is the same tensor: at an observed entry the
    distribution is a point mass at the observed value); ``quantiles[q]`` is the q-quantile over samples at each entry
    (levels in ``quantile_levels``); ``samples`` (n, B, F, L) only when asked for.
    """

    x_hat: torch.Tensor
    median: torch.Tensor
    quantile_levels: tuple[float, ...]
    quantiles: torch.Tensor
    samples: torch.Tensor | None = None


@dataclass
class Prediction:
    """Class logits, with the imputation they were computed from (None if the variant does not impute)."""

    logits: torch.Tensor
    imputation: Imputation | None
