"""federation.yaml: what the operator runs a federation with.

The round plan and the allow-list of silos, where to listen and with which TLS material, stage
deadlines, and the model and training settings every silo receives when it joins. Every key has
a documented default except ``name`` and ``silos``; ``tls`` is needed to serve (``coordinator
check`` works without it). Paths are relative to the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, model_validator

from condi_models.configfile import ConfigError, StrictModel, load_config
from condi_models.evaluation import EvalOptions
from condi_models.simulation import ModelSpec
from condi_models.training import LocalTrainingConfig
from silo_agent.config import ADDRESS_PATTERN, SILO_ID_PATTERN


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
    liveness_s: float = Field(default=60.0, gt=0, description="a silo silent this long is taken as gone")
    done_grace_s: float = Field(
        default=30.0, ge=0, description="after the run, how long the coordinator waits for silos to learn it"
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
        default=1 << 20, ge=1024, le=1 << 20, description="largest chunk of a state or update, in bytes"
    )
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: LocalTrainingConfig = Field(default_factory=LocalTrainingConfig)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        bad = [s for s in self.silos if not re.match(SILO_ID_PATTERN, s)]
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
        if self.timeouts.liveness_s * 1000 < 3 * self.poll_interval_ms:
            raise ValueError(
                f"timeouts.liveness_s ({self.timeouts.liveness_s:g}) must cover at least three poll "
                f"intervals ({3 * self.poll_interval_ms} ms), or polling silos would be taken as gone"
            )
        return self


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and validate a federation.yaml."""
    return load_config(path, FederationConfig)


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
