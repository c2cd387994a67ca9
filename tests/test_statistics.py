"""The data statistics summed once before round 0: exact pooling, the checks on what silos send,
and the statistics stage of the coordinator's round machine in the clear and through the secure sum.

The gRPC path (refusals naming the field, duplicates, the pooled result in every task) is in
tests/test_coordinator_grpc.py; real silo processes summing securely in tests/test_secure_harness.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from condi_models.data.normalize import ChannelNormalizer
from coordinator.rounds import Counted, Phase, RoundMachine, RoundPlan, RoundProgress, SecurePlan
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg import QuantConfig, dequantize, quantize
from federation.settings import RoundSettings, SettingsError
from federation.statistics import (
    STATISTICS_CLIP,
    STATISTICS_QUANT,
    PooledStatistics,
    SiloStatistics,
    StatisticsError,
    StatisticsLayout,
    check_statistics_report,
)
from federation.transfer import stage_key, stage_ref
from tests.helpers import drive_secure_attempt, secagg_identities

FEATURES, CLASSES = 3, 4
LAYOUT = StatisticsLayout(n_features=FEATURES, n_classes=CLASSES)


def _silos(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three silos' (values, visible mask, labels) on different scales, one never seeing channel 2."""
    rng = np.random.default_rng(seed)
    out = []
    for n, shift, scale in ((30, 0.0, 1.0), (12, 3.0, 5.0), (50, -1.0, 0.5)):
        x = (rng.normal(size=(n, FEATURES, 20)) * scale + shift).astype(np.float32)
        visible = rng.random((n, FEATURES, 20)) < 0.7
        if shift == 3.0:
            visible[:, 2] = False
        out.append((np.where(visible, x, 0.0).astype(np.float32), visible, rng.integers(0, 3, size=n)))
    return out


def _silo_statistics(silos) -> list[SiloStatistics]:
    return [SiloStatistics.of(ChannelNormalizer.fit(x, v), y, CLASSES) for x, v, y in silos]


def test_pooled_statistics_equal_the_fit_on_every_silos_data_in_the_clear_and_through_the_ring() -> None:
    silos = _silos(5)
    parts = _silo_statistics(silos)
    whole = ChannelNormalizer.fit(np.concatenate([x for x, _, _ in silos]), np.concatenate([v for _, v, _ in silos]))
    labels = np.concatenate([y for _, _, y in silos])
    clear = PooledStatistics.pool(parts)
    np.testing.assert_allclose(clear.mean, whole.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clear.std, whole.std, rtol=1e-5)
    assert clear.class_counts == tuple(np.bincount(labels, minlength=CLASSES)) and clear.class_counts[3] == 0
    assert clear.silos == 3 and clear.channel_count == tuple(float(c) for c in whole.count)
    # Through the secure sum's ring: quantize each vector, add mod 2^64, dequantize.
    rng = np.random.default_rng(0)
    codes = [quantize(p.to_vector(LAYOUT), STATISTICS_QUANT, rng) for p in parts]
    total = dequantize(np.sum(codes, axis=0, dtype=np.uint64), STATISTICS_QUANT)
    secure = PooledStatistics.from_total(LAYOUT, total, 3, max_records=100)
    assert secure.class_counts == clear.class_counts and secure.channel_count == clear.channel_count
    np.testing.assert_allclose(secure.mean, clear.mean, atol=1e-4)
    np.testing.assert_allclose(secure.std, clear.std, rtol=1e-4)
    # The normalizer silos scale with.
    norm = clear.normalizer
    np.testing.assert_allclose(norm.mean, whole.mean, rtol=1e-5, atol=1e-6)
    assert norm.mean.dtype == np.float32


def test_a_silo_refuses_to_send_statistics_the_ring_would_clip_or_that_are_not_finite() -> None:
    (part,) = _silo_statistics(_silos(1)[:1])
    huge = SiloStatistics(part.channel_count, part.channel_sum, part.channel_sq_sum * 0 + 2 * STATISTICS_CLIP,
                          part.class_counts)
    with pytest.raises(StatisticsError, match="exceed the secure-sum bound"):
        huge.to_vector(LAYOUT)
    nan = SiloStatistics(part.channel_count, part.channel_sum * np.nan, part.channel_sq_sum, part.class_counts)
    with pytest.raises(StatisticsError, match="NaN or infinite"):
        nan.to_vector(LAYOUT)
    with pytest.raises(StatisticsError, match="the layout of 3 channels and 5 classes has 14"):
        part.to_vector(StatisticsLayout(FEATURES, 5))


def test_reports_are_checked_against_the_layout_and_the_record_bound() -> None:
    (part,) = _silo_statistics(_silos(2)[:1])
    good = part.to_dict()
    checked = check_statistics_report(json.loads(json.dumps(good)), LAYOUT, "r", max_records=30)
    np.testing.assert_array_equal(checked.class_counts, part.class_counts)
    cases = {
        "r.class_counts: expected 4 finite numbers": {**good, "class_counts": [1, 2]},
        "r.channel_sum: expected 3 finite numbers": {**good, "channel_sum": [float("inf"), 0.0, 0.0]},
        "r.channel_count: expected whole numbers >= 0": {**good, "channel_count": [-1.0, 1.0, 1.0]},
        "30 records, expected 1 to 29": good,
        "no data set could have": {**good, "channel_sq_sum": [0.0, 0.0, 0.0]},
        "unknown keys ['x']": {**good, "x": 1},
        "r: expected an object": [1, 2],
    }
    for message, doc in cases.items():
        limit = 29 if message.startswith("30 records") else 30
        with pytest.raises(StatisticsError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_statistics_report(doc, LAYOUT, "r", max_records=limit)
    with pytest.raises(StatisticsError, match="1 to 30"):
        check_statistics_report({**good, "class_counts": [0, 0, 0, 0]}, LAYOUT, "r", max_records=30)


def test_round_settings_carry_the_statistics_and_refuse_malformed_ones() -> None:
    pooled = PooledStatistics.pool(_silo_statistics(_silos(3)))
    settings = RoundSettings(train_seed=4, statistics=pooled)
    assert RoundSettings.from_json(settings.to_json()) == settings
    doc = json.loads(settings.to_json())
    for field, value, message in (
        ("std", [1.0, 0.0, 1.0], "std must be > 0"),
        ("class_counts", [1, 2.5, 0, 0], "whole numbers"),
        ("mean", [1.0, 2.0], "one entry per channel"),
        ("silos", 0, "silos: expected a positive whole number"),
    ):
        bad = {**doc, "statistics": {**doc["statistics"], field: value}}
        with pytest.raises(SettingsError, match=message):
            RoundSettings.from_json(json.dumps(bad))
    with pytest.raises(StatisticsError, match="statistics of 3 channels and 4 classes, the run's layout has 12 and 5"):
        pooled.check_layout(12, 5, "round settings: statistics")


def _plan(secure: SecurePlan | None = None, silos: int = 3) -> RoundPlan:
    return RoundPlan(
        allowed=tuple(f"silo-{i + 1}" for i in range(silos)), rounds=2, silos_per_round=silos, min_silos=2,
        max_attempts=2, seed=0, gather_s=5.0, train_s=10.0, evaluate_s=10.0, liveness_s=1000.0, secure=secure,
    )


def _machine(plan: RoundPlan) -> RoundMachine:
    machine = RoundMachine(plan, "run-1", RoundProgress.start(0, statistics=True), "sha", 0.0)
    machine.data_shape = (CLASSES, FEATURES)
    for silo in plan.allowed:
        machine.join(silo, 0.0)
    return machine


def _report(machine: RoundMachine, silo: str, stats: SiloStatistics) -> None:
    view = machine.task_for(silo, 1.0)
    assert view.key.stage == pb.STAGE_STATISTICS and view.state_sha256 == ""
    digest = hashlib.sha256(json.dumps(stats.to_dict()).encode()).hexdigest()
    machine.accept_statistics(silo, stage_key(stage_ref(view.key)), digest, stats)


def test_the_statistics_stage_runs_once_before_round_0_and_every_later_task_carries_its_result() -> None:
    machine = _machine(_plan())
    parts = dict(zip(machine.plan.allowed, _silo_statistics(_silos(4)), strict=True))
    assert machine.tick(1.0) and machine.phase == Phase.STATISTICS and machine.progress().pending == "statistics"
    for silo in ("silo-1", "silo-3"):
        _report(machine, silo, parts[silo])
    assert machine.tick(2.0) == []  # silo-2 is alive and has not reported
    _report(machine, "silo-2", parts["silo-2"])
    (counted,) = machine.tick(3.0)
    assert isinstance(counted, Counted) and counted.total is None and counted.attempt == 0
    assert counted.participants == ("silo-1", "silo-2", "silo-3")
    assert machine.task_for("silo-1", 3.0).message.endswith("recording the statistics")
    pooled = PooledStatistics.pool(list(counted.reports.values()))
    machine.statistics_recorded(pooled, 3.0)
    machine.tick(4.0)
    assert machine.phase == Phase.TRAIN and machine.attempt == 1
    train = machine.task_for("silo-1", 4.0)
    assert train.key.stage == pb.STAGE_TRAIN and train.settings.statistics == pooled
    with pytest.raises(RuntimeError, match="statistics_recorded"):
        machine.statistics_recorded(pooled, 5.0)


def test_statistics_that_cannot_be_used_fail_the_attempt_and_are_asked_for_again() -> None:
    machine = _machine(_plan())
    parts = _silo_statistics(_silos(6))
    machine.tick(1.0)
    for silo, part in zip(machine.plan.allowed, parts, strict=True):
        _report(machine, silo, part)
    machine.tick(2.0)
    effects = machine.refuse_result("the summed statistics: nonsense", 2.0)
    assert [type(e).__name__ for e in effects] == ["Retry", "Persist"]
    assert effects[1].progress.pending == "statistics"
    machine.tick(3.0)
    assert machine.phase == Phase.STATISTICS and machine.attempt == 1
    for silo, part in zip(machine.plan.allowed, parts, strict=True):
        _report(machine, silo, part)
    machine.tick(4.0)
    (failed,) = machine.refuse_result("again", 4.0)
    assert type(failed).__name__ == "Failed" and "giving up after 2 failed attempts" in failed.message


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory):
    return secagg_identities(tmp_path_factory.mktemp("pki"), 4)


def test_under_secure_aggregation_only_the_sum_of_the_statistics_is_revealed(identities) -> None:
    secure = SecurePlan(lambda n: n // 2 + 1, 10.0, QuantConfig(1.0, 24, 32), identities[0], 1000.0)
    machine = _machine(_plan(secure, silos=4))
    machine.vector_length = 10  # the update vector of round 0's training
    parts = dict(zip(machine.plan.allowed, _silo_statistics(_silos(7)) + _silo_statistics(_silos(8))[:1],
                     strict=True))
    machine.tick(0.0)
    assert machine.phase == Phase.ADVERTISE
    settings = RoundSettings.from_json(machine.task_for("silo-1", 0.0).settings.to_json())
    assert settings.secagg is not None and settings.secagg.content == "statistics"
    assert settings.secagg.vector_length == LAYOUT.vector_length and settings.train_seed is None
    effects = drive_secure_attempt(machine, lambda sid: parts[sid].to_vector(LAYOUT), identities, dropped="silo-4")
    (counted,) = effects
    assert isinstance(counted, Counted) and counted.reports == {} and counted.total is not None
    assert counted.participants == ("silo-1", "silo-2", "silo-3")
    secure_pooled = PooledStatistics.from_total(LAYOUT, counted.total, len(counted.participants), max_records=100)
    clear = PooledStatistics.pool([parts[s] for s in counted.participants])
    assert secure_pooled.class_counts == clear.class_counts
    np.testing.assert_allclose(secure_pooled.mean, clear.mean, atol=1e-4)
    machine.statistics_recorded(secure_pooled, 50.0)
    machine.tick(51.0)
    settings = RoundSettings.from_json(machine.task_for("silo-1", 51.0).settings.to_json())
    assert settings.secagg is not None and settings.secagg.content == "update"
    assert settings.statistics == secure_pooled
