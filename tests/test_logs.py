"""The services' logging: JSON lines rotated by size, every generation private, a config file
validated with errors that name it."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from condi_models.configfile import ConfigError
from federation import logs


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_events_rotate_by_size_and_every_generation_is_private(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.jsonl"
    logs.configure(json_path=path, settings=logs.LogSettings(stderr="off", file_max_mb=0.001, file_backups=2))
    log = logging.getLogger("test.rotation")
    for i in range(200):
        log.info("round %d done", i, extra={"event": {"round": i}})
    files = sorted(path.parent.glob("events.jsonl*"))
    assert [f.name for f in files] == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert f.stat().st_size <= 1100
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        assert all(doc["logger"] == "test.rotation" for doc in lines)
    newest = json.loads(path.read_text().splitlines()[-1])
    assert newest["round"] == 199 and newest["message"] == "round 199 done"


def test_the_config_file_sets_level_and_stderr_format(tmp_path: Path) -> None:
    cfg = tmp_path / "logging.yaml"
    cfg.write_text("level: WARNING\nstderr: json\nfile_max_mb: 1\nfile_backups: 3\n")
    settings = logs.load_log_settings(cfg)
    assert (settings.level, settings.stderr, settings.file_backups) == ("WARNING", "json", 3)
    assert logs.load_log_settings(cfg, verbose=True).level == "DEBUG"
    code = (
        "import logging, sys; from federation import logs; "
        f"logs.configure(settings=logs.load_log_settings({str(cfg)!r})); "
        "logging.getLogger('x').info('hidden'); logging.getLogger('x').warning('shown')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "shown"


@pytest.mark.parametrize(
    ("text", "field"),
    [("level: LOUD\n", "level"), ("file_backups: 0\n", "file_backups"), ("rotate: daily\n", "rotate")],
)
def test_a_bad_config_file_is_refused_naming_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    cfg = tmp_path / "logging.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        logs.load_log_settings(cfg)
    assert str(cfg) in str(err.value) and field in str(err.value)


def test_both_services_refuse_a_bad_logging_file_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli import main as coordinator_main
    from silo_agent.cli import main as silo_main

    cfg = tmp_path / "logging.yaml"
    cfg.write_text("stderr: syslog\n")
    missing = str(tmp_path / "absent.yaml")
    for main in (coordinator_main, silo_main):
        assert main(["--config", missing, "--log-config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert str(cfg) in err and "stderr" in err and "absent.yaml" not in err
