"""site.yaml: what a hospital's silo agent is configured with.

Every key has a default except ``silo_id`` and ``data``; ``coordinator`` and ``tls`` are needed
to take part in a federation (``silo-agent check`` works without them). Paths are relative to
the working directory. Secrets never live here: key passphrases come from files or environment
variables.

``privacy:`` turns on DP-SGD (see :mod:`condi_models.privacy`); its keys are those of
:class:`~condi_models.privacy.PrivacySpec`, except that ``planned_rounds`` may be left out: the
agent then plans for its expected participation in the run it joins.

``compute: {workers: N}`` trains each round's local step on N worker processes
(:mod:`condi_models.distributed`): one per CPU core at most, or one per GPU with ``device: cuda``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from condi_models.configfile import ConfigError, StrictModel, load_config
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.sources import DataSource
from condi_models.privacy import PHASES, PrivacySpec
from condi_models.simulation import SplitSpec
from federation.names import ADDRESS_PATTERN, SILO_ID_PATTERN, is_silo_id
from federation.service_metrics import MonitorEndpoint


class CoordinatorEndpoint(StrictModel):
    """Where the coordinator listens, and how patiently to talk to it."""

    address: str = Field(pattern=ADDRESS_PATTERN, description="host:port of the coordinator")
    server_name: str | None = Field(
        default=None, description="name the coordinator certificate must carry when it differs from the host"
    )
    rpc_timeout_s: float = Field(default=30.0, gt=0, description="deadline of each short call")
    max_backoff_s: float = Field(
        default=30.0, gt=0, description="longest pause between reconnection attempts"
    )
    give_up_after_s: float = Field(
        default=900.0, gt=0, description="stop when the coordinator stays unreachable this long"
    )


class SiloTls(StrictModel):
    """The silo's certificate, its key and the federation CA; the passphrase from a file or variable."""

    ca: str
    cert: str
    key: str
    passphrase_file: str | None = None
    passphrase_env: str | None = None
    crl: str | None = Field(
        default=None, description="the CA's revocation list, re-read on change: peers' adverts are checked against it"
    )
    peers: dict[str, str] | None = Field(
        default=None,
        description="the federation's silos pinned out of band: silo id -> SHA-256 fingerprint (hex) of its "
        "certificate; secure aggregation then sums only with them (absent: any certificate of the CA)",
    )

    @model_validator(mode="after")
    def _one_passphrase_source(self) -> SiloTls:
        if self.passphrase_file is not None and self.passphrase_env is not None:
            raise ValueError("give passphrase_file or passphrase_env, not both")
        for silo, fingerprint in (self.peers or {}).items():
            if not is_silo_id(silo):
                raise ValueError(f"peers: {silo!r} is not a silo id")
            if not re.fullmatch("[0-9a-f]{64}", fingerprint):
                raise ValueError(f"peers.{silo}: expected a SHA-256 fingerprint, 64 lowercase hex characters")
        return self


class PartitionSpec(StrictModel):
    """Take share ``index`` of ``silos`` of the loaded data (patient-disjoint; for shared test data)."""

    silos: int = Field(ge=1)
    index: int = Field(ge=0)
    scheme: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _index_in_range(self) -> PartitionSpec:
        if self.index >= self.silos:
            raise ValueError(f"index {self.index} is outside 0..{self.silos - 1}")
        return self


class SitePrivacy(StrictModel):
    """DP-SGD for this silo: the PrivacySpec keys, with ``planned_rounds`` optional."""

    target_epsilon: float = Field(description="epsilon the silo may spend over every round it takes part in")
    delta: float = Field(default=1e-5, description="delta of the (epsilon, delta) guarantee; below 1/records")
    max_grad_norm: float = Field(default=1.0, description="per-record gradient clipping norm")
    phases: tuple[str, ...] = Field(default=PHASES, description="which of Phase A ('a') and B ('b') train privately")
    accountant: str = Field(default="rdp", description="'rdp' (Renyi DP) or 'prv'")
    planned_rounds: int | None = Field(
        default=None,
        description="rounds this silo plans to take part in; default: its expected share of the run's rounds",
    )

    @model_validator(mode="after")
    def _valid_spec(self) -> SitePrivacy:
        # PrivacySpec holds the rules; any planned round count checks the other keys.
        self.spec(self.planned_rounds or 1)
        return self

    def spec(self, planned_rounds: int) -> PrivacySpec:
        """The PrivacySpec of this section, with ``planned_rounds`` where the section leaves it out."""
        return PrivacySpec(
            target_epsilon=self.target_epsilon,
            planned_rounds=self.planned_rounds if self.planned_rounds is not None else planned_rounds,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            phases=self.phases,
            accountant=self.accountant,
        )


def expected_rounds(rounds: int, silos_per_round: int, allowed_silos: int) -> int:
    """Rounds a silo expects to train in when ``silos_per_round`` of ``allowed_silos`` are drawn each round."""
    if min(rounds, silos_per_round, allowed_silos) < 1:
        raise ValueError(
            f"cannot plan participation from rounds={rounds}, silos_per_round={silos_per_round}, "
            f"allowed_silos={allowed_silos}"
        )
    return max(1, math.ceil(rounds * min(silos_per_round, allowed_silos) / allowed_silos))


class SitePolicy(StrictModel):
    """What this hospital agrees to take part in; a run that breaks it is left, saying why."""

    require_secure_aggregation: bool = Field(
        default=True, description="refuse a run whose coordinator would see this silo's update or statistics"
    )
    min_threshold: int = Field(
        default=2, ge=2, description="least secure-aggregation threshold t this silo takes part under"
    )
    min_silos_per_round: int = Field(
        default=2, ge=1, description="least silos a stage may have beside this one included"
    )
    max_rounds: int | None = Field(default=None, ge=1, description="most rounds a run may have (none: any)")
    require_dp: bool = Field(default=False, description="train only with DP-SGD: site.yaml must have privacy:")


class SiteCompute(StrictModel):
    """How this silo trains: the worker processes of each round's local-training step."""

    workers: int = Field(
        default=1,
        ge=1,
        description="processes that train each round's local step together (torch.distributed: gloo on CPU, "
        "NCCL with one GPU each); one update is still uploaded (see condi_models.distributed)",
    )

    @field_validator("workers")
    @classmethod
    def _within_the_host(cls, workers: int) -> int:
        # A worker is a process with at least one core of its own; more would only contend.
        cores = os.cpu_count() or 1
        if workers > cores:
            raise ValueError(f"{workers} workers on a host with {cores} CPU cores; at most one worker per core")
        return workers


class SiteConfig(StrictModel):
    """A silo's configuration (site.yaml)."""

    silo_id: str = Field(pattern=SILO_ID_PATTERN, description="this hospital's id in the federation")
    data: DataSource
    simulated_missingness: MissingnessSpec | None = Field(
        default=None, description="hide data on purpose (research and tests); off by default"
    )
    state_dir: str = Field(default="state", description="where the agent keeps its state between runs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    split: SplitSpec = Field(default_factory=SplitSpec, description="local train / validation / test split")
    partition: PartitionSpec | None = Field(default=None, description="use only this share of the data")
    seed: int = Field(default=0, description="seeds the local split")
    coordinator: CoordinatorEndpoint | None = None
    tls: SiloTls | None = None
    privacy: SitePrivacy | None = Field(
        default=None, description="DP-SGD with a budget kept in state_dir (none when absent)"
    )
    policy: SitePolicy = Field(default_factory=SitePolicy, description="what runs this silo takes part in")
    compute: SiteCompute = Field(default_factory=SiteCompute, description="worker processes of local training")
    monitor: MonitorEndpoint | None = Field(
        default=None, description="serve Prometheus metrics (/metrics) at this local address; off when absent"
    )

    @model_validator(mode="after")
    def _tls_with_coordinator(self) -> SiteConfig:
        if self.coordinator is not None and self.tls is None:
            raise ValueError("tls: required when a coordinator is configured")
        if self.policy.require_dp and self.privacy is None:
            raise ValueError("policy.require_dp: the site requires DP-SGD, so a privacy: section is needed")
        return self


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site.yaml."""
    return load_config(path, SiteConfig)


def check_site_files(cfg: SiteConfig, source: str | Path) -> None:
    """Raise :class:`ConfigError` naming the file and key of every TLS file that does not exist."""
    if cfg.tls is None:
        return
    keys = {"tls.ca": cfg.tls.ca, "tls.cert": cfg.tls.cert, "tls.key": cfg.tls.key}
    if cfg.tls.passphrase_file is not None:
        keys["tls.passphrase_file"] = cfg.tls.passphrase_file
    if cfg.tls.crl is not None:
        keys["tls.crl"] = cfg.tls.crl
    missing = [
        f"{source}: {key}: file {path} does not exist"
        for key, path in keys.items()
        if not Path(path).is_file()
    ]
    if missing:
        raise ConfigError("\n".join(missing))
