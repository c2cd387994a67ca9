"""Silo-agent pieces: the extended check, the state directory, fault flags, giving up on the coordinator."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from condi_models.configfile import parse_config
from condi_models.data.normalize import ChannelNormalizer
from coordinator.app import CoordinatorServer
from coordinator.cli import main as coordinator_main
from coordinator.config import FederationConfig
from federation import pki, wire
from federation.faults import FaultPoint
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.stages import StageKey
from silo_agent.agent import Faults
from silo_agent.cli import main as silo_main
from silo_agent.client import CoordinatorClient, CoordinatorUnreachableError
from silo_agent.config import CoordinatorEndpoint, SiloTls, SiteConfig
from silo_agent.local_data import load_local_data
from silo_agent.state import AgentState


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    return pki.dev_pki(tmp_path_factory.mktemp("pki"), 2)


def _fed_doc(material: pki.DevPki, run_dir: Path, listen: str = "127.0.0.1:0") -> dict:
    return {
        "name": "check-test",
        "silos": ["silo-1", "silo-2"],
        "silos_per_round": 2,
        "min_silos": 1,
        "run_dir": str(run_dir),
        "listen": listen,
        "tls": material.coordinator_tls(),
    }


@pytest.fixture(scope="module")
def coordinator(
    material: pki.DevPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CoordinatorServer]:
    cfg = parse_config(
        _fed_doc(material, tmp_path_factory.mktemp("run")), FederationConfig, "federation.yaml"
    )
    server = CoordinatorServer(cfg, "federation.yaml")
    server.start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site(
    tmp_path: Path, material: pki.DevPki, port: int, silo_id: str = "silo-1", cert: Path | None = None
) -> Path:
    doc = {
        "silo_id": silo_id,
        "data": {"source": "synthetic_ecg", "n_records": 12, "seconds": 1.0},
        "coordinator": {"address": f"127.0.0.1:{port}"},
        "tls": {
            "ca": str(material.ca.cert),
            "cert": str(cert or material.silos["silo-1"].cert),
            "key": str(material.silos["silo-1"].key),
        },
    }
    path = tmp_path / f"site-{silo_id}-{port}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = silo_main(["check", "--config", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_check_verifies_the_certificate_and_that_the_coordinator_answers(
    material: pki.DevPki, coordinator: CoordinatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _check(_site(tmp_path, material, coordinator.port), capsys)
    assert code == 0, report
    assert report["tls"]["silo_id"] == "silo-1" and report["tls"]["days_left"] > 300
    assert report["tls"]["problems"] == []
    assert report["coordinator"]["status"] == "SERVING" and report["records"] == 12


def test_check_names_a_certificate_for_another_silo(
    material: pki.DevPki, coordinator: CoordinatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _check(_site(tmp_path, material, coordinator.port, silo_id="silo-2"), capsys)
    assert code == 1
    assert report["tls"]["problems"] == [
        "the certificate is for silo 'silo-1', site.yaml says silo_id 'silo-2'"
    ]


def test_check_reports_an_expired_certificate_and_an_absent_coordinator(
    material: pki.DevPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = pki.make_request(tmp_path / "late", "silo-1")
    late = pki.sign_request(
        req.csr,
        material.ca.cert.parent,
        tmp_path / "late" / "silo-1.crt",
        days=1,
        now=datetime.now(UTC) - timedelta(days=5),
    )
    site = _site(tmp_path, material, _free_port(), cert=late)
    doc = yaml.safe_load(site.read_text())
    doc["tls"]["key"] = str(req.key)
    site.write_text(yaml.safe_dump(doc))
    code, report = _check(site, capsys)
    assert code == 1
    assert any("expired" in p for p in report["tls"]["problems"])
    assert any("expired" in p for p in report["coordinator"]["problems"])
    good = _site(tmp_path, material, _free_port())
    code, report = _check(good, capsys)
    assert code == 1 and "does not answer" in report["coordinator"]["problems"][0]


def test_check_and_agent_name_missing_tls_files(material: pki.DevPki, tmp_path: Path, capsys) -> None:
    site = _site(tmp_path, material, 5000)
    doc = yaml.safe_load(site.read_text())
    doc["tls"]["cert"] = str(tmp_path / "nope.crt")
    site.write_text(yaml.safe_dump(doc))
    for argv in (["check", "--config", str(site)], ["--config", str(site)]):
        assert silo_main(argv) == 2
        err = capsys.readouterr().err
        assert f"{site}: tls.cert: file {tmp_path / 'nope.crt'} does not exist" in err


def test_coordinator_cli_checks_files_before_serving(material: pki.DevPki, tmp_path: Path, capsys) -> None:
    doc = _fed_doc(material, tmp_path / "run")
    doc["tls"]["key"] = str(tmp_path / "missing.key")
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert coordinator_main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["name"] == "check-test"
    assert f"{path}: tls.key: file {tmp_path / 'missing.key'} does not exist" in out.err
    assert coordinator_main(["--config", str(path)]) == 2
    assert "tls.key" in capsys.readouterr().err
    path.write_text(path.read_text() + "colour: blue\n")
    assert coordinator_main(["--config", str(path)]) == 2
    assert f"{path}: colour: unknown key" in capsys.readouterr().err


def test_agent_state_remembers_finished_tasks_and_caches_the_state(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "state")
    state.enter_run("run-1")
    key = StageKey("run-1", 2, 0, pb.STAGE_TRAIN)
    assert not state.is_done(key)
    state.mark_done(key)
    again = AgentState(tmp_path / "state")
    assert again.is_done(key) and not again.is_done(StageKey("run-1", 2, 1, pb.STAGE_TRAIN))
    again.enter_run("run-2")
    assert not AgentState(tmp_path / "state").is_done(key)

    first = wire.encode_state({"w": np.arange(10, dtype=np.float32)})
    second = wire.encode_state({"w": np.arange(10, dtype=np.float32) + 1})
    again.keep_state(first)
    again.keep_state(second)
    assert again.cached_state(first.manifest.payload_sha256) is None
    assert again.cached_state(second.manifest.payload_sha256).payload == second.payload
    (again.cache / f"{second.manifest.payload_sha256}.bin").write_bytes(b"\x00" * 40)
    assert again.cached_state(second.manifest.payload_sha256) is None
    (tmp_path / "state" / "agent.json").write_text("{broken")
    assert AgentState(tmp_path / "state").run_id is None
    # The SHA-256 a task names becomes a file name here: anything but 64 hex characters is refused.
    with pytest.raises(wire.WireError, match=r"task\.state_sha256: expected 64 lowercase hex characters"):
        again.cached_state("../../etc/passwd")


def test_fault_flags_are_parsed_strictly() -> None:
    assert Faults.from_env({}) == Faults()
    faults = Faults.from_env({"CONDI_FAULT_EXIT_AT": "3:evaluate", "CONDI_FAULT_NAN_AT": "1"})
    assert faults.exit_at == FaultPoint(3, pb.STAGE_EVALUATE) and faults.nan_at_round == 1
    for bad in (
        {"CONDI_FAULT_EXIT_AT": "x:train"},
        {"CONDI_FAULT_EXIT_AT": "1:upload"},
        {"CONDI_FAULT_NAN_AT": "a"},
    ):
        with pytest.raises(ValueError, match="CONDI_FAULT"):
            Faults.from_env(bad)


def test_the_coordinator_refuses_a_malformed_fault_point(
    material: pki.DevPki, tmp_path: Path, capsys, monkeypatch
) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(_fed_doc(material, tmp_path / "run")))
    monkeypatch.setenv("CONDI_COORDINATOR_EXIT_AT", "1:upload")
    assert coordinator_main(["--config", str(path)]) == 2
    assert "CONDI_COORDINATOR_EXIT_AT='1:upload': expected ROUND:STAGE" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_client_retries_with_backoff_then_gives_up(material: pki.DevPki) -> None:
    endpoint = CoordinatorEndpoint(
        address=f"127.0.0.1:{_free_port()}", rpc_timeout_s=1.0, max_backoff_s=0.4, give_up_after_s=1.5
    )
    tls_cfg = SiloTls(
        ca=str(material.ca.cert),
        cert=str(material.silos["silo-1"].cert),
        key=str(material.silos["silo-1"].key),
    )
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    client = CoordinatorClient(endpoint, tls_cfg, "silo-1", sleep=sleep)
    try:
        with pytest.raises(CoordinatorUnreachableError, match="unreachable for"):
            client.get_task(None, 0)
    finally:
        client.close()
    assert len(pauses) >= 3
    assert all(0.0 < p <= 0.4 for p in pauses)
    assert pauses[0] <= 0.5 and max(pauses) > pauses[0]


def test_a_silos_statistics_describe_its_visible_training_data_and_rescaling_keeps_its_masks() -> None:
    site = parse_config(
        {
            "silo_id": "silo-1",
            "data": {"source": "synthetic_ecg", "n_records": 40, "seed": 0, "seconds": 1.0},
            "simulated_missingness": {"ps": 0.8, "pw": 0.5, "pattern": "points", "seed": 3},
        },
        SiteConfig,
        "site.yaml",
    )
    data = load_local_data(site, "site.yaml")
    stats = data.statistics()
    train = data.sources[0]
    visible = data.train.observed
    np.testing.assert_array_equal(stats.channel_count, visible.sum(axis=(0, 2)))
    np.testing.assert_allclose(stats.channel_sum, np.where(visible, train.x, 0.0).sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        stats.channel_sq_sum, np.where(visible, train.x.astype(np.float64) ** 2, 0.0).sum(axis=(0, 2)), rtol=1e-4
    )
    assert stats.class_counts.sum() == len(data.train)
    # Standardized with the federation's normalizer: the same entries hidden, other values.
    pooled = ChannelNormalizer(mean=data.fitted.mean + 1.0, std=data.fitted.std * 2.0)
    scaled = data.scaled_with(pooled)
    for before, after in ((data.train, scaled.train), (data.val, scaled.val), (data.test, scaled.test)):
        np.testing.assert_array_equal(before.observed, after.observed)
        np.testing.assert_array_equal(before.hidden, after.hidden)
    expected = np.where(visible, (train.x - pooled.mean[None, :, None]) / pooled.std[None, :, None], 0.0)
    np.testing.assert_allclose(scaled.train.x, expected, atol=1e-5)
    # What the silo reports stays the sums of its own data, whatever it is scaled with.
    np.testing.assert_array_equal(scaled.statistics().channel_sum, stats.channel_sum)
