"""Config files: bad input gets one clear line naming the file and the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from condi_models.configfile import ConfigError
from condi_models.data.sources import source_layout
from coordinator.config import AggregationConfig, load_federation_config
from coordinator.layout import layout_mismatch
from silo_agent.cli import main as silo_main
from silo_agent.config import load_site_config
from tests.helpers import REPO

GOOD_SITE = """\
silo_id: hospital-a
data:
  source: synthetic_ecg
  n_records: 40
simulated_missingness:
  ps: 0.5
  pw: 0.5
"""


def _write(tmp_path, text, name="site.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_site_config_parses(tmp_path):
    cfg = load_site_config(_write(tmp_path, GOOD_SITE))
    assert cfg.silo_id == "hospital-a"
    assert cfg.data.n_records == 40
    assert cfg.simulated_missingness.pw == 0.5
    assert cfg.device == "auto"


def test_site_privacy_section_leaves_planned_rounds_to_the_run(tmp_path):
    cfg = load_site_config(_write(tmp_path, GOOD_SITE + "privacy:\n  target_epsilon: 3\n  phases: [b]\n"))
    assert cfg.privacy.planned_rounds is None
    spec = cfg.privacy.spec(4)
    assert (spec.target_epsilon, spec.planned_rounds, spec.delta, spec.phases) == (3.0, 4, 1e-5, ("b",))
    fixed = load_site_config(_write(tmp_path, GOOD_SITE + "privacy:\n  target_epsilon: 3\n  planned_rounds: 2\n"))
    assert fixed.privacy.spec(4).planned_rounds == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD_SITE + "colour: blue\n", "colour: unknown key"),
        (GOOD_SITE.replace("n_records: 40", "n_records: many"), "data.n_records"),
        (GOOD_SITE.replace("n_records: 40", "n_recs: 40"), "data.n_recs: unknown key"),
        (GOOD_SITE.replace("pw: 0.5", "pw: 1.5"), "simulated_missingness"),
        (GOOD_SITE.replace("pw: 0.5", "pw: 0.5\n  shape: round"), "simulated_missingness.shape: unknown key"),
        (GOOD_SITE.replace("silo_id: hospital-a\n", ""), "silo_id: required key is missing"),
        (GOOD_SITE.replace("hospital-a", "Hospital A"), "silo_id"),
        (GOOD_SITE.replace("synthetic_ecg", "floppy_disk"), "data"),
        (GOOD_SITE + "privacy:\n  target_epsilon: 8\n  noise: 1.1\n", "privacy.noise: unknown key"),
        (GOOD_SITE + "privacy:\n  target_epsilon: 0\n", "privacy.target_epsilon must be > 0"),
        (GOOD_SITE + "privacy:\n  delta: 0.001\n", "privacy.target_epsilon: required key is missing"),
        (GOOD_SITE + "privacy:\n  target_epsilon: 8\n  phases: [a, c]\n", "privacy.phases must name"),
        ("silo_id: [unclosed\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_bad_site_config_names_file_and_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_missing_data_folder_is_reported_by_check(tmp_path, capsys):
    path = _write(tmp_path, "silo_id: a\ndata:\n  source: ptbxl\n  path: /nonexistent/ptbxl\n")
    assert silo_main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "data.path" in err and "/nonexistent/ptbxl" in err


def test_federation_config_checks_consistency(tmp_path):
    ok = _write(tmp_path, "name: f\nsilos: [s-1, s-2, s-3]\nsilos_per_round: 2\nmin_silos: 2\n", "fed.yaml")
    assert load_federation_config(ok).rounds == 70
    bad = _write(tmp_path, "name: f\nsilos: [s-1, s-2]\nsilos_per_round: 3\n", "bad.yaml")
    with pytest.raises(ConfigError, match="silos_per_round"):
        load_federation_config(bad)
    dup = _write(tmp_path, "name: f\nsilos: [s-1, s-1]\nsilos_per_round: 1\nmin_silos: 1\n", "dup.yaml")
    with pytest.raises(ConfigError, match="twice"):
        load_federation_config(dup)


def test_shipped_federation_example_is_valid():
    cfg = load_federation_config(REPO / "examples" / "federation.yaml")
    assert (cfg.rounds, cfg.silos_per_round, len(cfg.silos)) == (70, 3, 6)


def test_console_scripts_installed():
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "check", "--config", str(REPO / "examples" / "federation.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["name"] == "condi-demo"


def test_the_default_threshold_survives_one_dropout_with_three_silos_a_round() -> None:
    agg = AggregationConfig()
    assert [agg.threshold_for(n) for n in (2, 3, 4, 5, 6, 10)] == [2, 2, 3, 3, 4, 6]
    # Always a majority of the selected silos, so no two disjoint sets can both unmask.
    assert all(2 * agg.threshold_for(n) > n for n in range(2, 60))


def test_a_pinned_layout_is_bounded_and_names_each_thing_once(tmp_path):
    head = "name: f\nsilos: [s-1, s-2, s-3]\nsilos_per_round: 2\nmin_silos: 2\n"
    layout = (
        "layout:\n  task: t\n  classes: [a, b]\n  sampling_rate_hz: 100\n  length: {length}\n"
        "  modalities:\n    - {{name: m1, channels: [{channels}]}}\n"
    )
    ok = _write(tmp_path, head + layout.format(length=50, channels="x, y"), "ok.yaml")
    assert load_federation_config(ok).layout.to_info("f").n_features == 2
    cases = {
        "200000 length, this federation takes at most 100000": layout.format(length=200_000, channels="x"),
        "channels: a name appears twice": layout.format(length=50, channels="x, x"),
    }
    for message, text in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_federation_config(_write(tmp_path, head + text, "bad.yaml"))
    limited = head + "layout_limits: {max_channels: 1}\n" + layout.format(length=50, channels="x, y")
    with pytest.raises(ConfigError, match="2 channels, this federation takes at most 1"):
        load_federation_config(_write(tmp_path, limited, "limited.yaml"))


def test_the_shipped_federation_pins_the_layout_of_the_shipped_site():
    cfg = load_federation_config(REPO / "examples" / "federation.yaml")
    site = load_site_config(REPO / "examples" / "site-federated.yaml")
    assert layout_mismatch(cfg.layout.to_info(cfg.name), source_layout(site.data)) is None
