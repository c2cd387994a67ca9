"""``condi harness``: a whole federation on this machine, over real gRPC and mutual TLS.

The harness makes a throwaway PKI, writes ``federation.yaml`` and one ``site.yaml`` per silo into
a run directory, and starts the coordinator and N silo-agent processes on 127.0.0.1 (a free port
picked at start), each with its own log file. Every silo loads the same data source and keeps
its own patient-disjoint Dirichlet share of it (synthetic 12-lead ECG by default, the shared
PTB-XL with ``--data ptbxl``). It shows progress, waits for the run to end and returns where the
report is.

Secure aggregation is on unless ``--plain`` (then the coordinator sees every update, and says so);
``--secure-metrics`` sums the silos' evaluation scores securely as well.
``--dp`` trains every silo with DP-SGD: each site.yaml gets a ``privacy:`` section with
``--dp-epsilon`` (default 8) and ``--dp-delta`` (default 1e-5), and ``--dp-planned-rounds`` when
given (else each silo plans for its expected share of the rounds); the summary gives the epsilon
each silo spent.

Fault injection: ``--kill-silo ID:ROUND:STAGE`` makes that silo exit hard in that round's
``train`` or ``evaluate`` stage, or in a secure stage (``advertise_keys``, ``share_keys``,
``masked_input``, ``unmask``); ``--nan-update ID:ROUND`` makes it produce a NaN update (which it
refuses to send); ``--restart-coordinator-at ROUND[:STAGE]`` makes the coordinator exit hard right
after it accepts the first submission of that round's stage (``train`` by default; in secure mode
a secure stage), and starts it again from its checkpoint. Both faults are injected at a named
point, not by racing a poll, so a fault run always hits them. ``--restart-killed`` starts a silo
killed by ``--kill-silo`` again (without the fault), on the same state directory. ``--churn`` is
a soak: every silo is killed twice and the coordinator twice at fault points drawn from
``--seed`` (:mod:`federation.churn`), each restarted on its state; afterwards ``churn.json``
holds the schedule, the kills and restarts seen, and ``coordinator replay``'s check that every
round was recorded once and that the model equals the replay of the run's journal.

Run directory layout: ``pki/``, ``federation.yaml``, ``sites/<id>.yaml``, ``logs/<process>.log``,
``coordinator/`` (checkpoint, metrics.jsonl, status.json, events.jsonl, audit.jsonl, report.json,
curves.png, global_model.npz) and ``silos/<id>/`` (each agent's state directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import yaml
from pydantic import TypeAdapter

from condi_models.data.sources import DataLayout, DataSource, source_layout
from federation import faults, pki
from federation.churn import ChurnError, ChurnPlan
from federation.stages import stage_label

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PTBXL = REPO.parent / "shared" / "data" / "ptbxl"
_DATA_SOURCE: TypeAdapter[DataSource] = TypeAdapter(DataSource)


@dataclass(frozen=True)
class Profile:
    """Data, model and training sizes of a harness run."""

    records_per_silo: int
    seconds: float
    model: Mapping[str, Any]
    training: Mapping[str, Any]
    evaluation: Mapping[str, Any]
    missingness: Mapping[str, Any] | None
    partition_alpha: float


_SMALL_MODEL = {
    "embed_dim": 16,
    "cond_dim": 16,
    "denoiser": {"hidden": 32, "n_blocks": 1, "n_heads": 2},
    "context": {"stem_dim": 16, "expert_hidden": 32, "out_dim": 16},
    "classifier": {"hidden": 32, "n_blocks": 1, "n_heads": 2, "head_hidden": 64},
}

PROFILES: dict[str, Profile] = {
    # CI: seconds per round; checks the mechanism, not the learning.
    "tiny": Profile(
        records_per_silo=40,
        seconds=2.5,
        model=_SMALL_MODEL,
        # The prior's EM refit and the gate and band fits still run every round, at a fraction of
        # the default's cost (3 EM steps, not 20: they were two thirds of a silo's round here).
        training={"epochs_a": 1, "epochs_b": 1, "batch_size": 32, "window": 250, "min_local_steps": 0,
                  "prior_em_iterations": 3, "band_windows": 4, "impute_steps": 3},
        evaluation={"n_samples": 1, "steps": 2, "batch_size": 64},
        missingness={"ps": 0.5, "pw": 0.5, "pattern": "points", "seed": 0},
        partition_alpha=0.5,
    ),
    # make demo: a few minutes on CPU, accuracy visibly rising over the rounds.
    "demo": Profile(
        records_per_silo=150,
        seconds=2.5,
        model=_SMALL_MODEL,
        training={"epochs_a": 1, "epochs_b": 4, "batch_size": 32, "window": 250},
        evaluation={"n_samples": 1, "steps": 3, "batch_size": 128},
        missingness={"ps": 0.5, "pw": 0.5, "pattern": "points", "seed": 0},
        # Milder label skew than the paper's 0.5, so that a few rounds show learning.
        partition_alpha=5.0,
    ),
}


@dataclass(frozen=True)
class HarnessOptions:
    """What ``condi harness`` runs."""

    out: Path
    silos: int = 3
    rounds: int = 2
    per_round: int | None = None
    min_silos: int | None = None
    data: Literal["synthetic", "ptbxl"] = "synthetic"
    ptbxl_path: Path = DEFAULT_PTBXL
    profile: str = "tiny"
    seed: int = 0
    kill_silo: tuple[str, int, str] | None = None
    # Further silos to kill, each at its own round and stage (one kill per silo).
    kill_silos: tuple[tuple[str, int, str], ...] = ()
    nan_update: tuple[str, int] | None = None
    # (round, stage): the coordinator dies on that stage's first accepted submission and is restarted.
    restart_coordinator_at: tuple[int, str] | None = None
    secure: bool = True
    # Evaluation scores go through a secure sum too (secure mode only).
    secure_metrics: bool = False
    threshold: float | int | None = None
    model: Mapping[str, Any] | None = None
    timeouts: Mapping[str, float] = field(default_factory=dict)
    max_attempts: int = 3
    timeout_s: float = 1800.0
    restart_killed: bool = False
    # A seeded soak: each silo killed twice and the coordinator twice, at drawn fault points, each
    # restarted; the run is then replayed from its journal (federation.churn).
    churn: bool = False
    dp: bool = False
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_planned_rounds: int | None = None
    # Per-silo changes to the privacy section (e.g. a smaller planned_rounds for one silo).
    privacy_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Serve metrics (and the coordinator's web view) on loopback ports, named in the written configs.
    monitor: bool = False

    def privacy(self, silo: str) -> dict[str, Any] | None:
        """The ``privacy:`` section of ``silo``'s site.yaml, or None without ``dp``."""
        if not self.dp:
            return None
        section: dict[str, Any] = {"target_epsilon": self.dp_epsilon, "delta": self.dp_delta}
        if self.dp_planned_rounds is not None:
            section["planned_rounds"] = self.dp_planned_rounds
        return {**section, **self.privacy_overrides.get(silo, {})}

    def silo_ids(self) -> list[str]:
        """silo-1 .. silo-N."""
        return [f"silo-{i}" for i in range(1, self.silos + 1)]

    def plan(self) -> tuple[int, int]:
        """Silos per round and the minimum per round."""
        per_round = self.per_round if self.per_round is not None else min(3, self.silos)
        minimum = self.min_silos if self.min_silos is not None else max(1, per_round - 1)
        return per_round, minimum


@dataclass(frozen=True)
class HarnessResult:
    """How the run ended and where its files are."""

    out: Path
    run_dir: Path
    report: Path | None
    coordinator_exit: int
    silo_exits: dict[str, int | None]
    coordinator_starts: int
    # With --churn: the schedule, what happened (kills and restarts) and the replay check.
    churn: dict[str, Any] | None = None


class HarnessError(RuntimeError):
    """The harness could not set up or finish the run; the message says what and where to look."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_configs(opts: HarnessOptions, port: int) -> tuple[Path, dict[str, Path]]:
    """Make the dev PKI and write federation.yaml and every site.yaml; returns their paths."""
    if opts.profile not in PROFILES:
        raise HarnessError(f"unknown profile {opts.profile!r}; expected one of {sorted(PROFILES)}")
    if opts.data == "ptbxl" and not opts.ptbxl_path.is_dir():
        raise HarnessError(f"--data ptbxl: {opts.ptbxl_path} is not a folder")
    profile = PROFILES[opts.profile]
    out = opts.out.resolve()
    ids = opts.silo_ids()
    material = pki.dev_pki(out / "pki", len(ids), silo_ids=ids)
    per_round, minimum = opts.plan()
    timeouts = {
        "gather_s": 60.0,
        "train_s": 600.0,
        "evaluate_s": 300.0,
        "liveness_s": 10.0,
        "done_grace_s": 15.0,
        "secure_stage_s": 60.0,
        **opts.timeouts,
    }
    federation = {
        "name": "condi-harness",
        "silos": ids,
        "rounds": opts.rounds,
        "silos_per_round": per_round,
        "min_silos": minimum,
        "max_attempts": opts.max_attempts,
        "seed": opts.seed,
        "run_dir": str(out / "coordinator"),
        "listen": f"127.0.0.1:{port}",
        "tls": material.coordinator_tls(),
        "poll_interval_ms": 500,
        "timeouts": timeouts,
        "model": dict(opts.model if opts.model is not None else profile.model),
        "training": dict(profile.training),
        "evaluation": dict(profile.evaluation),
        "aggregation": {
            "mode": "secure" if opts.secure else "plain",
            **({"secure_metrics": True} if opts.secure_metrics else {}),
            **({} if opts.threshold is None else {"threshold": opts.threshold}),
        },
    }
    if opts.monitor:
        federation["monitor"] = {"listen": f"127.0.0.1:{free_port()}"}
    if opts.churn:
        # Under churn a round may lose attempts to kills one after another; give it more of them.
        federation["max_attempts"] = max(opts.max_attempts, 6)
    if opts.data == "ptbxl":
        data: dict[str, Any] = {"source": "ptbxl", "path": str(opts.ptbxl_path.resolve())}
    else:
        data = {
            "source": "synthetic_ecg",
            "n_records": profile.records_per_silo * len(ids),
            "seed": opts.seed,
            "seconds": profile.seconds,
        }
    # The federation pins the layout of the data every site loads, so no silo's summary decides it.
    federation["layout"] = DataLayout.of(source_layout(_DATA_SOURCE.validate_python(data))).model_dump()
    # Every site pins the federation's silos, as hospitals would from a roster received out of band.
    peers = {sid: pki.certificate_fingerprint(pki.load_certificate(material.silos[sid].cert)) for sid in ids}
    sites = {}
    for index, sid in enumerate(ids):
        site: dict[str, Any] = {
            "silo_id": sid,
            "data": data,
            "partition": {
                "silos": len(ids),
                "index": index,
                "scheme": "dirichlet",
                "alpha": profile.partition_alpha,
                "seed": opts.seed,
            },
            "split": {"scheme": "patient", "fractions": [0.7, 0.15, 0.15]},
            "seed": opts.seed + index,
            "state_dir": str(out / "silos" / sid),
            "device": "cpu",
            "coordinator": {
                "address": f"127.0.0.1:{port}",
                "rpc_timeout_s": 20.0,
                "max_backoff_s": 2.0,
                "give_up_after_s": 120.0,
            },
            "tls": {
                "ca": str(material.ca.cert),
                "cert": str(material.silos[sid].cert),
                "key": str(material.silos[sid].key),
                "crl": str(material.ca.crl),
                "peers": peers,
            },
        }
        if profile.missingness is not None:
            site["simulated_missingness"] = dict(profile.missingness)
        if not opts.secure or per_round < 2:
            # The sites agree to what the harness was asked to run (one silo a round is plain).
            site["policy"] = {"require_secure_aggregation": False, "min_silos_per_round": min(2, per_round)}
        privacy = opts.privacy(sid)
        if privacy is not None:
            site["privacy"] = privacy
        if opts.monitor:
            site["monitor"] = {"listen": f"127.0.0.1:{free_port()}"}
        sites[sid] = _write_yaml(out / "sites" / f"{sid}.yaml", site)
    return _write_yaml(out / "federation.yaml", federation), sites


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: N silos and the coordinator share this machine's cores.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


def _start(name: str, args: list[str], log_path: Path, env: Mapping[str, str]) -> _Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("ab")
    popen = subprocess.Popen(
        [sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, env=_child_env(env)
    )
    log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
    return _Process(name=name, popen=popen, log=handle)


def _stop(proc: _Process, grace_s: float = 5.0) -> int | None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
    proc.log.close()
    return proc.popen.returncode


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The coordinator's status.json, or None while it has none (or is rewriting it)."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _churn_plan(opts: HarnessOptions) -> ChurnPlan:
    try:
        return ChurnPlan.draw(opts.silo_ids(), opts.rounds, opts.seed, secure=opts.secure)
    except ChurnError as exc:
        raise HarnessError(f"--churn: {exc}") from exc


def _replay(fed_yaml: Path) -> dict[str, Any]:
    """``coordinator replay`` on the finished run: every round once, the model equal to its journal's replay."""
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "replay", "--config", str(fed_yaml)],
        capture_output=True,
        text=True,
        env=_child_env({}),
        cwd=REPO,
    )
    if done.returncode not in (0, 1):
        return {"matches": False, "problems": [f"coordinator replay failed: {done.stderr.strip()[-400:]}"]}
    return dict(json.loads(done.stdout))


def run_harness(
    opts: HarnessOptions, progress: Callable[[dict[str, Any]], None] | None = None
) -> HarnessResult:
    """Run a federation of processes as ``opts`` says and wait for it to end."""
    out = opts.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise HarnessError(f"{out} is not empty; give a new --out folder")
    ids = opts.silo_ids()
    kills = {k[0]: k for k in ((opts.kill_silo,) if opts.kill_silo is not None else ()) + opts.kill_silos}
    for victim in kills:
        if victim not in ids:
            raise HarnessError(f"--kill-silo: no silo {victim!r} (silos are {ids[0]} .. {ids[-1]})")
    if opts.nan_update is not None and opts.nan_update[0] not in ids:
        raise HarnessError(f"--nan-update: no silo {opts.nan_update[0]!r}")
    unknown = sorted(set(opts.privacy_overrides) - set(ids))
    if unknown or (opts.privacy_overrides and not opts.dp):
        raise HarnessError(f"privacy overrides need dp and known silos; got {sorted(opts.privacy_overrides)}")
    crash = opts.restart_coordinator_at
    if crash is not None and crash[1] not in faults.STAGES:
        raise HarnessError(f"--restart-coordinator-at: stage {crash[1]!r} is not one of {list(faults.STAGES)}")
    plan = _churn_plan(opts) if opts.churn else None
    # The fault points each process still has ahead, in order: one is handed to each start.
    coordinator_points = list(plan.coordinator) if plan is not None else []
    if crash is not None:
        coordinator_points = [faults.FaultPoint(crash[0], faults.STAGES[crash[1]])]
    silo_points = {sid: [faults.FaultPoint(k[1], faults.STAGES[k[2]])] for sid, k in kills.items()}
    if plan is not None:
        silo_points = {sid: list(points) for sid, points in plan.silos.items()}
    restartable = set(ids) if plan is not None else (set(kills) if opts.restart_killed else set())
    port = free_port()
    fed_yaml, sites = write_configs(opts, port)
    run_dir = out / "coordinator"
    logs_dir = out / "logs"
    coordinator_args = ["-m", "coordinator.cli", "--config", str(fed_yaml)]
    events: list[dict[str, Any]] = []
    last_status: dict[str, Any] | None = None

    def next_point(points: list[faults.FaultPoint], variable: str) -> dict[str, str]:
        return {variable: points.pop(0).to_text()} if points else {}

    def start_coordinator() -> _Process:
        env = next_point(coordinator_points, faults.COORDINATOR_EXIT_AT)
        return _start("coordinator", coordinator_args, logs_dir / "coordinator.log", env)

    def start_silo(sid: str) -> _Process:
        env = next_point(silo_points.get(sid, []), faults.SILO_EXIT_AT)
        # The NaN fault is for the first start only: a restarted silo trains normally.
        if opts.nan_update is not None and opts.nan_update[0] == sid and sid not in silos:
            env["CONDI_FAULT_NAN_AT"] = str(opts.nan_update[1])
        return _start(sid, ["-m", "silo_agent.cli", "--config", str(sites[sid])], logs_dir / f"{sid}.log", env)

    def note(process: str, what: str) -> None:
        where = {} if last_status is None else {"round": last_status.get("round"), "phase": last_status.get("phase")}
        events.append({"time_s": round(time.monotonic() - began, 1), "process": process, "event": what, **where})

    began = time.monotonic()
    coordinator = start_coordinator()
    starts = 1
    silos: dict[str, _Process] = {}
    for sid in ids:
        silos[sid] = start_silo(sid)
    deadline = time.monotonic() + opts.timeout_s
    try:
        while True:
            status = read_status(run_dir)
            if status is not None and status != last_status:
                last_status = status
                if progress is not None:
                    progress(status)
            if coordinator.popen.poll() == faults.FAULT_EXIT_CODE:
                log.warning("the coordinator stopped at its injected fault; restarting it from its checkpoint")
                note("coordinator", "stopped at its fault point; restarted")
                coordinator.log.close()
                coordinator = start_coordinator()
                starts += 1
            for sid in sorted(restartable):
                if silos[sid].popen.poll() == faults.FAULT_EXIT_CODE:
                    log.warning("%s was killed as asked; starting it again on its state directory", sid)
                    note(sid, "stopped at its fault point; restarted")
                    silos[sid].log.close()
                    silos[sid] = start_silo(sid)
                    if plan is None:
                        restartable.discard(sid)
            if coordinator.popen.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"the run did not end within {opts.timeout_s:g} s; see the logs in {logs_dir}"
                )
            time.sleep(0.2)
        end = time.monotonic() + 30.0
        while time.monotonic() < end and any(p.popen.poll() is None for p in silos.values()):
            time.sleep(0.2)
    finally:
        silo_exits = {sid: _stop(p) for sid, p in silos.items()}
        code = _stop(coordinator)
    churn = None
    if plan is not None:
        churn = {"plan": plan.to_dict(), "events": events, "replay": _replay(fed_yaml)}
        (out / "churn.json").write_text(json.dumps(churn, indent=1) + "\n")
    report = run_dir / "report.json"
    return HarnessResult(
        out=out,
        run_dir=run_dir,
        report=report if report.is_file() else None,
        coordinator_exit=int(code if code is not None else -1),
        silo_exits=silo_exits,
        coordinator_starts=starts,
        churn=churn,
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _kill_spec(text: str) -> tuple[str, int, str]:
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in faults.STAGES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ID:ROUND:STAGE with STAGE one of {', '.join(faults.STAGES)}"
        )
    return parts[0], int(parts[1]), parts[2]


def _crash_spec(text: str) -> tuple[int, str]:
    round_text, _, stage = text.partition(":")
    stage = stage or "train"
    if not round_text.isdigit() or stage not in faults.STAGES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ROUND or ROUND:STAGE with STAGE one of {', '.join(faults.STAGES)}"
        )
    return int(round_text), stage


def _nan_spec(text: str) -> tuple[str, int]:
    silo, _, round_text = text.partition(":")
    if not silo or not round_text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID:ROUND")
    return silo, int(round_text)


def _harness(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out = Path(args.out) if args.out else Path("runs") / f"harness-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = HarnessOptions(
        out=out,
        silos=args.silos,
        rounds=args.rounds,
        per_round=args.per_round,
        data=args.data,
        ptbxl_path=Path(args.ptbxl_path),
        profile=args.profile,
        seed=args.seed,
        kill_silos=tuple(args.kill_silo or ()),
        nan_update=args.nan_update,
        restart_coordinator_at=args.restart_coordinator_at,
        secure=not args.plain,
        secure_metrics=args.secure_metrics,
        restart_killed=args.restart_killed,
        churn=args.churn,
        dp=args.dp,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        dp_planned_rounds=args.dp_planned_rounds,
        monitor=args.monitor,
    )
    bar = tqdm(total=args.rounds, desc="federation", unit="round", file=sys.stderr)

    announced = False

    def show(status: dict[str, Any]) -> None:
        nonlocal announced
        if opts.monitor and not announced:
            # The ports are drawn when the configs are written: say where to look once they exist.
            announced = True
            listen = yaml.safe_load((out / "federation.yaml").read_text())["monitor"]["listen"]
            bar.write(f"live view: http://{listen}/  metrics: http://{listen}/metrics", file=sys.stderr)
        bar.n = status.get("rounds_recorded", 0)
        members = status.get("members") or []
        bar.set_postfix_str(
            f"{stage_label(status)}: "
            f"{len(status.get('done') or [])}/{len(members)} done, "
            f"{len(status.get('connected') or [])} connected"
        )
        bar.refresh()

    print(f"run directory: {out.resolve()}", file=sys.stderr)
    try:
        result = run_harness(opts, progress=show)
    finally:
        bar.close()
    for sid, exit_code in result.silo_exits.items():
        if exit_code not in (0, None):
            print(
                f"{sid} exited with code {exit_code} (log: {result.out / 'logs' / (sid + '.log')})",
                file=sys.stderr,
            )
    if result.report is None:
        print(
            f"no report: the coordinator exited with {result.coordinator_exit}; see {result.out / 'logs'}",
            file=sys.stderr,
        )
        return 1
    report = json.loads(result.report.read_text())
    accuracy = ", ".join(f"{a:.3f}" for a in report.get("val_accuracy_by_round", []))
    mode = "secure aggregation" if opts.secure else "plain aggregation (the coordinator saw each update)"
    if opts.secure_metrics:
        mode += ", evaluation scores summed securely"
    print(
        f"{report['status']}: {report['message']}; {mode}; {dp_summary(opts, report)}; "
        f"validation accuracy by round: {accuracy}",
        file=sys.stderr,
    )
    if result.churn is not None:
        replayed = result.churn["replay"]
        print(
            f"churn: {len(result.churn['events'])} kills and restarts ({result.coordinator_starts - 1} of the "
            f"coordinator); replay of {replayed.get('rounds')} rounds from the journal "
            f"{'matches' if replayed.get('matches') else 'DOES NOT match'} the committed model; "
            f"details in {result.out / 'churn.json'}",
            file=sys.stderr,
        )
    print(result.report)
    ok = result.churn is None or bool(result.churn["replay"].get("matches"))
    return 0 if result.coordinator_exit == 0 and ok else 1


def dp_summary(opts: HarnessOptions, report: Mapping[str, Any]) -> str:
    """The summary's words on differential privacy: off, or the epsilon each silo last claimed."""
    if not opts.dp:
        return "no differential privacy"
    by_silo = report.get("privacy", {}).get("epsilon_by_silo", {})
    spent = []
    for sid, values in by_silo.items():
        claimed = [v for v in values if v is not None]
        spent.append(f"{sid} {claimed[-1]:.4g}" if claimed else f"{sid} none")
    departed = report.get("departed") or {}
    left = f", left the run: {', '.join(sorted(departed))}" if departed else ""
    return (
        f"DP-SGD at epsilon {opts.dp_epsilon:g}, delta {opts.dp_delta:g} "
        f"(epsilon spent: {', '.join(spent) or 'none reported'}{left})"
    )


def add_harness_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``condi harness``."""
    p = sub.add_parser("harness", help="coordinator + N silo-agent processes on loopback with a dev PKI")
    p.add_argument("--silos", type=int, default=3, help="number of silo processes (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    p.add_argument(
        "--per-round", type=int, default=None, help="silos selected per round (default min(3, silos))"
    )
    p.add_argument("--out", help="run directory (default runs/harness-<time>); must be new or empty")
    p.add_argument(
        "--data", choices=["synthetic", "ptbxl"], default="synthetic", help="data every silo shares"
    )
    p.add_argument("--ptbxl-path", default=str(DEFAULT_PTBXL), help="PTB-XL folder for --data ptbxl")
    p.add_argument("--profile", choices=sorted(PROFILES), default="tiny", help="data and model sizes")
    p.add_argument(
        "--kill-silo",
        type=_kill_spec,
        action="append",
        help="ID:ROUND:STAGE: that silo exits hard there (repeat for several silos)",
    )
    p.add_argument(
        "--nan-update", type=_nan_spec, help="ID:ROUND: that silo's update holds NaN (it refuses to send)"
    )
    p.add_argument(
        "--restart-coordinator-at",
        type=_crash_spec,
        help="ROUND[:STAGE]: the coordinator crashes on that stage's first submission (default train) "
        "and is restarted from its checkpoint",
    )
    p.add_argument(
        "--plain", action="store_true", help="aggregate in the clear (default: secure aggregation)"
    )
    p.add_argument(
        "--secure-metrics",
        action="store_true",
        help="evaluation scores go through the secure sum too: the coordinator learns only pooled ones",
    )
    p.add_argument(
        "--restart-killed", action="store_true", help="start a silo killed by --kill-silo again on its state"
    )
    p.add_argument(
        "--churn",
        action="store_true",
        help="soak: kill every silo twice and the coordinator twice at seeded fault points, restart each, "
        "then check every round was recorded once and replay the model from the run's journal (churn.json)",
    )
    p.add_argument("--dp", action="store_true", help="train every silo with DP-SGD (privacy: in each site.yaml)")
    p.add_argument("--dp-epsilon", type=float, default=8.0, help="--dp: target epsilon per silo (default 8)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="--dp: delta (default 1e-5)")
    p.add_argument(
        "--dp-planned-rounds",
        type=int,
        default=None,
        help="--dp: rounds each silo plans for (default: its expected share of the rounds)",
    )
    p.add_argument(
        "--monitor",
        action="store_true",
        help="serve Prometheus metrics on loopback from every process, and the coordinator's live web view",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_harness)
