"""Evaluation metrics through the secure sum: the pooled scores equal those pooled from clear reports.

The encoding is checked against coordinator.pooling on random silo evaluations, and a whole
secure evaluation runs through the coordinator's round machine with the real protocol clients
(X25519, AES-GCM, AES-CTR masks), one silo dropping out before its masked input.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from condi_models.evaluation import EvalResult
from condi_models.metrics import (
    SCORE_BINS,
    auroc,
    binned_macro_auroc,
    classification_metrics,
    imputation_metrics,
    score_histograms,
)
from coordinator.pooling import pool_split
from coordinator.rounds import Evaluated, Phase, RoundMachine, RoundPlan, RoundProgress, SecurePlan
from federation.secagg import QuantConfig, dequantize, quantize
from federation.secure_metrics import (
    METRICS_CLIP,
    METRICS_QUANT,
    MetricsEncodingError,
    MetricsLayout,
    decode_metrics,
    encode_metrics,
)
from federation.settings import RoundSettings
from silo_agent.agent import split_report
from tests.helpers import drive_secure_attempt, secagg_identities

CLASSES = ("a", "b", "c")
FEATURES = 4


def _silo_eval(rng: np.random.Generator, n: int) -> EvalResult:
    y = rng.integers(0, len(CLASSES), size=n)
    logits = rng.normal(size=(n, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = rng.normal(size=(n, 2, 8))
    hidden = rng.random(truth.shape) < 0.3
    estimate = truth + rng.normal(scale=0.4, size=truth.shape)
    return EvalResult(
        n_samples=n,
        loss=float(rng.uniform(0.5, 1.5)),
        classification=classification_metrics(y, probs, CLASSES),
        imputation=imputation_metrics(truth, estimate, hidden, None),
        score_histograms=score_histograms(y, probs, SCORE_BINS),
    )


def test_binned_auroc_is_the_exact_auroc_of_the_binned_scores() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=400)
    probs = rng.dirichlet(np.ones(3), size=400)
    probs[np.arange(400), y] += rng.uniform(0, 0.5, size=400)
    probs /= probs.sum(axis=1, keepdims=True)
    binned = np.floor(probs * SCORE_BINS)
    want = np.mean([auroc(y == c, binned[:, c]) for c in range(3)])
    got = binned_macro_auroc(score_histograms(y, probs, SCORE_BINS))
    assert got == pytest.approx(want, abs=1e-12)
    exact = np.mean([auroc(y == c, probs[:, c]) for c in range(3)])
    assert abs(got - exact) < 0.01
    assert binned_macro_auroc(score_histograms(np.zeros(5, int), probs[:5], SCORE_BINS)) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_summed_vectors_pool_like_clear_reports(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layout = MetricsLayout(len(CLASSES), ("val", "test"))
    evals = [{s: _silo_eval(rng, int(rng.integers(5, 60))) for s in layout.splits} for _ in range(4)]
    # Through the ring as the secure sum does it: quantize each, add mod 2^64, dequantize.
    codes = [quantize(encode_metrics(layout, e), METRICS_QUANT, rng) for e in evals]
    total = dequantize(np.sum(codes, axis=0, dtype=np.uint64), METRICS_QUANT)
    pooled = decode_metrics(layout, total, len(evals), max_n=60)
    for split in layout.splits:
        clear = pool_split([split_report(e[split]) for e in evals])
        got = pooled[split]
        assert got["n"] == clear["n"] and got["confusion_matrix"] == clear["confusion_matrix"]
        assert got["recall"] == clear["recall"]
        for key in ("accuracy", "macro_f1"):
            assert got[key] == pytest.approx(clear[key], abs=1e-12), key
        # Float sums carry 2^-12 of rounding per silo, divided by the pooled count.
        for key in ("loss", "imputation_mae", "imputation_rmse"):
            assert got[key] == pytest.approx(clear[key], abs=1e-4), key
        hist = np.sum([e[split].score_histograms for e in evals], axis=0)
        assert got["macro_auroc"] == pytest.approx(binned_macro_auroc(hist), abs=1e-12)
        assert got["silos"] == 4 and got["secure_sum"] is True


def test_encoding_refuses_non_finite_and_oversized_sums() -> None:
    rng = np.random.default_rng(4)
    layout = MetricsLayout(len(CLASSES), ("val",))
    result = _silo_eval(rng, 20)
    bad = EvalResult(result.n_samples, float("nan"), result.classification, None, result.score_histograms)
    with pytest.raises(MetricsEncodingError, match="NaN or infinite"):
        encode_metrics(layout, {"val": bad})
    huge = EvalResult(result.n_samples, 1e10, result.classification, None, result.score_histograms)
    with pytest.raises(MetricsEncodingError, match=re.escape(f"exceed the secure-sum bound {METRICS_CLIP:g}")):
        encode_metrics(layout, {"val": huge})
    with pytest.raises(MetricsEncodingError, match="no evaluation of the 'test' split"):
        encode_metrics(MetricsLayout(len(CLASSES), ("val", "test")), {"val": result})


def test_a_sum_no_honest_silos_could_give_is_refused() -> None:
    rng = np.random.default_rng(5)
    layout = MetricsLayout(len(CLASSES), ("val",))
    total = sum(encode_metrics(layout, {"val": _silo_eval(rng, 20)}) for _ in range(3))
    assert decode_metrics(layout, total, 3, max_n=20)["val"]["n"] == 60
    with pytest.raises(MetricsEncodingError, match="60 val samples from 3 silos of at most 19"):
        decode_metrics(layout, total, 3, max_n=19)
    # A silo adding 10^12 samples to n alone (issue 13: it set the pooled accuracy to 0.99999999999).
    inflated = total.copy()
    inflated[0] += 1e6
    with pytest.raises(MetricsEncodingError, match="the val counts disagree"):
        decode_metrics(layout, inflated, 3, max_n=10**7)
    negative = total.copy()
    negative[2] -= 5  # a confusion count made negative
    with pytest.raises(MetricsEncodingError, match="disagree"):
        decode_metrics(layout, negative, 3, max_n=20)


# ---------------------------------------------------------------------------------------------
# A secure evaluation through the coordinator's round machine

N = 4


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory):
    return secagg_identities(tmp_path_factory.mktemp("pki"), N)


def _machine(verify) -> RoundMachine:
    secure = SecurePlan(lambda n: n // 2 + 1, 10.0, QuantConfig(1.0, 24, 32), verify, 1000.0, metrics=True)
    plan = RoundPlan(
        allowed=tuple(f"silo-{i + 1}" for i in range(N)), rounds=2, silos_per_round=N, min_silos=2,
        max_attempts=2, seed=0, gather_s=5.0, train_s=10.0, evaluate_s=10.0, liveness_s=1000.0, secure=secure,
    )
    progress = RoundProgress(0, 0, 0, "evaluate", RoundProgress.start(0, statistics=False).rng_state)
    machine = RoundMachine(plan, "run-1", progress, "sha", 0.0)
    machine.vector_length = 10
    machine.data_shape = (len(CLASSES), FEATURES)
    for sid in plan.allowed:
        machine.join(sid, 0.0)
    return machine


def test_round_machine_secure_evaluation_reveals_only_the_pooled_scores(silos) -> None:
    machine = _machine(silos[0])
    rng = np.random.default_rng(7)
    evals = {f"silo-{i + 1}": {"val": _silo_eval(rng, 30 + i)} for i in range(N)}
    dropped = "silo-3"  # evaluates and shares keys, then vanishes before its masked input
    machine.tick(0.0)
    assert machine.phase == Phase.ADVERTISE
    view = machine.task_for("silo-1", 0.0)
    plan = RoundSettings.from_json(view.settings.to_json())
    assert plan.secagg is not None and plan.secagg.content == "metrics" and plan.eval_splits == ("val",)
    layout = MetricsLayout(len(CLASSES), plan.eval_splits)
    assert plan.secagg.vector_length == layout.vector_length
    effects = drive_secure_attempt(
        machine, lambda sid: encode_metrics(layout, evals[sid]), silos, dropped=dropped, start=0.0
    )
    (done,) = effects
    assert isinstance(done, Evaluated) and machine.phase == Phase.RECORD
    assert done.reports == {} and done.total is not None
    assert done.participants == tuple(s for s in machine.plan.allowed if s != dropped)
    pooled = decode_metrics(layout, done.total, len(done.participants), max_n=100)["val"]
    clear = pool_split([split_report(evals[s]["val"]) for s in done.participants])
    assert pooled["confusion_matrix"] == clear["confusion_matrix"]
    assert pooled["accuracy"] == pytest.approx(clear["accuracy"])
    assert pooled["imputation_mae"] == pytest.approx(clear["imputation_mae"], abs=1e-4)
