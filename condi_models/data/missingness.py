"""Simulated missingness: the paper's ps and pw, made precise (DESIGN.md section 3).

- A sample is affected with probability ``ps``.
- In an affected sample each modality is affected with probability ``modality_prob``; at least
  one modality is (if the coin flips pick none, one is chosen uniformly).
- An affected modality is dropped whole with probability ``p_drop``; otherwise it loses a fraction
  ``pw`` of its time steps (all its channels at those steps), ``points`` scattered or ``blocks``
  contiguous.

Masks are a fixed property of each sample: the random stream of a sample is seeded by the
config seed and a digest of its sample id, so the same sample gets the same mask in every call,
process and epoch, whatever else is in the dataset. Missing data stays missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import ConfigDict

from condi_models.data.dataset import ClinicalDataset


@dataclass(frozen=True)
class MissingnessSpec:
    """How to hide data. ``ps = 0`` hides nothing.

    Also the schema of the ``simulated_missingness:`` config section (unknown keys are errors).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    ps: float = 0.8
    pw: float = 0.8
    modality_prob: float = 0.5
    p_drop: float = 0.0
    pattern: Literal["points", "blocks"] = "points"
    max_blocks: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ps", "pw", "modality_prob", "p_drop"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"missingness {name} must be within [0, 1], got {v}")
        if self.pattern not in ("points", "blocks"):
            raise ValueError(f"missingness pattern must be 'points' or 'blocks', got {self.pattern!r}")
        if self.max_blocks < 1:
            raise ValueError(f"missingness max_blocks must be >= 1, got {self.max_blocks}")


@dataclass(frozen=True)
class MissingView:
    """A dataset as the model sees it after simulation, plus what is kept apart for evaluation.

    ``data`` is what training code may read. ``hidden`` marks entries that were observed in the
    source and removed by the simulation; the source values at those entries (``truth``) are for
    imputation metrics only.
    """

    data: ClinicalDataset
    hidden: np.ndarray  # (N, F, L) bool
    truth: np.ndarray  # (N, F, L) float32, the source values (0.0 where never observed)
    affected: np.ndarray  # (N,) bool, sample was selected by ps
    dropped_modalities: np.ndarray  # (N, M) bool, modality removed whole


def sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    """A random stream that depends only on ``seed`` and the sample's identity."""
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    return np.random.default_rng([seed & 0xFFFFFFFF, *words])


def _lost_steps(rng: np.random.Generator, length: int, pw: float, spec: MissingnessSpec) -> np.ndarray:
    """Boolean (L,) of time steps lost in one affected modality."""
    n_lost = int(round(pw * length))
    lost = np.zeros(length, dtype=bool)
    if n_lost == 0:
        return lost
    if spec.pattern == "points":
        lost[rng.choice(length, size=n_lost, replace=False)] = True
        return lost
    # Blocks: split n_lost into up to max_blocks contiguous gaps placed without overlap. The
    # gaps are laid in order along the free space, so the total is exact.
    n_blocks = int(rng.integers(1, spec.max_blocks + 1))
    n_blocks = min(n_blocks, n_lost)
    cuts = np.sort(rng.choice(np.arange(1, n_lost), size=n_blocks - 1, replace=False)) if n_blocks > 1 else []
    sizes = np.diff(np.concatenate([[0], cuts, [n_lost]])).astype(int)
    free = length - n_lost
    # Distribute the free steps into n_blocks + 1 slots around the gaps.
    gaps_before = rng.multinomial(free, np.full(n_blocks + 1, 1.0 / (n_blocks + 1)))
    pos = 0
    for size, space in zip(sizes, gaps_before[:-1]):
        pos += int(space)
        lost[pos : pos + size] = True
        pos += int(size)
    return lost


def simulate_missingness(dataset: ClinicalDataset, spec: MissingnessSpec) -> MissingView:
    """Hide entries of ``dataset`` as ``spec`` says; entries already unobserved stay unobserved."""
    n, _, length = dataset.x.shape
    n_mod = dataset.info.n_modalities
    chan_mod = dataset.info.channel_modality
    removed = np.zeros(dataset.x.shape, dtype=bool)
    affected = np.zeros(n, dtype=bool)
    dropped = np.zeros((n, n_mod), dtype=bool)
    for i, sid in enumerate(dataset.sample_ids):
        rng = sample_rng(spec.seed, sid)
        # Every draw is made whatever the outcome, so one sample's mask does not depend on
        # which branch an earlier coin took.
        is_affected = rng.random() < spec.ps
        mod_coins = rng.random(n_mod) < spec.modality_prob
        fallback = int(rng.integers(n_mod))
        drop_coins = rng.random(n_mod) < spec.p_drop
        if not is_affected:
            continue
        affected[i] = True
        if not mod_coins.any():
            mod_coins[fallback] = True
        for m in np.flatnonzero(mod_coins):
            rows = chan_mod == m
            if drop_coins[m]:
                removed[i, rows, :] = True
                dropped[i, m] = True
            else:
                removed[i, rows, :] = _lost_steps(rng, length, spec.pw, spec)[None, :]
    hidden = removed & dataset.observed
    observed = dataset.observed & ~removed
    x = np.where(observed, dataset.x, np.float32(0.0)).astype(np.float32, copy=False)
    return MissingView(
        data=replace(dataset, x=x, observed=observed),
        hidden=hidden,
        truth=dataset.x,
        affected=affected,
        dropped_modalities=dropped,
    )
