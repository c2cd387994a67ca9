"""federation.yaml: what the operator runs a federation with.

The round plan and the allow-list of silos, where to listen and with which TLS material, stage
deadlines, and the model and training settings every silo receives when it joins. Every key has
a documented default except ``name`` and ``silos``; ``tls`` is needed to serve (``coordinator
check`` works without it). Paths are relative to the working directory.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from condi_models.configfile import ConfigError, StrictModel, load_config, parse_config
from condi_models.data.sources import DataLayout
from condi_models.evaluation import EvalOptions
from condi_models.server_optimizer import ServerOptimizerConfig
from condi_models.simulation import ModelSpec
from condi_models.training import LocalTrainingConfig
from federation.names import ADDRESS_PATTERN, SILO_ID_PATTERN, is_silo_id
from federation.secagg.quantize import OverflowConfigError, check_overflow_bounds, choose_ring_bits
from federation.service_metrics import MonitorEndpoint
from federation.transfer import LayoutLimits
from federation.wire import MIN_CHUNK_BYTES

logger = logging.getLogger(__name__)


class ServerTls(StrictModel):
    """The coordinator's serverAuth certificate and key, the federation CA and its revocation list."""

    ca: str
    cert: str
    key: str
    crl: str = Field(description="the CA's revocation list; re-read whenever it changes on disk")


class StageTimeouts(StrictModel):
    """Deadlines of the round stages and how long a silent silo counts as connected (seconds)."""

    gather_s: float = Field(default=120.0, gt=0, description="a round waits this long for enough silos")
    train_s: float = Field(default=3600.0, gt=0, description="download, local training and upload")
    evaluate_s: float = Field(default=600.0, gt=0, description="evaluation of the new global model")
    secure_stage_s: float = Field(
        default=120.0, gt=0, description="each secure-aggregation stage after training (shares, masked input, unmask)"
    )
    liveness_s: float = Field(default=60.0, gt=0, description="a silo silent this long is taken as gone")
    done_grace_s: float = Field(
        default=30.0, ge=0, description="after the run, how long the coordinator waits for silos to learn it"
    )


class AggregationConfig(StrictModel):
    """How updates are combined: pairwise-masked secure sums (default) or in the clear."""

    mode: Literal["secure", "plain"] = Field(
        default="secure", description="plain lets the coordinator see every silo's update"
    )
    threshold: float | int = Field(
        # The smallest majority: with 3 silos a round, t = 2, so one silo may drop at any stage.
        default=0.51,
        description="silos that must reach unmasking: a fraction (0.5, 1] of the selected or a count >= 2",
    )
    clip_bound: float = Field(default=1.0, ge=1.0, description="largest |parameter delta| summed; larger are clipped")
    frac_bits: int = Field(default=24, ge=1, le=40, description="fixed-point fraction bits of the secure sum")
    ring_bits: Literal["auto", 32, 64] = Field(default="auto", description="ring of the secure sum")
    weight_unit: float = Field(
        default=10_000.0, gt=0, description="samples per unit weight; a silo's weight is capped at 1"
    )
    secure_metrics: bool = Field(
        default=False,
        description="evaluation reports go through a secure sum too: only pooled scores are learnt (secure mode)",
    )

    def threshold_for(self, selected: int) -> int:
        """t for a round attempt with ``selected`` silos: more than half of them, at least 2."""
        t = (
            self.threshold
            if isinstance(self.threshold, int)
            else math.ceil(self.threshold * selected - 1e-9)
        )
        return min(selected, max(2, t, selected // 2 + 1))

    def resolved_ring_bits(self, n_silos: int) -> int:
        """The ring width: as configured, or the narrowest that cannot overflow for ``n_silos``."""
        if self.ring_bits == "auto":
            return choose_ring_bits(n_silos, self.clip_bound, self.frac_bits, 1.0)
        return self.ring_bits


def layout_problem(layout: DataLayout, limits: LayoutLimits) -> str | None:
    """Why federation.yaml's ``layout`` is past ``limits`` or names something twice; else None."""
    channels = [c for m in layout.modalities for c in m.channels]
    modalities = [m.name for m in layout.modalities]
    problem = limits.problem(
        modalities=len(modalities),
        channels=len(channels),
        classes=len(layout.classes),
        length=layout.length,
        names=[layout.task, *layout.classes, *modalities, *channels],
    )
    if problem is not None:
        return problem
    for what, names in (("classes", layout.classes), ("modalities", modalities), ("channels", channels)):
        if len(set(names)) != len(names):
            return f"{what}: a name appears twice"
    return None


class ServiceSettings(StrictModel):
    """``service:`` in federation.yaml: `coordinator serve` runs federations one after another."""

    runs_dir: str = Field(description="each run's directory is runs_dir/<run id>; the queue is runs_dir/runs.json")
    admin_socket: str = Field(
        description="local socket for submit, runs, logs, cancel and status (mode 0600: the service's user only)"
    )
    watch_dir: str | None = Field(
        default=None, description="run files dropped here are submitted, then moved to submitted/ or rejected/"
    )
    max_queued: int = Field(default=20, ge=1, le=1000, description="most runs waiting at once; more are refused")
    max_run_file_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 24, description="largest run file accepted")


# What a submitted run may not change: how the service listens, whom it admits and its bounds.
SERVICE_FIELDS = frozenset(
    {"listen", "tls", "silos", "max_calls_per_silo", "max_chunk_bytes", "layout_limits", "max_silo_records",
     "monitor", "service", "run_dir"}
)


class FederationConfig(StrictModel):
    """The operator's federation.yaml."""

    name: str = Field(min_length=1, description="federation name, shown in logs and reports")
    silos: list[str] = Field(min_length=1, description="allow-list of silo ids")
    rounds: int = Field(default=70, ge=1)
    silos_per_round: int = Field(default=3, ge=1)
    min_silos: int = Field(default=2, ge=1, description="a round with fewer completed silos is retried")
    max_attempts: int = Field(default=3, ge=1, description="attempts per round before the run fails")
    seed: int = Field(default=0, description="seeds the per-round selection of silos and local training")
    run_dir: str = Field(default="runs/federation", description="checkpoints, metrics and reports")
    listen: str = Field(default="0.0.0.0:50051", pattern=ADDRESS_PATTERN, description="host:port to serve on")
    tls: ServerTls | None = None
    poll_interval_ms: int = Field(
        default=2000, ge=50, description="how often idle silos ask for work and busy silos report liveness"
    )
    max_chunk_bytes: int = Field(
        default=1 << 20, ge=MIN_CHUNK_BYTES, le=1 << 20, description="largest chunk of a state or update, in bytes"
    )
    model_selection: Literal["last", "best_val_auroc"] = Field(
        default="best_val_auroc",
        description="the model exported and tested: the last round's, or the round's with the best pooled "
        "validation macro AUROC (test is then evaluated once, on it, after the last round)",
    )
    max_calls_per_silo: int = Field(
        default=4,
        ge=2,
        le=64,
        description="calls one silo may have in progress at once (long poll, heartbeat, transfer); more are refused",
    )
    layout: DataLayout | None = Field(
        default=None,
        description="the data layout every silo must bring; unset, the first silo to join fixes it",
    )
    layout_limits: LayoutLimits = Field(
        default_factory=LayoutLimits,
        description="largest data layout (modalities, channels, length, classes, name length) a silo may bring",
    )
    max_silo_records: int = Field(
        default=1_000_000,
        ge=1,
        description="most training records one silo may report; larger statistics are refused",
    )
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: LocalTrainingConfig = Field(default_factory=LocalTrainingConfig)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    service: ServiceSettings | None = Field(
        default=None, description="`coordinator serve`: a long-lived service taking submitted runs (see runs.py)"
    )
    monitor: MonitorEndpoint | None = Field(
        default=None,
        description="serve Prometheus metrics (/metrics) and the live web view (/) at this local address; "
        "off when absent",
    )
    server_optimizer: ServerOptimizerConfig = Field(
        default_factory=ServerOptimizerConfig,
        description="how each round's average becomes the next global model (fedavg, fedavgm, fedadam)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        bad = [s for s in self.silos if not is_silo_id(s)]
        if bad:
            raise ValueError(f"silos: ids must match {SILO_ID_PATTERN}, got {bad}")
        if len(set(self.silos)) != len(self.silos):
            raise ValueError("silos: the allow-list names a silo twice")
        if self.silos_per_round > len(self.silos):
            raise ValueError(
                f"silos_per_round ({self.silos_per_round}) exceeds the {len(self.silos)} allowed silos"
            )
        if self.min_silos > self.silos_per_round:
            raise ValueError(f"min_silos ({self.min_silos}) exceeds silos_per_round ({self.silos_per_round})")
        if self.layout is not None and (problem := layout_problem(self.layout, self.layout_limits)) is not None:
            raise ValueError(f"layout: {problem}")
        if self.timeouts.liveness_s * 1000 < 3 * self.poll_interval_ms:
            raise ValueError(
                f"timeouts.liveness_s ({self.timeouts.liveness_s:g}) must cover at least three poll "
                f"intervals ({3 * self.poll_interval_ms} ms), or polling silos would be taken as gone"
            )
        if self.secure:
            self._check_secure()
        elif self.aggregation.secure_metrics:
            raise ValueError("aggregation.secure_metrics: needs aggregation.mode secure (and silos_per_round >= 2)")
        elif "mode" not in self.aggregation.model_fields_set and self.aggregation.mode == "secure":
            logger.warning("silos_per_round is 1: nothing to hide one update in, aggregation falls back to plain")
        return self

    @property
    def secure(self) -> bool:
        """Whether rounds use secure aggregation: the mode, unless one silo per round leaves nothing to mask.

        A federation.yaml that asks for ``mode: secure`` explicitly with ``silos_per_round: 1`` is refused.
        """
        agg = self.aggregation
        explicit = "mode" in agg.model_fields_set
        return agg.mode == "secure" and (explicit or self.silos_per_round >= 2)

    def _check_secure(self) -> None:
        agg = self.aggregation
        if isinstance(agg.threshold, int):
            if not self.silos_per_round / 2 < agg.threshold <= self.silos_per_round or agg.threshold < 2:
                raise ValueError(
                    f"aggregation.threshold: a count must be >= 2, more than half of silos_per_round "
                    f"({self.silos_per_round}) and at most it, got {agg.threshold}"
                )
        elif not 0.5 < agg.threshold <= 1.0:
            raise ValueError(f"aggregation.threshold: a fraction must be in (0.5, 1], got {agg.threshold}")
        if self.silos_per_round < 2:
            raise ValueError("aggregation.mode: secure needs silos_per_round >= 2, or set mode: plain")
        try:
            ring = agg.resolved_ring_bits(self.silos_per_round)
            check_overflow_bounds(self.silos_per_round, agg.clip_bound, agg.frac_bits, ring, 1.0)
        except OverflowConfigError as err:
            raise ValueError(
                f"aggregation.clip_bound/frac_bits/ring_bits with silos_per_round: the secure sum can overflow: {err}"
            ) from err
        # A single sample's weight must stay far above the rounding noise of the summed weights.
        if self.silos_per_round * 2.0**-agg.frac_bits >= 0.5 / agg.weight_unit:
            raise ValueError(
                f"aggregation.frac_bits ({agg.frac_bits}) is too coarse for weight_unit ({agg.weight_unit:g}):"
                " raise frac_bits or lower weight_unit"
            )


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and validate a federation.yaml; warns when aggregation is plain."""
    cfg = load_config(path, FederationConfig)
    if cfg.aggregation.mode == "plain":
        logger.warning(
            "%s: aggregation.mode is plain: the coordinator sees every silo's individual update", path
        )
    return cfg


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_config(base: FederationConfig, submitted: object, run_dir: str | Path, source: str) -> FederationConfig:
    """The config of a submitted run: the service's federation.yaml with the run file's fields laid
    over it (nested sections merged key by key), in its own ``run_dir``. A run file may set what a
    federation.yaml sets but the service's own fields (:data:`SERVICE_FIELDS`); errors name ``source``."""
    if not isinstance(submitted, dict):
        raise ConfigError(f"{source}: expected a mapping of federation.yaml fields, got {type(submitted).__name__}")
    fixed = sorted(SERVICE_FIELDS & set(submitted))
    if fixed:
        raise ConfigError(f"{source}: {', '.join(fixed)}: set by the service's federation.yaml, not by a run")
    merged = _merge(base.model_dump(mode="json", exclude_none=True), submitted)
    merged["run_dir"] = str(run_dir)
    return parse_config(merged, FederationConfig, source)


def federation_file_problems(cfg: FederationConfig, source: str | Path) -> list[str]:
    """One line per missing file the config names (``FILE: key: ...``); empty when all exist."""
    if cfg.tls is None:
        return [f"{source}: tls: required to serve (ca, cert, key, crl)"]
    keys = {"tls.ca": cfg.tls.ca, "tls.cert": cfg.tls.cert, "tls.key": cfg.tls.key, "tls.crl": cfg.tls.crl}
    return [
        f"{source}: {key}: file {path} does not exist"
        for key, path in keys.items()
        if not Path(path).is_file()
    ]


def check_federation_files(cfg: FederationConfig, source: str | Path) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`federation_file_problems`."""
    problems = federation_file_problems(cfg, source)
    if problems:
        raise ConfigError("\n".join(problems))
