"""How much a silo trains, on what loss, and how the coordinator's server optimizer moves the model.

Local work in steps with a floor, the learning-rate schedule over rounds, class weights and the
logit adjustment against label skew, the server optimizers (FedAvg, FedAvgM, FedAdam), the
per-part fusion norm and record-level evaluation over every window of a record.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from condi_models.batches import fit_visible, prepare_split, record_window_starts
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.evaluation import EvalOptions, evaluate
from condi_models.nn.classifier import ClassifierConfig
from condi_models.nn.config import ModelConfig, Variant
from condi_models.nn.model import CondIModel
from condi_models.nn.sampling import SamplingOptions
from condi_models.server_optimizer import ServerOptimizer, ServerOptimizerConfig
from condi_models.training import (
    ABSENT_CLASS_SHIFT,
    GATE_CANDIDATES,
    LocalTrainingConfig,
    TrainingProgress,
    class_weights,
    fit_gate,
    held_out_windows,
    logit_adjustment,
    phase_epochs,
    round_lr_scale,
    train_local,
)
from tests.helpers import toy_dataset

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(variant: Variant = Variant.FEDAVG_ZERO_FILL, length: int = 20, fusion: str = "per_part") -> CondIModel:
    torch.manual_seed(0)
    return CondIModel(ModelConfig(
        channel_modality=(0, 1, 1, 2, 2, 2), n_classes=3, length=length, variant=variant, embed_dim=8, cond_dim=8,
        classifier=ClassifierConfig(hidden=8, n_blocks=1, n_heads=2, patch_size=5, conv_channels=0,
                                    pos_embed_dim=8, head_hidden=16, dropout=0.0, fusion_norm=fusion),
    ))


def test_a_small_silo_makes_more_passes_to_reach_the_step_floor():
    cfg = LocalTrainingConfig(epochs_a=3, epochs_b=1, batch_size=32, min_local_steps=20, min_local_steps_a=4)
    assert phase_epochs(cfg, "B", 7) == 20
    assert phase_epochs(cfg, "B", 100) == 5  # 4 batches a pass
    assert phase_epochs(cfg, "B", 1000) == 1 and phase_epochs(cfg, "B", 0) == 0
    assert phase_epochs(cfg, "A", 7) == 4 and phase_epochs(cfg, "A", 1000) == 3  # Phase A's own floor
    assert phase_epochs(LocalTrainingConfig(epochs_a=0, min_local_steps=20), "A", 7) == 0
    ds = toy_dataset(n=7, length=20)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), None)
    seen: list[TrainingProgress] = []
    train_local(small_model(), split, LocalTrainingConfig(epochs_a=1, epochs_b=1, window=None, min_local_steps=12),
                seed=0, device=CPU, progress=seen.append)
    assert len([p for p in seen if p.phase == "B"]) == 12


def test_the_learning_rate_decays_over_rounds_as_configured():
    cosine = LocalTrainingConfig(lr_schedule="cosine", lr_min_ratio=0.1)
    scales = [round_lr_scale(cosine, r, 5) for r in range(5)]
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.1) and scales[2] == pytest.approx(0.55)
    assert all(a > b for a, b in itertools.pairwise(scales))
    assert round_lr_scale(LocalTrainingConfig(lr_schedule="constant"), 3, 5) == 1.0
    with pytest.raises(ValueError, match="lr_min_ratio"):
        LocalTrainingConfig(lr_min_ratio=0.0)


def test_class_weights_invert_the_pooled_counts():
    w = class_weights(np.array([60, 20, 20, 0]))
    assert w[:3].mean() == pytest.approx(1.0) and w[3] == 1.0
    assert w[1] == pytest.approx(3 * w[0])
    capped = class_weights(np.array([10_000, 1]))
    assert capped[1] / capped[0] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="class counts"):
        class_weights(np.array([1.0, np.nan]))


def test_logit_adjustment_undoes_a_silos_label_skew():
    assert np.allclose(logit_adjustment(np.array([10, 20, 30]), np.array([100, 200, 300])), 0.0)
    shift = logit_adjustment(np.array([30, 10, 0]), np.array([100, 100, 100]))
    assert shift[0] == pytest.approx(np.log(0.75 * 3)) and shift[1] == pytest.approx(np.log(0.25 * 3))
    assert shift[2] == ABSENT_CLASS_SHIFT
    with pytest.raises(ValueError, match="class counts"):
        logit_adjustment(np.array([1, 2]), np.array([1, 2, 3]))


def test_logit_adjusted_training_keeps_classes_a_silo_lacks():
    # A silo with only class 0: plain cross-entropy drives the other classes' scores down;
    # the adjusted loss, told the federation holds all three alike, leaves them alone.
    ds = toy_dataset(n=40, length=20)
    ds = ds.subset(np.flatnonzero(ds.y == 0))
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), None)
    pooled = np.array([40, 40, 40])
    probs = {}
    for mode in ("none", "logit_adjusted"):
        model = small_model()
        cfg = LocalTrainingConfig(epochs_a=0, epochs_b=1, window=None, min_local_steps=30, class_weighting=mode)
        train_local(model, split, cfg, seed=0, device=CPU, class_counts=pooled)
        model.eval()
        with torch.no_grad():
            probs[mode] = torch.softmax(model.classify(torch.from_numpy(split.x), torch.from_numpy(split.observed)), 1)
    assert probs["none"][:, 0].mean() > 0.8
    assert probs["logit_adjusted"][:, 0].mean() < 0.45


def test_fedavg_is_the_average_and_momentum_accumulates():
    old = {"w": np.zeros(3, np.float32), "prior.mean": np.zeros(2, np.float32)}
    avg = {"w": np.array([1.0, 0.0, -1.0], np.float32), "prior.mean": np.ones(2, np.float32)}
    plain = ServerOptimizer(ServerOptimizerConfig(), ["w"])
    assert plain.step(old, avg)["w"].tolist() == [1.0, 0.0, -1.0]
    m = ServerOptimizer(ServerOptimizerConfig(kind="fedavgm", momentum=0.5), ["w"])
    first = m.step(old, avg)
    second = m.step(first, {"w": first["w"] + avg["w"], "prior.mean": np.ones(2, np.float32)})
    assert second["w"].tolist() == [2.5, 0.0, -2.5]  # 1, then 1 + 0.5 x 1
    assert second["prior.mean"].tolist() == [1.0, 1.0]  # EM moments take the plain average
    assert first["w"].dtype == np.float32


def test_fedadam_steps_by_about_its_rate_and_resumes_from_its_state():
    cfg = ServerOptimizerConfig(kind="fedadam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-6)
    old = {"w": np.zeros(2, np.float32)}
    opt = ServerOptimizer(cfg, ["w"])
    new = opt.step(old, {"w": np.array([5.0, 0.0], np.float32)})
    # First step: m = 0.1 d, v = 0.01 d^2, so m / sqrt(v) = sign(d); an untrained entry stays.
    assert new["w"][0] == pytest.approx(0.01, rel=1e-4) and new["w"][1] == 0.0
    again = ServerOptimizer(cfg, ["w"])
    again.load_state(opt.state())
    nxt = {"w": new["w"] + 1.0}
    assert np.array_equal(again.step(new, nxt)["w"], opt.step(new, nxt)["w"]) and again.steps == 2
    with pytest.raises(ValueError, match="unexpected entry"):
        ServerOptimizer(cfg, ["other"]).load_state(opt.state())
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizerConfig(momentum=1.0)


def test_windows_tile_a_record_to_its_end():
    assert record_window_starts(1000, 250).tolist() == [0, 250, 500, 750]
    assert record_window_starts(1000, 300).tolist() == [0, 300, 600, 700]
    assert record_window_starts(1000, 250, stride=500).tolist() == [0, 500, 750]
    assert record_window_starts(250, 250).tolist() == [0]


def test_a_record_is_classified_by_the_mean_over_its_windows():
    ds = toy_dataset(n=12, length=60)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), None)
    model = small_model()
    records = evaluate(model, split, window=20, opts=EvalOptions(), seed=0, device=CPU)
    assert records.n_samples == 12 and records.windows is not None and records.windows.n_samples == 36
    model.eval()
    with torch.no_grad():
        windows = [torch.softmax(model.classify(torch.from_numpy(split.x[:, :, s:s + 20]),
                                                torch.from_numpy(split.observed[:, :, s:s + 20])), 1)
                   for s in (0, 20, 40)]
    mean = torch.stack(windows).mean(0).numpy()
    assert records.classification.accuracy == pytest.approx(float((mean.argmax(1) == split.y).mean()))
    centre = evaluate(model, split, window=20, opts=EvalOptions(record_level=False), seed=0, device=CPU)
    assert centre.windows is None
    assert centre.classification.accuracy == pytest.approx(float((windows[1].numpy().argmax(1) == split.y).mean()))


def test_each_fusion_part_is_normalized_on_its_own():
    model = small_model(Variant.CONDI)
    with torch.no_grad():
        model.w_mod.table.weight.mul_(100.0)  # a W_mod of large scale must not shrink omega_ins
    x = torch.randn(4, 6, 20)
    obs = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        parts = model.features(x, obs).view(4, 3, 3, 8)  # (B, M, parts, D)
    for p in range(3):
        assert parts[:, :, p].std(dim=-1, unbiased=False).mean() == pytest.approx(1.0, abs=0.05)
    assert parts[:, :, 0].std(dim=0).mean() > 0.05  # the instance part still varies between samples
    old = ModelConfig.from_dict({k: v for k, v in small_model().cfg.to_dict().items()} | {
        "classifier": {k: v for k, v in small_model().cfg.to_dict()["classifier"].items() if k != "fusion_norm"}
    })
    assert old.classifier.fusion_norm == "joint"  # checkpoints written before per-part norms load as they were


def test_phase_a_fits_the_band_factors_that_evaluation_scores_coverage_with():
    ds = toy_dataset(n=48, length=20)
    spec = MissingnessSpec(ps=1.0, pw=0.5, pattern="points", seed=0)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), spec)
    model = small_model(Variant.CONDI)
    cfg = LocalTrainingConfig(epochs_a=1, epochs_b=0, window=20, min_local_steps=0, impute_steps=3,
                              band_windows=24, band_samples=5)
    train_local(model, split, cfg, seed=0, device=CPU)
    factors = model.band.values()
    # Five draws hold too little of the truth between their quantiles (about 1/3 for the 50 % band).
    assert all(f > 1.2 for f in factors)
    opts = EvalOptions(n_samples=5, steps=3, antithetic=False, record_level=False)
    report = evaluate(model, split, window=20, opts=opts, seed=1, device=CPU).imputation
    assert report.coverage_50 == pytest.approx(0.5, abs=0.1) and report.coverage_90 == pytest.approx(0.9, abs=0.06)
    # Without Phase A there is nothing new to calibrate: the factors stay.
    train_local(model, split, LocalTrainingConfig(epochs_a=0, epochs_b=1, window=20), seed=0, device=CPU)
    assert model.band.values() == factors


def test_the_normalizer_sees_only_what_stays_visible():
    ds = toy_dataset(n=30, length=40)
    ds.x[:, 0, :20] += 50.0  # the first half of channel 0 is far off ...
    spec = MissingnessSpec(ps=1.0, pw=0.5, pattern="blocks", seed=0)
    visible = fit_visible(ds, spec)
    split = prepare_split(ds, visible, spec)
    assert visible.count.sum() == split.observed.sum() < ds.observed.sum()
    assert np.allclose(visible.mean, ChannelNormalizer.fit(ds.x, split.observed).mean)
    assert math.isclose(fit_visible(ds, None).count.sum(), ds.observed.sum())


def test_the_network_gate_keeps_the_prior_when_the_network_only_adds_error():
    """A network whose correction is pure error is gated off on held-out training entries."""
    ds = toy_dataset(n=16, length=20)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), MissingnessSpec(ps=1.0, pw=0.5, seed=0))
    model = small_model(Variant.CONDI)
    cfg = LocalTrainingConfig(epochs_a=0, epochs_b=0, window=20, impute_steps=3, band_windows=8)
    held_out = held_out_windows(model, split, cfg, seed=0, device=CPU)
    assert held_out and all(h.entries.any() for h in held_out)
    head = model.denoiser.head
    with torch.no_grad():
        head.bias.fill_(3.0)  # every noise estimate off by 3: sampling with it lands far from the truth
    assert fit_gate(model, held_out, cfg, seed=0) is not None
    assert float(model.network_gate) == GATE_CANDIDATES[0]
    with torch.no_grad():
        head.bias.zero_()  # a fresh head corrects nothing: every gate imputes alike, the tie keeps the network
    fit_gate(model, held_out, cfg, seed=0)
    assert float(model.network_gate) == 1.0


def test_a_closed_gate_imputes_the_priors_posterior_without_running_the_network(monkeypatch):
    """Gate 0 draws what a zero correction draws, whatever the network's weights, and never runs it."""
    ds = toy_dataset(n=8, length=20)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), MissingnessSpec(ps=1.0, pw=0.5, seed=0))
    model = small_model(Variant.CONDI)
    x, observed = torch.from_numpy(split.x[:, :, :20]), torch.from_numpy(split.observed[:, :, :20])
    assert (~observed).any()
    opts = SamplingOptions(n_samples=3, steps=3, antithetic=False)

    def draws() -> torch.Tensor:
        return model.impute(x, observed, opts, generator=torch.Generator().manual_seed(0), return_samples=True).samples

    with torch.no_grad():
        model.denoiser.head.weight.zero_()
        model.denoiser.head.bias.zero_()  # the network's correction is exactly zero
    zero_correction = draws()
    with torch.no_grad():
        model.denoiser.head.bias.fill_(3.0)
    assert not torch.allclose(draws(), zero_correction, atol=1e-3)  # open, the network moves the draws
    with torch.no_grad():
        model.network_gate.fill_(0.0)
    calls = []
    for name in ("denoise", "condition"):
        real = getattr(model.denoiser, name)
        monkeypatch.setattr(model.denoiser, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    assert torch.allclose(draws(), zero_correction, atol=1e-6) and not calls
