"""In-process federated simulation: K silos, a fraction per round, FedAvg, one seed.

``condi sim --config experiment.yaml`` runs this. It uses the same local-training function as
the silo agent and the same averaging rule as the coordinator; only the transport is missing.
Every random choice (split, partition, masks, selection, initialisation, batches, noise) derives
from ``seed``, so two runs with the same config give the same metrics.

What a federation pools before round 0 is pooled here the same way: each silo's per-channel
(count, mean, std) of what stays visible after the simulated hiding, summed into one normalizer
that every silo trains with and evaluation uses, and the per-class training counts behind the
balanced class weights. The server optimizer (``federation.server_optimizer``) turns each
round's average into the next global model. With ``federation.model_selection:
best_val_auroc`` the round whose global model scored the best validation macro AUROC is kept and
exported, and the test split is read once, at the end, on that model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from condi_models.aggregation import SiloUpdate, fedavg
from condi_models.batches import PreparedSplit, fit_visible, prepare_split
from condi_models.checkpoint import save_checkpoint
from condi_models.configfile import StrictModel, load_config
from condi_models.data.beat_template import is_ecg
from condi_models.data.dataset import ClinicalDataset, DatasetInfo
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.partition import Split, partition_silos, patient_folds, split_by_folds, split_by_patient
from condi_models.data.sources import DataSource, load_source
from condi_models.evaluation import EvalOptions, EvalResult, evaluate
from condi_models.nn.config import ModelConfig, Variant
from condi_models.nn.model import CondIModel, resolve_device
from condi_models.nn.prior import DEFAULT_INTERPOLATION_SPAN, DEFAULT_PRIOR_RIDGE
from condi_models.privacy import BudgetExhausted, PrivacySpec, SiloPrivacy
from condi_models.reports import write_round_curves
from condi_models.server_optimizer import ServerOptimizer, ServerOptimizerConfig
from condi_models.training import LocalTrainingConfig, aggregation_groups, round_lr_scale, train_local

log = logging.getLogger(__name__)


class SplitSpec(StrictModel):
    """How samples are split into train / validation / test, whole patients at a time."""

    scheme: Literal["patient", "folds", "patient_folds"] = Field(
        default="patient",
        description="patient: shuffled patients cut by fractions; folds: the source's own folds (PTB-XL "
        "strat_fold); patient_folds: n_folds patient folds made with fold_seed, for cross-validation",
    )
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    train_folds: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    val_folds: list[int] = Field(default_factory=lambda: [7])
    test_folds: list[int] = Field(default_factory=lambda: [8])
    n_folds: int = Field(default=8, ge=2)
    fold_seed: int = 0

    def apply(self, dataset: ClinicalDataset, seed: int) -> Split:
        """Split ``dataset`` as this section says (patient shuffles use ``seed``)."""
        if self.scheme == "folds":
            if dataset.folds is None:
                raise ValueError(f"split.scheme: 'folds' needs a source with folds; {dataset.info.name} has none")
            return split_by_folds(dataset.folds, self.train_folds, self.val_folds, self.test_folds)
        if self.scheme == "patient_folds":
            folds = patient_folds(dataset.patient_ids, self.n_folds, self.fold_seed)
            return split_by_folds(folds, self.train_folds, self.val_folds, self.test_folds)
        return split_by_patient(dataset.patient_ids, self.fractions, seed)


class FederationSpec(StrictModel):
    """Silos, rounds and how training data is dealt out."""

    silos: int = Field(default=6, ge=1)
    silos_per_round: int = Field(default=3, ge=1)
    rounds: int = Field(default=70, ge=1)
    partition: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    eval_every: int = Field(default=1, ge=1, description="evaluate the global model every N rounds")
    server_optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)
    model_selection: Literal["last", "best_val_auroc"] = Field(
        default="best_val_auroc",
        description="export the last round's model, or the evaluated round's with the best validation macro AUROC",
    )

    @model_validator(mode="after")
    def _fits(self) -> FederationSpec:
        if self.silos_per_round > self.silos:
            raise ValueError(f"silos_per_round ({self.silos_per_round}) exceeds silos ({self.silos})")
        return self


# Series sampled less often than this (ICU vitals and labs, hourly) hold a value for hours, and a
# silo holds few of them. Their prior bridges a stay's every gap, holds the nearest value at a
# channel's edges and solves with a stronger ridge: chosen on the MIMIC-IV demo's validation folds,
# where both helped, while on PTB-XL's both hurt (benchmarks/prior_variants.py; BENCHMARKS.md,
# "Imputation on long gaps", issue 15).
SLOW_SERIES_HZ = 1.0 / 60.0
SLOW_SERIES_PRIOR_RIDGE = 0.1


def is_slow_series(info: DatasetInfo) -> bool:
    """Whether the data is sampled less often than once a minute (the prior's defaults differ)."""
    return info.sampling_rate_hz < SLOW_SERIES_HZ


class ModelSpec(StrictModel):
    """The model: a variant and optional size overrides of its parts."""

    variant: Variant = Variant.CONDI
    embed_dim: int = Field(default=32, ge=1)
    cond_dim: int = Field(default=32, ge=1)
    tokens_per_channel: int = Field(default=25, ge=1)
    denoiser: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    classifier: dict[str, Any] = Field(default_factory=dict)
    diffusion: dict[str, Any] = Field(default_factory=dict)
    gaussian_prior: bool = Field(
        default=True, description="diffuse the residual around the cross-channel Gaussian prior (condi_models.nn.prior)"
    )
    prior_lags: int = Field(
        default=0, ge=0, description="the prior also conditions on the instants up to this many steps before and after"
    )
    prior_template: bool | None = Field(
        default=None,
        description="the prior also conditions on each lead's beat template (condi_models.data.beat_template); "
        "default: on when the channels are ECG leads",
    )
    prior_interpolation: bool = Field(
        default=True,
        description="the prior also conditions on each channel's value interpolated from its nearest observed entries",
    )
    prior_interpolation_span: int | None = Field(
        default=None,
        ge=1,
        description="the longest gap (in steps) the prior's interpolation bridges; default: 10, or the whole window "
        "for series sampled less often than once a minute (hourly ICU data)",
    )
    prior_interpolation_edges: bool | None = Field(
        default=None,
        description="the prior's interpolation holds the nearest observed value before a channel's first and after "
        "its last observation (within the span); default: on for series sampled less often than once a minute",
    )
    prior_ridge: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="added to the observed block's diagonal when the prior solves (standardized units); default: "
        f"{DEFAULT_PRIOR_RIDGE:g}, or {SLOW_SERIES_PRIOR_RIDGE:g} for series sampled less often than once a minute",
    )

    def build(self, info: DatasetInfo, length: int) -> ModelConfig:
        """The full model config for data laid out as ``info``, at input length ``length`` (the window)."""
        base = ModelConfig.for_dataset(replace(info, length=length), self.variant, self.tokens_per_channel).to_dict()
        slow = is_slow_series(info)
        base.update(
            embed_dim=self.embed_dim, cond_dim=self.cond_dim,
            gaussian_prior=self.gaussian_prior, prior_lags=self.prior_lags,
            prior_template=is_ecg(info.channel_names) if self.prior_template is None else self.prior_template,
            prior_interpolation=self.prior_interpolation,
            prior_interpolation_span=self.prior_interpolation_span or (length if slow else DEFAULT_INTERPOLATION_SPAN),
            prior_interpolation_edges=(
                slow if self.prior_interpolation_edges is None else self.prior_interpolation_edges
            ),
            prior_ridge=self.prior_ridge or (SLOW_SERIES_PRIOR_RIDGE if slow else DEFAULT_PRIOR_RIDGE),
        )
        for part in ("denoiser", "context", "classifier", "diffusion"):
            base[part] = {**base[part], **getattr(self, part)}
        return ModelConfig.from_dict(base)


class ExperimentConfig(StrictModel):
    """experiment.yaml: everything a simulation run needs."""

    name: str = "experiment"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "runs"
    data: DataSource
    split: SplitSpec = Field(default_factory=SplitSpec)
    missingness: MissingnessSpec | None = None
    federation: FederationSpec = Field(default_factory=FederationSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: LocalTrainingConfig = Field(default_factory=LocalTrainingConfig)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    privacy: PrivacySpec | None = Field(
        default=None, description="DP-SGD at every silo, each with its own accountant (none when absent)"
    )


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment.yaml."""
    return load_config(path, ExperimentConfig)


@dataclass
class SimulationResult:
    """Where the run wrote its files and its final figures."""

    run_dir: Path
    final: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # The test split's labels and per-record class probabilities of the exported model (paired
    # comparisons between methods resample these).
    test_labels: np.ndarray | None = None
    test_probs: np.ndarray | None = None


def _sub_seed(seed: int, *parts: int) -> int:
    """A seed for one (round, silo, ...) derived from the run seed, stable across processes."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def _summary(result: EvalResult) -> dict[str, Any]:
    c = result.classification
    row: dict[str, Any] = {
        "loss": result.loss,
        "accuracy": c.accuracy,
        "macro_f1": c.macro_f1,
        "macro_auroc": c.macro_auroc,
        "recall": {m.name: m.recall for m in c.per_class},
    }
    if result.windows is not None:
        row["window_accuracy"] = result.windows.accuracy
        row["window_macro_auroc"] = result.windows.macro_auroc
    if result.imputation is not None:
        row["imputation_mae"] = result.imputation.mae
        row["imputation_rmse"] = result.imputation.rmse
    return row


def run_simulation(
    cfg: ExperimentConfig,
    *,
    run_dir: Path | None = None,
    origin: str = "config",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> SimulationResult:
    """Run the federated simulation ``cfg`` describes; write metrics, report and checkpoint."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)

    dataset = load_source(cfg.data, origin=origin)
    split = cfg.split.apply(dataset, cfg.seed)
    train = dataset.subset(split.train)
    fed = cfg.federation
    silo_rows = partition_silos(
        train.y, train.patient_ids, fed.silos, scheme=fed.partition, alpha=fed.alpha, seed=cfg.seed
    )
    # One normalizer from the silos' (count, mean, std) of their visible training entries, used
    # by every silo, by evaluation and by the exported model.
    silo_data = [train.subset(r) for r in silo_rows]
    normalizer = ChannelNormalizer.pool([fit_visible(d, cfg.missingness) for d in silo_data])
    silos: list[PreparedSplit] = [prepare_split(d, normalizer, cfg.missingness) for d in silo_data]
    class_counts = sum(np.bincount(d.y, minlength=len(dataset.info.classes)) for d in silo_data)
    val = prepare_split(dataset.subset(split.val), normalizer, cfg.missingness)
    test = prepare_split(dataset.subset(split.test), normalizer, cfg.missingness)
    window = cfg.training.window if cfg.training.window is not None else dataset.info.length
    window = min(window, dataset.info.length)
    training = cfg.training if cfg.training.window == window else _with_window(cfg.training, window)

    model = CondIModel(cfg.model.build(dataset.info, window)).to(device)
    groups = aggregation_groups(model)
    global_state = {k: v.numpy() for k, v in model.state_to_named_tensors().items()}
    server = ServerOptimizer.for_model(fed.server_optimizer, model)
    best: tuple[float, int, dict[str, np.ndarray]] | None = None
    selection = np.random.default_rng(_sub_seed(cfg.seed, 1))
    log.info(
        "simulation %s: %d train / %d val / %d test samples, silos %s",
        cfg.name,
        len(train),
        len(val),
        len(test),
        [len(s) for s in silos],
    )

    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    privacy = _silo_privacy(cfg.privacy, out / "privacy", fed.silos)
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, fed.rounds + 1):
        t0 = time.perf_counter()
        chosen = sorted(int(k) for k in selection.choice(fed.silos, size=fed.silos_per_round, replace=False))
        updates, losses_a, losses_b, epsilons, declined = [], [], [], {}, []
        for k in chosen:
            model.load_named_tensors({n: torch.from_numpy(v) for n, v in global_state.items()})
            try:
                res = train_local(
                    model,
                    silos[k],
                    training,
                    seed=_sub_seed(cfg.seed, 2, rnd, k),
                    device=device,
                    privacy=privacy[k] if privacy else None,
                    lr_scale=round_lr_scale(training, rnd - 1, fed.rounds),
                    class_counts=class_counts,
                )
            except BudgetExhausted as err:
                # As a deployed silo does: it sits the round out and the others carry on.
                log.warning("round %d: silo %d declines: %s", rnd, k, err)
                declined.append(k)
                continue
            params = {n: v.numpy() for n, v in model.state_to_named_tensors().items()}
            updates.append(SiloUpdate(params=params, weights=res.group_weights))
            losses_a.append(res.phase_a_loss)
            losses_b.append(res.phase_b_loss)
            if "epsilon" in res.extra:
                epsilons[str(k)] = res.extra["epsilon"]
        if updates:
            global_state = server.step(global_state, fedavg(global_state, updates, groups))
        row: dict[str, Any] = {
            "round": rnd,
            "silos": [k for k in chosen if k not in declined],
            "phase_a_loss": float(np.nanmean(losses_a)) if not np.all(np.isnan(losses_a)) else None,
            "phase_b_loss": float(np.nanmean(losses_b)) if not np.all(np.isnan(losses_b)) else None,
        }
        if privacy:
            row["epsilon"] = epsilons
            row["declined"] = declined
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            model.load_named_tensors({n: torch.from_numpy(v) for n, v in global_state.items()})
            row["val"] = _summary(
                evaluate(model, val, window=window, opts=cfg.evaluation, seed=_sub_seed(cfg.seed, 3), device=device)
            )
            score = row["val"]["macro_auroc"]
            score = -np.inf if score is None else score
            if best is None or score > best[0]:
                best = (score, rnd, global_state)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rounds.append(row)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if progress is not None:
            progress(row)

    chosen_round = fed.rounds
    if fed.model_selection == "best_val_auroc" and best is not None:
        _, chosen_round, global_state = best
    model.load_named_tensors({n: torch.from_numpy(v) for n, v in global_state.items()})
    final_eval = evaluate(model, test, window=window, opts=cfg.evaluation, seed=_sub_seed(cfg.seed, 4), device=device)
    final = {
        "experiment": cfg.name,
        "variant": cfg.model.variant.value,
        "dataset": dataset.info.name,
        "rounds": fed.rounds,
        "selected_round": chosen_round,
        "model_selection": fed.model_selection,
        "test": _summary(final_eval),
        "test_full": final_eval.to_dict(),
        "silo_sizes": [len(s) for s in silos],
    }
    if privacy and cfg.privacy is not None:
        final["privacy"] = {
            "target_epsilon": cfg.privacy.target_epsilon,
            "delta": cfg.privacy.delta,
            "accountant": cfg.privacy.accountant,
            "phases": list(cfg.privacy.phases),
            "epsilon_spent": [p.epsilon_spent() for p in privacy],
            "noise_multiplier": [p.ledger.plan.noise_multiplier if p.ledger.plan else None for p in privacy],
            "rounds": [p.ledger.rounds for p in privacy],
        }
    save_checkpoint(
        out / "global_model.npz",
        model,
        normalizer,
        dataset.info,
        {"experiment": cfg.name, "rounds": fed.rounds, "selected_round": chosen_round},
    )
    (out / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    (out / "report.json").write_text(json.dumps({"final": final, "rounds": rounds}, indent=2) + "\n")
    write_round_curves(rounds, out / "curves.png", title=f"{cfg.name} ({cfg.model.variant.value})")
    return SimulationResult(
        run_dir=out, final=final, rounds=rounds, test_labels=test.y, test_probs=final_eval.probs
    )


def _silo_privacy(spec: PrivacySpec | None, folder: Path, n_silos: int) -> list[SiloPrivacy]:
    """One accountant per simulated silo, each with its own ledger file, fresh for this run."""
    if spec is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"silo-{k}.json" for k in range(n_silos)]
    for path in paths:
        # A run directory that is reused starts a new experiment, not more rounds of the old one.
        path.unlink(missing_ok=True)
    return [SiloPrivacy(spec, path) for path in paths]


def _with_window(training: LocalTrainingConfig, window: int) -> LocalTrainingConfig:
    return replace(training, window=window)
