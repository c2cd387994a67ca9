"""Coordinator pieces without a network: layout, pooling, checkpoint store, report, configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condi_models.checkpoint import load_checkpoint
from condi_models.configfile import ConfigError, parse_config
from condi_models.data.dataset import Modality
from condi_models.data.normalize import ChannelNormalizer
from condi_models.metrics import classification_metrics
from condi_models.nn.model import CondIModel
from condi_models.server_optimizer import ServerOptimizer, ServerOptimizerConfig
from condi_models.simulation import ModelSpec
from condi_models.training import LocalTrainingConfig
from coordinator.config import (
    FederationConfig,
    check_federation_files,
    federation_file_problems,
    load_federation_config,
)
from coordinator.global_model import RunningSums
from coordinator.layout import build_model_config, layout_mismatch
from coordinator.pooling import ReportError, check_split_report, pool_split
from coordinator.report import write_report
from coordinator.rounds import RoundProgress
from coordinator.store import CheckpointStore, CoordinatorCheckpoint, StoreError, split_saved_state, state_sha256
from federation.statistics import PooledStatistics
from silo_agent.config import SiteConfig, check_site_files, load_site_config
from tests.helpers import REPO, toy_dataset

SMALL = ModelSpec(
    embed_dim=8,
    cond_dim=8,
    denoiser={"hidden": 16, "n_blocks": 1, "n_heads": 2},
    context={"stem_dim": 8, "expert_hidden": 16, "out_dim": 8},
    classifier={"hidden": 16, "n_blocks": 1, "n_heads": 2, "head_hidden": 16},
)


def test_layout_mismatch_names_what_differs() -> None:
    info = toy_dataset(4, modalities=(1, 2), length=30, n_classes=3).info
    assert layout_mismatch(info, dataclasses.replace(info, name="other-source")) is None
    cases = {
        "task": dataclasses.replace(info, task="los3"),
        "classes": dataclasses.replace(info, classes=("a", "b", "c")),
        "sampling rate": dataclasses.replace(info, sampling_rate_hz=2.0),
        "31 steps": dataclasses.replace(info, length=31),
        "modalities": dataclasses.replace(info, modalities=info.modalities[::-1]),
        "channels": dataclasses.replace(
            info, modalities=(info.modalities[0], Modality("m1", info.modalities[1].channels[::-1]))
        ),
    }
    for expected, other in cases.items():
        reason = layout_mismatch(info, other)
        assert reason is not None and expected in reason, (expected, reason)


def test_model_is_built_from_the_layout_with_the_window_cut_to_the_records() -> None:
    info = toy_dataset(4, modalities=(1, 2), length=30, n_classes=3).info
    model_cfg, training = build_model_config(info, SMALL, LocalTrainingConfig(window=250))
    assert training.window == 30 and model_cfg.length == 30
    assert model_cfg.n_classes == 3 and model_cfg.channel_modality == (0, 1, 1)
    assert model_cfg.embed_dim == 8
    _, whole = build_model_config(info, SMALL, LocalTrainingConfig(window=None))
    assert whole.window == 30


# At most 50 samples a split and 10 hidden entries a sample.
BOUNDS = {"max_n": 50, "entries_per_sample": 10}


def _split_report(y: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict:
    c = classification_metrics(y, probs, classes)
    return {
        "n": len(y),
        "loss": 1.0,
        "accuracy": c.accuracy,
        "macro_f1": c.macro_f1,
        "macro_auroc": c.macro_auroc,
        "confusion_matrix": c.confusion_matrix,
        "imputation": {"n_entries": 10 * len(y), "mae": 0.1 * len(y), "rmse": 0.2},
    }


def test_pooled_accuracy_and_macro_f1_equal_the_metrics_of_the_pooled_data() -> None:
    rng = np.random.default_rng(3)
    classes = ("a", "b", "c", "d")
    parts = []
    for n in (17, 40, 9):
        y = rng.integers(0, 4, n)
        y[:2] = [0, 3]
        probs = rng.dirichlet(np.ones(4), n)
        parts.append((y, probs))
    reports = [
        check_split_report(_split_report(y, p, classes), 4, f"silo{i}", **BOUNDS) for i, (y, p) in enumerate(parts)
    ]
    pooled = pool_split(reports)
    whole = classification_metrics(
        np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]), classes
    )
    assert pooled["n"] == 66
    assert pooled["accuracy"] == pytest.approx(whole.accuracy)
    assert pooled["macro_f1"] == pytest.approx(whole.macro_f1)
    assert pooled["confusion_matrix"] == whole.confusion_matrix
    assert pooled["recall"] == pytest.approx([c.recall for c in whole.per_class])
    assert pooled["imputation_mae"] == pytest.approx(sum(10 * n * 0.1 * n for n in (17, 40, 9)) / 660)
    assert pool_split([]) is None


def test_split_reports_that_do_not_add_up_are_refused() -> None:
    y = np.array([0, 1, 1])
    good = _split_report(y, np.eye(2)[y], ("a", "b"))
    with pytest.raises(ReportError, match="confusion_matrix"):
        check_split_report({**good, "n": 4}, 2, "s", **BOUNDS)
    with pytest.raises(ReportError, match=r"s\.accuracy"):
        check_split_report({**good, "accuracy": float("nan")}, 2, "s", **BOUNDS)
    with pytest.raises(ReportError, match="confusion_matrix"):
        check_split_report(good, 3, "s", **BOUNDS)


def test_split_reports_are_bounded_before_they_weigh_in_a_pooled_figure() -> None:
    y = np.arange(60) % 2
    many = _split_report(y, np.eye(2)[y], ("a", "b"))
    with pytest.raises(ReportError, match=r"s\.n: expected a whole number from 1 to 50"):
        check_split_report(many, 2, "s", **BOUNDS)  # issue 13: n = 10^12 outweighed every other silo
    good = _split_report(y[:5], np.eye(2)[y[:5]], ("a", "b"))
    assert check_split_report(good, 2, "s", **BOUNDS) == good
    cases = {
        r"s\.accuracy: expected a score in \[0, 1\]": {**good, "accuracy": 1.5},
        r"s\.macro_auroc: expected a score in \[0, 1\]": {**good, "macro_auroc": -0.2},
        r"s\.loss: expected a number >= 0": {**good, "loss": -3.0},
        r"s\.imputation\.mae: expected a number >= 0": {**good, "imputation": {**good["imputation"], "mae": -1.0}},
        "more than 10 hidden entries per sample": {**good, "imputation": {**good["imputation"], "n_entries": 51}},
    }
    for message, doc in cases.items():
        with pytest.raises(ReportError, match=message):
            check_split_report(doc, 2, "s", **BOUNDS)


def _checkpoint(
    tmp_path: Path,
) -> tuple[CheckpointStore, CoordinatorCheckpoint, dict[str, np.ndarray], CondIModel]:
    info = toy_dataset(4, modalities=(1, 2), length=30, n_classes=3).info
    model_cfg, _ = build_model_config(info, SMALL, LocalTrainingConfig(window=None))
    torch.manual_seed(0)
    model = CondIModel(model_cfg)
    state = {k: v.numpy() for k, v in model.state_to_named_tensors().items()}
    store = CheckpointStore(tmp_path / "run")
    ckpt = CoordinatorCheckpoint(
        run_id="run-1", federation="fed", progress=RoundProgress.start(0, statistics=True), layout=info, model=model_cfg
    )
    return store, ckpt, state, model


def test_store_commits_atomically_and_resumes_exactly(tmp_path: Path) -> None:
    store, ckpt, state, _ = _checkpoint(tmp_path)
    assert store.load() is None
    name, sha = store.save_state(0, state)
    ckpt.state_file, ckpt.state_sha256 = name, sha
    ckpt.rows = [{"round": 0, "val": {"accuracy": 0.5}}]
    ckpt.progress = dataclasses.replace(ckpt.progress, round=1, attempt=2, failures=1, pending="evaluate")
    ckpt.statistics = PooledStatistics.from_sums(
        np.array([10.0, 20.0, 0.0]), np.array([5.0, -4.0, 0.0]), np.array([30.0, 9.0, 0.0]), np.array([3, 0, 4]), 2
    )
    store.commit(ckpt)
    loaded, tensors = store.load()
    assert loaded.to_dict() == ckpt.to_dict() and loaded.statistics == ckpt.statistics
    assert list(tensors) == list(state) and all(np.array_equal(tensors[k], state[k]) for k in state)
    assert [json.loads(line)["round"] for line in store.metrics_path.read_text().splitlines()] == [0]
    # A newer state replaces the older file only once the commit names it.
    newer = {k: v + 1 for k, v in state.items()}
    name2, sha2 = store.save_state(1, newer)
    assert store.load()[0].state_sha256 == sha
    ckpt.state_file, ckpt.state_sha256 = name2, sha2
    ckpt.rows.append({"round": 1})
    store.commit(ckpt)
    assert sorted(p.name for p in store.dir.glob("global-*.npz")) == [name2]
    assert [json.loads(line)["round"] for line in store.metrics_path.read_text().splitlines()] == [0, 1]
    # metrics.jsonl is rebuilt from the checkpoint on load (a crash between commit and rewrite).
    store.metrics_path.write_text('{"round": 0}\n{"round": 0}\n')
    store.load()
    assert [json.loads(line)["round"] for line in store.metrics_path.read_text().splitlines()] == [0, 1]


def test_the_server_optimizer_state_is_checkpointed_beside_the_model(tmp_path: Path) -> None:
    store, ckpt, state, model = _checkpoint(tmp_path)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = ServerOptimizer(ServerOptimizerConfig(kind="fedavgm", momentum=0.5), trained)
    moved = opt.step(state, {k: v + 0.01 if k in trained else v for k, v in state.items()})
    name, sha = store.save_state(0, moved, opt.state())
    assert sha == state_sha256(moved)  # silos download the model alone; the SHA-256 covers only it
    ckpt.state_file, ckpt.state_sha256 = name, sha
    store.commit(ckpt)
    _, saved = store.load()
    tensors, optimizer = split_saved_state(saved)
    assert list(tensors) == list(moved) and all(np.array_equal(tensors[k], moved[k]) for k in moved)
    resumed = ServerOptimizer(opt.cfg, trained)
    resumed.load_state(optimizer)
    nxt = {k: v + 0.01 if k in trained else v for k, v in moved.items()}
    after_resume, uninterrupted = resumed.step(moved, nxt), opt.step(moved, nxt)
    assert all(np.array_equal(after_resume[k], uninterrupted[k]) for k in moved)


def test_store_refuses_a_state_file_that_does_not_match_its_commit(tmp_path: Path) -> None:
    store, ckpt, state, _ = _checkpoint(tmp_path)
    name, sha = store.save_state(0, state)
    ckpt.state_file, ckpt.state_sha256 = name, sha
    store.commit(ckpt)
    other = {k: v * 2 for k, v in state.items()}
    np.savez(store.dir / name, **other)
    with pytest.raises(StoreError, match="does not match the SHA-256"):
        store.load()
    store.progress_path.write_text('{"format": "condi-coordinator/2"}')
    with pytest.raises(StoreError, match="inconsistent checkpoint"):
        store.load()


def test_report_exports_a_global_model_condi_predict_can_load(tmp_path: Path) -> None:
    _, ckpt, _, model = _checkpoint(tmp_path)
    normalizer = ChannelNormalizer(mean=np.array([1.0, 2.0, 3.0], np.float32), std=np.ones(3, np.float32))
    rows = [
        {"round": 0, "val": {"accuracy": 0.4}},
        {"round": 1, "val": {"accuracy": 0.6}, "test": {"accuracy": 0.55}},
    ]
    path = write_report(
        tmp_path / "out",
        federation="fed",
        run_id="run-1",
        status="complete",
        message="ok",
        rows=rows,
        model=model,
        normalizer=normalizer,
        layout=ckpt.layout,
    )
    report = json.loads(path.read_text())
    assert report["val_accuracy_by_round"] == [0.4, 0.6] and report["final_test"] == {"accuracy": 0.55}
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    loaded = load_checkpoint(tmp_path / "out" / "global_model.npz")
    assert loaded.info == ckpt.layout
    np.testing.assert_array_equal(loaded.normalizer.mean, normalizer.mean)
    for name, value in model.state_to_named_tensors().items():
        assert torch.equal(loaded.model.state_to_named_tensors()[name], value)


FED = """\
name: f
silos: [s-1, s-2, s-3]
silos_per_round: 2
min_silos: 2
listen: 127.0.0.1:5000
tls: {ca: ca.crt, cert: server.crt, key: server.key, crl: crl.pem}
timeouts: {train_s: 60, liveness_s: 10}
model: {embed_dim: 8}
training: {epochs_a: 1, window: 100}
evaluation: {steps: 2}
"""


def _write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_federation_config_new_sections_parse_and_bad_ones_name_file_and_key(tmp_path: Path) -> None:
    cfg = load_federation_config(_write(tmp_path, FED, "fed.yaml"))
    assert cfg.training.epochs_a == 1 and cfg.model.embed_dim == 8 and cfg.timeouts.train_s == 60
    bad = {
        "timeouts.trian_s: unknown key": FED.replace("train_s", "trian_s"),
        "training.epochs_a": FED.replace("epochs_a: 1", "epochs_a: many"),
        "tls.crl: required key is missing": FED.replace(", crl: crl.pem", ""),
        "listen": FED.replace("127.0.0.1:5000", "somewhere"),
        "three poll intervals": FED.replace("liveness_s: 10", "liveness_s: 1"),
        "model.size: unknown key": FED.replace("embed_dim: 8", "size: 8"),
    }
    for expected, text in bad.items():
        path = _write(tmp_path, text, "bad.yaml")
        with pytest.raises(ConfigError) as err:
            load_federation_config(path)
        assert str(path) in str(err.value) and expected in str(err.value), (expected, str(err.value))
    problems = federation_file_problems(cfg, "fed.yaml")
    assert problems[0] == "fed.yaml: tls.ca: file ca.crt does not exist" and len(problems) == 4
    with pytest.raises(ConfigError, match=r"tls\.crl: file crl\.pem"):
        check_federation_files(cfg, "fed.yaml")
    no_tls = parse_config(
        {"name": "f", "silos": ["a"], "min_silos": 1, "silos_per_round": 1}, FederationConfig, "x"
    )
    with pytest.raises(ConfigError, match="tls: required to serve"):
        check_federation_files(no_tls, "x")


SITE = """\
silo_id: silo-1
data: {source: synthetic_ecg, n_records: 30}
split: {fractions: [0.6, 0.2, 0.2]}
partition: {silos: 3, index: 2}
coordinator: {address: "127.0.0.1:5000"}
tls: {ca: ca.crt, cert: silo.crt, key: silo.key, passphrase_env: KEY_PASS}
"""


def test_site_config_federation_sections_parse_and_bad_ones_name_file_and_key(tmp_path: Path) -> None:
    cfg = load_site_config(_write(tmp_path, SITE, "site.yaml"))
    assert cfg.partition.index == 2 and cfg.coordinator.rpc_timeout_s == 30.0
    bad = {
        "partition: Value error, index 3 is outside 0..2": SITE.replace("index: 2", "index: 3"),
        "tls: required when a coordinator is configured": SITE.split("tls:")[0],
        "coordinator.adress: unknown key": SITE.replace("address", "adress"),
        "not both": SITE.replace("passphrase_env: KEY_PASS", "passphrase_env: A, passphrase_file: b"),
        "split.fractions": SITE.replace("[0.6, 0.2, 0.2]", "[0.6, 0.2]"),
    }
    for expected, text in bad.items():
        path = _write(tmp_path, text, "bad-site.yaml")
        with pytest.raises(ConfigError) as err:
            load_site_config(path)
        assert str(path) in str(err.value) and expected in str(err.value), (expected, str(err.value))
    with pytest.raises(ConfigError) as err:
        check_site_files(cfg, "site.yaml")
    assert "site.yaml: tls.ca: file ca.crt does not exist" in str(err.value)
    assert "tls.key" in str(err.value)


def test_shipped_examples_parse() -> None:
    fed = load_federation_config(REPO / "examples" / "federation.yaml")
    assert fed.tls is not None and fed.timeouts.liveness_s > 0
    site = load_site_config(REPO / "examples" / "site-federated.yaml")
    assert isinstance(site, SiteConfig) and site.coordinator is not None and site.tls is not None


def test_the_best_rounds_state_file_is_kept_beside_the_current_one_and_read_back_checked(tmp_path: Path) -> None:
    store, ckpt, state, _ = _checkpoint(tmp_path)
    name0, sha0 = store.save_state(0, state)
    ckpt.state_file, ckpt.state_sha256 = name0, sha0
    ckpt.best = {"round": 0, "macro_auroc": 0.8, "state_file": name0, "state_sha256": sha0}
    store.commit(ckpt)
    newer = {k: v + 1 for k, v in state.items()}
    name1, sha1 = store.save_state(1, newer)
    ckpt.state_file, ckpt.state_sha256 = name1, sha1
    store.commit(ckpt)
    assert sorted(p.name for p in store.dir.glob("global-*.npz")) == sorted([name0, name1])
    loaded, _ = store.load()
    assert loaded.best == ckpt.best
    best = store.read_state(name0, sha0)
    assert all(np.array_equal(best[k], state[k]) for k in state)
    with pytest.raises(StoreError, match="does not match the SHA-256"):
        store.read_state(name1, sha0)
    ckpt.best = {**ckpt.best, "state_file": "global-00009-0123456789abcdef.npz"}
    with pytest.raises(StoreError, match="state file missing"):
        store.commit(ckpt)
    data = json.loads(store.progress_path.read_text())
    data["best"]["state_file"] = "../../etc/passwd"
    store.progress_path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="not a state file name"):
        store.load()


def test_the_aggregate_journal_keeps_what_rows_name_and_refuses_altered_sums(tmp_path: Path) -> None:
    store, ckpt, state, _ = _checkpoint(tmp_path)
    ckpt.state_file, ckpt.state_sha256 = store.save_state(0, state)
    recorded = store.save_aggregate(0, np.arange(5.0))
    pending = store.save_aggregate(1, np.full(5, 0.25))
    orphan = store.save_aggregate(1, np.ones(5))  # an attempt that never committed (a crash)
    ckpt.rows = [{"round": 0, "aggregate": recorded}]
    ckpt.pending_row = {"round": 1, "aggregate": pending}
    store.commit(ckpt)
    kept = sorted(p.name for p in store.aggregates_dir.iterdir())
    assert kept == sorted([recorded["file"], pending["file"]]) and orphan["file"] not in kept
    np.testing.assert_array_equal(store.read_aggregate(recorded), np.arange(5.0))
    path = store.aggregates_dir / recorded["file"]
    np.save(path, np.arange(5.0) + 1e-9)
    with pytest.raises(StoreError, match=f"{path}: content does not match"):
        store.read_aggregate(recorded)
    np.save(path, np.arange(5, dtype=np.float32))
    with pytest.raises(StoreError, match="expected a float64 vector"):
        store.read_aggregate(recorded)


def test_running_sums_keep_one_sum_per_attempt_and_no_update() -> None:
    sums = RunningSums()
    sums.add(3, 1, "silo-1", np.array([1.0, 2.0]))
    sums.add(3, 0, "silo-2", np.array([5.0, 5.0]))  # a failed attempt's
    sums.add(3, 1, "silo-3", np.array([0.5, -1.0]))
    with pytest.raises(ValueError, match="already summed"):
        sums.add(3, 1, "silo-1", np.array([1.0, 2.0]))
    np.testing.assert_array_equal(sums.take(3, 1, ("silo-1", "silo-3")), [1.5, 1.0])
    # Taken once, with the failed attempt's sum gone too.
    with pytest.raises(RuntimeError, match=r"holds \[\], the round machine accepted \['silo-2'\]"):
        sums.take(3, 0, ("silo-2",))
    sums.add(4, 0, "silo-1", np.ones(2))
    with pytest.raises(RuntimeError, match="holds \\['silo-1'\\]"):
        sums.take(4, 0, ("silo-1", "silo-2"))
