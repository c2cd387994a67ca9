"""federation.yaml: what the operator runs a federation with.

This holds the round plan and the allow-list of silos; the network, TLS and secure-aggregation
sections join it with the federation server.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, model_validator

from condi_models.configfile import StrictModel, load_config
from silo_agent.config import SILO_ID_PATTERN


class FederationConfig(StrictModel):
    """The operator's federation.yaml."""

    name: str = Field(min_length=1, description="federation name, shown in logs and reports")
    silos: list[str] = Field(min_length=1, description="allow-list of silo ids")
    rounds: int = Field(default=70, ge=1)
    silos_per_round: int = Field(default=3, ge=1)
    min_silos: int = Field(default=2, ge=1, description="a round with fewer completed silos is retried")
    seed: int = Field(default=0, description="seeds the per-round selection of silos")
    run_dir: str = Field(default="runs/federation", description="checkpoints, metrics and reports")

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        bad = [s for s in self.silos if not re.match(SILO_ID_PATTERN, s)]
        if bad:
            raise ValueError(f"silos: ids must match {SILO_ID_PATTERN}, got {bad}")
        if len(set(self.silos)) != len(self.silos):
            raise ValueError("silos: the allow-list names a silo twice")
        if self.silos_per_round > len(self.silos):
            raise ValueError(f"silos_per_round ({self.silos_per_round}) exceeds the {len(self.silos)} allowed silos")
        if self.min_silos > self.silos_per_round:
            raise ValueError(f"min_silos ({self.min_silos}) exceeds silos_per_round ({self.silos_per_round})")
        return self


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and validate a federation.yaml."""
    return load_config(path, FederationConfig)
