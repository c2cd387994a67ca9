"""`silo-agent check` end to end, as hospital IT runs it from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from condi_models.data.sources import DataLayout, MimicSource, PtbxlSource, load_source, source_layout
from coordinator.layout import layout_mismatch
from silo_agent.config import load_site_config
from tests.helpers import REPO


def _check(config: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "silo_agent.cli", "check", "--config", config, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_check_ptbxl_example_reports_records_and_superclasses(ptbxl_root):
    out = _check("examples/site-ptbxl.yaml", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["records"] + report["skipped_records"] == 353
    assert report["records"] == 352  # one record has no diagnostic statement
    assert set(report["classes"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert sum(report["classes"].values()) == 352
    assert report["classes"]["NORM"] == 220
    assert len(report["modalities"]) == 12
    assert all(v == 1.0 for v in report["natural_observed_fraction"].values())
    assert all(v < 1.0 for v in report["simulated_observed_fraction"].values())


def test_check_mimic_demo_reports_stays_and_both_label_balances(mimic_root):
    out = _check("examples/site-mimic-demo.yaml", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    details = report["source_details"]
    assert details["stays_in_table"] == 140
    assert report["records"] == details["stays_kept"]["ihm48"]
    assert details["label_balance"]["ihm48"] == report["classes"]
    assert sum(details["label_balance"]["los3"].values()) == details["stays_kept"]["los3"]
    assert details["absent_tables"] == ["icu/chartevents"]
    assert report["natural_observed_fraction"]["vitals"] == 0.0
    assert report["natural_observed_fraction"]["chemistry"] > 0.0


@pytest.mark.parametrize(
    "config",
    ["examples/site-synthetic-ecg.yaml", "examples/site-synthetic-psg.yaml", "examples/site-synthetic-icu.yaml"],
)
def test_check_prints_the_layout_federation_yaml_pins_and_the_data_has(config):
    out = _check(config, "--layout")
    assert out.returncode == 0, out.stderr
    printed = DataLayout.model_validate(yaml.safe_load(out.stdout)["layout"])
    site = load_site_config(REPO / config)
    loaded = load_source(site.data).info
    assert layout_mismatch(loaded, printed.to_info("pinned")) is None
    # The layout known without reading the data is the one the data has.
    assert layout_mismatch(loaded, source_layout(site.data)) is None


def test_the_layout_of_the_shared_records_is_known_without_reading_them(ptbxl_root, mimic_root):
    for source in (PtbxlSource(source="ptbxl", path=str(ptbxl_root), max_records=5),
                   MimicSource(source="mimic", path=str(mimic_root))):
        assert layout_mismatch(load_source(source).info, source_layout(source)) is None


def test_check_synthetic_text_summary():
    out = _check("examples/site-synthetic-ecg.yaml")
    assert out.returncode == 0, out.stderr
    assert "600 records" in out.stdout
    assert "simulated:" in out.stdout


def test_check_rejects_bad_config_with_file_and_key(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("silo_id: a\ndata:\n  source: synthetic_ecg\n  n_records: -3\n")
    out = _check(str(bad))
    assert out.returncode == 2
    assert f"{bad}: data.n_records" in out.stderr
