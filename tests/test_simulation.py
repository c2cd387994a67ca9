"""The in-process federated simulation: runs end to end, is deterministic, writes what it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from condi_models.checkpoint import CheckpointError, load_checkpoint
from condi_models.configfile import ConfigError, parse_config
from condi_models.simulation import ExperimentConfig, load_experiment, run_simulation
from tests.helpers import REPO

TINY = {
    "name": "t",
    "seed": 3,
    "device": "cpu",
    "data": {"source": "synthetic_ecg", "n_records": 90, "seed": 1, "seconds": 5.0},
    "missingness": {"ps": 0.8, "pw": 0.5, "seed": 0},
    "federation": {"silos": 3, "silos_per_round": 2, "rounds": 2},
    "model": {
        "variant": "condi",
        "embed_dim": 8,
        "cond_dim": 8,
        "denoiser": {"hidden": 16, "n_blocks": 1, "n_heads": 2},
        "context": {"stem_dim": 8, "expert_hidden": 16, "out_dim": 8},
        "classifier": {"hidden": 16, "n_blocks": 1, "n_heads": 2, "head_hidden": 32},
    },
    # The prior's refit and the gate and band fits run every round, on a small budget.
    "training": {"epochs_a": 1, "epochs_b": 1, "batch_size": 16, "window": 100, "min_local_steps": 0,
                 "prior_em_iterations": 3, "band_windows": 4, "impute_steps": 3},
    "evaluation": {"n_samples": 2, "steps": 3},
}


def _cfg(**changes) -> ExperimentConfig:
    return parse_config({**TINY, **changes}, ExperimentConfig, "test")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    return run_simulation(_cfg(), run_dir=tmp_path_factory.mktemp("run1"))


def test_same_seed_same_metrics(first_run, tmp_path):
    again = run_simulation(_cfg(), run_dir=tmp_path)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first_run.rounds]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again.rounds]
    assert first_run.final["test"] == again.final["test"]


def test_other_seed_other_run(first_run, tmp_path):
    other = run_simulation(_cfg(seed=4), run_dir=tmp_path)
    assert other.final["test"] != first_run.final["test"]


def test_run_writes_report_curves_and_checkpoint(first_run):
    d = first_run.run_dir
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["silos"]) == 2 for r in rows)
    assert "imputation_mae" in rows[-1]["val"]
    report = json.loads((d / "report.json").read_text())
    assert report["final"]["test"]["accuracy"] == first_run.final["test"]["accuracy"]
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(d / "global_model.npz")
    assert ckpt.info.classes == ("NORM", "MI", "STTC", "CD", "HYP")
    assert ckpt.model.cfg.variant.value == "condi"
    x = torch.zeros(2, 12, 100)
    obs = torch.ones(2, 12, 100, dtype=torch.bool)
    assert ckpt.model.classify(x, obs).shape == (2, 5)
    # The silos' EM moments were averaged into the global prior: leads correlate, so not identity.
    second = ckpt.model.prior.second_moment.detach()
    assert second.shape == (36, 36)  # the 12 leads, their beat templates and their interpolations
    leads = second[:12, :12]
    assert (leads - torch.diag(torch.diagonal(leads))).abs().max() > 0.3
    assert second[:12, 12:].abs().max() > 0.1  # each lead correlates with its template


def test_classifier_trains_on_observed_imputed_or_prior_filled_samples(tmp_path):
    losses = {}
    for mode in ("observed", "imputed", "prior"):
        cfg = _cfg(
            training={**TINY["training"], "phase_b_input": mode, "impute_steps": 2},
            federation={"silos": 3, "silos_per_round": 1, "rounds": 1},
        )
        res = run_simulation(cfg, run_dir=tmp_path / mode)
        assert 0.0 <= res.final["test"]["accuracy"] <= 1.0
        losses[mode] = res.rounds[0]["phase_b_loss"]
    assert all(np.isfinite(v) for v in losses.values())
    # Same seed and data: only the classifier's input differs, so each trains a different model.
    assert len(set(losses.values())) == 3, losses


def test_corrupt_checkpoint_is_refused(tmp_path, first_run):
    bad = tmp_path / "bad.npz"
    bad.write_bytes((first_run.run_dir / "global_model.npz").read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"bad\.npz"):
        load_checkpoint(bad)


def test_experiment_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"federation: .*silos_per_round"):
        _cfg(federation={"silos": 2, "silos_per_round": 3})
    with pytest.raises(ConfigError, match=r"training\.epochs: unknown key"):
        _cfg(training={"epochs": 3})
    with pytest.raises(ConfigError, match=r"model\.variant"):
        _cfg(model={"variant": "magic"})


def test_every_variant_runs_one_round(tmp_path):
    for variant in ("fedavg_zero_fill", "pepsy", "no_imputation", "no_wcond", "no_imputation_no_wcond"):
        cfg = _cfg(
            model={**TINY["model"], "variant": variant}, federation={"silos": 3, "silos_per_round": 1, "rounds": 1}
        )
        res = run_simulation(cfg, run_dir=tmp_path / variant)
        assert 0.0 <= res.final["test"]["accuracy"] <= 1.0
        assert np.isfinite(res.final["test"]["loss"])


def test_shipped_tiny_example_prints_final_json_last(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "federation.cli", "sim", "--config", "examples/sim-tiny.yaml", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(final) >= {"accuracy", "macro_f1", "imputation_mae"}
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == final


def test_every_shipped_simulation_config_validates():
    names = sorted(p.name for p in (REPO / "examples").glob("sim-*.yaml"))
    assert "sim-ptbxl.yaml" in names
    for name in names:
        cfg = load_experiment(REPO / "examples" / name)
        assert cfg.federation.rounds >= 1
    ptbxl = load_experiment(REPO / "examples" / "sim-ptbxl.yaml")
    # The shared sample, the paper's federation and its headline missingness, whole leads dropped.
    assert ptbxl.data.source == "ptbxl" and (ptbxl.federation.silos, ptbxl.federation.silos_per_round) == (6, 3)
    assert ptbxl.missingness.ps == ptbxl.missingness.pw == 0.8 and ptbxl.missingness.p_drop > 0


def test_the_exported_model_is_the_best_on_validation(tmp_path):
    res = run_simulation(
        _cfg(federation={"silos": 3, "silos_per_round": 2, "rounds": 3, "eval_every": 1}), run_dir=tmp_path
    )
    aurocs = [r["val"]["macro_auroc"] for r in res.rounds]
    assert res.final["selected_round"] == 1 + int(np.argmax(aurocs))
    assert res.test_probs.shape[0] == len(res.test_labels) and np.allclose(res.test_probs.sum(1), 1.0, atol=1e-4)
    last = run_simulation(
        _cfg(federation={"silos": 3, "silos_per_round": 2, "rounds": 3, "eval_every": 1, "model_selection": "last"}),
        run_dir=tmp_path / "last",
    )
    assert last.final["selected_round"] == 3
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in res.rounds]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in last.rounds] == strip
