"""The silo agent: a small state machine over the coordinator's tasks.

After joining (layout up, run settings down) the agent asks for its task in a long poll and acts
on what comes back:

- WAIT: ask again (the coordinator holds the call while nothing changes);
- TRAIN: take the global state (from the cache when it already holds it, else a checksummed
  download), run :func:`condi_models.training.train_local` unchanged on the local training
  split (with ``compute.workers`` > 1 in site.yaml, :func:`condi_models.distributed.train_on_workers`
  on that many processes), and upload the parameters and group weights; an update with NaN or
  infinity is never sent;
- secure aggregation instead of the plain upload: ADVERTISE_KEYS trains the same way, encodes
  the update as the secure vector (weighted clipped deltas and group weights, clipping counted)
  and sends fresh keys signed with the silo's certificate key; SHARE_KEYS, MASKED_INPUT and
  UNMASK drive :class:`federation.secagg.SecAggClient` with the task's inputs, peers' adverts
  checked against the federation CA. A silo whose own certificate that check refuses (revoked
  by its CRL, expired, not among the pinned peers) cannot take part: it tells the coordinator it
  leaves the run and exits with status 2;
- EVALUATE: take the new global state, evaluate it on the local validation (and, in the last
  round, test) split and report aggregate scores and the local normalization statistics;
- DONE: exit.

With ``privacy:`` in site.yaml the private phases train with DP-SGD
(:class:`condi_models.privacy.SiloPrivacy`): the budget's ledger is ``privacy-ledger.json`` and
the sampling and noise are keyed by ``dp.secret``, both in the state directory, so the spending
carries over restarts (and every run this state directory takes part in). Each update claims the
epsilon spent so far. When the next round would pass the budget the agent trains nothing, tells
the coordinator it leaves the run (``HeartbeatRequest.leaving``) and exits with status 0.

While working it sends heartbeats, so the coordinator knows it is alive. Tasks whose result the
coordinator acknowledged are recorded in the state directory and not repeated after a restart.
A coordinator that restarted asks the agent to join again; one that cannot be reached is retried
with backoff (see :mod:`silo_agent.client`).

For fault-injection tests the agent honours two environment variables: ``CONDI_FAULT_EXIT_AT=
ROUND:STAGE`` (exit hard once the state of that round's ``train`` or ``evaluate`` task is
loaded; for the secure stages ``advertise_keys``, ``share_keys``, ``masked_input`` and ``unmask``,
once the task arrives) and ``CONDI_FAULT_NAN_AT=ROUND`` (poison that round's update, which the agent then
refuses to send).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import torch

from condi_models.aggregation import SecureLayout, SiloUpdate
from condi_models.distributed import train_on_workers, worker_devices
from condi_models.evaluation import EvalResult, evaluate
from condi_models.nn.model import CondIModel, resolve_device
from condi_models.privacy import BudgetExhausted, SiloPrivacy, load_or_create_secret
from condi_models.training import LocalResult, TrainingProgress, aggregation_groups, train_local
from federation import identity, pki, secagg, wire
from federation import secagg_wire as sw
from federation.faults import SILO_EXIT_AT, FaultPoint, exit_hard, parse_exit_at
from federation.monitor_http import MonitorServer
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secure_metrics import METRICS_QUANT, MetricsEncodingError, MetricsLayout, encode_metrics
from federation.settings import RoundSettings, RunSettings, SettingsError
from federation.stages import StageKey, stage_name
from federation.statistics import STATISTICS_QUANT, PooledStatistics, StatisticsError, StatisticsLayout
from federation.transfer import (
    PROTOCOL_VERSION,
    NonFiniteUpdateError,
    TransferError,
    encode_plain_update,
    stage_key,
    stage_ref,
)
from silo_agent.client import CoordinatorClient, CoordinatorUnreachableError
from silo_agent.config import SiteConfig, expected_rounds
from silo_agent.local_data import LocalData, load_local_data
from silo_agent.state import LEDGER_FILE, SECRET_FILE, AgentState
from silo_agent.status import AgentStatus, silo_registry

log = logging.getLogger(__name__)

SOFTWARE = "condi-silo-agent"
# How long a GetTask may wait on the coordinator; it holds at most a third of its liveness window.
_LONG_POLL_MS = 30_000
# Coordinator answers that mean "this task is over or not yours": move on to the next task.
_MOVED_ON = frozenset(
    {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}
)
# What a silo still says about its update under secure aggregation.
_SECURE_CLAIMS = frozenset(
    {"phase_a_s", "phase_b_s", "download_s", "download_bytes", "epsilon", "delta", "noise_multiplier"}
)
_SECURE_STAGES = (pb.STAGE_ADVERTISE_KEYS, pb.STAGE_SHARE_KEYS, pb.STAGE_MASKED_INPUT, pb.STAGE_UNMASK)


class JoinRefusedError(RuntimeError):
    """The coordinator would not accept this silo; the message is its reason."""


class RunSkippedError(RuntimeError):
    """The coordinator's run is one this silo already refused by its policy."""


class PolicyRefusedError(RuntimeError):
    """The run breaks this site's policy; the message says how."""


@dataclass(frozen=True)
class Faults:
    """Failures to inject on purpose (tests and the harness); none by default."""

    exit_at: FaultPoint | None = None
    nan_at_round: int | None = None
    # (round, attempt) whose secure contribution is neither clipped nor weighted, as a hostile silo's.
    unclipped_at: tuple[int, int] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        """Read ``CONDI_FAULT_EXIT_AT=ROUND:STAGE`` and ``CONDI_FAULT_NAN_AT=ROUND``."""
        exit_at = parse_exit_at(SILO_EXIT_AT, env.get(SILO_EXIT_AT))
        nan = env.get("CONDI_FAULT_NAN_AT")
        if nan and not nan.isdigit():
            raise ValueError(f"CONDI_FAULT_NAN_AT={nan!r}: expected a round number")
        return cls(exit_at=exit_at, nan_at_round=int(nan) if nan else None)


class Heartbeats:
    """Sends the current status to the coordinator every ``interval_s`` while a task runs."""

    def __init__(self, client: CoordinatorClient, key: StageKey, interval_s: float) -> None:
        self._client = client
        self._key = key
        self._interval = interval_s
        self._status = "starting"
        self._progress = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def update(self, status: str, progress: float) -> None:
        """What the next heartbeat says."""
        self._status, self._progress = status, progress

    def training(self, p: TrainingProgress) -> None:
        """Progress hook for :func:`train_local`."""
        done = ((p.epoch - 1) * p.batches + p.batch) / max(1, p.epochs * p.batches)
        self.update(f"phase {p.phase} epoch {p.epoch}/{p.epochs} batch {p.batch}/{p.batches}", done)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._client.heartbeat(
                self._key, self._status, self._progress, timeout_s=max(1.0, self._interval)
            )

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


def split_report(result: EvalResult) -> dict[str, Any]:
    """One split's scores as the coordinator pools them: counts and aggregates, never a record."""
    c = result.classification
    imputation = None
    if result.imputation is not None:
        i = result.imputation
        imputation = {"n_entries": i.n_entries, "mae": i.mae, "rmse": i.rmse}
    return {
        "n": result.n_samples,
        "loss": result.loss,
        "accuracy": c.accuracy,
        "macro_f1": c.macro_f1,
        "macro_auroc": c.macro_auroc,
        "confusion_matrix": c.confusion_matrix,
        "imputation": imputation,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class _SecureRound:
    """This silo's side of one secure round attempt: the protocol client and what it will sum."""

    key: StageKey
    round_id: str
    client: secagg.SecAggClient
    vector: np.ndarray
    base_sha256: str
    claims: dict[str, Any]
    delivery: secagg.ShareDelivery | None = None


class SiloAgent:
    """One silo's participation in a federation run."""

    def __init__(
        self,
        cfg: SiteConfig,
        source: str | Path,
        *,
        faults: Faults | None = None,
        skip_runs: frozenset[str] = frozenset(),
    ) -> None:
        if cfg.coordinator is None or cfg.tls is None:
            raise ValueError(
                f"{source}: coordinator and tls sections are needed to take part in a federation"
            )
        self.cfg = cfg
        self.source = str(source)
        self.faults = faults or Faults()
        self.data: LocalData | None = None
        self.device = resolve_device(cfg.device)
        # Refused here, not at the first round, when the GPUs are fewer than the workers.
        worker_devices(self.device, cfg.compute.workers)
        self.state = AgentState(cfg.state_dir)
        # Runs this silo already refused by policy (a staying-up agent is not asked twice), and how
        # run() ended: done, budget, policy, skipped, identity, refused, unreachable.
        self.skip_runs = skip_runs
        self.outcome = ""
        self.joined_run: str | None = None
        self.status = AgentStatus(cfg.state_dir, cfg.silo_id, cfg.coordinator.address)
        self.client: CoordinatorClient | None = None
        self.run_id: str | None = None
        self.settings: RunSettings | None = None
        self.model: CondIModel | None = None
        self.poll_interval_s = 2.0
        self._refused: set[StageKey] = set()
        self._secure: _SecureRound | None = None
        self.privacy: SiloPrivacy | None = None
        # The federation's pooled statistics the data is scaled with, once a task brought them.
        self.statistics: PooledStatistics | None = None
        tls_cfg = cfg.tls
        passphrase = pki.read_passphrase(tls_cfg.passphrase_file, tls_cfg.passphrase_env)
        self._signing_key = pki.load_private_key(tls_cfg.key, passphrase)
        self._cert_pem = Path(tls_cfg.cert).read_bytes()
        ca = pki.load_certificate(tls_cfg.ca)
        revoked = frozenset if tls_cfg.crl is None else identity.RevocationList(tls_cfg.crl, ca).serials
        self._verify_cert = secagg.ca_cert_verifier(ca, revoked=revoked)
        if tls_cfg.peers is not None:
            self._verify_cert = secagg.pinned_cert_verifier(self._verify_cert, tls_cfg.peers)
        else:
            log.warning(
                "tls.peers is not set: secure aggregation takes any certificate of the federation CA, whose "
                "holder could add silos of its own to a round; pin the federation's silos to prevent it"
            )

    # ---- setup ------------------------------------------------------------------------------

    def _join(self) -> None:
        assert self.client is not None and self.data is not None
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            software_version=SOFTWARE,
            capabilities=["secure-aggregation", *(["gpu"] if self.device.type == "cuda" else [])],
            data=self.data.summary(),
        )
        reply = self.client.join(request)
        if not reply.accepted:
            raise JoinRefusedError(reply.reason)
        self.joined_run = reply.run_id
        if reply.run_id in self.skip_runs:
            raise RunSkippedError(reply.run_id)
        violation = self._policy_violation(None, reply)
        if violation is not None:
            raise PolicyRefusedError(violation)
        if reply.silo_id != self.cfg.silo_id:
            log.warning(
                "the coordinator knows this certificate as silo %s, site.yaml says %s",
                reply.silo_id,
                self.cfg.silo_id,
            )
        settings = RunSettings.from_json(reply.model_config_json)
        if settings != self.settings or reply.run_id != self.run_id:
            self.settings = settings
            self.model = CondIModel(settings.model).to(self.device)
            self._group_names = aggregation_groups(self.model).group_names()
            self._param_names = tuple(aggregation_groups(self.model).assignment)
            state = self.model.state_to_named_tensors()
            self._expected = {k: (v.numpy().dtype, tuple(v.shape)) for k, v in state.items()}
            self._state_bytes = sum(v.numel() * v.element_size() for v in state.values())
        self.run_id = reply.run_id
        self.state.enter_run(reply.run_id)
        self.status.activity("waiting", run_id=reply.run_id)
        if self.cfg.privacy is not None and self.privacy is None:
            self.privacy = self._open_privacy(reply)
        self.poll_interval_s = max(0.05, reply.poll_interval_ms / 1000.0)
        log.info(
            "joined run %s of federation %s as %s (coordinator %s)",
            reply.run_id,
            reply.federation_name,
            reply.silo_id,
            reply.software_version,
        )

    def _open_privacy(self, reply: pb.JoinReply) -> SiloPrivacy:
        """The silo's DP-SGD budget, its ledger and secret in the state directory; planned rounds from
        site.yaml, else from the run's participation plan in the JoinReply."""
        site = self.cfg.privacy
        assert site is not None
        planned = site.planned_rounds
        if planned is None:
            try:
                planned = expected_rounds(reply.rounds, reply.silos_per_round, reply.allowed_silos)
            except ValueError as exc:
                raise SettingsError(
                    f"{self.source}: privacy.planned_rounds is not set and the coordinator sent no participation "
                    f"plan ({exc}); set privacy.planned_rounds"
                ) from None
            log.info(
                "privacy: planning for %d rounds (%d rounds, %d of %d silos per round; set privacy.planned_rounds "
                "to change it)",
                planned,
                reply.rounds,
                reply.silos_per_round,
                reply.allowed_silos,
            )
        root = Path(self.cfg.state_dir)
        privacy = SiloPrivacy(
            site.spec(planned), root / LEDGER_FILE, secret=load_or_create_secret(root / SECRET_FILE)
        )
        spec = privacy.spec
        log.info(
            "privacy: DP-SGD on phases %s, target epsilon %g at delta %g, max grad norm %g, %s accountant; "
            "spent so far %.4g over %d rounds (ledger %s)",
            "+".join(spec.phases),
            spec.target_epsilon,
            spec.delta,
            spec.max_grad_norm,
            spec.accountant,
            privacy.epsilon_spent(),
            privacy.ledger.rounds,
            privacy.ledger.path,
        )
        return privacy

    def _leave(self, exc: BudgetExhausted) -> int:
        """The budget is spent: tell the coordinator this silo leaves the run, then end with status 0."""
        log.warning("%s", exc)
        self._depart(
            f"privacy budget spent: epsilon {exc.spent:.4g} of {exc.target:g} over {exc.rounds_done} of "
            f"{exc.planned_rounds} planned rounds"
        )
        return 0

    def _depart(self, reason: str) -> None:
        """Tell the coordinator this silo leaves the run for good, and why (it records the reason)."""
        assert self.client is not None
        timeout = self.client.endpoint.rpc_timeout_s
        request = pb.HeartbeatRequest(status="leaving", leaving=reason)
        try:
            self.client.retrying("Heartbeat", lambda: self.client.stub.Heartbeat(request, timeout=timeout))
        except (grpc.RpcError, CoordinatorUnreachableError) as err:
            # The coordinator then stops waiting for this silo once its liveness window passes.
            detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            log.warning("could not tell the coordinator that this silo leaves (%s)", detail)
        log.info("silo %s leaves the run: %s", self.cfg.silo_id, reason)

    def _policy_violation(self, task: pb.Task | None, reply: pb.JoinReply | None = None) -> str | None:
        """Why the run or ``task`` breaks this site's policy (site.yaml ``policy:``), or None."""
        policy = self.cfg.policy
        if reply is not None and policy.max_rounds is not None and reply.rounds > policy.max_rounds:
            return f"the run has {reply.rounds} rounds, site policy allows at most {policy.max_rounds}"
        if task is None:
            return None
        if policy.require_secure_aggregation and task.aggregation != pb.AGGREGATION_MODE_SECURE:
            return (
                "site policy requires secure aggregation, and this run is plain "
                "(the coordinator would see this silo's data sums and updates)"
            )
        if task.threshold and task.threshold < policy.min_threshold:
            return f"threshold t = {task.threshold}, site policy requires at least {policy.min_threshold}"
        if task.selected and len(task.selected) < policy.min_silos_per_round:
            return f"{len(task.selected)} silos in this stage, site policy requires {policy.min_silos_per_round}"
        return None

    def _refuse_by_policy(self, reason: str) -> int:
        log.error("silo %s refuses the run: %s", self.cfg.silo_id, reason)
        self._depart(f"refused by site policy: {reason}")
        return 2

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Take part until the run is over: 0 when it ended, 1 when the coordinator was lost, 2 if refused."""
        assert self.cfg.coordinator is not None and self.cfg.tls is not None
        self.data = load_local_data(self.cfg, self.source)
        log.info(
            "silo %s: %d train / %d val / %d test samples; device %s",
            self.cfg.silo_id,
            len(self.data.train),
            len(self.data.val),
            len(self.data.test),
            self.device,
        )
        self.client = CoordinatorClient(self.cfg.coordinator, self.cfg.tls, self.cfg.silo_id)
        monitor = None
        if self.cfg.monitor is not None:
            monitor = MonitorServer(self.cfg.monitor, silo_registry(self.status, self._epsilon))
            monitor.start()
        self.status.activity("joining")
        try:
            self._join()
            code = self._loop()
            self.outcome = "done"
            return code
        except BudgetExhausted as exc:
            self.outcome = "budget"
            self.status.activity("left: privacy budget spent")
            return self._leave(exc)
        except PolicyRefusedError as exc:
            self.outcome = "policy"
            self.status.activity(f"left: refused by site policy: {exc}")
            return self._refuse_by_policy(str(exc))
        except RunSkippedError as exc:
            self.outcome = "skipped"
            self.status.activity(f"waiting: run {exc} was refused by site policy")
            return 0
        except secagg.IdentityError as exc:
            self.outcome = "identity"
            # Every peer would refuse this silo's adverts, in this round and every later one.
            log.error("silo %s cannot take part in secure aggregation: %s", self.cfg.silo_id, exc)
            self.status.error(f"cannot take part in secure aggregation: {exc}")
            self._depart(f"its certificate cannot be used for secure aggregation: {exc}")
            return 2
        except JoinRefusedError as exc:
            self.outcome = "refused"
            log.error("the coordinator refused silo %s: %s", self.cfg.silo_id, exc)
            self.status.error(f"join refused: {exc}")
            return 2
        except CoordinatorUnreachableError as exc:
            self.outcome = "unreachable"
            log.error("%s", exc)
            self.status.error(str(exc))
            return 1
        except grpc.RpcError as exc:
            # Refused by the identity check (revoked, not on the allow-list) or the protocol.
            self.outcome = "identity" if exc.code() == grpc.StatusCode.PERMISSION_DENIED else "refused"
            log.error(
                "the coordinator refused silo %s (%s: %s)", self.cfg.silo_id, exc.code().name, exc.details()
            )
            self.status.error(f"refused ({exc.code().name}: {exc.details()})")
            return 2
        finally:
            if self.status.snapshot()["activity"] in ("joining", "waiting", "working"):
                self.status.activity("stopped")
            self.client.close()
            if monitor is not None:
                monitor.stop()

    def _epsilon(self) -> tuple[float, float] | None:
        """(epsilon spent, target) for the metrics endpoint, or None without DP."""
        if self.privacy is None:
            return None
        return self.privacy.epsilon_spent(), self.privacy.spec.target_epsilon

    def _loop(self) -> int:
        assert self.client is not None
        last: StageKey | None = None
        while True:
            asked = time.monotonic()
            try:
                task = self.client.get_task(last, _LONG_POLL_MS)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                log.info("joining again: %s", exc.details())
                self._join()
                last = None
                continue
            try:
                key = stage_key(task.ref)
            except TransferError as exc:
                # A stage of a newer protocol: nothing this silo can do but wait for the next task.
                log.warning("a task this silo cannot take: %s", exc)
                time.sleep(task.poll_after_ms / 1000.0 or self.poll_interval_s)
                continue
            if key.stage == pb.STAGE_DONE:
                log.info("the run is over: %s", task.message)
                self.status.activity("done")
                return 0
            workable = key.stage in (pb.STAGE_STATISTICS, pb.STAGE_TRAIN, pb.STAGE_EVALUATE, *_SECURE_STAGES)
            if workable and not self.state.is_done(key) and key not in self._refused:
                violation = self._policy_violation(task)
                if violation is not None:
                    raise PolicyRefusedError(violation)
                self.status.task_started(key, task.remaining_ms)
                self.status.task_finished(key, self._work(task, key))
            elif key == last and time.monotonic() - asked < 0.05:
                time.sleep(task.poll_after_ms / 1000.0 or self.poll_interval_s)
            last = key

    def _work(self, task: pb.Task, key: StageKey) -> str | None:
        """Carry out a task; returns None when it went through, else why not (also logged)."""
        assert self.client is not None
        try:
            with Heartbeats(self.client, key, self.poll_interval_s) as beats:
                if key.stage == pb.STAGE_STATISTICS:
                    self._report_statistics(key)
                elif key.stage == pb.STAGE_TRAIN:
                    self._train(task, key, beats)
                elif key.stage == pb.STAGE_EVALUATE:
                    self._evaluate(task, key, beats)
                else:
                    self._secure_stage(task, key, beats)
        except grpc.RpcError as exc:
            if exc.code() in _MOVED_ON:
                log.warning(
                    "%s: the coordinator moved on (%s: %s)", key.describe(), exc.code().name, exc.details()
                )
                # Not taken up again: a task the coordinator turned down is not retried from scratch.
                self._refused.add(key)
                return f"the coordinator moved on ({exc.code().name}: {exc.details()})"
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            log.error(
                "%s refused by the coordinator (%s: %s)", key.describe(), exc.code().name, exc.details()
            )
            self._refused.add(key)
            return f"refused by the coordinator ({exc.code().name}: {exc.details()})"
        except (SettingsError, StatisticsError, wire.WireError, secagg.ProtocolError, secagg.MessageError) as exc:
            log.error("%s cannot be carried out: %s", key.describe(), exc)
            self._refused.add(key)
            return f"cannot be carried out: {exc}"
        return None

    def _load_global_state(self, task: pb.Task, key: StageKey) -> tuple[float, int]:
        """Put the task's global state into the model; returns seconds spent and bytes downloaded."""
        assert self.client is not None and self.model is not None
        t0 = time.perf_counter()
        encoded = self.state.cached_state(task.state_sha256)
        received = 0
        if encoded is None:
            encoded, received = self.client.download_state(key, task.state_sha256, self._state_bytes)
            self.status.transferred(downloaded=received)
            self.state.keep_state(encoded)
        tensors = wire.decode_state(encoded.manifest, encoded.payload, self._expected, finite=True)
        self.model.load_named_tensors({k: torch.from_numpy(v) for k, v in tensors.items()})
        if self.faults.exit_at is not None and self.faults.exit_at.reached(key.round, key.stage):
            exit_hard(log, f"stopping in {key.describe()}")
        return time.perf_counter() - t0, received

    def _train_round(
        self, task: pb.Task, key: StageKey, beats: Heartbeats
    ) -> tuple[RoundSettings, dict[str, np.ndarray], LocalResult, dict[str, Any]]:
        """Load the task's global state and train on it: the settings, the global parameters, the
        local result and the claims about it."""
        assert self.client is not None and self.model is not None and self.settings is not None and self.data
        plan = RoundSettings.from_json(task.round_config_json)
        if plan.train_seed is None:
            raise SettingsError(f"round settings: a {stage_name(key.stage)} task needs train_seed")
        self._adopt_statistics(plan)
        beats.update("downloading the global state", 0.0)
        download_s, received = self._load_global_state(task, key)
        named = self.model.state_to_named_tensors()
        start = {n: named[n].numpy().copy() for n in self._param_names}
        workers = self.cfg.compute.workers
        train = train_local if workers == 1 else partial(train_on_workers, workers=workers)
        result = train(
            self.model,
            self.data.train,
            self.settings.training,
            seed=plan.train_seed,
            device=self.device,
            progress=beats.training,
            privacy=self.privacy,
            lr_scale=plan.lr_scale,
            class_counts=None if self.statistics is None else np.asarray(self.statistics.class_counts),
        )
        claims = {
            "phase_a_loss": _finite_or_none(result.phase_a_loss),
            "phase_b_loss": _finite_or_none(result.phase_b_loss),
            "phase_a_s": result.seconds_a,
            "phase_b_s": result.seconds_b,
            "download_s": download_s,
            "download_bytes": received,
        }
        if "epsilon" in result.extra:
            claims.update(
                epsilon=result.extra["epsilon"],
                delta=result.extra["delta"],
                noise_multiplier=result.extra["noise_multiplier"],
            )
            assert self.privacy is not None
            log.info(
                "%s: DP-SGD epsilon spent %.4g of %g (delta %g) after %d rounds; noise multiplier %.4g",
                key.describe(),
                result.extra["epsilon"],
                self.privacy.spec.target_epsilon,
                result.extra["delta"],
                self.privacy.ledger.rounds,
                result.extra["noise_multiplier"],
            )
        return plan, start, result, claims

    def _train(self, task: pb.Task, key: StageKey, beats: Heartbeats) -> None:
        assert self.client is not None and self.model is not None
        _, _, result, claims = self._train_round(task, key, beats)
        named = self.model.state_to_named_tensors()
        params = {n: named[n].numpy() for n in self._param_names}
        if self.faults.nan_at_round == key.round:
            first = self._param_names[0]
            params[first] = params[first].copy()
            params[first].flat[0] = np.nan
            log.warning(
                "fault injection: poisoning tensor %s of the %s update with NaN", first, key.describe()
            )
        try:
            encoded = encode_plain_update(params, result.group_weights, self._group_names)
        except NonFiniteUpdateError as exc:
            log.error("refusing to send the update of %s: %s", key.describe(), exc)
            self._refused.add(key)
            return
        header = pb.UpdateHeader(
            ref=stage_ref(key),
            encoding=pb.UPDATE_ENCODING_PLAIN,
            base_state_sha256=task.state_sha256,
            num_examples=result.n_samples,
            claims_json=json.dumps(claims),
        )
        beats.update("uploading the update", 1.0)
        receipt = self.client.upload(header, encoded)
        self.status.transferred(uploaded=encoded.manifest.payload_bytes)
        self.state.mark_done(key)
        log.info(
            "%s: update %s (%d samples; loss A %s, B %s; %.1f s + %.1f s)",
            key.describe(),
            "already accepted" if receipt.duplicate else "accepted",
            result.n_samples,
            f"{result.phase_a_loss:.4f}",
            f"{result.phase_b_loss:.4f}",
            result.seconds_a,
            result.seconds_b,
        )

    def _secure_stage(self, task: pb.Task, key: StageKey, beats: Heartbeats) -> None:
        assert self.client is not None and self.run_id is not None
        exit_at = self.faults.exit_at
        if key.stage != pb.STAGE_ADVERTISE_KEYS and exit_at is not None and exit_at.reached(key.round, key.stage):
            exit_hard(log, f"stopping in {key.describe()}")
        if task.aggregation != pb.AGGREGATION_MODE_SECURE:
            raise SettingsError(f"{key.describe()}: a secure-aggregation stage in a run that is not secure")
        if not 2 * task.threshold > len(task.selected):
            raise secagg.ProtocolError(
                f"threshold t={task.threshold} is not more than half of the {len(task.selected)} selected silos"
            )
        timeout = self.client.endpoint.rpc_timeout_s
        stub = self.client.stub
        ref = stage_ref(key)
        if key.stage == pb.STAGE_ADVERTISE_KEYS:
            plan = RoundSettings.from_json(task.round_config_json)
            if plan.secagg is not None and plan.secagg.content == "metrics":
                advert = self._start_secure_metrics(task, key, plan, beats)
            elif plan.secagg is not None and plan.secagg.content == "statistics":
                advert = self._start_secure_statistics(task, key, plan)
            else:
                advert = self._start_secure(task, key, beats)
            request = sw.advert_to_proto(ref, advert)
            receipt = self.client.retrying("AdvertiseKeys", lambda: stub.AdvertiseKeys(request, timeout=timeout))
        else:
            current = self._secure
            if current is None or (current.key.round, current.key.attempt) != (key.round, key.attempt):
                raise secagg.ProtocolError(f"{key.describe()}: this silo holds no keys of that round attempt")
            rid = current.round_id
            if key.stage == pb.STAGE_SHARE_KEYS:
                shares = current.client.share_keys(sw.roster_from_proto(rid, task.key_roster))
                share_request = pb.ShareKeysRequest(ref=ref, shares=sw.share_keys_to_proto(shares))
                receipt = self.client.retrying("ShareKeys", lambda: stub.ShareKeys(share_request, timeout=timeout))
            elif key.stage == pb.STAGE_MASKED_INPUT:
                beats.update("uploading the masked update", 1.0)
                current.delivery = sw.delivery_from_proto(rid, self.cfg.silo_id, task.shares)
                masked = current.client.masked_input(current.delivery, current.vector)
                dtype = np.dtype(f"<u{masked.ring_bits // 8}")
                encoded = wire.encode_state({"masked": np.frombuffer(masked.data, dtype=dtype)})
                header = pb.UpdateHeader(
                    ref=ref,
                    encoding=pb.UPDATE_ENCODING_MASKED,
                    base_state_sha256=current.base_sha256,
                    claims_json=json.dumps(current.claims),
                )
                receipt = self.client.upload(header, encoded)
                self.status.transferred(uploaded=encoded.manifest.payload_bytes)
            else:
                if current.delivery is None:
                    raise secagg.ProtocolError(f"{key.describe()}: no masked input was sent in this attempt")
                request_in = sw.unmask_request_from_proto(rid, task.survivors, current.delivery)
                shares_out = sw.unmask_response_to_proto(current.client.unmask(request_in))
                unmask_request = pb.UnmaskRequest(ref=ref, shares=shares_out)
                receipt = self.client.retrying("Unmask", lambda: stub.Unmask(unmask_request, timeout=timeout))
                self._secure = None
        self.state.mark_done(key)
        log.info(
            "%s: %s", key.describe(), "already accepted" if receipt.duplicate else "accepted"
        )

    def _start_secure(self, task: pb.Task, key: StageKey, beats: Heartbeats) -> secagg.KeyAdvert:
        """Train, encode the update for the secure sum and make this attempt's protocol client."""
        assert self.model is not None and self.run_id is not None
        plan, start, result, claims = self._train_round(task, key, beats)
        if plan.secagg is None:
            raise SettingsError("round settings: an ADVERTISE_KEYS task needs the secagg encoding")
        enc = plan.secagg
        named = self.model.state_to_named_tensors()
        params = {n: named[n].numpy() for n in self._param_names}
        if self.faults.nan_at_round == key.round:
            params[self._param_names[0]] = np.full_like(params[self._param_names[0]], np.nan)
            log.warning("fault injection: poisoning the %s update with NaN", key.describe())
        groups = aggregation_groups(self.model)
        layout = SecureLayout(groups, {n: v.shape for n, v in start.items()}, enc.clip_bound, enc.weight_unit)
        if layout.vector_length != enc.vector_length:
            raise SettingsError(
                f"round settings: secagg.vector_length {enc.vector_length}, this model gives {layout.vector_length}"
            )
        try:
            contribution = layout.contribution(start, SiloUpdate(params, result.group_weights))
        except ValueError as exc:
            raise secagg.ProtocolError(f"refusing to send the update of {key.describe()}: {exc}") from exc
        vector = contribution.vector
        if self.faults.unclipped_at == (key.round, key.attempt):
            # Every entry at the clip bound whatever its weight: what the ring can carry of an update
            # that was neither clipped nor weighted.
            log.warning("fault injection: the %s contribution unweighted at +%g", key.describe(), enc.clip_bound)
            vector = vector.copy()
            vector[: -len(groups.group_names())] = enc.clip_bound
        elif contribution.clipped:
            log.warning("%s: clipped %d update entries to +-%g", key.describe(), contribution.clipped, enc.clip_bound)
        capped = sorted(g for g, w in result.group_weights.items() if w > enc.weight_unit)
        if capped:
            log.warning(
                "%s: group weights %s exceed weight_unit %g samples and count as %g",
                key.describe(),
                capped,
                enc.weight_unit,
                enc.weight_unit,
            )
        # Sample counts and losses would tell the coordinator what the secure sum hides; only timings,
        # bytes and the DP budget spent go out in the clear.
        public = {k: v for k, v in claims.items() if k in _SECURE_CLAIMS}
        quant = secagg.QuantConfig(enc.clip_bound, enc.frac_bits, enc.ring_bits)
        return self._begin_secure(task, key, quant, vector, public, plan.train_seed or 0)

    def _begin_secure(
        self,
        task: pb.Task,
        key: StageKey,
        quant: secagg.QuantConfig,
        vector: np.ndarray,
        claims: dict[str, Any],
        rounding_seed: int,
    ) -> secagg.KeyAdvert:
        """This attempt's protocol client for summing ``vector``; returns its signed key advert."""
        assert self.run_id is not None
        round_id = sw.secure_round_id(self.run_id, key.round, key.attempt)
        client = secagg.SecAggClient(
            secagg.RoundConfig(round_id, task.threshold, vector.size, quant),
            self.cfg.silo_id,
            self._signing_key,
            self._cert_pem,
            self._verify_cert,
            rounding_seed=rounding_seed,
            min_roster=self.cfg.policy.min_silos_per_round,
        )
        self._secure = _SecureRound(key, round_id, client, vector, task.state_sha256, claims)
        return client.advertise()

    def _report_statistics(self, key: StageKey) -> None:
        """Send the sums over the local training split in the clear (plain aggregation)."""
        assert self.client is not None and self.data is not None
        metrics = {"statistics": self.data.statistics().to_dict()}
        receipt = self.client.report_metrics(pb.MetricsReport(ref=stage_ref(key), metrics_json=json.dumps(metrics)))
        self.state.mark_done(key)
        log.info("%s: statistics %s", key.describe(), "already accepted" if receipt.duplicate else "accepted")

    def _start_secure_statistics(self, task: pb.Task, key: StageKey, plan: RoundSettings) -> secagg.KeyAdvert:
        """Write the sums over the local training split as a vector and make this attempt's protocol client."""
        assert self.data is not None and plan.secagg is not None
        enc = plan.secagg
        assert self.settings is not None
        layout = StatisticsLayout.of(self.settings.layout)
        quant = secagg.QuantConfig(enc.clip_bound, enc.frac_bits, enc.ring_bits)
        if enc.vector_length != layout.vector_length or quant != STATISTICS_QUANT:
            raise SettingsError(
                f"round settings: a statistics sum of {enc.vector_length} entries in {quant}; this silo lays "
                f"its sums out as {layout.vector_length} entries in {STATISTICS_QUANT}"
            )
        vector = self.data.statistics().to_vector(layout)
        log.info("%s: the sums over the training split go into a secure sum", key.describe())
        return self._begin_secure(task, key, quant, vector, {}, 0)

    def _adopt_statistics(self, plan: RoundSettings) -> None:
        """Scale the data with the federation's pooled normalizer the first time a task brings it."""
        assert self.data is not None and self.settings is not None
        stats = plan.statistics
        if stats is None or stats == self.statistics:
            return
        layout = self.settings.layout
        stats.check_layout(layout.n_features, len(layout.classes), "round settings: statistics")
        self.data = self.data.scaled_with(stats.normalizer)
        self.statistics = stats
        log.info(
            "scaling this silo's data with the federation's normalizer (%d silos, %d training records)",
            stats.silos,
            sum(stats.class_counts),
        )

    def _start_secure_metrics(
        self, task: pb.Task, key: StageKey, plan: RoundSettings, beats: Heartbeats
    ) -> secagg.KeyAdvert:
        """Evaluate, write the scores as a vector of sums and make this attempt's protocol client."""
        assert self.run_id is not None and self.data and self.settings is not None
        enc = plan.secagg
        assert enc is not None
        layout = MetricsLayout(len(self.settings.layout.classes), plan.eval_splits)
        quant = secagg.QuantConfig(enc.clip_bound, enc.frac_bits, enc.ring_bits)
        if enc.vector_length != layout.vector_length or quant != METRICS_QUANT:
            raise SettingsError(
                f"round settings: a metrics sum of {enc.vector_length} entries in {quant}; this silo lays its "
                f"scores out as {layout.vector_length} entries in {METRICS_QUANT}"
            )
        results = self._evaluate_splits(task, key, plan, beats)
        try:
            vector = encode_metrics(layout, results)
        except MetricsEncodingError as exc:
            raise secagg.ProtocolError(f"refusing to send the metrics of {key.describe()}: {exc}") from exc
        log.info("%s: evaluated %s; the scores go into a secure sum", key.describe(), ", ".join(plan.eval_splits))
        return self._begin_secure(task, key, quant, vector, {}, plan.eval_seed or 0)

    def _evaluate_splits(
        self, task: pb.Task, key: StageKey, plan: RoundSettings, beats: Heartbeats
    ) -> dict[str, EvalResult]:
        """Load the task's global state and evaluate it on each local split the round names."""
        assert self.model is not None and self.settings is not None and self.data
        if plan.eval_seed is None or not plan.eval_splits:
            raise SettingsError(f"round settings: evaluation in {key.describe()} needs eval_seed and eval_splits")
        self._adopt_statistics(plan)
        beats.update("downloading the global state", 0.0)
        self._load_global_state(task, key)
        results = {}
        for i, name in enumerate(plan.eval_splits):
            beats.update(f"evaluating on the {name} split", i / len(plan.eval_splits))
            results[name] = evaluate(
                self.model,
                self.data.split(name),
                window=self.settings.training.window,
                opts=self.settings.evaluation,
                seed=plan.eval_seed,
                device=self.device,
            )
        return results

    def _evaluate(self, task: pb.Task, key: StageKey, beats: Heartbeats) -> None:
        assert self.client is not None and self.data
        plan = RoundSettings.from_json(task.round_config_json)
        splits = {name: split_report(r) for name, r in self._evaluate_splits(task, key, plan, beats).items()}
        metrics = {"splits": splits}
        receipt = self.client.report_metrics(
            pb.MetricsReport(ref=stage_ref(key), metrics_json=json.dumps(metrics))
        )
        self.state.mark_done(key)
        name, first = next(iter(splits.items()))
        log.info(
            "%s: metrics %s (%s accuracy %.3f on %d samples)",
            key.describe(),
            "already accepted" if receipt.duplicate else "accepted",
            name,
            first["accuracy"],
            first["n"],
        )
