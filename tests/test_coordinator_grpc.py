"""The coordinator over real gRPC and mutual TLS on loopback: bad input at the protocol level.

Handshake-level refusals (no client certificate, another CA, expired, revoked) are covered by
tests/test_tls.py; here the coordinator's own checks run against clients holding valid
certificates: layout, identity, stage references, chunks, tensors, values, duplicates.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from condi_models.configfile import ConfigError, parse_config
from condi_models.data.sources import DataLayout
from condi_models.nn.model import CondIModel
from condi_models.training import aggregation_groups
from coordinator.app import CoordinatorServer
from coordinator.config import FederationConfig
from coordinator.layout import layout_mismatch
from coordinator.store import StoreError
from federation import pki, tls, wire
from federation import secagg_wire as sw
from federation.messages import HeartbeatReply, HeartbeatRequest
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.proto_gen.condi.v1 import federation_pb2_grpc as pb_grpc
from federation.secagg import KeyAdvert
from federation.settings import RoundSettings, RunSettings
from federation.transfer import (
    GROUP_WEIGHTS,
    chunk_to_proto,
    data_summary,
    encode_plain_update,
    receive_state,
    update_parts,
)
from silo_agent.agent import Faults, SiloAgent
from silo_agent.config import SiteConfig
from tests.helpers import toy_dataset

TIMEOUT = 20
SMALL_MODEL = {
    "embed_dim": 8,
    "cond_dim": 8,
    "denoiser": {"hidden": 16, "n_blocks": 1, "n_heads": 2},
    "context": {"stem_dim": 8, "expert_hidden": 16, "out_dim": 8},
    "classifier": {"hidden": 16, "n_blocks": 1, "n_heads": 2, "head_hidden": 16},
}


@dataclass
class Running:
    server: CoordinatorServer
    thread: threading.Thread
    material: pki.DevPki
    exit_codes: list[int]

    @property
    def run_dir(self) -> Path:
        return self.server.coordinator.run_dir

    def stub(self, silo: str) -> pb_grpc.FederationStub:
        paths = self.material.silos[silo]
        creds = tls.channel_credentials(self.material.ca.cert, paths.cert, paths.key)
        channel = tls.secure_channel(f"127.0.0.1:{self.server.port}", creds)
        return pb_grpc.FederationStub(channel)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)


def _start(root: Path, material: pki.DevPki, allowed: list[str], **overrides: object) -> Running:
    doc = {
        "name": "grpc-test",
        "silos": allowed,
        "rounds": 2,
        "silos_per_round": len(allowed),
        "min_silos": 1,
        "seed": 3,
        "run_dir": str(root / "run"),
        "listen": "127.0.0.1:0",
        "tls": material.coordinator_tls(),
        "poll_interval_ms": 100,
        "max_chunk_bytes": 65536,
        "timeouts": {"gather_s": 60, "train_s": 60, "evaluate_s": 60, "liveness_s": 60, "done_grace_s": 1},
        "model": SMALL_MODEL,
        "training": {"epochs_a": 1, "epochs_b": 1, "batch_size": 16, "window": None, "min_local_steps": 0},
        "evaluation": {"n_samples": 1, "steps": 2},
        # These tests drive plain uploads by hand; secure rounds are tested in test_secure_federation.
        "aggregation": {"mode": "plain"},
        **overrides,
    }
    cfg = parse_config(doc, FederationConfig, "federation.yaml")
    server = CoordinatorServer(cfg, "federation.yaml")
    server.start()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(server.coordinator.run()), daemon=True)
    thread.start()
    return Running(server=server, thread=thread, material=material, exit_codes=codes)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    return pki.dev_pki(tmp_path_factory.mktemp("pki"), 3, silo_ids=["silo-1", "silo-2", "silo-outsider"])


INFO = toy_dataset(8, modalities=(1, 2), length=40, n_classes=3).info


def _join_request(info=INFO, version: int = 1) -> pb.JoinRequest:
    return pb.JoinRequest(
        protocol_version=version,
        software_version="test",
        data=data_summary(info),
    )


@dataclass
class Train:
    running: Running
    stubs: dict[str, pb_grpc.FederationStub]
    tasks: dict[str, pb.Task]
    settings: RunSettings
    model: CondIModel


@pytest.fixture(scope="module")
def train(material: pki.DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Train]:
    running = _start(tmp_path_factory.mktemp("coord"), material, ["silo-1", "silo-2"])
    stubs = {s: running.stub(s) for s in ("silo-1", "silo-2")}
    first = stubs["silo-1"].Join(_join_request(), timeout=TIMEOUT)
    assert first.accepted, first.reason
    settings = RunSettings.from_json(first.model_config_json)
    assert stubs["silo-2"].Join(_join_request(), timeout=TIMEOUT).accepted
    tasks = _first_training_tasks(stubs)
    yield Train(running, stubs, tasks, settings, CondIModel(settings.model))
    running.stop()


def _statistics(records: int = 8, *, classes: int = 3, features: int = 3) -> dict:
    """A plausible statistics report: ``records`` records, all of class 0, 40 entries per channel."""
    counts = [0] * classes
    counts[0] = records
    n = 40.0 * records
    return {
        "channel_count": [n] * features,
        "channel_sum": [0.5 * n] * features,
        "channel_sq_sum": [1.25 * n] * features,
        "class_counts": counts,
    }


def _task(stub: pb_grpc.FederationStub, stage: int) -> pb.Task:
    """Poll until the silo's task is ``stage``."""
    task = stub.GetTask(pb.TaskRequest(wait_ms=0), timeout=TIMEOUT)
    while task.ref.stage != stage:
        task = stub.GetTask(pb.TaskRequest(ref=task.ref, wait_ms=2000), timeout=TIMEOUT)
    return task


def _first_training_tasks(stubs: dict[str, pb_grpc.FederationStub]) -> dict[str, pb.Task]:
    """Every silo sends its statistics, then polls until its task is round 0's TRAIN."""
    for stub in stubs.values():
        task = _task(stub, pb.STAGE_STATISTICS)
        report = pb.MetricsReport(ref=task.ref, metrics_json=json.dumps({"statistics": _statistics()}))
        stub.ReportMetrics(report, timeout=TIMEOUT)
    return {silo: _task(stub, pb.STAGE_TRAIN) for silo, stub in stubs.items()}


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()


def _global(t: Train, silo: str) -> dict[str, np.ndarray]:
    task = t.tasks[silo]
    parts = t.stubs[silo].DownloadState(
        pb.DownloadRequest(ref=task.ref, state_sha256=task.state_sha256), timeout=TIMEOUT
    )
    encoded = receive_state(parts, task.state_sha256, max_payload_bytes=10**8, max_chunk_bytes=65536)
    return wire.decode_state(encoded.manifest, encoded.payload, finite=True)


def _params(t: Train, shift: float = 0.0) -> tuple[dict[str, np.ndarray], tuple[str, ...], dict[str, float]]:
    groups = aggregation_groups(t.model)
    state = {k: v + shift for k, v in _global(t, "silo-1").items()}
    params = {n: state[n] for n in groups.assignment}
    weights = {g: 8.0 for g in groups.group_names()}
    return params, groups.group_names(), weights


def _upload(
    t: Train, silo: str, encoded: wire.EncodedState, *, ref: pb.StageRef | None = None, **header: object
) -> pb.UploadReceipt:
    task = t.tasks[silo]
    fields = {
        "ref": ref or task.ref,
        "encoding": pb.UPDATE_ENCODING_PLAIN,
        "base_state_sha256": task.state_sha256,
        "num_examples": 8,
        **header,
    }
    return t.stubs[silo].UploadUpdate(
        update_parts(pb.UpdateHeader(**fields), encoded, 65536), timeout=TIMEOUT
    )


def test_statistics_are_checked_pooled_once_and_sent_with_every_task(material: pki.DevPki, tmp_path: Path) -> None:
    running = _start(tmp_path, material, ["silo-1", "silo-2"], max_silo_records=100)
    try:
        stubs = {s: running.stub(s) for s in ("silo-1", "silo-2")}
        for stub in stubs.values():
            assert stub.Join(_join_request(), timeout=TIMEOUT).accepted
        task = _task(stubs["silo-1"], pb.STAGE_STATISTICS)

        def report(doc: object, stub: pb_grpc.FederationStub = stubs["silo-1"], ref: pb.StageRef = task.ref):
            return stub.ReportMetrics(pb.MetricsReport(ref=ref, metrics_json=json.dumps(doc)), timeout=TIMEOUT)

        good = _statistics(6)
        bad = {
            "metrics_json.statistics.class_counts: expected 3 finite numbers": {**good, "class_counts": [6, 0]},
            "600 records, expected 1 to 100": {**good, "class_counts": [600, 0, 0]},
            "expected whole numbers": {**good, "channel_count": [1.5, 240.0, 240.0]},
            "sum^2 > count x sum of squares": {**good, "channel_sum": [1e6, 0.0, 0.0]},
            "channel_sq_sum: expected 3 finite numbers": {**good, "channel_sq_sum": [float("nan"), 1.0, 1.0]},
            "unknown keys ['records']": {**good, "records": 6},
        }
        for message, doc in bad.items():
            with pytest.raises(grpc.RpcError) as err:
                report({"statistics": doc})
            assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), message
        with pytest.raises(grpc.RpcError) as err:
            report({"statistics": good, "splits": {}})
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert not report({"statistics": good}).duplicate
        assert report({"statistics": good}).duplicate
        with pytest.raises(grpc.RpcError) as err:
            report({"statistics": _statistics(7)})
        assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
        # silo-2: 2 records of class 2 whose entries are all 2.0.
        other = {"channel_count": [80.0] * 3, "channel_sum": [160.0] * 3, "channel_sq_sum": [320.0] * 3,
                 "class_counts": [0, 0, 2]}
        assert not report({"statistics": other}, stubs["silo-2"], task.ref).duplicate
        tasks = {silo: _task(stub, pb.STAGE_TRAIN) for silo, stub in stubs.items()}
        assert tasks["silo-1"].ref.attempt == 1  # the statistics took attempt 0 of round 0
        pooled = RoundSettings.from_json(tasks["silo-1"].round_config_json).statistics
        assert pooled is not None and pooled == RoundSettings.from_json(tasks["silo-2"].round_config_json).statistics
        assert pooled.class_counts == (6, 0, 2) and pooled.silos == 2
        # 240 entries of mean 0.5, variance 1 and 80 entries equal to 2.0.
        n = 320.0
        mean = (240 * 0.5 + 80 * 2.0) / n
        var = (240 * 1.25 + 80 * 4.0) / n - mean**2
        np.testing.assert_allclose(pooled.mean, [mean] * 3)
        np.testing.assert_allclose(pooled.std, [np.sqrt(var)] * 3)
        # The stage is over: a resend of the accepted report is still a duplicate (its receipt may
        # have been lost); nothing else for it is taken.
        assert report({"statistics": good}).duplicate
        with pytest.raises(grpc.RpcError) as err:
            report({"statistics": _statistics(5)})
        assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        running.stop()


def test_join_refuses_other_versions_and_layouts_naming_the_mismatch(train: Train) -> None:
    stub = train.stubs["silo-2"]
    reply = stub.Join(_join_request(version=7), timeout=TIMEOUT)
    assert not reply.accepted and "protocol version 7" in reply.reason
    other = toy_dataset(8, modalities=(1, 2), length=40, n_classes=4).info
    reply = stub.Join(_join_request(other), timeout=TIMEOUT)
    assert not reply.accepted and "classes" in reply.reason and "class3" in reply.reason
    shorter = toy_dataset(8, modalities=(1, 2), length=30, n_classes=3).info
    reply = stub.Join(_join_request(shorter), timeout=TIMEOUT)
    assert not reply.accepted and "30 steps" in reply.reason
    wide = toy_dataset(2, modalities=(1,) * 1_600, length=40, n_classes=3).info
    reply = stub.Join(_join_request(wide), timeout=TIMEOUT)
    assert not reply.accepted and "1600 modalities, this federation takes at most 64" in reply.reason
    # The first silo fixed the layout; the model fits it.
    assert train.settings.layout == INFO and train.settings.model.n_features == 3
    assert train.settings.training.window == 40


def test_a_layout_pinned_in_federation_yaml_decides_and_survives_no_first_joiner(
    material: pki.DevPki, tmp_path: Path
) -> None:
    pinned = DataLayout.of(INFO).model_dump()
    running = _start(tmp_path, material, ["silo-1", "silo-2"], layout=pinned)
    try:
        # The model exists before anyone joins, built for federation.yaml's layout.
        assert running.server.coordinator.ckpt.layout is not None
        assert layout_mismatch(INFO, running.server.coordinator.ckpt.layout) is None
        # The first silo to join no longer decides: another layout is refused though nobody joined yet.
        other = toy_dataset(8, modalities=(2, 1), length=40, n_classes=3).info
        reply = running.stub("silo-1").Join(_join_request(other), timeout=TIMEOUT)
        assert not reply.accepted and "data layout does not match" in reply.reason and "channels" in reply.reason
        reply = running.stub("silo-2").Join(_join_request(), timeout=TIMEOUT)
        assert reply.accepted, reply.reason
        assert RunSettings.from_json(reply.model_config_json).model.n_features == 3
    finally:
        running.stop()
    # The run's checkpoint keeps its layout: a federation.yaml whose layout changed is refused.
    changed = {**pinned, "classes": ["a", "b"]}
    with pytest.raises(StoreError, match=r"layout differs from federation\.yaml's layout"):
        _start(tmp_path, material, ["silo-1", "silo-2"], layout=changed)


def test_a_silo_outside_the_allow_list_is_refused(train: Train, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as err:
        train.running.stub("silo-outsider").Join(_join_request(), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
    assert "silo-outsider" in err.value.details() and "allow-list" in err.value.details()
    assert any("silo-outsider" in r.getMessage() for r in caplog.records)


def test_every_call_and_refusal_is_audited_in_a_private_append_only_file(train: Train) -> None:
    with pytest.raises(grpc.RpcError):
        train.running.stub("silo-outsider").Heartbeat(pb.HeartbeatRequest(), timeout=TIMEOUT)
    forged = 'r1\n{"outcome": "ok"}'
    bad_ref = pb.StageRef(run_id=forged, round=0, attempt=1, stage=pb.STAGE_TRAIN)
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-2"].ReportMetrics(pb.MetricsReport(ref=bad_ref, metrics_json="{}"), timeout=TIMEOUT)
    path = train.running.run_dir / "audit.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    joined = [e for e in entries if e["method"] == "Join" and e["outcome"] == "ok"]
    assert {e["silo"] for e in joined} >= {"silo-1", "silo-2"}
    assert all(e["peer"].startswith("ipv") and "silo-" in e["subject"] for e in joined)
    refused = [e for e in entries if e["method"] == "ReportMetrics" and e["outcome"] == "refused"]
    assert refused and refused[-1]["silo"] == "silo-2" and refused[-1]["code"] == _code(err).name
    # Refused by the identity check, before any handler: the peer and its certificate are on record.
    outsider = [e for e in entries if "silo-outsider" in e.get("subject", "")][-1]
    assert outsider["outcome"] == "refused" and outsider["code"] == "PERMISSION_DENIED"
    assert outsider["method"].endswith("/Heartbeat") and "allow-list" in outsider["reason"]
    # The peer's newline neither splits the line nor forges an entry.
    assert all(line.startswith('{"time"') for line in lines)
    assert not any(e.get("outcome") == "ok" and e["method"] == "ReportMetrics" and "silo" not in e for e in entries)


def test_the_caller_is_the_certificate_whatever_the_message_says(train: Train) -> None:
    other_ref = train.tasks["silo-2"].ref
    reply = train.stubs["silo-1"].Heartbeat(
        pb.HeartbeatRequest(ref=other_ref, status="I am silo-2"), timeout=TIMEOUT
    )
    assert reply.silo_id == "silo-1"
    assert reply.current == train.tasks["silo-1"].ref


def test_requests_for_another_run_round_attempt_or_stage_are_refused(train: Train) -> None:
    params, groups, weights = _params(train)
    encoded = encode_plain_update(params, weights, groups)
    ref = train.tasks["silo-1"].ref
    bad_refs = {
        "run": pb.StageRef(run_id="another-run", round=ref.round, attempt=ref.attempt, stage=ref.stage),
        "round": pb.StageRef(run_id=ref.run_id, round=ref.round + 1, attempt=ref.attempt, stage=ref.stage),
        "attempt": pb.StageRef(run_id=ref.run_id, round=ref.round, attempt=ref.attempt + 4, stage=ref.stage),
        "stage": pb.StageRef(
            run_id=ref.run_id, round=ref.round, attempt=ref.attempt, stage=pb.STAGE_EVALUATE
        ),
    }
    for what, bad in bad_refs.items():
        with pytest.raises(grpc.RpcError) as err:
            _upload(train, "silo-1", encoded, ref=bad)
        assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION, what
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].ReportMetrics(pb.MetricsReport(ref=ref, metrics_json="{}"), timeout=TIMEOUT)
    assert (
        _code(err) == grpc.StatusCode.FAILED_PRECONDITION
        and "belongs to stage EVALUATE" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", encoded, base_state_sha256="ab" * 32)
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION and "stale update" in err.value.details()


def test_bad_chunks_are_refused_naming_the_chunk(train: Train) -> None:
    params, groups, weights = _params(train)
    encoded = encode_plain_update(params, weights, groups)
    header = pb.UpdateHeader(
        ref=train.tasks["silo-1"].ref,
        encoding=pb.UPDATE_ENCODING_PLAIN,
        base_state_sha256=train.tasks["silo-1"].state_sha256,
        num_examples=8,
        manifest_json=encoded.manifest.to_json(),
    )
    pieces = [chunk_to_proto(c) for c in wire.chunk(encoded, 4096)]
    pieces[1].data = bytes([pieces[1].data[0] ^ 1]) + pieces[1].data[1:]
    parts = [pb.UpdatePart(header=header), *(pb.UpdatePart(chunk=c) for c in pieces)]
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].UploadUpdate(iter(parts), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "chunk 1 of" in err.value.details()
    assert "SHA-256 mismatch" in err.value.details()
    oversized = wire.chunk(encoded, 65537)
    assert len(oversized[0].data) == 65537
    parts = [pb.UpdatePart(header=header), pb.UpdatePart(chunk=chunk_to_proto(oversized[0]))]
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].UploadUpdate(iter(parts), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "chunk 0 of" in err.value.details() and "65537 bytes, over the limit of 65536" in err.value.details()
    )
    # A chunk announcing a total the payload cannot have is refused before anything is kept.
    huge = chunk_to_proto(wire.chunk(encoded, 4096)[0])
    huge.total = 30_000_000
    parts = [pb.UpdatePart(header=header), pb.UpdatePart(chunk=huge)]
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].UploadUpdate(iter(parts), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "chunk 0 of 30000000: a payload of" in err.value.details()
    # So is a header whose manifest lists 100,000 dimensions, without a shape product being taken.
    manifest = encoded.manifest.to_dict()
    manifest["tensors"][0]["shape"] = [2] * 100_000
    deep = pb.UpdateHeader()
    deep.CopyFrom(header)
    deep.manifest_json = json.dumps(manifest)
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].UploadUpdate(iter([pb.UpdatePart(header=deep)]), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "characters, at most 262144" in err.value.details()


def test_a_request_the_protocol_cannot_mean_is_refused_naming_the_field(train: Train) -> None:
    """The servicer's conversion to domain types refuses it, before the coordinator is called."""
    stub = train.stubs["silo-1"]
    ref = train.tasks["silo-1"].ref
    unknown = pb.StageRef(run_id=ref.run_id, round=ref.round, attempt=ref.attempt, stage=42)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTask(pb.TaskRequest(ref=unknown), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "TaskRequest.ref.stage: unknown stage 42" in err.value.details()
    params, groups, weights = _params(train)
    encoded = encode_plain_update(params, weights, groups)
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", encoded, encoding=7)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "UpdateHeader.encoding: unknown update encoding 7" in err.value.details()
    headless = [pb.UpdatePart(chunk=chunk_to_proto(piece)) for piece in wire.chunk(encoded, 65536)]
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadUpdate(iter(headless), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "upload: the first message must be the header" in err.value.details()


def test_updates_of_the_wrong_shape_dtype_or_with_nan_are_refused(train: Train) -> None:
    params, groups, weights = _params(train)
    vector = np.array([weights[g] for g in groups])
    name = next(iter(params))
    nan = {**params, name: params[name].copy()}
    nan[name].flat[0] = np.nan
    inf = {**params, name: np.full_like(params[name], np.inf)}
    wrong_shape = {**params, name: np.zeros((*params[name].shape, 1), np.float32)}
    wrong_dtype = {k: v.astype(np.int32) if k == name else v for k, v in params.items()}
    too_wide = {k: v.astype(np.float64) if k == name else v for k, v in params.items()}
    for what, named, message in (
        ("nan", nan, "NaN or infinite"),
        ("inf", inf, "NaN or infinite"),
        ("shape", wrong_shape, f"tensor '{name}': shape"),
        ("dtype", wrong_dtype, f"tensor '{name}': dtype int32, expected float32"),
        ("size", too_wide, "bytes, over the limit of"),
    ):
        forged = wire.encode_state({**named, GROUP_WEIGHTS: vector})
        with pytest.raises(grpc.RpcError) as err:
            _upload(train, "silo-1", forged)
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT, what
        assert message in err.value.details(), (what, err.value.details())
    # Same byte count, other layout: refused by name and shape.
    first, second = list(params)[:2]
    swapped = {**params, first: params[second], second: params[first]}
    if swapped[first].shape != params[first].shape:
        forged = wire.encode_state({**swapped, GROUP_WEIGHTS: vector})
        with pytest.raises(grpc.RpcError) as err:
            _upload(train, "silo-1", forged)
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "shape" in err.value.details()
    good = encode_plain_update(params, weights, groups)
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", good, num_examples=9)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "num_examples 9" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", good, encoding=pb.UPDATE_ENCODING_MASKED)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "plain updates" in err.value.details()


def test_downloads_check_the_state_and_secure_calls_are_not_served(train: Train) -> None:
    task = train.tasks["silo-1"]
    state = _global(train, "silo-1")
    expected = train.model.state_to_named_tensors()
    assert list(state) == list(expected)
    assert all(state[k].shape == tuple(v.shape) for k, v in expected.items())
    with pytest.raises(grpc.RpcError) as err:
        list(train.stubs["silo-1"].DownloadState(pb.DownloadRequest(ref=task.ref, state_sha256="00" * 32)))
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    wait_ref = pb.StageRef(run_id=task.ref.run_id, round=0, attempt=0, stage=pb.STAGE_WAIT)
    with pytest.raises(grpc.RpcError) as err:
        list(
            train.stubs["silo-1"].DownloadState(
                pb.DownloadRequest(ref=wait_ref, state_sha256=task.state_sha256)
            )
        )
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].AdvertiseKeys(pb.AdvertiseKeysRequest(ref=task.ref), timeout=TIMEOUT)
    assert _code(err) == grpc.StatusCode.UNIMPLEMENTED


def _metrics(classes: int, n: int = 5) -> dict:
    confusion = np.zeros((classes, classes), dtype=int)
    confusion[0, 0] = n
    split = {
        "n": n,
        "loss": 0.7,
        "accuracy": 1.0,
        "macro_f1": 1.0,
        "macro_auroc": None,
        "confusion_matrix": confusion.tolist(),
        "imputation": None,
    }
    return {"splits": {"val": split}}


def test_a_round_completes_with_duplicates_accepted_and_replays_refused(train: Train) -> None:
    params, groups, weights = _params(train, shift=0.25)
    one = encode_plain_update(params, weights, groups)
    claims = json.dumps({"silo_id": "silo-2", "phase_a_loss": 0.5})
    receipt = _upload(train, "silo-1", one, claims_json=claims)
    assert not receipt.duplicate and receipt.payload_sha256 == one.manifest.payload_sha256
    assert _upload(train, "silo-1", one, claims_json=claims).duplicate
    other = encode_plain_update(_params(train, shift=2.0)[0], weights, groups)
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", other)
    assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    # The update counted for silo-1 (its certificate), not for the silo its claims name.
    status = json.loads((train.running.run_dir / "status.json").read_text())
    assert status["done"] == ["silo-1"] or status["phase"] != "train"
    assert (
        train.stubs["silo-2"].GetTask(pb.TaskRequest(wait_ms=0), timeout=TIMEOUT).ref.stage == pb.STAGE_TRAIN
    )
    # silo-2 is hostile: it claims 10^12 samples and moves every entry by 1,000. Plain updates are
    # capped at weight_unit samples and clipped at clip_bound (1) as secure ones are.
    hostile = {g: 1e12 for g in groups}
    _upload(train, "silo-2", encode_plain_update(_params(train, shift=1000.0)[0], hostile, groups), num_examples=10**12)

    evaluate = {}
    for silo, stub in train.stubs.items():
        task = stub.GetTask(pb.TaskRequest(ref=train.tasks[silo].ref, wait_ms=5000), timeout=TIMEOUT)
        while task.ref.stage != pb.STAGE_EVALUATE:
            task = stub.GetTask(pb.TaskRequest(ref=task.ref, wait_ms=5000), timeout=TIMEOUT)
        evaluate[silo] = task
    new_state = _global(Train(train.running, train.stubs, evaluate, train.settings, train.model), "silo-1")
    first = next(iter(params))
    # Weights 8 and 10,000 (the cap), deltas 0.25 and 1 (clipped): the hostile silo moved the model
    # by at most the clip bound, not to its own values.
    expected = (8 * 0.25 + 10_000 * 1.0) / 10_008
    np.testing.assert_allclose(new_state[first], params[first] - 0.25 + expected, rtol=1e-5, atol=1e-5)
    bad = _metrics(3)
    bad["splits"]["val"]["n"] = 6
    with pytest.raises(grpc.RpcError) as err:
        train.stubs["silo-1"].ReportMetrics(
            pb.MetricsReport(ref=evaluate["silo-1"].ref, metrics_json=json.dumps(bad)), timeout=TIMEOUT
        )
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "confusion_matrix" in err.value.details()
    for silo, stub in train.stubs.items():
        report = pb.MetricsReport(ref=evaluate[silo].ref, metrics_json=json.dumps(_metrics(3)))
        assert not stub.ReportMetrics(report, timeout=TIMEOUT).duplicate
        assert stub.ReportMetrics(report, timeout=TIMEOUT).duplicate
    # The training task is over: a retry of the accepted upload is still a duplicate (its receipt
    # may have been lost), but anything else for that task, or for a task never given, is refused.
    assert _upload(train, "silo-1", one).duplicate
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", other)
    assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    old = train.tasks["silo-1"].ref
    replay = pb.StageRef(run_id=old.run_id, round=old.round, attempt=old.attempt + 1, stage=pb.STAGE_TRAIN)
    with pytest.raises(grpc.RpcError) as err:
        _upload(train, "silo-1", one, ref=replay)
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION and "stale or replayed" in err.value.details()
    rows = []
    for _ in range(100):
        rows = [
            json.loads(line) for line in (train.running.run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        if rows:
            break
        threading.Event().wait(0.05)
    assert [r["round"] for r in rows] == [0]
    assert rows[0]["completed"] == ["silo-1", "silo-2"] and rows[0]["val"]["n"] == 10
    assert rows[0]["phase_a_loss"] == 0.5


def test_a_hostile_advert_is_refused_naming_field_and_silo_and_a_resent_one_is_a_duplicate(
    material: pki.DevPki, tmp_path: Path
) -> None:
    running = _start(tmp_path, material, ["silo-1", "silo-2"], aggregation={"mode": "secure"})
    try:
        stubs = {s: running.stub(s) for s in ("silo-1", "silo-2")}
        for stub in stubs.values():
            assert stub.Join(_join_request(), timeout=TIMEOUT).accepted
        # Under secure aggregation the statistics are the first secure sum: its adverts come first.
        task = _task(stubs["silo-1"], pb.STAGE_ADVERTISE_KEYS)
        round_id = sw.secure_round_id(task.ref.run_id, task.ref.round, task.ref.attempt)
        paths = material.silos["silo-1"]
        cert, key = paths.cert.read_bytes(), pki.load_private_key(paths.key)

        def request(c_public: bytes = bytes(32), **fields: bytes) -> pb.AdvertiseKeysRequest:
            advert = KeyAdvert.signed(round_id, "silo-1", c_public, bytes(32), cert, key)
            out = sw.advert_to_proto(task.ref, advert)
            for name, value in fields.items():
                setattr(out, name, value)
            return out

        stub = stubs["silo-1"]
        for fields, refusal in (
            ({"mask_public_key": bytes(33)}, "mask_public_key must be 32 bytes, got 33"),
            ({"signature": bytes(81)}, "signature may hold at most 80 bytes, got 81"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.AdvertiseKeys(request(**fields), timeout=TIMEOUT)
            assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
            assert f"key advert of 'silo-1': {refusal}" in err.value.details()
        accepted = request()
        assert not stub.AdvertiseKeys(accepted, timeout=TIMEOUT).duplicate
        assert stub.AdvertiseKeys(accepted, timeout=TIMEOUT).duplicate  # a retried call
        with pytest.raises(grpc.RpcError) as err:
            stub.AdvertiseKeys(request(bytes(range(32))), timeout=TIMEOUT)
        assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        running.stop()


def _start_for_agents(
    tmp_path: Path, material: pki.DevPki, allowed: list[str], *, train_s: float = 60, **overrides: object
) -> Running:
    """A one-round coordinator for real silo agents (see :func:`_run_agents`)."""
    return _start(
        tmp_path,
        material,
        allowed,
        rounds=1,
        timeouts={"gather_s": 60, "train_s": train_s, "evaluate_s": 60, "liveness_s": 60, "done_grace_s": 5},
        training={"epochs_a": 1, "epochs_b": 1, "batch_size": 16, "window": 100, "min_local_steps": 0},
        **overrides,
    )


def _run_agents(
    running: Running,
    material: pki.DevPki,
    tmp_path: Path,
    faults: dict[str, Faults],
    silos: tuple[str, ...],
    policies: dict[str, dict] | None = None,
    crls: dict[str, Path] | None = None,
    compute: dict[str, dict] | None = None,
) -> dict[str, int]:
    """Real silo agents on synthetic ECG shares, one thread each, until the run ends; their exit codes.

    A silo's site policy allows the run's aggregation mode unless ``policies`` says otherwise; a
    silo in ``crls`` checks adverts against that revocation list; one in ``compute`` has that
    ``compute:`` section.
    """
    plain = running.server.coordinator.plan.secure is None
    agents = {}
    for index, silo in enumerate(silos):
        site = {
            "silo_id": silo,
            "data": {"source": "synthetic_ecg", "n_records": 20 * len(silos), "seed": 0, "seconds": 1.0},
            "partition": {"silos": len(silos), "index": index, "scheme": "iid"},
            "state_dir": str(tmp_path / silo),
            "device": "cpu",
            "coordinator": {"address": f"127.0.0.1:{running.server.port}", "give_up_after_s": 30},
            "tls": {
                "ca": str(material.ca.cert),
                "cert": str(material.silos[silo].cert),
                "key": str(material.silos[silo].key),
                **({"crl": str(crls[silo])} if crls and silo in crls else {}),
            },
            "policy": (policies or {}).get(silo, {"require_secure_aggregation": not plain}),
            **({"compute": compute[silo]} if compute and silo in compute else {}),
        }
        cfg = parse_config(site, SiteConfig, f"{silo}.yaml")
        agents[silo] = SiloAgent(cfg, f"{silo}.yaml", faults=faults.get(silo, Faults()))
    codes: dict[str, int] = {}
    threads = [
        threading.Thread(target=lambda s=s, a=a: codes.__setitem__(s, a.run()), daemon=True)
        for s, a in agents.items()
    ]
    torch.set_num_threads(1)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    running.thread.join(30)
    running.stop()
    return codes


def test_a_silo_agent_refuses_to_send_a_nan_update_and_the_round_goes_on(
    material: pki.DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = _start_for_agents(tmp_path, material, ["silo-1", "silo-2"], train_s=8)
    with caplog.at_level(logging.INFO):
        codes = _run_agents(running, material, tmp_path, {"silo-2": Faults(nan_at_round=0)}, ("silo-1", "silo-2"))
    assert codes == {"silo-1": 0, "silo-2": 0}
    assert running.exit_codes == [0]
    refusals = [r.getMessage() for r in caplog.records if "refusing to send the update" in r.getMessage()]
    assert len(refusals) == 1 and "round 0 attempt 1 TRAIN" in refusals[0] and "NaN" in refusals[0]
    rows = [json.loads(line) for line in (running.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]
    assert rows[0]["selected"] == ["silo-1", "silo-2"] and rows[0]["completed"] == ["silo-1"]
    assert rows[0]["evaluated_by"] == ["silo-1", "silo-2"] and "test" not in rows[0]
    report = json.loads((running.run_dir / "report.json").read_text())
    assert report["status"] == "complete" and (running.run_dir / "global_model.npz").is_file()
    assert report["model_selection"]["selected_round"] == 0 and report["final_test"]["n"] > 0


def test_a_silo_training_on_two_workers_uploads_one_update_per_round(
    material: pki.DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = _start_for_agents(tmp_path, material, ["silo-1", "silo-2"])
    with caplog.at_level(logging.INFO):
        codes = _run_agents(
            running, material, tmp_path, {}, ("silo-1", "silo-2"), compute={"silo-1": {"workers": 2}}
        )
    assert codes == {"silo-1": 0, "silo-2": 0} and running.exit_codes == [0]
    assert sum("local training on 2 workers" in r.getMessage() for r in caplog.records) == 1
    audit = [json.loads(line) for line in (running.run_dir / "audit.jsonl").read_text().splitlines()]
    uploads = [e["silo"] for e in audit if e["method"] == "UploadUpdate"]
    assert sorted(uploads) == ["silo-1", "silo-2"]
    rows = [json.loads(line) for line in (running.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0] and rows[0]["completed"] == ["silo-1", "silo-2"]


def test_a_secure_sum_a_hostile_silo_left_unclipped_is_refused_and_the_round_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    material = pki.dev_pki(tmp_path / "pki", 3)
    silos = ("silo-1", "silo-2", "silo-3")
    running = _start_for_agents(tmp_path, material, list(silos), aggregation={"mode": "secure"})
    # silo-2 skips clipping in the first training attempt (attempt 1: the statistics took 0).
    with caplog.at_level(logging.INFO):
        codes = _run_agents(running, material, tmp_path, {"silo-2": Faults(unclipped_at=(0, 1))}, silos)
    assert codes == dict.fromkeys(silos, 0) and running.exit_codes == [0]
    messages = [r.getMessage() for r in caplog.records]
    retries = [m for m in messages if m.startswith("retrying round 0")]
    assert len(retries) == 1 and "the sum of silo-1, silo-2, silo-3 was refused" in retries[0]
    assert "a contribution was not clipped" in retries[0]
    rows = [json.loads(line) for line in (running.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["attempt"]) for r in rows] == [(0, 2)] and rows[0]["aggregation"] == "secure"


def test_a_silo_whose_crl_revokes_its_own_certificate_leaves_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    material = pki.dev_pki(tmp_path / "pki", 3)
    silos = ("silo-1", "silo-2", "silo-3")
    # silo-3 holds a newer CRL than the coordinator, one that revokes its own certificate.
    own_crl = pki.revoke(shutil.copytree(material.ca.key.parent, tmp_path / "ca-copy"), material.silos["silo-3"].cert)
    running = _start_for_agents(tmp_path, material, list(silos), aggregation={"mode": "secure"})
    with caplog.at_level(logging.INFO):
        codes = _run_agents(running, material, tmp_path, {}, silos, crls={"silo-3": own_crl})
    assert codes == {"silo-1": 0, "silo-2": 0, "silo-3": 2} and running.exit_codes == [0]
    (line,) = [r.getMessage() for r in caplog.records if "cannot take part in secure aggregation" in r.getMessage()]
    assert line.startswith("silo silo-3 cannot take part") and "the certificate of silo 'silo-3' is refused" in line
    report = json.loads((running.run_dir / "report.json").read_text())
    assert report["status"] == "complete"
    assert "its certificate cannot be used for secure aggregation" in report["departed"]["silo-3"]
    assert "revoked" in report["departed"]["silo-3"]


def test_silo_strings_are_escaped_and_capped_in_logs_and_unexpected_errors_stay_internal(
    material: pki.DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = _start(tmp_path, material, ["silo-1", "silo-2"])
    try:
        stub = running.stub("silo-1")
        forged = "1.0\n2026-12-05 INFO coordinator: silo silo-2 joined" + "x" * 3_000_000
        request = _join_request()
        request.software_version = forged
        with caplog.at_level(logging.INFO):
            assert stub.Join(request, timeout=TIMEOUT).accepted
        (line,) = [r.getMessage() for r in caplog.records if "silo silo-1 joined" in r.getMessage()]
        assert "\n" not in line and "1.0\\n2026-12-05" in line and "more characters" in line and len(line) < 1000

        def boom(silo: str, request: HeartbeatRequest) -> HeartbeatReply:
            raise RuntimeError("secret detail of the coordinator's state")

        monkeypatch.setattr(running.server.coordinator, "heartbeat", boom)
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(pb.HeartbeatRequest(status="x"), timeout=TIMEOUT)
        assert _code(err) == grpc.StatusCode.INTERNAL and "secret" not in err.value.details()
        assert any("Heartbeat from silo silo-1 failed unexpectedly" in r.getMessage() for r in caplog.records)
    finally:
        running.stop()


def test_one_silo_flooding_long_polls_is_capped_and_others_are_still_served(
    material: pki.DevPki, tmp_path: Path
) -> None:
    running = _start(tmp_path, material, ["silo-1", "silo-2"], max_calls_per_silo=4)
    try:
        flooder, other = running.stub("silo-1"), running.stub("silo-2")
        # silo-2 stays out of the run, so the gather (and silo-1's task) holds still.
        assert flooder.Join(_join_request(), timeout=TIMEOUT).accepted
        current = flooder.GetTask(pb.TaskRequest(wait_ms=0), timeout=TIMEOUT).ref
        held = pb.TaskRequest(ref=current, wait_ms=8000)
        with futures.ThreadPoolExecutor(max_workers=40) as pool:
            calls = [pool.submit(flooder.GetTask.future(held, timeout=TIMEOUT).exception) for _ in range(40)]
            # The four allowed polls are held for 8 s; the others come back at once.
            done, _ = futures.wait(calls, timeout=4)
            refused = [call.result() for call in done]
            assert len(refused) == 36
            assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
            # Refused by the per-silo cap (or, when 16 calls are in flight at once, by the server's limit).
            assert any("already has 4 calls in progress" in e.details() for e in refused)
            # The four held polls do not starve anyone else: silo-2 is answered at once.
            assert other.Heartbeat(pb.HeartbeatRequest(status="ok"), timeout=5).silo_id == "silo-2"
    finally:
        running.stop()


def test_a_silo_whose_policy_the_run_breaks_leaves_it_saying_why(
    material: pki.DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A plain run: silo-2 keeps the default policy (secure aggregation required), silo-1 allows it.
    running = _start_for_agents(tmp_path, material, ["silo-1", "silo-2"])
    policies = {"silo-1": {"require_secure_aggregation": False, "min_silos_per_round": 1}, "silo-2": {}}
    with caplog.at_level(logging.INFO):
        codes = _run_agents(running, material, tmp_path, {}, ("silo-1", "silo-2"), policies)
    assert codes == {"silo-1": 0, "silo-2": 2} and running.exit_codes == [0]
    report = json.loads((running.run_dir / "report.json").read_text())
    assert report["status"] == "complete"
    assert "refused by site policy: site policy requires secure aggregation" in report["departed"]["silo-2"]
    # It refused before sending anything: the statistics came from silo-1 alone.
    assert any("data statistics pooled from 1 silos (silo-1)" in r.getMessage() for r in caplog.records)


def test_a_run_longer_than_the_sites_policy_allows_is_refused_at_join(material: pki.DevPki, tmp_path: Path) -> None:
    # With no silo left to gather, the coordinator gives up within seconds.
    timeouts = {"gather_s": 1, "train_s": 60, "evaluate_s": 60, "liveness_s": 60, "done_grace_s": 1}
    running = _start(tmp_path, material, ["silo-1", "silo-2"], rounds=5, timeouts=timeouts)
    try:
        policy = {"require_secure_aggregation": False, "max_rounds": 3}
        codes = _run_agents(running, material, tmp_path, {}, ("silo-1",), {"silo-1": policy})
    finally:
        running.stop()
    assert codes == {"silo-1": 2}


def test_a_site_that_requires_dp_needs_a_privacy_section() -> None:
    site = {"silo_id": "silo-1", "data": {"source": "synthetic_ecg", "n_records": 8}, "policy": {"require_dp": True}}
    with pytest.raises(ConfigError, match=r"policy\.require_dp"):
        parse_config(site, SiteConfig, "site.yaml")


def test_pinned_peers_in_site_yaml_must_be_silo_ids_and_fingerprints() -> None:
    tls_section = {"ca": "ca.crt", "cert": "s.crt", "key": "s.key", "peers": {"silo-2": "XYZ"}}
    site = {
        "silo_id": "silo-1",
        "data": {"source": "synthetic_ecg", "n_records": 8},
        "coordinator": {"address": "127.0.0.1:50051"},
        "tls": tls_section,
    }
    with pytest.raises(ConfigError, match="expected a SHA-256 fingerprint, 64 lowercase hex characters"):
        parse_config(site, SiteConfig, "site.yaml")
    tls_section["peers"] = {"Silo 2": "0" * 64}
    with pytest.raises(ConfigError, match="'Silo 2' is not a silo id"):
        parse_config(site, SiteConfig, "site.yaml")
