"""The federation's global model on the coordinator: built for the layout, moved by each round's sum.

A :class:`GlobalModel` exists once the data layout is known. It holds the model and the run
settings sent to every silo, how summed contributions become the next state (the aggregation
layout and the server optimizer), and the current state
both as named arrays and in the encoded, chunked form silos download. It knows nothing of rounds,
silos or locks; the :class:`~coordinator.server.Coordinator` owns it and serialises access.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import torch

from condi_models.aggregation import SecureLayout
from condi_models.data.dataset import DatasetInfo
from condi_models.nn.config import ModelConfig
from condi_models.server_optimizer import ServerOptimizer
from condi_models.training import aggregation_groups
from coordinator.config import FederationConfig
from coordinator.layout import build_model_config, initial_model
from federation import wire
from federation.settings import RunSettings
from federation.statistics import StatisticsLayout
from federation.transfer import plain_update_payload_bytes

log = logging.getLogger(__name__)


class GlobalModel:
    """The model for one layout, its current state and how rounds move it."""

    def __init__(
        self,
        cfg: FederationConfig,
        layout: DatasetInfo,
        model_cfg: ModelConfig | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Build the run's model for ``layout``: the initial one, or with a checkpoint's ``model_cfg``
        and ``tensors``. Tensors that do not fit the model raise :class:`ValueError`."""
        built, training = build_model_config(layout, cfg.model, cfg.training)
        if model_cfg is None:
            model_cfg = built
        elif training.window != model_cfg.length:
            # The checkpointed model was built for its window; training must keep using it.
            log.warning(
                "training.window %s differs from the checkpointed model's window %d; keeping %d",
                training.window,
                model_cfg.length,
                model_cfg.length,
            )
            training = dataclasses.replace(training, window=model_cfg.length)
        self.model = initial_model(model_cfg, cfg.seed)
        if tensors is not None:
            self.model.load_named_tensors({k: torch.from_numpy(v) for k, v in tensors.items()})
        self.groups = aggregation_groups(self.model)
        state = {k: v.numpy() for k, v in self.model.state_to_named_tensors().items()}
        self.group_names = self.groups.group_names()
        self.param_shapes = {n: tuple(state[n].shape) for n in self.groups.assignment}
        agg = cfg.aggregation
        # Plain and secure rounds alike: weights capped at weight_unit samples, deltas clipped.
        self.secure_layout = SecureLayout(self.groups, self.param_shapes, agg.clip_bound, agg.weight_unit)
        self.optimizer = ServerOptimizer.for_model(cfg.server_optimizer, self.model)
        self.settings = RunSettings(model=model_cfg, training=training, evaluation=cfg.evaluation, layout=layout)
        # How the statistics stage's sums over data of this layout are laid out.
        self.statistics_layout = StatisticsLayout.of(layout)
        self.update_bytes = plain_update_payload_bytes(self.param_shapes, len(self.group_names))
        self.max_chunk_bytes = cfg.max_chunk_bytes
        self.state: dict[str, np.ndarray] = {}
        self.sha256 = self.set_state(state)
        log.info(
            "model: %s with %d parameters in %d tensors; window %s; plain update %d bytes",
            model_cfg.variant.value,
            sum(int(np.prod(s)) for s in self.param_shapes.values()),
            len(self.param_shapes),
            training.window,
            self.update_bytes,
        )

    def set_state(self, state: dict[str, np.ndarray]) -> str:
        """Make ``state`` current and chunk it for downloads; returns its wire SHA-256."""
        encoded = wire.encode_state(state)
        self.state = state
        self.manifest = encoded.manifest
        self.chunks = wire.chunk(encoded, self.max_chunk_bytes)
        self.state_bytes = encoded.manifest.payload_bytes
        self.sha256 = encoded.manifest.payload_sha256
        return self.sha256

    def next_state(self, total: np.ndarray) -> dict[str, np.ndarray]:
        """The state a round's summed contributions give: their average, through the server optimizer
        (whose moments move; the current state does not until :meth:`set_state`)."""
        return self.optimizer.step(self.state, self.secure_layout.average(self.state, total))

    def loaded_model(self) -> torch.nn.Module:
        """The model module holding the current state (for the report and the exported file)."""
        self.model.load_named_tensors({k: torch.from_numpy(v) for k, v in self.state.items()})
        return self.model


class RunningSums:
    """Plain mode: the contributions of each round attempt, added up as they are accepted.

    No silo's update is kept once added: the driver takes one attempt's sum when the attempt
    aggregates, and older attempts' sums (failed ones) are dropped then.
    """

    def __init__(self) -> None:
        self._sums: dict[tuple[int, int], tuple[np.ndarray, set[str]]] = {}

    def add(self, round_index: int, attempt: int, silo: str, vector: np.ndarray) -> None:
        """Add ``silo``'s contribution to its attempt's sum (once per silo)."""
        total, silos = self._sums.setdefault((round_index, attempt), (np.zeros_like(vector), set()))
        if silo in silos:
            raise ValueError(f"round {round_index} attempt {attempt}: silo {silo!r} was already summed")
        total += vector
        silos.add(silo)

    def take(self, round_index: int, attempt: int, silos: tuple[str, ...]) -> np.ndarray:
        """The attempt's sum, which must hold exactly ``silos``; this and every earlier attempt's are dropped."""
        total, summed = self._sums.get((round_index, attempt), (None, set()))
        for key in [k for k in self._sums if k <= (round_index, attempt)]:
            del self._sums[key]
        if total is None or summed != set(silos):
            raise RuntimeError(
                f"round {round_index} attempt {attempt}: the running sum holds {sorted(summed)}, "
                f"the round machine accepted {sorted(silos)}"
            )
        return total
