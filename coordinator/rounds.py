"""The coordinator's round state machine: who is connected, who is selected, what each silo does now.

Pure and transport-free: every call takes the current time, nothing here sleeps, reads a socket
or touches tensors. gRPC handlers report what they receive (joins, signs of life, uploads,
metrics) and ask what a silo's task is; one driver thread calls :meth:`RoundMachine.tick`, the
only place where phases change, and carries out the :class:`Effect` it returns (aggregate,
checkpoint, report).

Before round 0 a run sums its data statistics once: GATHER -> STATISTICS -> RECORD, in which
every connected silo sends sums over its training split (federation.statistics), in the clear or,
with secure aggregation, through a secure attempt of their own; the pooled normalizer and class
counts then go out with every training and evaluation task of the run.

A round goes GATHER -> TRAIN -> AGGREGATE -> GATHER -> EVALUATE -> RECORD -> next round:

- GATHER waits for connected silos. The first gather of a coordinator process waits for every
  allowed silo (or, at the gather deadline, for the minimum); later ones start at once with the
  silos that are connected, since waiting for a silo that went away only delays the run.
- TRAIN: a seeded selection (the RNG state is checkpointed) of up to ``silos_per_round``
  connected silos downloads, trains and uploads. The stage ends when all selected uploaded, when
  every missing one has gone silent, or at the deadline. With at least ``min_silos`` updates the
  round aggregates; otherwise the attempt fails and the round is retried with a new selection
  under the next attempt number, until ``max_attempts`` failures end the run with a message that
  names the round, the silos and what was missing.
- EVALUATE: every connected silo evaluates the new global state on its own held-out data; the
  stage ends when all reported, the others went silent, or at the deadline. With secure metrics
  the silos instead evaluate in a secure attempt of their own (ADVERTISE_KEYS .. UNMASK over a
  vector of metric sums), so only the pooled scores are learnt; it needs two connected silos and
  is retried like a training attempt when it cannot complete.
- AGGREGATE and RECORD: the driver averages the updates or records the round and checkpoints;
  :meth:`RoundMachine.aggregated` and :meth:`RoundMachine.next_round` move on.

Requests carry (run, round, attempt, stage); one that is not the silo's current task is refused
(a replay or a stale request), an identical repeat of an accepted submission is a duplicate (also
after its stage ended, so a retry whose receipt was lost is safe), and a different second
submission for the same task is refused.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from federation import secagg
from federation.secagg_wire import secure_round_id
from federation.secure_metrics import METRICS_QUANT, MetricsLayout
from federation.settings import RoundSettings, SecureSettings
from federation.stages import DOWNLOAD_STAGES, Stage, StageKey, stage_name
from federation.statistics import STATISTICS_QUANT, PooledStatistics, StatisticsLayout

Pending = Literal["statistics", "train", "evaluate", "final", "done"]
PENDING: tuple[Pending, ...] = ("statistics", "train", "evaluate", "final", "done")
# What a secure attempt sums.
Purpose = Literal["update", "metrics", "statistics"]


class Phase(enum.StrEnum):
    """Where the current round is."""

    GATHER = "gather"
    STATISTICS = "statistics"
    TRAIN = "train"
    ADVERTISE = "advertise_keys"
    SHARE = "share_keys"
    MASKED = "masked_input"
    UNMASK = "unmask"
    AGGREGATE = "aggregate"
    EVALUATE = "evaluate"
    RECORD = "record"
    DONE = "done"
    FAILED = "failed"


class ProtocolError(Exception):
    """A request the protocol refuses; ``code`` is a gRPC status name in lower case."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The secure stages in order, with the task each hands out; TRAIN's task in secure mode ends with
# the advert, so the silo trains and then advertises fresh keys in one task.
_SECURE = {
    Phase.ADVERTISE: Stage.ADVERTISE_KEYS,
    Phase.SHARE: Stage.SHARE_KEYS,
    Phase.MASKED: Stage.MASKED_INPUT,
    Phase.UNMASK: Stage.UNMASK,
}
_RUNNING = {
    Phase.STATISTICS: Stage.STATISTICS,
    Phase.TRAIN: Stage.TRAIN,
    Phase.EVALUATE: Stage.EVALUATE,
    **_SECURE,
}


@dataclass(frozen=True)
class SecurePlan:
    """Secure aggregation settings: t for a selection size, stage deadline, encoding, the PKI check."""

    threshold_for: Callable[[int], int]
    stage_s: float
    quant: secagg.QuantConfig
    verify_cert: secagg.CertVerifier
    weight_unit: float
    # Evaluation reports go through a secure sum too, so only pooled scores are learnt.
    metrics: bool = False


@dataclass(frozen=True)
class RoundPlan:
    """The round rules from federation.yaml; ``secure`` set means updates are only ever summed masked."""

    allowed: tuple[str, ...]
    rounds: int
    silos_per_round: int
    min_silos: int
    max_attempts: int
    seed: int
    gather_s: float
    train_s: float
    evaluate_s: float
    liveness_s: float
    secure: SecurePlan | None = None
    # The learning-rate factor each round's training runs with (empty: 1 throughout).
    lr_scales: tuple[float, ...] = ()
    # After the last round, one more evaluation, of the test splits alone, on the model the driver
    # selected (the best on validation); without it the last round evaluates test too.
    final_test: bool = False

    def lr_scale(self, round_index: int) -> float:
        """The learning-rate factor of round ``round_index``."""
        return self.lr_scales[round_index] if round_index < len(self.lr_scales) else 1.0

    def __post_init__(self) -> None:
        if not self.allowed or len(set(self.allowed)) != len(self.allowed):
            raise ValueError("allowed silos must be a non-empty list without repeats")
        if not 1 <= self.min_silos <= self.silos_per_round <= len(self.allowed):
            raise ValueError("need 1 <= min_silos <= silos_per_round <= allowed silos")
        if self.rounds < 1 or self.max_attempts < 1:
            raise ValueError("rounds and max_attempts must be >= 1")


@dataclass(frozen=True)
class RoundProgress:
    """The part of the machine a checkpoint keeps: enough to resume without losing or doubling a round."""

    round: int
    attempt: int
    failures: int
    pending: Pending
    rng_state: dict[str, Any]

    @classmethod
    def start(cls, seed: int, *, statistics: bool) -> RoundProgress:
        """Progress of a run that has not begun: round 0, nothing tried, a fresh selection RNG; the
        statistics stage first when ``statistics``."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1])))
        pending: Pending = "statistics" if statistics else "train"
        return cls(round=0, attempt=-1, failures=0, pending=pending, rng_state=rng.bit_generator.state)


@dataclass(frozen=True)
class Aggregate:
    """TRAIN ended with enough updates: average, checkpoint, then call :meth:`RoundMachine.aggregated`."""

    round: int
    attempt: int
    selected: tuple[str, ...]
    updates: Mapping[str, Any]
    stage_s: float
    total: np.ndarray | None = None


@dataclass(frozen=True)
class Evaluated:
    """EVALUATE ended: record the round, checkpoint, then call :meth:`RoundMachine.next_round`."""

    round: int
    attempt: int
    participants: tuple[str, ...]
    reports: Mapping[str, Any]
    stage_s: float
    # Secure metrics: the unmasked sum of the participants' metrics vectors (reports is then empty).
    total: np.ndarray | None = None


@dataclass(frozen=True)
class Counted:
    """STATISTICS ended: pool the sums, checkpoint, then call :meth:`RoundMachine.statistics_recorded`
    (or :meth:`RoundMachine.refuse_result` when the sums cannot be used)."""

    attempt: int
    participants: tuple[str, ...]
    reports: Mapping[str, Any]
    stage_s: float
    # Secure aggregation: the unmasked sum of the participants' statistics vectors (reports is then empty).
    total: np.ndarray | None = None


@dataclass(frozen=True)
class Persist:
    """The checkpointed progress changed (a new attempt began): write it before anyone acts on it."""

    progress: RoundProgress


@dataclass(frozen=True)
class Retry:
    """An attempt failed and the round is tried again; ``message`` says why."""

    round: int
    attempt: int
    message: str


@dataclass(frozen=True)
class Failed:
    """The run cannot go on; ``message`` names the round, the silos and what was missing."""

    message: str


@dataclass(frozen=True)
class Finished:
    """Every round is done."""

    rounds: int


Effect = Counted | Aggregate | Evaluated | Persist | Retry | Failed | Finished


@dataclass(frozen=True)
class TaskView:
    """A silo's current task, ready to be turned into a Task message."""

    key: StageKey
    remaining_s: float
    message: str
    state_sha256: str
    settings: RoundSettings
    selected: tuple[str, ...]
    round_id: str = ""
    stage_input: Any = None


@dataclass
class _Submission:
    digest: str
    value: Any


@dataclass
class _Silo:
    last_seen: float
    # When this silo's current process joined: one that joined after a secure attempt began has
    # lost that attempt's keys and cannot finish its later stages.
    joined_at: float = 0.0
    told_done: bool = False
    # Why the silo left the run for good (it said so), or None while it takes part.
    departed: str | None = None


@dataclass
class _Stage:
    """The running TRAIN or EVALUATE stage of the current attempt."""

    members: tuple[str, ...]
    started: float
    deadline: float
    received: dict[str, _Submission] = field(default_factory=dict)


def _secure_settings(quant: secagg.QuantConfig, length: int, weight_unit: float, content: str) -> SecureSettings:
    return SecureSettings(
        clip_bound=quant.clip_bound,
        frac_bits=quant.frac_bits,
        ring_bits=quant.ring_bits,
        weight_unit=weight_unit,
        vector_length=length,
        content=content,
    )


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class RoundMachine:
    """The state of a run's rounds; not thread-safe (callers hold one lock around it)."""

    def __init__(
        self,
        plan: RoundPlan,
        run_id: str,
        progress: RoundProgress,
        state_sha256: str,
        now: float,
        statistics: PooledStatistics | None = None,
    ) -> None:
        self.plan = plan
        # The pooled statistics every training and evaluation task carries, once summed.
        self.statistics = statistics
        self.run_id = run_id
        self.state_sha256 = state_sha256
        self.round = progress.round
        self.attempt = progress.attempt
        self.failures = progress.failures
        self._rng = np.random.Generator(np.random.PCG64())
        self._rng.bit_generator.state = progress.rng_state
        self._silos: dict[str, _Silo] = {}
        self._stage: _Stage | None = None
        # Digest of every submission accepted by this process, so a retry is a duplicate even
        # after its stage ended.
        self._accepted: dict[tuple[str, int, int, int, str], str] = {}
        self.failure: str | None = None
        self._first_gather = True
        # Secure mode: the protocol server of the current attempt, the length of the summed vector
        # (known once the model is), and what the secure stages learnt so far.
        self._secagg: secagg.SecAggServer | None = None
        self.vector_length: int | None = None
        self._inputs: dict[str, Any] = {}
        self._claims: dict[str, Any] = {}
        self._train_started = 0.0
        self._selected: tuple[str, ...] = ()
        # What the running secure attempt sums: a model update, evaluation metrics or data statistics;
        # and the (classes, channels) of the data layout the latter two are laid out for, once known.
        self._purpose: Purpose = "update"
        self.data_shape: tuple[int, int] | None = None
        if progress.pending == "done" or (self.round >= plan.rounds and progress.pending != "final"):
            self.phase = Phase.DONE
            self._next: Pending = "done"
        else:
            self._gather(progress.pending, now)

    # ---- bookkeeping --------------------------------------------------------------------

    def progress(self) -> RoundProgress:
        """What a checkpoint must keep now."""
        pending: Pending = "done" if self.phase == Phase.DONE else self._next
        return RoundProgress(
            round=self.round,
            attempt=self.attempt,
            failures=self.failures,
            pending=pending,
            rng_state=self._rng.bit_generator.state,
        )

    def _gather(self, next_stage: Pending, now: float) -> None:
        self.phase = Phase.GATHER
        self._next = next_stage
        self._stage = _Stage(members=(), started=now, deadline=now + self.plan.gather_s)

    def alive(self, now: float) -> tuple[str, ...]:
        """Joined silos heard from within the liveness window that have not left the run, sorted."""
        return tuple(
            sorted(
                s
                for s, info in self._silos.items()
                if info.departed is None and now - info.last_seen <= self.plan.liveness_s
            )
        )

    def joined(self) -> tuple[str, ...]:
        """Every silo that joined this coordinator process, sorted."""
        return tuple(sorted(self._silos))

    def join(self, silo: str, now: float) -> None:
        """A silo was accepted by Join (its certificate and data layout already checked)."""
        if silo not in self.plan.allowed:
            raise ProtocolError("permission_denied", f"silo {silo!r} is not in this federation's allow-list")
        self._silos[silo] = _Silo(last_seen=now, joined_at=now)

    def depart(self, silo: str, reason: str, now: float) -> None:
        """``silo`` leaves the run for good (e.g. its privacy budget is spent): from now on it is not
        alive, so it is not selected and a running stage does not wait for it; joining again undoes it."""
        self._require_joined(silo)
        info = self._silos[silo]
        info.departed = reason
        info.last_seen = now

    def departed(self) -> dict[str, str]:
        """Silos that left the run, with their reasons."""
        return {s: info.departed for s, info in sorted(self._silos.items()) if info.departed is not None}

    def seen(self, silo: str, now: float) -> None:
        """Any authenticated call from ``silo``: it is alive."""
        info = self._silos.get(silo)
        if info is not None:
            info.last_seen = max(info.last_seen, now)

    def _require_joined(self, silo: str) -> None:
        if silo not in self._silos:
            raise ProtocolError(
                "failed_precondition", f"silo {silo!r} has not joined run {self.run_id}; call Join"
            )

    # ---- what a silo should do ------------------------------------------------------------

    def _key(self, stage: Stage) -> StageKey:
        return StageKey(run_id=self.run_id, round=self.round, attempt=max(self.attempt, 0), stage=stage)

    def _settings(self, silo: str, stage: Stage) -> RoundSettings:
        stats = self.statistics
        if stage == Stage.ADVERTISE_KEYS and self._purpose == "statistics":
            return RoundSettings(
                secagg=_secure_settings(STATISTICS_QUANT, self.statistics_layout().vector_length, 1.0, "statistics")
            )
        evaluate = RoundSettings(
            eval_seed=self._eval_seed(), eval_splits=self.eval_splits(self.round), statistics=stats
        )
        if stage == Stage.ADVERTISE_KEYS and self._purpose == "metrics":
            length = self.metrics_layout(self.round).vector_length
            return dataclasses.replace(evaluate, secagg=_secure_settings(METRICS_QUANT, length, 1.0, "metrics"))
        if stage == Stage.EVALUATE:
            return evaluate
        if stage in (Stage.TRAIN, Stage.ADVERTISE_KEYS):
            index = self.plan.allowed.index(silo)
            seed = _derived_seed(self.plan.seed, 2, self.round, self.attempt, index)
            train = RoundSettings(train_seed=seed, lr_scale=self.plan.lr_scale(self.round), statistics=stats)
            secure = self.plan.secure
            if stage == Stage.TRAIN or secure is None or self.vector_length is None:
                return train
            encoding = _secure_settings(secure.quant, self.vector_length, secure.weight_unit, "update")
            return dataclasses.replace(train, secagg=encoding)
        return RoundSettings()

    def _eval_seed(self) -> int:
        return _derived_seed(self.plan.seed, 3, self.round)

    @property
    def secure_metrics(self) -> bool:
        """Whether evaluation reports are summed securely instead of sent in the clear."""
        return self.plan.secure is not None and self.plan.secure.metrics

    def _data_shape(self) -> tuple[int, int]:
        if self.data_shape is None:
            raise RuntimeError("a secure sum of scores or statistics needs the data layout, which no silo has brought")
        return self.data_shape

    def metrics_layout(self, round_index: int) -> MetricsLayout:
        """The metrics vector silos sum in ``round_index`` (secure metrics only)."""
        classes, _ = self._data_shape()
        return MetricsLayout(classes, self.eval_splits(round_index))

    def statistics_layout(self) -> StatisticsLayout:
        """The statistics vector silos sum before round 0 (secure aggregation only)."""
        classes, features = self._data_shape()
        return StatisticsLayout(n_features=features, n_classes=classes)

    def eval_splits(self, round_index: int) -> tuple[str, ...]:
        """The local splits silos evaluate in ``round_index``: validation; test in the last round, or,
        with a final test, in that evaluation alone (its round index is ``rounds``)."""
        if self.plan.final_test:
            return ("test",) if round_index >= self.plan.rounds else ("val",)
        return ("val", "test") if round_index == self.plan.rounds - 1 else ("val",)

    def task_for(self, silo: str, now: float) -> TaskView:
        """The task ``silo`` should work on now."""
        self._require_joined(silo)
        stage, message = self._stage_for(silo, now)
        if stage == Stage.DONE:
            self._silos[silo].told_done = True
        remaining = 0.0 if self._stage is None else max(0.0, self._stage.deadline - now)
        secure = self.phase in _SECURE and stage != Stage.WAIT
        return TaskView(
            key=self._key(stage),
            remaining_s=remaining,
            message=message,
            state_sha256=self.state_sha256 if stage in DOWNLOAD_STAGES else "",
            settings=self._settings(silo, stage),
            selected=self._stage.members
            if self._stage is not None and self.phase in (Phase.TRAIN, *_SECURE)
            else (),
            round_id=self._secagg.round_id if secure and self._secagg is not None else "",
            stage_input=self._input_for(silo) if secure else None,
        )

    def _input_for(self, silo: str) -> Any:
        value = self._inputs.get(self.phase)
        if isinstance(value, dict):
            return value.get(silo)
        return value

    @property
    def secure_config(self) -> secagg.RoundConfig | None:
        """The protocol settings of the running secure attempt, or None."""
        return None if self._secagg is None else self._secagg.config

    def _stage_for(self, silo: str, now: float) -> tuple[int, str]:
        r = "the final test" if self._next == "final" else f"round {self.round + 1} of {self.plan.rounds}"
        if self.phase == Phase.DONE:
            return Stage.DONE, f"the run is complete after {self.plan.rounds} rounds"
        if self.phase == Phase.FAILED:
            return Stage.DONE, f"the run failed: {self.failure}"
        if self.phase == Phase.GATHER:
            return (
                Stage.WAIT,
                f"{r}: waiting for silos ({len(self.alive(now))} of {len(self.plan.allowed)} connected)",
            )
        if self.phase == Phase.AGGREGATE:
            return Stage.WAIT, f"{r}: aggregating"
        if self.phase == Phase.RECORD:
            return Stage.WAIT, f"{r}: recording the {'statistics' if self._next == 'statistics' else 'evaluation'}"
        assert self._stage is not None
        stage = _RUNNING[self.phase]
        if silo not in self._stage.members:
            return Stage.WAIT, f"{r}: not selected for {stage_name(stage).lower()}"
        if silo in self._stage.received:
            return Stage.WAIT, f"{r}: {stage_name(stage).lower()} received, waiting for the others"
        return stage, f"{r}: {stage_name(stage).lower()}"

    def told_done(self) -> tuple[str, ...]:
        """Silos that have been told the run is over."""
        return tuple(sorted(s for s, info in self._silos.items() if info.told_done))

    # ---- submissions ----------------------------------------------------------------------

    def check(self, silo: str, key: StageKey, stage: Stage) -> None:
        """Refuse unless ``key`` is ``silo``'s current task and that task is ``stage``."""
        self._require_joined(silo)
        if key.run_id != self.run_id:
            raise ProtocolError(
                "failed_precondition",
                f"request for run {key.run_id!r}, but the current run is {self.run_id!r}",
            )
        if key.stage != stage:
            raise ProtocolError(
                "failed_precondition",
                f"this call belongs to stage {stage_name(stage)}, the request names {key.describe()}",
            )
        running = _RUNNING.get(self.phase)
        current = self._key(running if running is not None else Stage.WAIT)
        if running is None or (key.round, key.attempt, key.stage) != (
            current.round,
            current.attempt,
            current.stage,
        ):
            raise ProtocolError(
                "failed_precondition",
                f"stale or replayed request for {key.describe()}; the current task is {current.describe()}",
            )
        assert self._stage is not None
        if silo not in self._stage.members:
            raise ProtocolError(
                "failed_precondition", f"silo {silo!r} is not taking part in {key.describe()}"
            )

    def repeats(self, silo: str, key: StageKey, digest: str) -> bool:
        """True when ``silo`` already had exactly this submission accepted for ``key``, even if that
        stage is over (a retry whose receipt was lost); a different one for the same task is refused."""
        prior = self._accepted.get((key.run_id, key.round, key.attempt, key.stage, silo))
        if prior is None:
            return False
        if prior != digest:
            raise ProtocolError(
                "already_exists",
                f"silo {silo!r} already submitted a different {stage_name(key.stage)} result "
                f"for {key.describe()}",
            )
        return True

    def admit(
        self, silo: str, key: StageKey, stage: Stage, digest: str, *, base_state_sha256: str | None = None
    ) -> bool:
        """The one admission check of a submission, made before its payload is read and again when it
        is recorded: a repeat of the accepted one (True: nothing more to do), else the silo's task
        must be ``key`` in ``stage`` of the running attempt and, for an update, trained from the
        current state; anything else raises :class:`ProtocolError` saying why."""
        if self.repeats(silo, key, digest):
            return True
        self.check(silo, key, stage)
        if base_state_sha256 is not None and base_state_sha256 != self.state_sha256:
            raise ProtocolError(
                "failed_precondition",
                f"stale update: computed from state {base_state_sha256[:12] or '(none)'}, "
                f"{key.describe()} trains from {self.state_sha256[:12]}",
            )
        return False

    def _record(self, silo: str, key: StageKey, digest: str, value: Any) -> None:
        assert self._stage is not None
        self._stage.received[silo] = _Submission(digest=digest, value=value)
        self._accepted[(key.run_id, key.round, key.attempt, key.stage, silo)] = digest

    def _submit(
        self, silo: str, key: StageKey, stage: Stage, digest: str, value: Any, base_state_sha256: str | None = None
    ) -> bool:
        if self.admit(silo, key, stage, digest, base_state_sha256=base_state_sha256):
            return True
        self._record(silo, key, digest, value)
        return False

    def accept_update(
        self, silo: str, key: StageKey, base_state_sha256: str, payload_sha256: str, update: Any
    ) -> bool:
        """Record a checked update; returns True when it repeats one already accepted."""
        return self._submit(silo, key, Stage.TRAIN, payload_sha256, update, base_state_sha256)

    def accept_secure(self, silo: str, key: StageKey, digest: str, message: Any, claims: Any = None) -> bool:
        """Record a secure-stage submission (advert, shares, masked vector, unmasking shares) and hand it
        to the protocol server; returns True when it repeats one already accepted."""
        stage = _RUNNING.get(self.phase)
        if self.repeats(silo, key, digest):
            return True
        if stage is None or self.phase not in _SECURE or self._secagg is None:
            raise ProtocolError("failed_precondition", f"no secure-aggregation stage is running for {key.describe()}")
        self.admit(silo, key, stage, digest)
        receive = {
            Phase.ADVERTISE: self._secagg.receive_advert,
            Phase.SHARE: self._secagg.receive_shares,
            Phase.MASKED: self._secagg.receive_masked,
            Phase.UNMASK: self._secagg.receive_unmask,
        }[self.phase]
        try:
            receive(silo, message)
        except (secagg.ProtocolError, secagg.MessageError) as exc:
            raise ProtocolError("invalid_argument", f"{stage_name(stage)} from silo {silo!r}: {exc}") from exc
        if claims is not None:
            self._claims[silo] = claims
        self._record(silo, key, digest, None)
        return False

    def accept_metrics(self, silo: str, key: StageKey, digest: str, metrics: Any) -> bool:
        """Record a silo's evaluation report; returns True when it repeats one already accepted."""
        return self._submit(silo, key, Stage.EVALUATE, digest, metrics)

    def accept_statistics(self, silo: str, key: StageKey, digest: str, statistics: Any) -> bool:
        """Record a silo's checked statistics report; returns True when it repeats one already accepted."""
        return self._submit(silo, key, Stage.STATISTICS, digest, statistics)

    # ---- transitions (driver thread only) -------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Advance on deadlines, arrivals and departures; the caller carries out the effects in order."""
        if self.phase == Phase.GATHER:
            return self._tick_gather(now)
        if self.phase == Phase.TRAIN:
            return self._tick_train(now)
        if self.phase in _SECURE:
            return self._tick_secure(now)
        if self.phase in (Phase.EVALUATE, Phase.STATISTICS):
            return self._tick_reports(now)
        return []

    def _fail_attempt(self, message: str, now: float) -> list[Effect]:
        if self._secagg is not None and self._secagg.result is None:
            self._secagg.abort(message)
        self._secagg = None
        self._inputs = {}
        self._claims = {}
        self.failures += 1
        if self.failures >= self.plan.max_attempts:
            self.phase = Phase.FAILED
            self._stage = None
            self.failure = f"{message}; giving up after {self.failures} failed attempts of round {self.round}"
            return [Failed(self.failure)]
        self._gather(self._next, now)
        return [Retry(self.round, self.attempt, message), Persist(self.progress())]

    def _tick_gather(self, now: float) -> list[Effect]:
        assert self._stage is not None
        alive = self.alive(now)
        if self._next == "train":
            need = self.plan.min_silos
        elif self._next == "statistics":
            need = 2 if self.plan.secure is not None else 1
        else:
            need = 2 if self.secure_metrics else 1
        # Silos that left the run are not waited for.
        everyone = len(alive) + len(self.departed()) >= len(self.plan.allowed)
        past_deadline = now >= self._stage.deadline
        if len(alive) >= need and (everyone or past_deadline or not self._first_gather):
            self._first_gather = False
            self.attempt += 1
            if self._next == "train":
                k = min(self.plan.silos_per_round, len(alive))
                chosen = self._rng.choice(len(alive), size=k, replace=False)
                members = tuple(sorted(alive[int(i)] for i in chosen))
                self._stage = _Stage(members=members, started=now, deadline=now + self.plan.train_s)
                self.phase = Phase.TRAIN
                if self.plan.secure is not None:
                    return self._start_secure(members, now, "update")
            elif self._next == "statistics":
                self.phase = Phase.STATISTICS
                self._stage = _Stage(members=alive, started=now, deadline=now + self.plan.evaluate_s)
                if self.plan.secure is not None:
                    return self._start_secure(alive, now, "statistics")
            else:
                self.phase = Phase.EVALUATE
                self._stage = _Stage(members=alive, started=now, deadline=now + self.plan.evaluate_s)
                if self.secure_metrics:
                    return self._start_secure(alive, now, "metrics")
            return [Persist(self.progress())]
        if past_deadline:
            waiting = {"train": "training", "statistics": "the data statistics"}.get(self._next, "evaluation")
            return self._fail_attempt(
                f"round {self.round}: only {len(alive)} silos connected ({', '.join(alive) or 'none'}) after "
                f"{self.plan.gather_s:g} s, {need} needed for {waiting}",
                now,
            )
        return []

    def _tick_train(self, now: float) -> list[Effect]:
        stage = self._stage
        assert stage is not None
        alive = set(self.alive(now))
        done = tuple(s for s in stage.members if s in stage.received)
        missing = [s for s in stage.members if s not in stage.received]
        still_working = [s for s in missing if s in alive]
        if missing and still_working and now < stage.deadline:
            return []
        if len(done) >= self.plan.min_silos:
            self.phase = Phase.AGGREGATE
            updates = {s: stage.received[s].value for s in done}
            return [Aggregate(self.round, self.attempt, stage.members, updates, now - stage.started)]
        gone = [s for s in missing if s not in alive]
        why = "before the deadline" if still_working else "before the others went silent"
        return self._fail_attempt(
            f"round {self.round} attempt {self.attempt}: {len(done)} of the {self.plan.min_silos} required "
            f"updates arrived {why} (selected {', '.join(stage.members)}; "
            f"uploaded {', '.join(done) or 'none'}; silent {', '.join(gone) or 'none'}; "
            f"late {', '.join(still_working) or 'none'})",
            now,
        )

    def _start_secure(self, members: tuple[str, ...], now: float, purpose: Purpose) -> list[Effect]:
        """Begin a secure attempt over ``members``: training and the update sum, evaluation and the
        metrics sum, or the statistics sum."""
        secure = self.plan.secure
        assert secure is not None
        self.phase = Phase.ADVERTISE
        self._purpose = purpose
        self._train_started = now
        self._selected = members
        t = secure.threshold_for(len(members))
        if purpose == "update":
            length, quant = self.vector_length, secure.quant
        elif purpose == "metrics":
            length = None if self.data_shape is None else self.metrics_layout(self.round).vector_length
            quant = METRICS_QUANT
        else:
            length = None if self.data_shape is None else self.statistics_layout().vector_length
            quant = STATISTICS_QUANT
        if length is None or len(members) < 2 or t > len(members):
            return [
                Persist(self.progress()),
                *self._fail_attempt(
                    f"round {self.round} attempt {self.attempt}: {self._secure_name()} needs at least 2 "
                    f"silos and t={t} of them, had {', '.join(members)}",
                    now,
                ),
            ]
        config = secagg.RoundConfig(secure_round_id(self.run_id, self.round, self.attempt), t, length, quant)
        self._secagg = secagg.SecAggServer(config, members, secure.verify_cert)
        return [Persist(self.progress())]

    def _secure_name(self) -> str:
        return {"update": "secure aggregation", "metrics": "secure evaluation"}.get(
            self._purpose, "the secure sum of statistics"
        )

    def _tick_secure(self, now: float) -> list[Effect]:
        stage, server, secure = self._stage, self._secagg, self.plan.secure
        assert stage is not None and server is not None and secure is not None
        alive = set(self.alive(now))
        # A member that restarted after the attempt began can still advertise keys, but it holds
        # none of the keys its later stages need: waiting for it would only run out the deadline.
        still_working = [
            s
            for s in stage.members
            if s not in stage.received
            and s in alive
            and (self.phase == Phase.ADVERTISE or self._silos[s].joined_at <= self._train_started)
        ]
        if still_working and now < stage.deadline:
            return []
        phase = self.phase
        outcome: Any
        if phase == Phase.ADVERTISE:
            outcome, following = server.close_adverts(), Phase.SHARE
        elif phase == Phase.SHARE:
            outcome, following = server.close_shares(), Phase.MASKED
        elif phase == Phase.MASKED:
            outcome, following = server.close_masked(), Phase.UNMASK
        else:
            result = server.finish()
            if not result.completed:
                return self._fail_attempt(
                    f"round {self.round} attempt {self.attempt}: {self._secure_name()} did not complete "
                    f"({result.reason}); nothing was revealed",
                    now,
                )
            self._secagg = None
            if self._purpose == "statistics":
                self.phase = Phase.RECORD
                self._inputs, self._claims = {}, {}
                return [Counted(self.attempt, result.uploaded, {}, now - self._train_started, result.total)]
            if self._purpose == "metrics":
                self.phase = Phase.RECORD
                self._inputs, self._claims = {}, {}
                stage_s = now - self._train_started
                return [Evaluated(self.round, self.attempt, result.uploaded, {}, stage_s, result.total)]
            self.phase = Phase.AGGREGATE
            claims = {s: self._claims.get(s, {}) for s in result.uploaded}
            self._inputs, self._claims = {}, {}
            stage_s = now - self._train_started
            return [Aggregate(self.round, self.attempt, self._selected, claims, stage_s, result.total)]
        if isinstance(outcome, secagg.RoundAbort):
            return self._fail_attempt(
                f"round {self.round} attempt {self.attempt}: {self._secure_name()} aborted at {outcome.stage} "
                f"({outcome.reason}); nothing was revealed",
                now,
            )
        if phase == Phase.ADVERTISE:
            members = outcome.silo_ids()
        elif phase == Phase.SHARE:
            members = tuple(sorted(outcome))
        else:
            members = outcome.uploaded
        self._inputs[following] = outcome
        self.phase = following
        self._stage = _Stage(members=tuple(members), started=now, deadline=now + secure.stage_s)
        return []

    def _tick_reports(self, now: float) -> list[Effect]:
        """EVALUATE or STATISTICS in the clear: done when every live member reported, or at the deadline."""
        stage = self._stage
        assert stage is not None
        alive = set(self.alive(now))
        missing = [s for s in stage.members if s not in stage.received and s in alive]
        if missing and now < stage.deadline:
            return []
        reports = {s: sub.value for s, sub in stage.received.items()}
        if self.phase == Phase.STATISTICS:
            if not reports:
                return self._fail_attempt(f"round {self.round} attempt {self.attempt}: no silo sent statistics", now)
            self.phase = Phase.RECORD
            return [Counted(self.attempt, tuple(sorted(reports)), reports, now - stage.started)]
        self.phase = Phase.RECORD
        return [Evaluated(self.round, self.attempt, stage.members, reports, now - stage.started)]

    def statistics_recorded(self, statistics: PooledStatistics, now: float) -> None:
        """The driver pooled and checkpointed the run's statistics: round 0's training comes next."""
        if self.phase != Phase.RECORD or self._next != "statistics":
            raise RuntimeError(f"statistics_recorded() called in phase {self.phase}")
        self.statistics = statistics
        self.failures = 0
        self._gather("train", now)

    def refuse_result(self, message: str, now: float) -> list[Effect]:
        """The driver cannot use what the attempt produced (``message`` says why: summed statistics,
        an update sum or summed scores out of bounds): the attempt failed and is retried (the same
        stage again), or the run fails."""
        if self.phase not in (Phase.AGGREGATE, Phase.RECORD):
            raise RuntimeError(f"refuse_result() called in phase {self.phase}")
        return self._fail_attempt(f"round {self.round} attempt {self.attempt}: {message}", now)

    def aggregated(self, state_sha256: str, now: float) -> None:
        """The driver averaged the round's updates and checkpointed the new global state."""
        if self.phase != Phase.AGGREGATE:
            raise RuntimeError(f"aggregated() called in phase {self.phase}")
        self.state_sha256 = state_sha256
        self._gather("evaluate", now)

    def next_round(self, now: float) -> list[Effect]:
        """The driver recorded the round's evaluation and checkpointed it: move to the next round, to
        the final test (the driver first calls :meth:`select_state`), or to the end."""
        if self.phase != Phase.RECORD:
            raise RuntimeError(f"next_round() called in phase {self.phase}")
        if self._next != "final":
            self.round += 1
        self.attempt = -1
        self.failures = 0
        if self.round == self.plan.rounds and self.plan.final_test and self._next != "final":
            # The last round is recorded: evaluate the selected model on test once.
            self._gather("final", now)
            return []
        if self.round >= self.plan.rounds:
            self.phase = Phase.DONE
            self._next = "done"
            self._stage = None
            return [Finished(self.plan.rounds)]
        self._gather("train", now)
        return []

    def select_state(self, state_sha256: str) -> None:
        """The model the final test evaluates (the driver serves it from now on)."""
        if self.phase != Phase.RECORD or self.round != self.plan.rounds - 1 or not self.plan.final_test:
            raise RuntimeError("select_state() is for the end of the last round of a run with a final test")
        self.state_sha256 = state_sha256

    @property
    def final(self) -> bool:
        """Whether the running (or recorded) evaluation is the final test."""
        return self._next == "final"

    def status(self, now: float) -> dict[str, Any]:
        """Progress for the operator: round, stage, who is selected and who is done."""
        stage = self._stage if self.phase in _RUNNING else None
        return {
            "round": self.round,
            "rounds": self.plan.rounds,
            "attempt": self.attempt,
            "phase": self.phase.value,
            # What the current stage serves: the statistics, a round's training or evaluation, the final test.
            "pending": "done" if self.phase == Phase.DONE else self._next,
            "connected": list(self.alive(now)),
            "members": list(stage.members) if stage else [],
            "done": sorted(stage.received) if stage else [],
            "remaining_s": round(max(0.0, stage.deadline - now), 1) if stage else None,
            "failure": self.failure,
            "departed": self.departed(),
            "seen_ago_s": {silo: now - info.last_seen for silo, info in sorted(self._silos.items())},
        }
