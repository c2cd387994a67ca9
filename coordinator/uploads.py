"""What silos submit to the coordinator: updates, masked vectors, secure-aggregation messages, reports.

:class:`Submissions` is the part of the :class:`~coordinator.server.Coordinator` that takes them,
as the domain types of :mod:`federation.messages`, on the state it shares with the other parts
(:class:`~coordinator.state.CoordinatorState`). Each operation admits the submission with the
round machine's one check (:meth:`~coordinator.rounds.RoundMachine.admit`) before any payload is
read, reads and bounds the payload, and records it under the lock; a plain update goes straight
into its attempt's running sum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from condi_models.aggregation import SiloUpdate
from condi_models.batches import record_window_starts
from coordinator.pooling import ReportError, check_split_report
from coordinator.report import SiloUpload
from coordinator.rounds import ProtocolError
from coordinator.state import CoordinatorState
from federation import messages as msg
from federation.faults import FaultPoint, exit_hard
from federation.secagg import MaskedInput, MessageError
from federation.stages import Stage, StageKey, stage_name
from federation.statistics import StatisticsError, check_statistics_report
from federation.transfer import decode_plain_update, receive_upload

# One logger for all of the coordinator's operations, as operators filter its lines by name.
log = logging.getLogger("coordinator.server")


class Submissions:
    """The submission operations of the coordinator (plain and masked uploads, secure stages, reports)."""

    def __init__(self, state: CoordinatorState, *, exit_at: FaultPoint | None = None) -> None:
        self.state = state
        # Fault injection (tests, the harness): (round, stage) at whose first accepted submission to die.
        self.exit_at = exit_at

    def upload(self, silo: str, parts: Iterator[msg.UploadPart]) -> msg.UploadReceipt:
        """Receive, check and record a plain update of the silo's current TRAIN task, or in secure mode
        its masked vector of the MASKED_INPUT task. ``parts`` is read lazily: the header is admitted
        before the first chunk is asked for."""
        state = self.state
        model = state.model
        if model is None:
            raise ProtocolError("failed_precondition", "no model yet: no silo has joined")
        if state.plan.secure is not None:
            return self._upload_masked(silo, parts)
        started = state.clock()
        # The state the update was trained from, read with the base-state check under the lock;
        # absent for a repeat of an accepted update, which is answered without being decoded.
        base: dict[str, dict[str, np.ndarray]] = {}

        def check_header(header: msg.UpdateHeader) -> None:
            repeat, current = self._admit_upload(silo, header, Stage.TRAIN)
            if repeat:
                return
            base["state"] = current
            manifest = header.manifest
            if manifest.payload_bytes != model.update_bytes:
                raise ProtocolError(
                    "invalid_argument",
                    f"update of {manifest.payload_bytes} bytes; "
                    f"a plain update of this model has {model.update_bytes}",
                )

        received = receive_upload(
            parts,
            max_chunk_bytes=state.cfg.max_chunk_bytes,
            max_payload_bytes=model.update_bytes,
            check_header=check_header,
        )
        upload_s = state.clock() - started
        header = received.header
        key, manifest = header.key, header.manifest
        if "state" not in base:
            # The header repeated an accepted upload, and an accepted digest stays accepted.
            log.info("duplicate update from silo %s for %s", silo, key.describe())
            return msg.UploadReceipt(key=key, payload_sha256=manifest.payload_sha256, duplicate=True)
        params, weights = decode_plain_update(manifest, received.payload, model.param_shapes, model.group_names)
        if header.num_examples != round(weights.get("all", 0.0)):
            raise ProtocolError(
                "invalid_argument",
                f"num_examples {header.num_examples} differs from the update's sample weight "
                f"{weights.get('all', 0.0):g}",
            )
        # Capped and clipped as a secure contribution is, so one silo's claims move the model no
        # further in plain mode than in secure mode; from here on only the sum holds its tensors.
        contribution = model.secure_layout.contribution(base["state"], SiloUpdate(params=params, weights=weights))
        record = SiloUpload(
            weights=weights,
            claims=_claims(header.claims_json),
            upload_s=upload_s,
            upload_bytes=manifest.payload_bytes,
            clipped=contribution.clipped,
        )
        with state.cond:
            duplicate = state.machine.accept_update(
                silo, key, header.base_state_sha256, manifest.payload_sha256, record
            )
            if not duplicate:
                state.sums.add(key.round, key.attempt, silo, contribution.vector)
            self._fault_point(silo, key, duplicate)
            state.cond.notify_all()
        log.info(
            "%s update from silo %s for %s: %d samples, %d bytes in %.2f s",
            "duplicate" if duplicate else "accepted",
            silo,
            key.describe(),
            header.num_examples,
            manifest.payload_bytes,
            upload_s,
        )
        return msg.UploadReceipt(key=key, payload_sha256=manifest.payload_sha256, duplicate=duplicate)

    def _admit_upload(self, silo: str, header: msg.UpdateHeader, stage: Stage) -> tuple[bool, dict[str, np.ndarray]]:
        """Admit an upload from its header, before any chunk is read: the run's encoding (a plain
        update in TRAIN, a masked vector in MASKED_INPUT), then the round machine's one check, the
        base state included for an update. Returns whether it repeats an accepted upload, and the
        current global state read under the same lock (what a plain update is a delta from)."""
        wanted = msg.UpdateEncoding.PLAIN if stage == Stage.TRAIN else msg.UpdateEncoding.MASKED
        if header.encoding != wanted:
            raise ProtocolError(
                "invalid_argument",
                f"update encoding {header.encoding.name}: this run takes "
                + ("plain updates" if stage == Stage.TRAIN else "masked vectors only (secure aggregation)"),
            )
        base = header.base_state_sha256 if stage == Stage.TRAIN else None
        state = self.state
        with state.cond:
            state.machine.seen(silo, state.clock())
            repeat = state.machine.admit(
                silo, header.key, stage, header.manifest.payload_sha256, base_state_sha256=base
            )
            return repeat, ({} if state.model is None else state.model.state)

    def _upload_masked(self, silo: str, parts: Iterator[msg.UploadPart]) -> msg.UploadReceipt:
        state = self.state
        started = state.clock()
        with state.cond:
            running = state.machine.secure_config
        # The running attempt fixes the shape: a model update, or the metrics of a secure evaluation.
        # Between attempts only a retried update can arrive, to be answered as a duplicate.
        if running is not None:
            length, ring_bits = running.vector_length, running.quant.ring_bits
        else:
            assert state.model is not None and state.plan.secure is not None
            length, ring_bits = state.model.secure_layout.vector_length, state.plan.secure.quant.ring_bits
        dtype = f"uint{ring_bits}"
        expected = length * ring_bits // 8

        def check_header(header: msg.UpdateHeader) -> None:
            if self._admit_upload(silo, header, Stage.MASKED_INPUT)[0]:
                return
            specs = header.manifest.tensors
            if len(specs) != 1 or specs[0].dtype != dtype or tuple(specs[0].shape) != (length,):
                raise ProtocolError("invalid_argument", f"a masked vector is one {dtype} tensor of shape ({length},)")

        received = receive_upload(
            parts, max_chunk_bytes=state.cfg.max_chunk_bytes, max_payload_bytes=expected, check_header=check_header
        )
        header = received.header
        key, manifest = header.key, header.manifest
        claimed = _claims(header.claims_json)
        claims = SiloUpload(
            weights={"all": float(claimed.get("samples", 0.0))},
            claims=claimed,
            upload_s=state.clock() - started,
            upload_bytes=manifest.payload_bytes,
        )
        with state.cond:
            config = state.machine.secure_config
            if config is None:
                raise ProtocolError("failed_precondition", f"no secure round is running for {key.describe()}")
            try:
                masked = MaskedInput(config.round_id, silo, ring_bits, bytes(received.payload))
            except MessageError as exc:
                raise ProtocolError("invalid_argument", f"masked vector: {exc}") from exc
            duplicate = state.machine.accept_secure(silo, key, manifest.payload_sha256, masked, claims)
            self._fault_point(silo, key, duplicate)
            state.cond.notify_all()
        log.info(
            "%s masked vector from silo %s for %s: %d bytes",
            "duplicate" if duplicate else "accepted",
            silo,
            key.describe(),
            manifest.payload_bytes,
        )
        return msg.UploadReceipt(key=key, payload_sha256=manifest.payload_sha256, duplicate=duplicate)

    def _secure_call(
        self, silo: str, request: msg.SecureRequest, stage: Stage, build: Callable[[str], Any]
    ) -> msg.Receipt:
        """One of AdvertiseKeys, ShareKeys, Unmask: build the protocol message for the running round
        and give it to the machine."""
        state = self.state
        if state.plan.secure is None:
            raise ProtocolError(
                "unimplemented",
                "this run aggregates in the clear (AGGREGATION_MODE_PLAIN); secure-aggregation calls are not served",
            )
        key = request.key
        with state.cond:
            state.machine.seen(silo, state.clock())
            config = state.machine.secure_config
            if key.stage != stage or config is None:
                state.machine.check(silo, key, stage)
                raise ProtocolError("failed_precondition", f"no secure round is running for {key.describe()}")
            try:
                message = build(config.round_id)
            except MessageError as exc:
                raise ProtocolError("invalid_argument", f"{stage_name(stage)}: {exc}") from exc
            duplicate = state.machine.accept_secure(silo, key, request.digest, message)
            self._fault_point(silo, key, duplicate)
            state.cond.notify_all()
        log.info("%s %s from silo %s", "duplicate" if duplicate else "accepted", stage_name(stage), silo)
        return msg.Receipt(key=key, duplicate=duplicate)

    def advertise_keys(self, silo: str, request: msg.AdvertiseKeysRequest) -> msg.Receipt:
        """Stage 1: the silo's signed fresh public keys."""
        return self._secure_call(
            silo, request, Stage.ADVERTISE_KEYS, lambda rid: msg.key_advert(rid, silo, request.keys)
        )

    def share_keys(self, silo: str, request: msg.ShareKeysRequest) -> msg.Receipt:
        """Stage 2: the silo's encrypted shares for its peers."""
        return self._secure_call(
            silo, request, Stage.SHARE_KEYS, lambda rid: msg.share_keys(rid, silo, request.shares)
        )

    def unmask(self, silo: str, request: msg.RevealSharesRequest) -> msg.Receipt:
        """Stage 4: the shares that remove the masks of the sum."""
        return self._secure_call(
            silo, request, Stage.UNMASK, lambda rid: msg.unmask_response(rid, silo, request.shares)
        )

    def report_metrics(self, silo: str, request: msg.MetricsReport) -> msg.Receipt:
        """Check and record a silo's evaluation of the current global state, or its statistics."""
        state = self.state
        key = request.key
        stage = Stage.STATISTICS if key.stage == Stage.STATISTICS else Stage.EVALUATE
        digest = hashlib.sha256(request.metrics_json.encode("utf-8")).hexdigest()
        with state.cond:
            state.machine.seen(silo, state.clock())
            if state.machine.admit(silo, key, stage, digest):
                return msg.Receipt(key=key, duplicate=True)
        assert state.model is not None
        layout = state.model.settings.layout
        try:
            data = json.loads(request.metrics_json)
        except json.JSONDecodeError as exc:
            raise ReportError(f"metrics_json: not valid JSON ({exc})") from exc
        if stage == Stage.STATISTICS:
            return self._report_statistics(silo, key, digest, data)
        if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
            raise ReportError("metrics_json: expected an object with 'splits'")
        wanted = state.machine.eval_splits(key.round)
        missing = [s for s in wanted if s not in data["splits"]]
        if missing:
            raise ReportError(f"metrics_json.splits: missing {missing}")
        bounds = {"max_n": state.cfg.max_silo_records, "entries_per_sample": self._entries_per_sample()}
        report = {
            "splits": {
                s: check_split_report(data["splits"][s], len(layout.classes), f"metrics_json.splits.{s}", **bounds)
                for s in wanted
            },
        }
        with state.cond:
            duplicate = state.machine.accept_metrics(silo, key, digest, report)
            self._fault_point(silo, key, duplicate)
            state.cond.notify_all()
        name, first = wanted[0], report["splits"][wanted[0]]
        log.info(
            "%s metrics from silo %s for %s: %s accuracy %.3f on %d samples",
            "duplicate" if duplicate else "accepted",
            silo,
            key.describe(),
            name,
            first["accuracy"],
            first["n"],
        )
        return msg.Receipt(key=key, duplicate=duplicate)

    def _entries_per_sample(self) -> int:
        """The most hidden entries one evaluated sample can contribute: every channel of every
        window evaluation takes of it (overlapping record windows count an entry more than once)."""
        assert self.state.model is not None
        settings = self.state.model.settings
        window = settings.model.length
        windows = len(record_window_starts(settings.layout.length, window, settings.evaluation.window_stride))
        return settings.layout.n_features * window * windows

    def _report_statistics(self, silo: str, key: StageKey, digest: str, data: Any) -> msg.Receipt:
        """Check and record a silo's plain statistics report (sums over its training split)."""
        state = self.state
        if not isinstance(data, dict) or sorted(data) != ["statistics"]:
            raise ReportError("metrics_json: expected an object with only 'statistics'")
        assert state.model is not None
        try:
            report = check_statistics_report(
                data["statistics"], state.model.statistics_layout, "metrics_json.statistics",
                max_records=state.cfg.max_silo_records,
            )
        except StatisticsError as exc:
            raise ReportError(str(exc)) from None
        with state.cond:
            duplicate = state.machine.accept_statistics(silo, key, digest, report)
            self._fault_point(silo, key, duplicate)
            state.cond.notify_all()
        log.info("%s statistics from silo %s", "duplicate" if duplicate else "accepted", silo)
        return msg.Receipt(key=key, duplicate=duplicate)

    def _fault_point(self, silo: str, key: StageKey, duplicate: bool) -> None:
        """Die, as a crash would, on accepting the first submission of the injected round and stage.

        Called with the lock held, before the driver can act on the submission: the round is then
        always mid-stage when the process ends, however fast the silos are.
        """
        if not duplicate and self.exit_at is not None and self.exit_at.reached(key.round, key.stage):
            exit_hard(log, f"stopping in {key.describe()} after accepting the submission of silo {silo}")


def _claims(text: str) -> dict[str, Any]:
    """A silo's statements about its update: information only, never identity or weight."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        log.warning("ignoring claims that are not valid JSON")
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: v
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
