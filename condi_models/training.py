"""One round of local training at a silo: Phase A, then Phase B.

:func:`train_local` is the function both the in-process simulation and the silo agent call,
unchanged. It starts from whatever parameters the model holds (the global state of the round),
trains on the silo's prepared data, and reports the sample and per-group weights that federated
averaging needs.

How much a silo trains per round: each phase runs its epochs, but never fewer than
``min_local_steps`` optimizer steps, so a silo of 7 records (one batch per epoch) still moves its
model (it makes more passes over its data). Optimizers are fresh every round, as in FedAvg; each
phase warms its learning rate up over ``warmup_steps`` (Adam's first steps from empty moments are
the largest), and the coordinator scales the rate per round (:func:`round_lr_scale`, cosine decay
by default).

Label skew: a silo whose records are mostly one class would each round pull the classifier
towards "my majority". ``class_weighting: logit_adjusted`` trains Phase B on logits shifted by
log(local prior / federation prior): under label shift the silo's Bayes posterior is the
federation's times that ratio, so the unshifted logits learn the federation's posterior from
every silo alike; a class the silo lacks drops out of its softmax, so the silo leaves that class
alone instead of pushing it down (the restricted softmax of FedRS, Li and Zhan, KDD 2021).
``balanced`` instead weighs the loss by the inverse of the pooled class counts. Both read the
federation's pooled counts; without them the silo's own counts stand in (``balanced``) or the
adjustment is the identity (``logit_adjusted``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import ConfigDict
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from condi_models.aggregation import ParameterGroups
from condi_models.batches import Batch, PreparedSplit, crop, iterate_batches
from condi_models.evaluation import impute_split
from condi_models.imputers import gaussian_em
from condi_models.metrics import BAND_LEVELS, band_factor
from condi_models.nn.diffusion import make_training_mask
from condi_models.nn.model import CondIModel, PhaseADraw
from condi_models.nn.sampling import SamplingOptions
from condi_models.privacy import PrivateRound, SiloPrivacy

# Logit shift of a class a silo has no record of: exp(-30) ~ 1e-13, out of the softmax.
ABSENT_CLASS_SHIFT = -30.0


@dataclass(frozen=True)
class LocalTrainingConfig:
    """Local training per round; also the ``training:`` config section."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    epochs_a: int = 3
    epochs_b: int = 3
    batch_size: int = 32
    lr_a: float = 1e-3
    lr_b: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    window: int | None = 250
    # What the classifier trains on: CondI classifies imputed samples, and the prior's fill is a
    # cheap stand-in for them (PTB-XL validation fold 7, one seed: macro AUROC 0.87 against 0.79
    # on the observed entries; BENCHMARKS.md, "A model that learns").
    phase_b_input: Literal["observed", "imputed", "prior"] = "prior"
    impute_steps: int = 10
    prior_em_iterations: int = 20
    # The local regime below took zero-fill's validation AUROC from 0.70 to about 0.76 on PTB-XL
    # (BENCHMARKS.md, "A model that learns"); its parts one by one moved it less than the noise.
    min_local_steps: int = 20
    # Phase A's own floor: its steps cost about five of Phase B's, and most of the imputation comes
    # from the Gaussian prior, so by default it runs its epochs alone.
    min_local_steps_a: int = 0
    warmup_steps: int = 5
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_min_ratio: float = 0.1
    class_weighting: Literal["none", "balanced", "logit_adjusted"] = "logit_adjusted"
    # The imputer's calibrations after Phase A (held_out_windows, then fit_gate and fit_band):
    # training windows they are fitted on (0: keep the gate and factors the model holds), and
    # independent draws per window for the band; a factor holds for as many draws as it was
    # fitted with, so this is `condi predict`'s default. 16 windows hold thousands of held-out
    # entries, plenty for two quantiles; each window costs band_samples x impute_steps denoiser
    # calls a round, more than its Phase A epoch.
    band_windows: int = 16
    band_samples: int = 5

    def __post_init__(self) -> None:
        if self.epochs_a < 0 or self.epochs_b < 0:
            raise ValueError("epochs_a and epochs_b must be >= 0")
        if self.min_local_steps < 0 or self.warmup_steps < 0 or self.min_local_steps_a < 0:
            raise ValueError("min_local_steps, min_local_steps_a and warmup_steps must be >= 0")
        if not 0.0 < self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in (0, 1], got {self.lr_min_ratio}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr_a <= 0 or self.lr_b <= 0:
            raise ValueError("learning rates must be > 0")
        if self.prior_em_iterations < 0:
            raise ValueError(f"prior_em_iterations must be >= 0, got {self.prior_em_iterations}")
        if self.band_windows < 0 or self.band_samples < 2:
            raise ValueError(
                f"band_windows must be >= 0 and band_samples >= 2, got {self.band_windows} and {self.band_samples}"
            )


@dataclass(frozen=True)
class TrainingProgress:
    """One progress report: where local training is, and its running loss."""

    phase: Literal["A", "B"]
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float


ProgressHook = Callable[[TrainingProgress], None]


@dataclass(frozen=True)
class LocalResult:
    """What a silo reports after local training (aggregates only, never records)."""

    n_samples: int
    group_weights: dict[str, float]
    phase_a_loss: float
    phase_b_loss: float
    seconds_a: float
    seconds_b: float
    extra: dict[str, float] = field(default_factory=dict)


def phase_epochs(cfg: LocalTrainingConfig, phase: Literal["A", "B"], n_samples: int) -> int:
    """Passes over ``n_samples`` records a phase makes: its epochs, or more to reach its step floor."""
    epochs = cfg.epochs_a if phase == "A" else cfg.epochs_b
    floor = cfg.min_local_steps_a if phase == "A" else cfg.min_local_steps
    if epochs == 0 or n_samples == 0:
        return 0
    per_epoch = math.ceil(n_samples / cfg.batch_size)
    return max(epochs, math.ceil(floor / per_epoch))


def round_lr_scale(cfg: LocalTrainingConfig, round_index: int, rounds: int) -> float:
    """The learning-rate factor of round ``round_index`` (0-based) of ``rounds``: 1 throughout for
    ``constant``; for ``cosine`` from 1 in the first round down to ``lr_min_ratio`` in the last."""
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return 1.0
    done = min(max(round_index, 0), rounds - 1) / (rounds - 1)
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights with mean 1 over the classes present; an absent class weighs 1.

    ``counts`` (C,) are training samples per class, pooled over the federation where possible.
    The largest weight is at most 10 x the smallest, so a class of one record cannot dominate the loss.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"class counts must be a 1-D array of >= 2 finite non-negative numbers, got {counts}")
    present = counts > 0
    if not present.any():
        return np.ones_like(counts)
    raw = np.where(present, counts[present].sum() / (present.sum() * np.maximum(counts, 1.0)), 1.0)
    raw = np.minimum(raw, 10.0 * raw[present].min())
    return raw / raw[present].mean() * present + (~present)


def logit_adjustment(local_counts: np.ndarray, pooled_counts: np.ndarray) -> np.ndarray:
    """Per class, log(local prior / pooled prior); a class the silo lacks gets ``ABSENT_CLASS_SHIFT``.

    Shifted that far, an absent class drops out of the silo's softmax (its gradient is ~0): the
    silo has nothing to say about it, so it neither pushes its score down nor learns it.
    """
    local = np.asarray(local_counts, dtype=np.float64)
    pooled = np.asarray(pooled_counts, dtype=np.float64)
    if local.shape != pooled.shape or local.ndim != 1 or np.any(local < 0) or np.any(pooled < 0):
        raise ValueError(f"class counts must be two 1-D non-negative arrays of one length, got {local} and {pooled}")
    present = local > 0
    if not present.any():
        return np.zeros_like(local)
    pooled = np.maximum(pooled, local)  # a silo's own records are part of the pool
    ratio = (local[present] / local.sum()) / (pooled[present] / pooled.sum())
    shift = np.full_like(local, ABSENT_CLASS_SHIFT)
    shift[present] = np.log(ratio)
    return shift


def aggregation_groups(model: CondIModel) -> ParameterGroups:
    """The model's trainable tensors by FedAvg weight group (see condi_models.aggregation).

    Tensors owned by one modality weigh by that modality's observed count; row-owned tensors
    (W_mod rows, W_cond source rows) row by row; everything else by the sample count.
    """
    g = model.parameter_groups()
    assignment: dict[str, str | tuple[str, ...]] = {}
    for name in (*g.theta, *g.w_mod, *g.w_cond):
        if name in g.modality_tensors:
            assignment[name] = f"modality/{g.modality_tensors[name]}"
        elif name in g.modality_rows:
            assignment[name] = tuple(f"modality/{m}" for m in g.modality_rows[name])
        else:
            assignment[name] = "all"
    return ParameterGroups(assignment)


def group_weights(split: PreparedSplit) -> dict[str, float]:
    """A silo's FedAvg weights: its sample count, and per modality the samples that observe it."""
    weights = {"all": float(len(split))}
    for m, count in enumerate(split.modality_counts()):
        weights[f"modality/{m}"] = float(count)
    return weights


def refit_prior(model: CondIModel, split: PreparedSplit, iterations: int, seed: int) -> int:
    """EM on the silo's observed training entries from the model's current Gaussian prior.

    Returns the EM steps taken (0 when the model has no prior or the split nothing observed).
    The moments it leaves are what the silo reports for averaging; see ``condi_models.nn.prior``.
    """
    if model.prior is None or iterations == 0 or not split.observed.any():
        return 0
    mu, cov = model.prior.moments()
    template = None
    if model.uses_beat_template:
        t = split.beat_template()
        template = (torch.from_numpy(t.values), torch.from_numpy(t.available))
    x, observed = model.prior.stack(torch.from_numpy(split.x), torch.from_numpy(split.observed), template)
    mu, cov, done = gaussian_em(x.numpy(), observed.numpy(), mu, cov, iterations, seed=seed)
    model.prior.set_moments(mu, cov)
    return done


# The network gates fit_gate chooses from: the prior alone, half the network's correction, all of it.
GATE_CANDIDATES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class HeldOut:
    """A batch of training windows, the conditioning mask that hides some of their observed entries, and those."""

    batch: Batch
    cond: torch.Tensor
    entries: torch.Tensor


def held_out_windows(
    model: CondIModel, split: PreparedSplit, cfg: LocalTrainingConfig, seed: int, device: torch.device
) -> list[HeldOut]:
    """Up to ``cfg.band_windows`` training windows with observed entries hidden as Phase A hides them.

    A seeded choice of records, centre-cropped to ``cfg.window``; ``make_training_mask`` hides
    what another record's missingness pattern lacks (or a random share), so the held-out entries
    look like the gaps the silo's data have. The imputer's calibrations are fitted on them.
    """
    if cfg.band_windows == 0 or len(split) == 0:
        return []
    rows = np.sort(np.random.default_rng(seed).permutation(len(split))[: cfg.band_windows])
    if model.uses_beat_template:
        split.beat_template()  # the split keeps it: its rows are cut from it, not built again
    chosen = split.rows(rows)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    batches = iterate_batches(
        chosen, cfg.batch_size, window=cfg.window, rng=None, device=device, template=model.uses_beat_template
    )
    for batch in batches:
        cond = make_training_mask(batch.observed, generator)
        out.append(HeldOut(batch, cond, batch.observed & ~cond))
    return out


def fit_gate(model: CondIModel, held_out: Sequence[HeldOut], cfg: LocalTrainingConfig, seed: int) -> float | None:
    """Set ``network_gate`` to the candidate of ``GATE_CANDIDATES`` whose imputation of ``held_out`` errs least.

    The imputation is the sampler's centre path (one antithetic draw: deterministic), so the
    candidates differ only in how much of the network's correction to the prior's estimate they
    apply. With few Phase A steps the network's shift on long gaps is unstable between runs; on
    PTB-XL validation folds it made CondI 5 to 27 % worse than its prior on blocks and 9 % worse on
    points. The gate keeps what the held-out entries confirm. Returns the MAE at the chosen gate,
    or None (the gate unchanged) without a prior or without held-out entries; ties keep the larger.
    """
    if model.network_gate is None or not held_out or not any(h.entries.any() for h in held_out):
        return None
    sampling = SamplingOptions(n_samples=1, steps=cfg.impute_steps, antithetic=True)
    errors = {}
    for gate in GATE_CANDIDATES:
        with torch.no_grad():
            model.network_gate.fill_(gate)
        total, count = 0.0, 0
        for h in held_out:
            generator = torch.Generator(device=h.batch.x.device).manual_seed(seed)
            imp = model.impute(h.batch.x, h.cond, sampling, generator=generator, template=h.batch.template)
            total += float((imp.x_hat - h.batch.x).abs()[h.entries].sum())
            count += int(h.entries.sum())
        errors[gate] = total / count
    best = min(GATE_CANDIDATES, key=lambda g: (errors[g], -g))
    with torch.no_grad():
        model.network_gate.fill_(best)
    return errors[best]


def fit_band(model: CondIModel, held_out: Sequence[HeldOut], cfg: LocalTrainingConfig, seed: int) -> int:
    """Fit the imputer's band factors on the ``held_out`` training entries; returns the entries used.

    ``cfg.band_samples`` independent DDIM draws (``cfg.impute_steps`` steps) impute them, and each
    level's factor is the one under which its band covers that share of their truth
    (``condi_models.metrics.band_factor``). Returns 0, leaving the factors, when the model has no
    imputer or nothing was held out.
    """
    if model.band is None or not held_out:
        return 0
    sampling = SamplingOptions(n_samples=cfg.band_samples, steps=cfg.impute_steps, antithetic=False)
    generator = torch.Generator(device=held_out[0].batch.x.device).manual_seed(seed)
    truth, draws = [], []
    for h in held_out:
        imp = model.impute(h.batch.x, h.cond, sampling, generator=generator, return_samples=True,
                           template=h.batch.template)
        truth.append(h.batch.x[h.entries].cpu().numpy())
        draws.append(imp.samples[:, h.entries].cpu().numpy())
    t = np.concatenate(truth)
    if t.size == 0:
        return 0
    s = np.concatenate(draws, axis=1)
    model.band.set_factors([band_factor(t, s, level) for level in BAND_LEVELS], cfg.band_samples)
    return int(t.size)


def _phase_b_input(
    model: CondIModel, batch: Batch, cfg: LocalTrainingConfig, train_x: np.ndarray | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the classifier trains on: (values, mask, modality availability or None for the mask's).

    Observed entries as the paper does, unless ``train_x`` holds imputed records or
    ``phase_b_input`` is ``prior`` (the prior's conditional mean, a cheap stand-in for the
    imputation the classifier meets at inference). Filled inputs are whole; eq. 4 still routes by
    what was observed.
    """
    if train_x is not None:
        filled = torch.from_numpy(crop(train_x, batch.index, batch.start, batch.x.shape[-1])).to(device)
    elif cfg.phase_b_input == "prior" and model.prior is not None and model.spec.impute_for_classification:
        filled = model.prior_estimate(batch.x, batch.observed, batch.template).mean
    else:
        return batch.x, batch.observed, None
    return filled, torch.ones_like(batch.observed), model.availability(batch.observed)


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel group training one silo (:mod:`condi_models.distributed`).

    Every rank draws the same global batches (same seed, order, crops and Phase A draws) and
    trains on its own contiguous rows of each; the ranks' gradients are combined so that a step
    moves the model as one process's step on the whole global batch does (see :class:`_RankStep`).
    """

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world - 1}")

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n``: contiguous, the first ``n % world`` ranks one more."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def total(self, value: float, device: torch.device) -> float:
        """The sum of ``value`` over the ranks (on ``device``: NCCL reduces only GPU tensors)."""
        summed = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return float(summed.item())


@dataclass(frozen=True)
class ClassTerms:
    """Phase B's class weights (``balanced``) and logit shift (``logit_adjusted``): (C,) arrays or None."""

    weights: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass(frozen=True)
class PhasesRun:
    """What :func:`train_phases` did: each phase's mean loss over its last epoch, and its seconds."""

    phase_a_loss: float
    phase_b_loss: float
    seconds_a: float
    seconds_b: float


class _LossForward(nn.Module):
    """The model with a forward that runs the loss it is handed.

    DistributedDataParallel prepares its gradient all-reduce in its forward, and CondI's losses
    are model methods, not ``forward``; this lets a step's loss run inside DDP's forward.
    """

    def __init__(self, model: CondIModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return compute()


@dataclass(frozen=True)
class _RankLoss:
    """One rank's side of a step: what it back-propagates (None: nothing), its own rows' mean loss
    (for the finite check and progress), its part of the global batch's loss, and its row count."""

    backward: torch.Tensor | None
    own: torch.Tensor
    part: float
    rows: int


class _RankStep:
    """One rank's part of each step of a phase trained by a data-parallel group.

    A global batch's loss is sum_i c_i l_i over its records (c_i = 1/n for a mean, w_i / sum w for
    Phase B's class-weighted mean); this rank's part is that sum over its own rows: their mean
    loss times their share of the weight. What it back-propagates is the part scaled so that the
    combination across ranks is the global batch's gradient. DDP averages the ranks' gradients,
    so plainly it is the part times the world size. Under DP-SGD the per-record gradients are what
    count and Opacus multiplies the mean loss's gradient by the rows it saw, so the part is
    scaled by (global rows / own rows); DistributedDPOptimizer then sums the clipped gradients of
    all ranks and adds the noise once. A rank with no rows in a step (a last batch smaller than
    the group) still joins the all-reduce, with a zero gradient.
    """

    def __init__(
        self,
        shard: Shard,
        params: list[nn.Parameter],
        ddp: DistributedDataParallel | None,
        weights: torch.Tensor | None,
    ) -> None:
        self.shard = shard
        self.params = params
        self.ddp = ddp
        self.weights = weights

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, shard: Shard, model: CondIModel, params: list[nn.Parameter], private: bool, weights: torch.Tensor | None
    ) -> Iterator[_RankStep]:
        """The phase's rank step; without DP the model is wrapped in DDP, with only ``params`` trainable
        meanwhile so that DDP reduces just the phase's gradients (DP's optimizer does its own)."""
        if private:
            yield cls(shard, params, None, weights)
            return
        wanted = {id(p) for p in params}
        saved = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        try:
            # Whether a parameter is used can depend on the records, hence the search for unused ones:
            # one never used keeps no gradient, as in one process.
            ddp = DistributedDataParallel(_LossForward(model), find_unused_parameters=True)
            yield cls(shard, params, ddp, weights)
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    def loss(
        self,
        batch: Batch,
        draw: PhaseADraw | None,
        loss_of: Callable[[Batch, PhaseADraw | None], torch.Tensor],
    ) -> _RankLoss:
        """This rank's rows of the global ``batch`` (and of its Phase A ``draw``), and their loss."""
        n = len(batch.index)
        rows = self.shard.rows(n)
        own_rows = rows.stop - rows.start
        part_batch = Batch(
            x=batch.x[rows], observed=batch.observed[rows], y=batch.y[rows], index=batch.index[rows],
            start=batch.start[rows],
            template=None if batch.template is None else (batch.template[0][rows], batch.template[1][rows]),
        )
        part_draw = None if draw is None else PhaseADraw(draw.cond_mask[rows], draw.t[rows], draw.noise[rows])
        if self.weights is None:
            share = own_rows / n
        else:
            w = self.weights[batch.y]
            share = float(w[rows].sum() / w.sum())
        zero = torch.zeros((), device=batch.x.device)
        if self.ddp is None:
            if own_rows == 0:
                return _RankLoss(None, zero, 0.0, 0)
            own = loss_of(part_batch, part_draw)
            return _RankLoss(own * (share * n / own_rows), own, float(own.detach()) * share, own_rows)

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            if own_rows == 0:
                # Touches every trainable parameter, so this rank's DDP hooks fire with zeros.
                return sum((p.sum() for p in self.params), zero) * 0.0, zero
            own = loss_of(part_batch, part_draw)
            return own * (share * self.shard.world), own

        backward, own = self.ddp(compute)
        return _RankLoss(backward, own, float(own.detach()) * share, own_rows)


def _batch_loss(
    phase: Literal["A", "B"],
    model: CondIModel,
    batch: Batch,
    draw: PhaseADraw | None,
    cfg: LocalTrainingConfig,
    train_x: np.ndarray | None,
    device: torch.device,
    weights: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """The loss of ``batch``: Phase A's for the ``draw``, or Phase B's classification loss."""
    if phase == "A":
        assert draw is not None
        return model.phase_a_loss_for(batch.x, batch.observed, draw, batch.template)
    x_in, mask, availability = _phase_b_input(model, batch, cfg, train_x, device)
    logits = model.classify(x_in, mask, availability)
    if shift is not None:
        logits = logits + shift
    return torch.nn.functional.cross_entropy(logits, batch.y, weight=weights)


def _run_phase(
    phase: Literal["A", "B"],
    model: CondIModel,
    split: PreparedSplit,
    cfg: LocalTrainingConfig,
    epochs: int,
    rng: np.random.Generator,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressHook | None,
    train_x: np.ndarray | None = None,
    private: PrivateRound | None = None,
    lr_scale: float = 1.0,
    weights: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    shard: Shard | None = None,
) -> float:
    """Train one phase; returns the mean loss of its last epoch (NaN when it has no work).

    With ``private`` the phase runs DP-SGD: Poisson-sampled batches, per-sample clipping and
    noise instead of the batch-level gradient clip. ``weights`` are Phase B's class weights and
    ``shift`` its logit adjustment, each (C,) or None. With ``shard`` this process is one rank of
    a data-parallel group and trains on its rows of every global batch (:class:`_RankStep`).
    """
    params = model.phase_parameters(phase.lower())
    if epochs == 0 or not params or len(split) == 0:
        return math.nan
    lr = (cfg.lr_a if phase == "A" else cfg.lr_b) * lr_scale
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (cfg.warmup_steps + 1)))
    n_batches = math.ceil(len(split) / cfg.batch_size)
    last = math.nan
    model.train()
    with contextlib.ExitStack() as stack:
        if private is not None:
            world = 1 if shard is None else shard.world
            opt = stack.enter_context(private.optimizer(model, params, opt, world=world))

        def loss_of(rows: Batch, draw: PhaseADraw | None) -> torch.Tensor:
            return _batch_loss(phase, model, rows, draw, cfg, train_x, device, weights, shift)

        ranked = None
        if shard is not None:
            ranked = stack.enter_context(_RankStep.open(shard, model, params, private is not None, weights))
        for epoch in range(epochs):
            total, counted = 0.0, 0
            if private is None:
                batches = iterate_batches(
                    split, cfg.batch_size, window=cfg.window, rng=rng, device=device, template=model.uses_beat_template
                )
            else:
                batches = private.batches(split, window=cfg.window, device=device, template=model.uses_beat_template)
            for b, batch in enumerate(batches):
                if private is not None and len(batch.index) == 0:
                    opt.zero_grad(set_to_none=True)
                    private.step(opt, 0)
                    continue
                draw = None
                if phase == "A":
                    # Under DP a sample's conditioning mask may not borrow another record's pattern
                    # (the default borrows the previous sample's), or one record could move two
                    # clipped gradients; its own pattern makes the draw CSDI's random strategy.
                    borrowed = batch.observed if private is not None else None
                    draw = model.phase_a_draw(batch.x, batch.observed, generator, borrowed)
                if ranked is None:
                    loss = loss_of(batch, draw)
                    step = _RankLoss(loss, loss, float(loss.detach()), len(batch.index))
                else:
                    step = ranked.loss(batch, draw, loss_of)
                if not torch.isfinite(step.own):
                    raise FloatingPointError(
                        f"phase {phase} loss became {step.own.item()} at epoch {epoch + 1}, batch {b + 1}"
                    )
                opt.zero_grad(set_to_none=True)
                if step.backward is not None:
                    step.backward.backward()
                if private is None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                else:
                    private.step(opt, step.rows)
                warmup.step()
                total += step.part
                counted += 1
                if progress is not None:
                    progress(TrainingProgress(phase, epoch + 1, epochs, b + 1, n_batches, float(step.own.detach())))
            if shard is not None:
                total = shard.total(total, device)
            last = total / counted if counted else math.nan
    return last


def train_local(
    model: CondIModel,
    split: PreparedSplit,
    cfg: LocalTrainingConfig,
    *,
    seed: int,
    device: torch.device,
    progress: ProgressHook | None = None,
    privacy: SiloPrivacy | None = None,
    lr_scale: float = 1.0,
    class_counts: np.ndarray | None = None,
) -> LocalResult:
    """Phase A for ``cfg.epochs_a`` epochs, then Phase B for ``cfg.epochs_b``, on ``split``
    (more passes where ``cfg.min_local_steps`` asks for them: :func:`phase_epochs`).

    ``lr_scale`` multiplies both learning rates (the round's :func:`round_lr_scale`).
    ``class_counts`` (C,) are the federation's pooled training counts per class, for
    ``class_weighting`` ``balanced`` or ``logit_adjusted``; without them the silo's own counts
    stand in for ``balanced`` and ``logit_adjusted`` leaves the logits as they are.

    Before Phase A the imputer's Gaussian prior is refitted by ``cfg.prior_em_iterations`` EM
    steps on the split, and after it the network gate and the band factors (:func:`fit_gate`,
    :func:`fit_band`); none of them under ``privacy``, as they would leave the silo unnoised.
    With ``privacy`` the phases it names train with DP-SGD; the budget is checked first
    (:class:`~condi_models.privacy.BudgetExhausted` before anything trains), the round is
    recorded in the silo's ledger afterwards, and ``extra`` reports the epsilon spent so far.
    """
    terms = class_terms(cfg, split, class_counts)
    private = None if privacy is None else begin_private_round(model, split, cfg, privacy, seed=seed, device=device)
    run = train_phases(
        model, split, cfg, seed=seed, device=device, progress=progress, private=private, lr_scale=lr_scale,
        terms=terms,
    )
    return local_result(split, run, privacy, private)


def class_terms(cfg: LocalTrainingConfig, split: PreparedSplit, class_counts: np.ndarray | None) -> ClassTerms:
    """Phase B's class weights or logit shift on ``split`` as ``cfg.class_weighting`` says, from the
    pooled ``class_counts`` (C,) or, without them, as :func:`train_local` describes."""
    local_counts = np.bincount(split.y, minlength=len(split.info.classes))
    if class_counts is not None and len(class_counts) != len(local_counts):
        raise ValueError(f"class_counts has {len(class_counts)} entries for {len(local_counts)} classes")
    if cfg.class_weighting == "balanced":
        return ClassTerms(weights=class_weights(local_counts if class_counts is None else class_counts))
    if cfg.class_weighting == "logit_adjusted" and class_counts is not None:
        return ClassTerms(shift=logit_adjustment(local_counts, class_counts))
    return ClassTerms()


def begin_private_round(
    model: CondIModel,
    split: PreparedSplit,
    cfg: LocalTrainingConfig,
    privacy: SiloPrivacy,
    *,
    seed: int,
    device: torch.device,
) -> PrivateRound:
    """Check the budget and set up the round's DP-SGD on ``split`` (the phases' work as
    :func:`train_local` plans it); raises BudgetExhausted before anything trains."""
    epochs = {"a": phase_epochs(cfg, "A", len(split)), "b": phase_epochs(cfg, "B", len(split))}
    work = {p: (e if model.phase_parameters(p) else 0) for p, e in epochs.items()}
    return privacy.begin_round(
        n_samples=len(split), batch_size=cfg.batch_size, phase_epochs=work, seed=seed, device=device
    )


def train_phases(
    model: CondIModel,
    split: PreparedSplit,
    cfg: LocalTrainingConfig,
    *,
    seed: int,
    device: torch.device,
    progress: ProgressHook | None = None,
    private: PrivateRound | None = None,
    lr_scale: float = 1.0,
    terms: ClassTerms | None = None,
    shard: Shard | None = None,
) -> PhasesRun:
    """The training of :func:`train_local` between the budget check and the ledger: the prior's
    refit, Phase A, the imputer's calibrations (:func:`fit_gate`, :func:`fit_band`), the imputed inputs where asked,
    Phase B.

    ``private`` is the round :func:`begin_private_round` set up (its ``steps_taken`` counts the
    noisy steps), ``terms`` Phase B's :func:`class_terms`. With ``shard`` this process is one rank
    of a data-parallel group that has ``torch.distributed`` set up; every rank refits the prior
    and imputes the whole split alike, and trains on its rows of each batch.
    """
    terms = terms or ClassTerms()
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    model.to(device)
    epochs_a = phase_epochs(cfg, "A", len(split))
    epochs_b = phase_epochs(cfg, "B", len(split))
    weights = None if terms.weights is None else torch.as_tensor(terms.weights, dtype=torch.float32, device=device)
    shift = None if terms.shift is None else torch.as_tensor(terms.shift, dtype=torch.float32, device=device)
    private_a = private if private is not None and "a" in private.phases else None
    private_b = private if private is not None and "b" in private.phases else None
    t0 = time.perf_counter()
    # The prior's moments, the network gate and the band factors leave the silo unnoised, so a
    # private round keeps the global ones.
    if private is None and epochs_a > 0:
        refit_prior(model, split, cfg.prior_em_iterations, seed)
    loss_a = _run_phase(
        "A", model, split, cfg, epochs_a, rng, generator, device, progress, private=private_a, lr_scale=lr_scale,
        shard=shard,
    )
    if private is None and epochs_a > 0:
        held_out = held_out_windows(model, split, cfg, seed, device)
        fit_gate(model, held_out, cfg, seed)
        fit_band(model, held_out, cfg, seed)
    t1 = time.perf_counter()
    train_x = None
    if cfg.phase_b_input == "imputed" and model.spec.diffusion:
        sampling = SamplingOptions(n_samples=1, steps=cfg.impute_steps)
        train_x = impute_split(model, split, sampling=sampling, seed=seed, device=device).x_hat
    loss_b = _run_phase(
        "B", model, split, cfg, epochs_b, rng, generator, device, progress, train_x, private_b, lr_scale, weights,
        shift, shard,
    )
    t2 = time.perf_counter()
    return PhasesRun(phase_a_loss=loss_a, phase_b_loss=loss_b, seconds_a=t1 - t0, seconds_b=t2 - t1)


def local_result(
    split: PreparedSplit, run: PhasesRun, privacy: SiloPrivacy | None = None, private: PrivateRound | None = None
) -> LocalResult:
    """What the silo reports of ``run`` on ``split``; with ``privacy`` the ``private`` round is recorded
    in the ledger first and ``extra`` reports the epsilon spent so far."""
    extra: dict[str, float] = {}
    if privacy is not None and private is not None:
        extra = {
            "epsilon": privacy.commit(private),
            "delta": privacy.spec.delta,
            "noise_multiplier": private.noise_multiplier,
            "dp_steps": float(private.steps_taken),
        }
    return LocalResult(
        n_samples=len(split),
        group_weights=group_weights(split),
        phase_a_loss=run.phase_a_loss,
        phase_b_loss=run.phase_b_loss,
        seconds_a=run.seconds_a,
        seconds_b=run.seconds_b,
        extra=extra,
    )
