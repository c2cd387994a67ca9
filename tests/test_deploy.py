"""deploy/: the systemd units are valid, hardened, and start the services with arguments and a
logging config the services accept."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coordinator_parser
from federation import logs
from silo_agent.cli import build_parser as silo_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = {"condi-coordinator.service": coordinator_parser, "condi-silo-agent.service": silo_parser}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def service_section(name: str) -> dict[str, list[str]]:
    """The [Service] keys of a unit, each with every value it is given (keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_starts_the_service_with_arguments_it_accepts(name: str) -> None:
    argv = shlex.split(service_section(name)["ExecStart"][0])
    assert Path(argv[0]).parent == Path("/opt/condi/.venv/bin")
    args = UNITS[name]().parse_args(argv[1:])
    assert args.config.startswith("/etc/condi/") and args.log_config == "/etc/condi/logging.yaml"
    # Both stay up between runs: the coordinator as a service taking runs, the silo waiting for them.
    assert args.command == "serve" if name == "condi-coordinator.service" else args.stay_up
    settings = logs.load_log_settings(DEPLOY / "logging.yaml")
    assert settings.stderr == "json" and settings.file_backups >= 1


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_writes_only_its_state_directory_and_gains_no_privilege(name: str) -> None:
    svc = service_section(name)
    expected = {
        "User": "condi", "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "ReadWritePaths": "/var/lib/condi", "UMask": "0077", "CapabilityBoundingSet": "",
    }
    assert {k: svc.get(k, [None])[0] for k in expected} == expected
    assert "MemoryDenyWriteExecute" not in svc  # oneDNN writes its kernels at run time


@needs_systemd_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_accepts_the_unit_without_a_warning(name: str, tmp_path: Path) -> None:
    # The venv the units name does not exist here: point them at this checkout's, so systemd can
    # check the command too and any remaining message is a real problem with the unit.
    unit = tmp_path / name
    unit.write_text((DEPLOY / name).read_text().replace("/opt/condi/.venv/bin", str(Path(sys.executable).parent)))
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(unit.read_text())
    assert parser.get("Install", "WantedBy") == "multi-user.target"


@needs_systemd_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_rates_the_unit_exposure_ok(name: str) -> None:
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(DEPLOY / name)],
        capture_output=True, text=True, timeout=60,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert level is not None, out.stdout + out.stderr
    assert float(level.group(1)) <= 2.0
