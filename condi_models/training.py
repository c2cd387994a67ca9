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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict

from condi_models.aggregation import ParameterGroups
from condi_models.batches import Batch, PreparedSplit, crop, iterate_batches
from condi_models.evaluation import impute_split
from condi_models.imputers import gaussian_em
from condi_models.nn.model import CondIModel
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
    x, observed = model.prior.stack(torch.from_numpy(split.x), torch.from_numpy(split.observed))
    mu, cov, done = gaussian_em(x.numpy(), observed.numpy(), mu, cov, iterations, seed=seed)
    model.prior.set_moments(mu, cov)
    return done


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
        filled = model.prior_estimate(batch.x, batch.observed).mean
    else:
        return batch.x, batch.observed, None
    return filled, torch.ones_like(batch.observed), model.availability(batch.observed)


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
) -> float:
    """Train one phase; returns the mean loss of its last epoch (NaN when it has no work).

    With ``private`` the phase runs DP-SGD: Poisson-sampled batches, per-sample clipping and
    noise instead of the batch-level gradient clip. ``weights`` are Phase B's class weights and
    ``shift`` its logit adjustment, each (C,) or None.
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
            opt = stack.enter_context(private.optimizer(model, params, opt))
        for epoch in range(epochs):
            total, counted = 0.0, 0
            if private is None:
                batches = iterate_batches(split, cfg.batch_size, window=cfg.window, rng=rng, device=device)
            else:
                batches = private.batches(split, window=cfg.window, device=device)
            for b, batch in enumerate(batches):
                if private is not None and len(batch.index) == 0:
                    opt.zero_grad(set_to_none=True)
                    private.step(opt, 0)
                    continue
                if phase == "A":
                    # Under DP a sample's conditioning mask may not borrow another record's pattern
                    # (the default borrows the previous sample's), or one record could move two
                    # clipped gradients; its own pattern makes the draw CSDI's random strategy.
                    borrowed = batch.observed if private is not None else None
                    loss = model.phase_a_loss(batch.x, batch.observed, generator=generator, borrowed_masks=borrowed)
                else:
                    x_in, mask, availability = _phase_b_input(model, batch, cfg, train_x, device)
                    logits = model.classify(x_in, mask, availability)
                    if shift is not None:
                        logits = logits + shift
                    loss = torch.nn.functional.cross_entropy(logits, batch.y, weight=weights)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"phase {phase} loss became {loss.item()} at epoch {epoch + 1}, batch {b + 1}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if private is None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                else:
                    private.step(opt, len(batch.index))
                warmup.step()
                total += float(loss.detach())
                counted += 1
                if progress is not None:
                    progress(TrainingProgress(phase, epoch + 1, epochs, b + 1, n_batches, float(loss.detach())))
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
    steps on the split (not under ``privacy``: its moments would leave the silo unnoised).
    With ``privacy`` the phases it names train with DP-SGD; the budget is checked first
    (:class:`~condi_models.privacy.BudgetExhausted` before anything trains), the round is
    recorded in the silo's ledger afterwards, and ``extra`` reports the epsilon spent so far.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    model.to(device)
    epochs_a = phase_epochs(cfg, "A", len(split))
    epochs_b = phase_epochs(cfg, "B", len(split))
    local_counts = np.bincount(split.y, minlength=len(split.info.classes))
    if class_counts is not None and len(class_counts) != len(local_counts):
        raise ValueError(f"class_counts has {len(class_counts)} entries for {len(local_counts)} classes")
    weights = shift = None
    if cfg.class_weighting == "balanced":
        counts = local_counts if class_counts is None else class_counts
        weights = torch.as_tensor(class_weights(counts), dtype=torch.float32, device=device)
    elif cfg.class_weighting == "logit_adjusted" and class_counts is not None:
        shift = torch.as_tensor(logit_adjustment(local_counts, class_counts), dtype=torch.float32, device=device)
    rnd = None
    if privacy is not None:
        work = {
            p: (epochs if model.phase_parameters(p) else 0) for p, epochs in (("a", epochs_a), ("b", epochs_b))
        }
        rnd = privacy.begin_round(
            n_samples=len(split), batch_size=cfg.batch_size, phase_epochs=work, seed=seed, device=device
        )
    private_a = rnd if rnd is not None and "a" in rnd.phases else None
    private_b = rnd if rnd is not None and "b" in rnd.phases else None
    t0 = time.perf_counter()
    # The prior's moments leave the silo unnoised, so a private round keeps the global ones.
    if privacy is None and epochs_a > 0:
        refit_prior(model, split, cfg.prior_em_iterations, seed)
    loss_a = _run_phase(
        "A", model, split, cfg, epochs_a, rng, generator, device, progress, private=private_a, lr_scale=lr_scale
    )
    t1 = time.perf_counter()
    train_x = None
    if cfg.phase_b_input == "imputed" and model.spec.diffusion:
        sampling = SamplingOptions(n_samples=1, steps=cfg.impute_steps)
        train_x = impute_split(model, split, sampling=sampling, seed=seed, device=device).x_hat
    loss_b = _run_phase(
        "B", model, split, cfg, epochs_b, rng, generator, device, progress, train_x, private_b, lr_scale, weights, shift
    )
    t2 = time.perf_counter()
    extra: dict[str, float] = {}
    if privacy is not None and rnd is not None:
        extra = {
            "epsilon": privacy.commit(rnd),
            "delta": privacy.spec.delta,
            "noise_multiplier": rnd.noise_multiplier,
            "dp_steps": float(rnd.steps_taken),
        }
    return LocalResult(
        n_samples=len(split),
        group_weights=group_weights(split),
        phase_a_loss=loss_a,
        phase_b_loss=loss_b,
        seconds_a=t1 - t0,
        seconds_b=t2 - t1,
        extra=extra,
    )
