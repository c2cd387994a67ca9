"""A site's data made ready for federated rounds: its share, its split, its normalization.

The same preparation as the in-process simulation, done at the site: load the source, keep this
site's partition when site.yaml names one (a patient-disjoint share of a dataset several test
silos load), split whole patients into train / validation / test, standardize with statistics of
the local training data only, then hide data as ``simulated_missingness`` says. What leaves the
site is aggregate: the layout, counts, and per-channel statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from condi_models.batches import PreparedSplit, fit_visible, prepare_split
from condi_models.data.dataset import DatasetInfo
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.partition import partition_silos
from condi_models.data.sources import load_source
from federation.proto_gen.condi.v1 import federation_pb2 as pb
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
    normalizer: ChannelNormalizer
    channel_counts: np.ndarray  # visible training entries per channel behind the normalizer, shape (F,)

    def summary(self) -> pb.DataSummary:
        """The Join data summary: layout and counts, no record."""
        return data_summary(
            self.info, num_samples=len(self.train), observed_samples=self.train.modality_counts().tolist()
        )

    def normalizer_report(self) -> dict[str, list[float]]:
        """Per channel: count, mean and std of the training entries (pooled by the coordinator)."""
        return {
            "count": self.channel_counts.astype(np.float64).tolist(),
            "mean": self.normalizer.mean.astype(np.float64).tolist(),
            "std": self.normalizer.std.astype(np.float64).tolist(),
        }

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
    train = dataset.subset(split.train)
    spec = cfg.simulated_missingness
    normalizer = fit_visible(train, spec)
    return LocalData(
        info=dataset.info,
        train=prepare_split(train, normalizer, spec),
        val=prepare_split(dataset.subset(split.val), normalizer, spec),
        test=prepare_split(dataset.subset(split.test), normalizer, spec),
        normalizer=normalizer,
        channel_counts=np.asarray(normalizer.count, dtype=np.int64),
    )
