"""The coordinator: the run's state and the operations the silos' calls come to.

:class:`Coordinator` builds the state its parts share (:class:`~coordinator.state.CoordinatorState`:
the :class:`~coordinator.rounds.RoundMachine`, the global model and its chunked form for downloads,
the data layout and the checkpoint, behind one lock) and is composed of three parts: itself for
joins, tasks, downloads and heartbeats; :class:`~coordinator.uploads.Submissions` for what silos
submit; :class:`~coordinator.driver.RoundDriver`, the one thread (:meth:`Coordinator.run`) that
makes every transition, averages updates outside the lock, commits checkpoints, writes
``status.json`` for the operator and logs progress. Operations take and return the domain types
of :mod:`federation.messages`: :mod:`coordinator.servicer`, its gRPC face, alone converts them
from and to protobuf; :mod:`coordinator.app` serves it over mutual TLS.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from condi_models.data.dataset import DatasetInfo
from condi_models.training import round_lr_scale
from coordinator.config import FederationConfig
from coordinator.driver import RoundDriver
from coordinator.global_model import GlobalModel
from coordinator.layout import layout_mismatch
from coordinator.rounds import (
    ProtocolError,
    RoundMachine,
    RoundPlan,
    RoundProgress,
    SecurePlan,
    TaskView,
)
from coordinator.state import CoordinatorState
from coordinator.store import CheckpointStore, CoordinatorCheckpoint, StoreError, split_saved_state
from coordinator.uploads import Submissions
from federation import identity, pki
from federation import messages as msg
from federation.faults import FaultPoint
from federation.secagg import QuantConfig, ca_cert_verifier
from federation.stages import DOWNLOAD_STAGES, Stage, stage_name
from federation.transfer import PROTOCOL_VERSION
from federation.untrusted import shown

log = logging.getLogger(__name__)

CAPABILITIES = ("plain-aggregation", "secure-aggregation")


def software_version() -> str:
    """The installed condi package version, for the handshake and the logs."""
    try:
        return metadata.version("condi")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_run_id(federation: str) -> str:
    """A fresh run id: the federation name, the UTC start time and a random suffix."""
    return f"{federation}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class Coordinator:
    """The run's shared state, the parts that act on it, and the operations the servicer calls (thread-safe)."""

    def __init__(
        self,
        cfg: FederationConfig,
        *,
        revocations: identity.RevocationList,
        clock: Callable[[], float] = time.monotonic,
        exit_at: FaultPoint | None = None,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        store = CheckpointStore(self.run_dir)
        self.plan = RoundPlan(
            allowed=tuple(cfg.silos),
            rounds=cfg.rounds,
            silos_per_round=cfg.silos_per_round,
            min_silos=cfg.min_silos,
            max_attempts=cfg.max_attempts,
            seed=cfg.seed,
            gather_s=cfg.timeouts.gather_s,
            train_s=cfg.timeouts.train_s,
            evaluate_s=cfg.timeouts.evaluate_s,
            liveness_s=cfg.timeouts.liveness_s,
            secure=self._secure_plan(cfg, revocations),
            final_test=cfg.model_selection == "best_val_auroc",
            lr_scales=tuple(round_lr_scale(cfg.training, r, cfg.rounds) for r in range(cfg.rounds)),
        )
        loaded = store.load()
        tensors = None
        optimizer_state: dict[str, np.ndarray] = {}
        if loaded is None:
            ckpt = CoordinatorCheckpoint(
                run_id=run_id or new_run_id(cfg.name),
                federation=cfg.name,
                progress=RoundProgress.start(cfg.seed, statistics=True),
            )
            log.info("new run %s of federation %s in %s", ckpt.run_id, cfg.name, self.run_dir)
        else:
            ckpt, saved = loaded
            tensors, optimizer_state = split_saved_state(saved) if saved is not None else (None, {})
            if ckpt.federation != cfg.name:
                raise StoreError(
                    f"{store.progress_path}: holds a run of federation {ckpt.federation!r}, "
                    f"not {cfg.name!r}; use another run_dir"
                )
            p = ckpt.progress
            log.info(
                "resuming run %s from its checkpoint: round %d, %s pending, %d rounds recorded",
                ckpt.run_id,
                p.round,
                p.pending,
                len(ckpt.rows),
            )
        # Built once the layout is known (federation.yaml, the checkpoint or the first silo to join).
        model = None
        if ckpt.layout is not None:
            model = self._restored_model(store, ckpt, tensors, optimizer_state)
        machine = RoundMachine(self.plan, ckpt.run_id, ckpt.progress, ckpt.state_sha256, clock(), ckpt.statistics)
        self.state = CoordinatorState(
            cfg=cfg, plan=self.plan, clock=clock, run_dir=self.run_dir, store=store, ckpt=ckpt, machine=machine
        )
        if model is not None:
            self._use_model(model)
        self._pin_layout()
        self.submissions = Submissions(self.state, exit_at=exit_at)
        self.driver = RoundDriver(self.state)

    @property
    def ckpt(self) -> CoordinatorCheckpoint:
        """The run's checkpoint record (read it under ``state.cond`` while the run goes on)."""
        return self.state.ckpt

    def run(self) -> int:
        """Drive the run to its end and write the report (:meth:`RoundDriver.run`); 0 when every
        round completed, else 1."""
        return self.driver.run()

    def stop(self) -> None:
        """Ask the driver and any held long polls to finish."""
        self.state.stopping.set()
        with self.state.cond:
            self.state.cond.notify_all()

    def _pin_layout(self) -> None:
        """Adopt federation.yaml's ``layout:`` before any silo joins, or check the checkpoint keeps it."""
        if self.cfg.layout is None:
            log.warning("federation.yaml has no layout: the first silo to join fixes the data layout")
            return
        pinned = self.cfg.layout.to_info(self.cfg.name)
        ckpt = self.state.ckpt
        if ckpt.layout is None:
            self._fix_layout(pinned, "federation.yaml")
            return
        reason = layout_mismatch(pinned, ckpt.layout)
        if reason is not None:
            raise StoreError(
                f"{self.state.store.progress_path}: the checkpointed run's data layout differs from federation.yaml's "
                f"layout ({reason}); use another run_dir or restore the layout"
            )

    @staticmethod
    def _secure_plan(cfg: FederationConfig, revocations: identity.RevocationList) -> SecurePlan | None:
        if not cfg.secure:
            log.warning("aggregation is plain: the coordinator sees every silo's individual update")
            return None
        if cfg.tls is None:
            raise ValueError("aggregation.mode secure needs tls.ca: peers' key adverts are checked against it")
        agg = cfg.aggregation
        quant = QuantConfig(agg.clip_bound, agg.frac_bits, agg.resolved_ring_bits(cfg.silos_per_round))
        # Adverts are checked against the same reloading CRL as the calls themselves.
        verify = ca_cert_verifier(pki.load_certificate(cfg.tls.ca), revoked=revocations.serials)
        return SecurePlan(
            agg.threshold_for, cfg.timeouts.secure_stage_s, quant, verify, agg.weight_unit, agg.secure_metrics
        )

    # ---- model and state ----------------------------------------------------------------

    def _restored_model(
        self,
        store: CheckpointStore,
        ckpt: CoordinatorCheckpoint,
        tensors: dict[str, np.ndarray] | None,
        optimizer_state: dict[str, np.ndarray],
    ) -> GlobalModel:
        """The checkpointed run's model, with its saved state and server optimizer state when it has them."""
        assert ckpt.layout is not None
        if tensors is None:
            model = GlobalModel(self.cfg, ckpt.layout, ckpt.model)
        else:
            try:
                model = GlobalModel(self.cfg, ckpt.layout, ckpt.model, tensors)
            except ValueError as exc:
                raise StoreError(f"{store.dir}: the checkpointed state does not fit its model ({exc})") from exc
            if model.sha256 != ckpt.state_sha256:
                raise StoreError(f"{store.dir}: the checkpointed state changed when loaded into its model")
        try:
            model.optimizer.load_state(optimizer_state)
        except ValueError as exc:
            raise StoreError(f"{store.dir}: {exc}") from exc
        return model

    def _use_model(self, model: GlobalModel) -> None:
        """Make ``model`` the run's, and tell the round machine the sizes submissions must have
        (caller holds the lock, or no silo can call yet)."""
        state = self.state
        state.model = model
        if self.plan.secure is not None:
            state.machine.vector_length = model.secure_layout.vector_length
        layout = model.settings.layout
        state.machine.data_shape = (len(layout.classes), layout.n_features)

    def _fix_layout(self, info: DatasetInfo, by: str) -> None:
        """Build the initial global model for ``info`` and checkpoint both (caller holds the lock)."""
        state = self.state
        model = GlobalModel(self.cfg, info)
        self._use_model(model)
        name, sha = state.store.save_state(state.machine.round, model.state)
        state.ckpt.layout = info
        state.ckpt.model = model.settings.model
        state.ckpt.state_file, state.ckpt.state_sha256 = name, sha
        state.machine.state_sha256 = sha
        state.checkpoint()
        log.info(
            "data layout fixed by %s: %d modalities, %d channels, %d steps at %g Hz, classes %s",
            by,
            info.n_modalities,
            info.n_features,
            info.length,
            info.sampling_rate_hz,
            list(info.classes),
        )

    # ---- handler operations ---------------------------------------------------------------

    def join(self, silo: str, request: msg.JoinRequest) -> msg.JoinReply:
        """Handshake: check version and layout (fixed by the first join unless pinned), send the run settings."""
        state = self.state
        offer = msg.JoinReply(
            accepted=False,
            silo_id=silo,
            federation_name=self.cfg.name,
            run_id=state.ckpt.run_id,
            protocol_version=PROTOCOL_VERSION,
            software_version=software_version(),
            capabilities=CAPABILITIES,
            poll_interval_ms=self.cfg.poll_interval_ms,
            max_chunk_bytes=self.cfg.max_chunk_bytes,
            rounds=self.plan.rounds,
            silos_per_round=self.plan.silos_per_round,
            allowed_silos=len(self.plan.allowed),
        )

        def refuse(reason: str) -> msg.JoinReply:
            log.warning("refused Join from silo %s: %s", silo, reason)
            return dataclasses.replace(offer, reason=reason)

        if request.protocol_version != PROTOCOL_VERSION:
            return refuse(
                f"protocol version {request.protocol_version} is not supported; this coordinator speaks "
                f"{PROTOCOL_VERSION}"
            )
        info = request.layout
        if info is None:
            return refuse(request.layout_refusal)
        with state.cond:
            if state.ckpt.layout is None:
                self._fix_layout(info, f"silo {silo}")
            else:
                reason = layout_mismatch(state.ckpt.layout, info)
                if reason is not None:
                    return refuse(f"data layout does not match the federation's: {reason}")
            state.machine.join(silo, state.clock())
            state.cond.notify_all()
        assert state.model is not None
        log.info(
            "silo %s joined (software %s, capabilities %s)",
            silo,
            shown(request.software_version or "?", 64),
            [shown(c, 64) for c in request.capabilities[:16]],
        )
        return dataclasses.replace(offer, accepted=True, settings=state.model.settings)

    def _task(self, view: TaskView) -> msg.Task:
        config = self.state.machine.secure_config
        return msg.Task(
            key=view.key,
            remaining_ms=int(view.remaining_s * 1000),
            poll_after_ms=self.cfg.poll_interval_ms,
            message=view.message,
            state_sha256=view.state_sha256,
            aggregation=msg.AggregationMode.PLAIN if self.plan.secure is None else msg.AggregationMode.SECURE,
            selected=view.selected,
            settings=view.settings if view.key.stage in DOWNLOAD_STAGES else None,
            threshold=config.threshold if config is not None and view.round_id else 0,
            stage_input=view.stage_input,
        )

    def get_task(self, silo: str, request: msg.TaskRequest) -> msg.Task:
        """The silo's task, held while unchanged for up to ``wait_ms`` (at most a third of liveness_s)."""
        state = self.state
        hold = min(request.wait_ms / 1000.0, self.cfg.timeouts.liveness_s / 3.0)
        with state.cond:
            now = state.clock()
            state.machine.seen(silo, now)
            view = state.machine.task_for(silo, now)
            end = now + hold
            while view.key == request.last and view.key.stage != Stage.DONE and not state.stopping.is_set():
                if end - now <= 0:
                    break
                state.cond.wait(end - now)
                now = state.clock()
                view = state.machine.task_for(silo, now)
            state.machine.seen(silo, now)
        return self._task(view)

    def download(self, silo: str, request: msg.DownloadRequest) -> Iterator[msg.StatePart]:
        """The current global state for the silo's TRAIN or EVALUATE task, from ``first_chunk`` on."""
        state = self.state
        key = request.key
        with state.cond:
            state.machine.seen(silo, state.clock())
            if key.stage not in DOWNLOAD_STAGES:
                raise ProtocolError(
                    "failed_precondition",
                    f"downloads belong to TRAIN, ADVERTISE_KEYS or EVALUATE, not {stage_name(key.stage)}",
                )
            state.machine.check(silo, key, key.stage)
            if request.state_sha256 != state.machine.state_sha256:
                raise ProtocolError(
                    "not_found",
                    f"state {request.state_sha256[:12] or '(none)'} is not the current one "
                    f"({state.machine.state_sha256[:12]})",
                )
            assert state.model is not None
            manifest, chunks = state.model.manifest, state.model.chunks
            counter = state.downloads.setdefault((key.round, key.attempt, key.stage), {})
        if request.first_chunk > len(chunks):
            raise ProtocolError("invalid_argument", f"first_chunk {request.first_chunk} beyond {len(chunks)} chunks")

        def stream() -> Iterator[msg.StatePart]:
            yield manifest
            for piece in chunks[request.first_chunk :]:
                with state.cond:
                    counter[silo] = counter.get(silo, 0) + len(piece.data)
                yield piece

        return stream()

    def heartbeat(self, silo: str, request: msg.HeartbeatRequest) -> msg.HeartbeatReply:
        """A sign of life; the reply names the caller and its current task. With ``leaving`` set the
        silo leaves the run for good: it is marked departed at once, so no stage waits for it."""
        state = self.state
        current = None
        with state.cond:
            now = state.clock()
            state.machine.seen(silo, now)
            if request.leaving:
                self._depart(silo, shown(request.leaving, 500), now)
            elif silo in state.machine.joined():
                current = state.machine.task_for(silo, now).key
        if request.status:
            log.debug("silo %s: %s (%.0f%%)", silo, shown(request.status), 100 * request.progress)
        return msg.HeartbeatReply(silo_id=silo, current=current)

    def _depart(self, silo: str, reason: str, now: float) -> None:
        """Mark ``silo`` as gone for good (caller holds the lock); logged and written to events.jsonl."""
        machine = self.state.machine
        machine.depart(silo, reason, now)
        self.state.cond.notify_all()
        log.warning(
            "silo %s leaves the run in round %d: %s",
            silo,
            machine.round,
            reason,
            extra={"event": {"event": "silo_departed", "silo": silo, "round": machine.round, "reason": reason}},
        )
