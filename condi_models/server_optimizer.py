"""Server optimizers: how the coordinator turns the round's averaged model into the next global one.

FedAvg takes the average as it is. FedAvgM and FedAdam (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021) treat ``average - global`` as a pseudo-gradient and step along it with
server momentum or Adam moments. They need only the average, which secure aggregation delivers
(never an individual update), so they work unchanged under it.

Only the entries some silo trained move: an entry whose average equals the global value (its
group had no weight this round, e.g. a modality no selected silo holds) keeps its value and its
optimizer state. Tensors outside ``names`` (the Gaussian prior's moments, fitted by EM rather
than by gradient steps) take the plain average. The state is a dict of named arrays, so the
coordinator checkpoints it with the model in its own format (never pickle).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import ConfigDict
from torch import nn


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The ``server_optimizer:`` config section; defaults are plain FedAvg.

    ``lr`` is the server learning rate (FedAvg with lr 1 is the average itself); ``momentum``
    is FedAvgM's; ``beta1``, ``beta2`` and ``tau`` (the adaptivity floor) are FedAdam's.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    kind: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"server_optimizer.lr must be > 0, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"server_optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.tau > 0:
            raise ValueError(f"server_optimizer.tau must be > 0, got {self.tau}")


class ServerOptimizer:
    """Applies one :class:`ServerOptimizerConfig` round after round; holds its moments."""

    def __init__(self, cfg: ServerOptimizerConfig, names: Iterable[str]) -> None:
        self.cfg = cfg
        self.names = frozenset(names)
        self.steps = 0
        self._first: dict[str, np.ndarray] = {}
        self._second: dict[str, np.ndarray] = {}

    @classmethod
    def for_model(cls, cfg: ServerOptimizerConfig, model: nn.Module) -> ServerOptimizer:
        """An optimizer that moves the parameters gradient steps train (not the EM-fitted prior)."""
        return cls(cfg, [n for n, p in model.named_parameters() if p.requires_grad])

    def step(
        self, global_params: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global parameters from this round's average (FedAvg's result)."""
        cfg = self.cfg
        out: dict[str, np.ndarray] = {}
        for name, old in global_params.items():
            avg = averaged[name]
            if name not in self.names or (cfg.kind == "fedavg" and cfg.lr == 1.0):
                out[name] = avg
                continue
            old64 = np.asarray(old, dtype=np.float64)
            delta = np.asarray(avg, dtype=np.float64) - old64
            trained = delta != 0.0
            if cfg.kind == "fedavg":
                direction = delta
            elif cfg.kind == "fedavgm":
                m = self._first.get(name, np.zeros_like(old64))
                m = np.where(trained, cfg.momentum * m + delta, m)
                self._first[name] = m
                direction = m
            else:
                m = self._first.get(name, np.zeros_like(old64))
                v = self._second.get(name, np.zeros_like(old64))
                m = np.where(trained, cfg.beta1 * m + (1.0 - cfg.beta1) * delta, m)
                v = np.where(trained, cfg.beta2 * v + (1.0 - cfg.beta2) * delta**2, v)
                self._first[name], self._second[name] = m, v
                direction = m / (np.sqrt(v) + cfg.tau)
            out[name] = np.where(trained, old64 + cfg.lr * direction, old64).astype(old.dtype)
        self.steps += 1
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's state as named float64 arrays (``m/<name>``, ``v/<name>``, ``steps``)."""
        tensors = {f"m/{n}": a for n, a in self._first.items()}
        tensors.update({f"v/{n}": a for n, a in self._second.items()})
        tensors["steps"] = np.asarray([self.steps], dtype=np.float64)
        return tensors

    def load_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned; a name this optimizer does not move is an error."""
        first, second = {}, {}
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if key == "steps":
                continue
            if kind not in ("m", "v") or name not in self.names:
                raise ValueError(f"server optimizer state: unexpected entry {key!r}")
            (first if kind == "m" else second)[name] = np.asarray(value, dtype=np.float64)
        self._first, self._second = first, second
        self.steps = int(np.asarray(tensors.get("steps", [0])).ravel()[0])
