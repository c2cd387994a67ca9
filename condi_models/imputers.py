"""Simple imputation baselines the diffusion imputer is measured against.

Each baseline is fitted on training arrays and then fills the unobserved entries of (x, observed)
arrays shaped (N, F, L). Values at unobserved entries of the input are never read (the data
interface stores 0.0 there, which is not a measurement), and observed entries come back unchanged,
bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)


class Imputer(Protocol):
    """What every baseline offers: fit on training data, then fill unobserved entries."""

    def fit(self, x: np.ndarray, observed: np.ndarray) -> Imputer:
        """Learn whatever the method needs from the observed training entries."""
        ...

    def impute(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """A copy of ``x`` with unobserved entries filled; observed entries unchanged."""
        ...


def _check_arrays(x: np.ndarray, observed: np.ndarray, n_features: int | None = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (N, F, L), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x: expected a floating-point array, got dtype {x.dtype}")
    if observed.shape != x.shape or observed.dtype != np.bool_:
        raise ValueError(
            f"observed: expected a bool array of shape {x.shape}, got {observed.dtype} {observed.shape}"
        )
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"x: fitted on {n_features} channels, got {x.shape[1]}")
    if not np.all(np.isfinite(x[observed])):
        raise ValueError("x: NaN or infinite values at observed entries")


def _channel_means(x: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Per-channel mean over observed entries, (F,) float64; 0.0 for a channel never observed."""
    if not np.any(observed):
        raise ValueError(f"fit: the training data {x.shape} has no observed entry to learn from")
    counts = observed.sum(axis=(0, 2))
    sums = np.where(observed, x, 0.0).sum(axis=(0, 2), dtype=np.float64)
    empty = counts == 0
    if np.any(empty):
        log.warning(
            "channels %s have no observed training entry; their mean falls back to 0.0",
            np.flatnonzero(empty).tolist(),
        )
    return np.divide(sums, counts, out=np.zeros_like(sums), where=~empty)


def _require_fitted(value: np.ndarray | None, name: str) -> np.ndarray:
    if value is None:
        raise RuntimeError(f"{name}.impute called before fit")
    return value


class MeanImputer:
    """Fills each channel with the mean of that channel's observed training entries."""

    def __init__(self) -> None:
        self.means: np.ndarray | None = None

    def fit(self, x: np.ndarray, observed: np.ndarray) -> MeanImputer:
        """Store per-channel means of the observed training entries."""
        _check_arrays(x, observed)
        self.means = _channel_means(x, observed)
        return self

    def impute(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """Unobserved entries get their channel's training mean."""
        means = _require_fitted(self.means, "MeanImputer")
        _check_arrays(x, observed, means.size)
        fill = means.astype(x.dtype)[None, :, None]
        return np.where(observed, x, fill)


def observed_neighbours(observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry of ``observed`` (..., L), the nearest observed step at or before it and at or after it.

    Returns (previous, next) index arrays shaped like ``observed``: -1 where nothing before is
    observed, L where nothing after is.
    """
    length = observed.shape[-1]
    t = np.arange(length, dtype=np.int32)
    previous = np.maximum.accumulate(np.where(observed, t, -1), axis=-1)
    following = np.flip(np.minimum.accumulate(np.flip(np.where(observed, t, length), axis=-1), axis=-1), axis=-1)
    return previous, following


def _interpolate(x: np.ndarray, observed: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Linear interpolation in time of every (sample, channel) row; see LinearInterpolationImputer."""
    length = x.shape[2]
    prev_idx, next_idx = observed_neighbours(observed)
    # Only the missing entries need a value; gathering at them alone saves most of the work.
    missing = np.flatnonzero(~observed)
    row_start = missing - missing % length
    prev = prev_idx.reshape(-1)[missing]
    nxt = next_idx.reshape(-1)[missing]
    has_prev = prev >= 0
    has_next = nxt < length
    flat = x.reshape(-1)
    v_prev = flat[row_start + np.maximum(prev, 0)].astype(np.float64)
    v_next = flat[row_start + np.minimum(nxt, length - 1)].astype(np.float64)
    w = (missing % length - prev) / np.maximum(nxt - prev, 1)
    values = np.where(has_prev & has_next, v_prev + w * (v_next - v_prev), np.where(has_prev, v_prev, v_next))
    channel = (missing // length) % x.shape[1]
    values = np.where(has_prev | has_next, values, fallback[channel])
    out = x.copy()
    out.reshape(-1)[missing] = values
    return out


class LinearInterpolationImputer:
    """Per (sample, channel): linear interpolation in time between observed points.

    Before the first and after the last observed point the nearest observed value is held; a row
    with no observed point at all gets the channel's training mean.
    """

    def __init__(self) -> None:
        self.means: np.ndarray | None = None

    def fit(self, x: np.ndarray, observed: np.ndarray) -> LinearInterpolationImputer:
        """Store per-channel training means for rows with nothing to interpolate from."""
        _check_arrays(x, observed)
        self.means = _channel_means(x, observed)
        return self

    def impute(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """Interpolate every row in time; see the class docstring for edges and empty rows."""
        means = _require_fitted(self.means, "LinearInterpolationImputer")
        _check_arrays(x, observed, means.size)
        return _interpolate(x, observed, means)


@dataclass(frozen=True)
class _GaussianFit:
    means: np.ndarray  # (F,) channel means over observed training entries, used to standardize
    scales: np.ndarray  # (F,) channel standard deviations, 1.0 where degenerate
    mu: np.ndarray  # (F,) mean of the standardized channels under the fitted Gaussian
    cov: np.ndarray  # (F, F) covariance of the standardized channels
    em_iterations: int


@dataclass(frozen=True)
class _PatternGroups:
    """Rows grouped by observed subset: group k is ``order[bounds[k]:bounds[k + 1]]``."""

    order: np.ndarray
    bounds: np.ndarray
    patterns: np.ndarray  # (P, F) bool, the observed subset of each group

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)


class RidgeImputer:
    """Cross-channel regression per time step, as the conditional mean of a fitted Gaussian.

    Channels are standardized by their observed training entries. The joint Gaussian of the
    standardized channels at one time step (mean mu, covariance C) starts from pairwise-complete
    estimates and is refined by EM for Gaussians with missing entries (Little & Rubin), so a channel
    whose observed entries are an unlucky subset gets its mean and covariances from its regression
    on the channels observed beside it. Pairwise-complete estimates alone are biased by exactly such
    subsets (contiguous gaps in a slow signal).

    Impute: at a time step with observed channels o and missing channels m,
    z_m = mu_m + C_mo (C_oo + alpha I)^-1 (z_o - mu_o), which is ridge regression of each missing
    channel on the observed ones with penalty ``alpha`` (the E-step uses the same penalty so a
    singular C, e.g. leads that are exact sums of others, stays solvable). Time steps sharing an
    observed subset are solved together. A time step with no observed channel has nothing to regress
    on and falls back to linear interpolation in time.

    EM runs on per-pattern sufficient statistics; when their size (patterns x F x F) would exceed a
    fixed budget, it runs on a random subset of training time steps drawn with ``seed``.
    """

    def __init__(self, alpha: float = 1e-3, max_iter: int = 50, tol: float = 1e-5, seed: int = 0) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha: expected a positive ridge penalty, got {alpha}")
        if max_iter < 0:
            raise ValueError(f"max_iter: expected a non-negative number of EM iterations, got {max_iter}")
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.fitted: _GaussianFit | None = None

    def fit(self, x: np.ndarray, observed: np.ndarray) -> RidgeImputer:
        """Standardize channels, start from pairwise-complete moments, refine them by EM."""
        _check_arrays(x, observed)
        f = x.shape[1]
        means = _channel_means(x, observed)
        centered = np.where(observed, x - means[None, :, None], 0.0)
        counts = observed.sum(axis=(0, 2))
        var = np.divide((centered**2).sum(axis=(0, 2)), counts, out=np.zeros(f), where=counts > 0)
        # A constant or never-observed channel keeps unit scale so standardizing never divides by 0.
        scales = np.where(var > 0, np.sqrt(var), 1.0)
        z = centered / scales[None, :, None]
        start = _nearest_psd(_pairwise_covariance(*_rows_of(z, observed)))
        mu, cov, iterations = gaussian_em(
            z, observed, np.zeros(f), start, self.max_iter, alpha=self.alpha, tol=self.tol, seed=self.seed
        )
        self.fitted = _GaussianFit(means=means, scales=scales, mu=mu, cov=cov, em_iterations=iterations)
        return self

    def impute(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """Fill each time step's missing channels from its observed channels (see class docstring)."""
        if self.fitted is None:
            raise RuntimeError("RidgeImputer.impute called before fit")
        g = self.fitted
        _check_arrays(x, observed, g.means.size)
        n, f, length = x.shape

        # One row per (sample, time step): its observed subset and standardized values (0 where missing).
        z_rows, obs_rows = _rows_of((x - g.means[None, :, None]) / g.scales[None, :, None], observed)
        n_obs = obs_rows.sum(axis=1)
        todo = np.flatnonzero((n_obs > 0) & (n_obs < f))
        groups = _group_by_pattern(obs_rows[todo])
        rows = todo[groups.order]
        # Centered on mu at observed entries, 0 at missing ones (gain rows there are 0 anyway).
        centered = z_rows[rows] - np.where(obs_rows[rows], g.mu, 0.0)
        pred_sorted = np.empty_like(centered)
        for k, gain in _gains_by_group(g.cov, groups.patterns, self.alpha):
            lo, hi = groups.bounds[k], groups.bounds[k + 1]
            pred_sorted[lo:hi] = centered[lo:hi] @ gain
        pred_rows = np.zeros((n * length, f))
        pred_rows[rows] = pred_sorted
        pred_z = pred_rows.reshape(n, length, f).transpose(0, 2, 1) + g.mu[None, :, None]
        filled = (pred_z * g.scales[None, :, None] + g.means[None, :, None]).astype(x.dtype)
        no_channel = (n_obs == 0).reshape(n, length)[:, None, :]
        if np.any(no_channel):
            filled = np.where(no_channel, _interpolate(x, observed, g.means), filled)
        return np.where(observed, x, filled)


# Upper bounds on float64 entries per array (8 bytes each): a batch of gains 8 MiB, EM statistics 64 MiB.
_GAIN_BATCH_ENTRIES = 1 << 20
_STATS_BUDGET_ENTRIES = 1 << 23


def _rows_of(x: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, F, L) arrays as (N * L, F) rows, one per (sample, time step); 0.0 at unobserved entries."""
    n, f, length = x.shape
    values = np.where(observed, x, 0.0).astype(np.float64)
    return values.transpose(0, 2, 1).reshape(n * length, f), observed.transpose(0, 2, 1).reshape(n * length, f)


def gaussian_em(
    x: np.ndarray,
    observed: np.ndarray,
    mu: np.ndarray,
    cov: np.ndarray,
    iterations: int,
    *,
    alpha: float = 1e-3,
    tol: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """EM for the per-time-step Gaussian of the F channels of (N, F, L) data with missing entries.

    Starts from (``mu``, ``cov``) and runs at most ``iterations`` EM steps (fewer once no entry
    moves by ``tol`` or more); returns the new mean, covariance and the steps taken. Every time
    step counts, those with no observed channel too (their expectation is the current Gaussian),
    so one step's moments from several silos, averaged with their record counts as weights, are
    exactly one step on the pooled records. Runs on per-pattern sufficient statistics; when their
    size (patterns x F x F) would exceed a fixed budget, on a random subset of time steps drawn
    with ``seed``.
    """
    _check_arrays(x, observed)
    f = x.shape[1]
    if mu.shape != (f,) or cov.shape != (f, f):
        raise ValueError(f"gaussian_em: expected a mean ({f},) and covariance ({f}, {f}), got {mu.shape}, {cov.shape}")
    if not observed.any():
        raise ValueError(f"gaussian_em: the data {x.shape} has no observed entry to learn from")
    z_rows, obs_rows = _rows_of(x, observed)
    groups = _group_by_pattern(obs_rows)
    if groups.patterns.shape[0] * f * f > _STATS_BUDGET_ENTRIES:
        n_rows = z_rows.shape[0]
        keep = np.sort(np.random.default_rng(seed).choice(
            n_rows, size=min(n_rows, max(1, _STATS_BUDGET_ENTRIES // (f * f))), replace=False
        ))
        z_rows, groups = z_rows[keep], _group_by_pattern(obs_rows[keep])
        log.info("gaussian EM: %d sampled time steps to bound memory", keep.size)
    s1, s2 = _group_moments(z_rows, groups)
    mu, cov = mu.astype(np.float64), cov.astype(np.float64)
    done, change = 0, np.inf
    # One BLAS thread: the products are small, and a BLAS pool that spins on cores other
    # processes hold (a silo beside its peers, a benchmark beside the tests) made a refit 10x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        while done < iterations and change >= tol:
            new_mu, new_cov = _em_step(mu, cov, groups, s1, s2, alpha)
            change = max(np.abs(new_mu - mu).max(), np.abs(new_cov - cov).max())
            mu, cov = new_mu, new_cov
            done += 1
    if change >= tol and iterations and tol > 0:
        log.info("gaussian EM: stopped at %d iterations before reaching tol", iterations)
    return mu, cov, done


def _pairwise_covariance(z_rows: np.ndarray, obs_rows: np.ndarray) -> np.ndarray:
    """Covariance of each channel pair over the rows where both are observed (0 where never together)."""
    m = obs_rows.astype(np.float64)
    pair_counts = m.T @ m
    f = z_rows.shape[1]
    return np.divide(z_rows.T @ z_rows, pair_counts, out=np.zeros((f, f)), where=pair_counts > 0)


def _nearest_psd(cov: np.ndarray) -> np.ndarray:
    # Pairwise-complete estimates need not form a valid covariance; clipping eigenvalues makes one.
    eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2.0)
    return (eigvec * np.clip(eigval, 0.0, None)) @ eigvec.T


def _group_by_pattern(obs_rows: np.ndarray) -> _PatternGroups:
    """Group bool rows (R, F) by identical observed subsets with one sort."""
    n_rows, f = obs_rows.shape
    if n_rows == 0:
        return _PatternGroups(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, f), bool))
    packed = np.packbits(obs_rows, axis=1)
    order = np.lexsort(packed.T)
    ordered = packed[order]
    starts = np.flatnonzero(np.any(ordered[1:] != ordered[:-1], axis=1)) + 1
    bounds = np.r_[0, starts, n_rows]
    return _PatternGroups(order=order, bounds=bounds, patterns=obs_rows[order[bounds[:-1]]])


def _group_moments(z_rows: np.ndarray, groups: _PatternGroups) -> tuple[np.ndarray, np.ndarray]:
    """Per group: sum of rows (P, F) and sum of outer products (P, F, F)."""
    f = z_rows.shape[1]
    z = z_rows[groups.order]
    n_groups = groups.patterns.shape[0]
    s1 = np.add.reduceat(z, groups.bounds[:-1], axis=0) if n_groups else np.zeros((0, f))
    s2 = np.empty((n_groups, f, f))
    # One small matmul per group beats materializing every row's outer product (R x F x F).
    for k in range(n_groups):
        zg = z[groups.bounds[k] : groups.bounds[k + 1]]
        s2[k] = zg.T @ zg
    return s1, s2


def _em_step(
    mu: np.ndarray, cov: np.ndarray, groups: _PatternGroups, s1: np.ndarray, s2: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """One EM update of (mu, cov) from per-group statistics of rows with 0 at missing entries.

    In a group with observed subset o and gain G, each row's completed vector is x_hat = z A + c
    with A = diag(o) + G and c = mu * (1 - o) - mu G, and its missing block carries the conditional
    covariance K = (C - C G) restricted to m x m. Sums over a group follow from its moments.
    """
    f = mu.size
    eye = np.eye(f)
    total_n = groups.sizes.sum()
    sum_x = np.zeros(f)
    sum_xx = np.zeros((f, f))
    batch = max(1, _GAIN_BATCH_ENTRIES // (f * f))
    for p0 in range(0, groups.patterns.shape[0], batch):
        pats = groups.patterns[p0 : p0 + batch]
        counts = groups.sizes[p0 : p0 + batch].astype(np.float64)
        gain, rhs = _conditional_gains(cov, pats, alpha)
        a = gain + eye[None] * pats[:, None, :]
        c = np.where(pats, 0.0, mu) - (mu @ gain)
        s1a = (s1[p0 : p0 + batch, None, :] @ a)[:, 0, :]
        missing = (~pats).astype(np.float64)
        sum_x += s1a.sum(axis=0) + counts @ c
        cross = s1a.T @ c
        # Sums over patterns of per-pattern products, each as one (F, bF) @ (bF, F) product:
        # with a window of instants (F of 60) per-pattern products were the whole cost of a refit.
        # sum_b A_b^T S2_b A_b, and the conditional covariance of each pattern's missing block,
        # C_mm - C_mo G_om, weighted by the pattern's rows (rhs_b^T G_b is 0 outside m x m).
        weighted_gain = (gain * counts[:, None, None]).reshape(-1, f)
        sum_xx += (
            a.reshape(-1, f).T @ (s2[p0 : p0 + batch] @ a).reshape(-1, f)
            + cross
            + cross.T
            + (c * counts[:, None]).T @ c
            + cov * ((missing * counts[:, None]).T @ missing)
            - rhs.reshape(-1, f).T @ weighted_gain
        )
    new_mu = sum_x / total_n
    new_cov = sum_xx / total_n - np.outer(new_mu, new_mu)
    return new_mu, (new_cov + new_cov.T) / 2.0


def _gains_by_group(cov: np.ndarray, patterns: np.ndarray, alpha: float) -> Iterator[tuple[int, np.ndarray]]:
    """(group index, gain) for every pattern, solving in batches so memory stays bounded when F is large."""
    batch = max(1, _GAIN_BATCH_ENTRIES // cov.size)
    for p0 in range(0, patterns.shape[0], batch):
        yield from enumerate(_conditional_gains(cov, patterns[p0 : p0 + batch], alpha)[0], start=p0)


def _conditional_gains(cov: np.ndarray, patterns: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pattern (observed subset o), the (F, F) matrix G with z @ G = z_o (C_oo + alpha I)^-1 C_om.

    Returns G and the right-hand side it solved, C_om in place (0 elsewhere). In both, rows outside
    o and columns outside m are zero. Solving the full F x F system with identity on the
    missing block keeps every pattern the same shape, so all of them go through one batched solve.
    """
    eye = np.eye(cov.shape[0])
    both_observed = patterns[:, :, None] & patterns[:, None, :]
    lhs = np.where(both_observed, cov + alpha * eye, eye)
    rhs = np.where(patterns[:, :, None] & ~patterns[:, None, :], cov, 0.0)
    return np.linalg.solve(lhs, rhs), rhs


IMPUTERS = {"mean": MeanImputer, "interpolation": LinearInterpolationImputer, "ridge": RidgeImputer}


def make_imputer(name: str) -> Imputer:
    """A fresh, unfitted baseline by name: "mean", "interpolation" or "ridge"."""
    try:
        return IMPUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown imputer {name!r}; expected one of {sorted(IMPUTERS)}") from None
