"""site.yaml: what a hospital's silo agent is configured with.

Every key has a default except ``silo_id`` and ``data``. Paths are relative to the working
directory. Secrets never live here: key passphrases come from files or environment variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from condi_models.configfile import StrictModel, load_config
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.sources import DataSource

SILO_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class SiteConfig(StrictModel):
    """A silo's configuration (site.yaml)."""

    silo_id: str = Field(pattern=SILO_ID_PATTERN, description="this hospital's id in the federation")
    data: DataSource
    simulated_missingness: MissingnessSpec | None = Field(
        default=None, description="hide data on purpose (research and tests); off by default"
    )
    state_dir: str = Field(default="state", description="where the agent keeps its state between runs")
    device: Literal["auto", "cpu", "cuda"] = "auto"


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site.yaml."""
    return load_config(path, SiteConfig)
