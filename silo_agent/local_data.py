"""A site's data made ready for federated rounds: its share, its split, its normalization.

The same preparation as the in-process simulation, done at the site: load the source, keep this
site's partition when site.yaml names one (a patient-disjoint share of a dataset several test
silos load), split whole patients into train / validation / test, hide data as
``simulated_missingness`` says, and standardize with the statistics of what stays visible of the
local training split. Once the federation has pooled every silo's statistics
(federation.statistics), the splits are standardized again with the pooled normalizer
(:meth:`LocalData.scaled_with`), so every silo scales its inputs alike. What leaves the site is
aggregate: the layout, counts, and per-channel sums.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from condi_models.batches import PreparedSplit, fit_visible, prepare_split
from condi_models.data.dataset import ClinicalDataset, DatasetInfo
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.partition import partition_silos
from condi_models.data.sources import load_source
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.statistics import SiloStatistics
from federation.transfer import data_summary
from silo_agent.config import SiteConfig

log = logging.getLogger(__name__)


class LocalDataError(ValueError):
    """The site's data cannot take part as configured; the message names the config key."""


@dataclass(frozen=True)
class LocalData:
    """The site's prepared splits and what it may tell others about them."""

    info: DatasetInfo
    train: PreparedSplit
    val: PreparedSplit
    test: PreparedSplit
    # The fit to the visible entries of the local training split (with per-channel counts).
    fitted: ChannelNormalizer
    # The unscaled splits (train, val, test) and the simulated hiding, to standardize them again.
    sources: tuple[ClinicalDataset, ClinicalDataset, ClinicalDataset]
    missingness: MissingnessSpec | None

    def summary(self) -> pb.DataSummary:
        """The Join data summary: layout and counts, no record."""
        return data_summary(self.info)

    def statistics(self) -> SiloStatistics:
        """The sums over the training split that the federation pools before round 0."""
        return SiloStatistics.of(self.fitted, self.train.y, len(self.info.classes))

    def scaled_with(self, normalizer: ChannelNormalizer) -> LocalData:
        """The same data standardized with ``normalizer`` (the federation's pooled one)."""
        train, val, test = (prepare_split(d, normalizer, self.missingness) for d in self.sources)
        return dataclasses.replace(self, train=train, val=val, test=test)

    def split(self, name: str) -> PreparedSplit:
        """The prepared split called ``name`` (train, val or test)."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_local_data(cfg: SiteConfig, source: str | Path) -> LocalData:
    """Load and prepare the site's data as ``cfg`` says; ``source`` names site.yaml in errors."""
    where = str(source)
    dataset = load_source(cfg.data, origin=where)
    if cfg.partition is not None:
        p = cfg.partition
        try:
            shares = partition_silos(
                dataset.y, dataset.patient_ids, p.silos, scheme=p.scheme, alpha=p.alpha, seed=p.seed
            )
        except ValueError as exc:
            raise LocalDataError(f"{where}: partition: {exc}") from exc
        dataset = dataset.subset(shares[p.index])
        log.info("partition %d of %d: %d records", p.index, p.silos, len(dataset))
    try:
        split = cfg.split.apply(dataset, cfg.seed)
    except ValueError as exc:
        raise LocalDataError(f"{where}: {exc}") from exc
    for name in ("train", "val", "test"):
        if len(getattr(split, name)) == 0:
            raise LocalDataError(
                f"{where}: split: the local {name} split is empty ({len(dataset)} records); "
                "add data or change split.fractions"
            )
    sources = (dataset.subset(split.train), dataset.subset(split.val), dataset.subset(split.test))
    spec = cfg.simulated_missingness
    fitted = fit_visible(sources[0], spec)
    train, val, test = (prepare_split(d, fitted, spec) for d in sources)
    return LocalData(
        info=dataset.info, train=train, val=val, test=test, fitted=fitted, sources=sources, missingness=spec
    )
