"""DP-SGD in local training: budget planning, the persistent ledger, refusal, noise, clipping, sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier

from condi_models.batches import iterate_batches, prepare_split
from condi_models.configfile import ConfigError, parse_config
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.nn.model import CondIModel
from condi_models.privacy import (
    BudgetExhausted,
    LedgerError,
    NoisePlan,
    PrivacyLedger,
    PrivacySpec,
    PrivateRound,
    SiloPrivacy,
    epsilon_of,
    load_or_create_secret,
    plan_noise,
)
from condi_models.simulation import ExperimentConfig, run_simulation
from condi_models.training import LocalTrainingConfig, train_local
from tests.helpers import tiny_model, toy_dataset

CPU = torch.device("cpu")
N = 40
TRAIN = LocalTrainingConfig(epochs_a=1, epochs_b=1, batch_size=10, window=None, min_local_steps=0)
STEPS_PER_ROUND = 2 * math.ceil(N / 10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split():
    ds = toy_dataset(N, modalities=(2, 1, 1), length=24, n_classes=3, seed=1)
    return prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), MissingnessSpec(ps=0.5, pw=0.5, seed=0))


def spec(**changes) -> PrivacySpec:
    return PrivacySpec(**{"target_epsilon": 3.0, "planned_rounds": 2, **changes})


def params_of(model: CondIModel) -> dict[str, torch.Tensor]:
    return model.state_to_named_tensors()


def opacus_leftovers(model: CondIModel) -> list[str]:
    found = []
    for name, p in model.named_parameters():
        found += [f"{name}.{a}" for a in ("grad_sample", "summed_grad", "_forward_counter") if hasattr(p, a)]
        # The Gaussian prior, the network gate and the band factors are frozen by design (fitted
        # outside any optimizer); anything else left frozen is a leak.
        if not p.requires_grad and not name.startswith(("prior.", "band.", "network_gate")):
            found.append(f"{name} frozen")
    for name, m in model.named_modules():
        if m._forward_hooks or m._backward_hooks or hasattr(m, "activations"):
            found.append(f"{name} hooks")
    return found


# ---- one round, the ledger, restart, the budget ------------------------------------------------


def test_one_private_round_reports_epsilon_within_target_and_leaves_the_model_clean(split, tmp_path):
    model = tiny_model()
    before = params_of(model)
    privacy = SiloPrivacy(spec(), tmp_path / "ledger.json")
    res = train_local(model, split, TRAIN, seed=0, device=CPU, privacy=privacy)
    assert 0 < res.extra["epsilon"] <= 3.0
    assert res.extra["dp_steps"] == STEPS_PER_ROUND
    assert res.extra["noise_multiplier"] > 0.5
    after = params_of(model)
    assert list(after) == list(before)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # The prior's moments would leave the silo unnoised, so a private round does not refit them.
    assert torch.equal(after["prior.second_moment"], before["prior.second_moment"])
    assert opacus_leftovers(model) == []
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert data["rounds"] == 1
    assert data["history"] == [[res.extra["noise_multiplier"], 10 / N, STEPS_PER_ROUND]]
    assert data["epsilon_spent"] == pytest.approx(res.extra["epsilon"])
    assert not [p.name for p in tmp_path.iterdir() if p.name != "ledger.json"]  # no temp file left behind
    # The model trains on normally afterwards, with ordinary gradients everywhere.
    plain = train_local(model, split, TRAIN, seed=1, device=CPU)
    assert plain.extra == {}
    assert not torch.equal(params_of(model)["prior.second_moment"], before["prior.second_moment"])


def test_accountant_survives_a_restart_and_epsilon_keeps_adding_up(split, tmp_path):
    path = tmp_path / "state" / "privacy.json"
    model = tiny_model()
    first = train_local(model, split, TRAIN, seed=0, device=CPU, privacy=SiloPrivacy(spec(), path))
    restarted = SiloPrivacy(spec(), path)
    assert restarted.ledger.rounds == 1
    assert restarted.epsilon_spent() == pytest.approx(first.extra["epsilon"])
    second = train_local(model, split, TRAIN, seed=1, device=CPU, privacy=restarted)
    sigma = first.extra["noise_multiplier"]
    assert second.extra["noise_multiplier"] == sigma  # the plan is kept, not derived again
    assert second.extra["epsilon"] > first.extra["epsilon"] * 1.2
    assert second.extra["epsilon"] == pytest.approx(
        epsilon_of([(sigma, 10 / N, 2 * STEPS_PER_ROUND)], delta=1e-5)
    )


def test_silo_stops_at_its_budget_before_training(split, tmp_path):
    path = tmp_path / "ledger.json"
    model = tiny_model()
    privacy = SiloPrivacy(spec(planned_rounds=2), path)
    eps = [train_local(model, split, TRAIN, seed=r, device=CPU, privacy=privacy).extra["epsilon"] for r in (0, 1)]
    # Both phases share one accountant: the planned rounds spend nearly all of the target, never more.
    assert 0.97 * 3.0 <= eps[1] <= 3.0
    before = params_of(model)
    for silo in (privacy, SiloPrivacy(spec(planned_rounds=2), path)):
        with pytest.raises(BudgetExhausted, match=r"budget exhausted .*ledger\.json.* 2 of 2 planned rounds") as err:
            train_local(model, split, TRAIN, seed=2, device=CPU, privacy=silo)
        assert err.value.spent == pytest.approx(eps[1]) and err.value.target == 3.0
    after = params_of(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert json.loads(path.read_text())["rounds"] == 2


def test_a_changed_plan_derives_the_noise_again_counting_what_was_spent(split, tmp_path):
    path = tmp_path / "ledger.json"
    privacy = SiloPrivacy(spec(planned_rounds=2), path)
    first = train_local(tiny_model(), split, TRAIN, seed=0, device=CPU, privacy=privacy)
    longer = SiloPrivacy(spec(planned_rounds=4), path)
    rnd = longer.begin_round(n_samples=N, batch_size=10, phase_epochs={"a": 1, "b": 1}, seed=0, device=CPU)
    assert rnd.noise_multiplier > first.extra["noise_multiplier"]
    spent = [(first.extra["noise_multiplier"], 10 / N, STEPS_PER_ROUND)]
    total = epsilon_of([*spent, (rnd.noise_multiplier, 10 / N, 3 * STEPS_PER_ROUND)], delta=1e-5)
    assert 0.97 * 3.0 <= total <= 3.0
    with pytest.raises(BudgetExhausted, match=r"already spent \(.*\) reaches the target 0\.5"):
        SiloPrivacy(spec(target_epsilon=0.5), path).begin_round(
            n_samples=N, batch_size=10, phase_epochs={"a": 1, "b": 1}, seed=0, device=CPU
        )


def test_only_the_private_phases_are_accounted(split, tmp_path):
    privacy = SiloPrivacy(spec(phases=("b",)), tmp_path / "ledger.json")
    rnd = privacy.begin_round(n_samples=N, batch_size=10, phase_epochs={"a": 3, "b": 2}, seed=0, device=CPU)
    assert rnd.phases == ("b",) and rnd.planned_steps == 2 * 4
    nothing = privacy.begin_round(n_samples=N, batch_size=10, phase_epochs={"a": 3, "b": 0}, seed=0, device=CPU)
    assert nothing.planned_steps == 0
    assert privacy.commit(nothing) == 0.0 and not (tmp_path / "ledger.json").exists()
    whole = privacy.begin_round(n_samples=6, batch_size=10, phase_epochs={"a": 1, "b": 1}, seed=0, device=CPU)
    assert (whole.sample_rate, whole.expected_batch_size, whole.steps_per_epoch) == (1.0, 6, 1)


# ---- determinism and randomness --------------------------------------------------------------


def test_same_seed_same_private_result_and_the_secret_changes_it(split, tmp_path):
    runs = []
    for i, secret in enumerate((None, None, bytes(32), bytes(range(32)))):
        model = tiny_model()
        res = train_local(model, split, TRAIN, seed=5, device=CPU,
                          privacy=SiloPrivacy(spec(), tmp_path / f"l{i}.json", secret=secret))
        runs.append((params_of(model), res.extra["epsilon"]))
    (a, eps_a), (b, eps_b), (c, _), (d, _) = runs
    assert eps_a == eps_b and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert any(not torch.equal(c[n], d[n]) for n in c)


def test_private_training_differs_from_plain_training_with_the_same_seed(split, tmp_path):
    plain, private = tiny_model(), tiny_model()
    train_local(plain, split, TRAIN, seed=3, device=CPU)
    train_local(private, split, TRAIN, seed=3, device=CPU, privacy=SiloPrivacy(spec(), tmp_path / "l.json"))
    p, q = params_of(plain), params_of(private)
    assert sum(not torch.equal(p[n], q[n]) for n in p) > len(p) // 2


def test_secret_file_is_created_once_and_kept(tmp_path):
    path = tmp_path / "dp.secret"
    secret = load_or_create_secret(path)
    assert len(secret) == 32 and load_or_create_secret(path) == secret
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="expected 32 bytes"):
        load_or_create_secret(path)


# ---- the mechanism: sampling, noise, clipping ----------------------------------------------------


def manual_round(sigma: float, *, clip: float = 1.0, batch: int = 8, rate: float = 1.0, seed: int = 0) -> PrivateRound:
    return PrivateRound(
        phases=("b",), noise_multiplier=sigma, sample_rate=rate, steps_per_epoch=1, expected_batch_size=batch,
        max_grad_norm=clip, planned_steps=1, rng=np.random.default_rng(seed),
        noise_generator=torch.Generator().manual_seed(seed),
    )


def sgd_update(model: CondIModel, rnd: PrivateRound, x, observed, y) -> torch.Tensor:
    """The flattened Phase B update of one private SGD step with learning rate 1."""
    params = model.phase_parameters("b")
    before = torch.cat([p.detach().flatten().clone() for p in params])
    with rnd.optimizer(model, params, torch.optim.SGD(params, lr=1.0)) as opt:
        opt.zero_grad()
        if len(y):
            model.phase_b_loss(x, observed, y).backward()
        rnd.step(opt, len(y))
    return torch.cat([p.detach().flatten() for p in params]) - before


def first_batch(split, n: int):
    b = next(iterate_batches(split, n, window=None, rng=None, device=CPU))
    return b.x, b.observed, b.y


def test_poisson_sampling_matches_the_accounted_rate(split):
    rnd = manual_round(1.0, rate=0.25, seed=1)
    rnd.steps_per_epoch = 400
    sizes, hits = [], np.zeros(N)
    for b in rnd.batches(split, window=12, device=CPU):
        sizes.append(len(b.index))
        hits[b.index] += 1
        assert b.x.shape == (len(b.index), 4, 12)
    assert np.mean(sizes) == pytest.approx(0.25 * N, rel=0.05)
    assert np.std(sizes) == pytest.approx(math.sqrt(N * 0.25 * 0.75), rel=0.15)  # not a fixed batch size
    assert hits.min() > 0.15 * 400 and hits.max() < 0.35 * 400


def test_gaussian_noise_of_the_planned_scale_is_added(split):
    x, observed, y = first_batch(split, 8)
    clean = sgd_update(tiny_model(), manual_round(0.0, clip=0.5), x, observed, y)
    noisy = sgd_update(tiny_model(), manual_round(2.0, clip=0.5), x, observed, y)
    diff = (noisy - clean) * 8  # SGD with lr 1 moves by -(clipped sum + noise) / expected batch
    assert diff.numel() > 2000
    assert diff.std().item() == pytest.approx(2.0 * 0.5, rel=0.05)
    assert abs(diff.mean().item()) < 0.1


def test_an_empty_poisson_sample_takes_a_noise_only_step(split):
    rnd = manual_round(1.0, rate=1e-12)
    batch = next(iter(rnd.batches(split, window=None, device=CPU)))
    assert len(batch.index) == 0 and batch.x.shape == (0, 4, 24)
    update = sgd_update(tiny_model(), rnd, batch.x, batch.observed, batch.y)
    assert rnd.steps_taken == 1
    assert update.std().item() == pytest.approx(1.0 / 8, rel=0.1)


def test_per_sample_clipping_bounds_each_record_and_the_update(split):
    x, observed, y = first_batch(split, 8)
    clip = 0.01
    model = tiny_model()
    model.phase_b_loss(x, observed, y).backward()
    raw = torch.cat([p.grad.flatten() for p in model.phase_parameters("b") if p.grad is not None]).norm()
    assert raw > 20 * clip  # every record's gradient is far above the clip
    full = sgd_update(tiny_model(), manual_round(0.0, clip=clip), x, observed, y)
    assert 0 < full.norm() <= clip * (1 + 1e-4)
    # Leaving one record out moves the update by at most clip / expected batch: its sensitivity.
    keep = torch.arange(8) != 3
    without = sgd_update(tiny_model(), manual_round(0.0, clip=clip), x[keep], observed[keep], y[keep])
    assert 0 < (full - without).norm() <= clip / 8 * (1 + 1e-4)


# ---- planning ----------------------------------------------------------------------------------


def test_fresh_plan_agrees_with_opacus_and_stays_within_target():
    ours = plan_noise([], sample_rate=0.25, steps=40, target_epsilon=4.0, delta=1e-5)
    theirs = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.25, steps=40)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert 3.99 <= epsilon_of([(ours, 0.25, 40)], delta=1e-5) <= 4.0
    # PRV accounting is tighter than RDP, so the same target needs less noise.
    prv = plan_noise([], sample_rate=0.25, steps=40, target_epsilon=4.0, delta=1e-5, accountant="prv")
    assert prv < 0.97 * ours
    assert 3.99 <= epsilon_of([(prv, 0.25, 40)], delta=1e-5, accountant="prv") <= 4.0
    spent = [(1.0, 0.25, 40)]
    with pytest.raises(ValueError, match="already spent"):
        plan_noise(spent, sample_rate=0.25, steps=40, target_epsilon=epsilon_of(spent, delta=1e-5), delta=1e-5)


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be > 0"),
        ({"target_epsilon": math.inf}, "leave the privacy section out"),
        ({"target_epsilon": "3"}, "target_epsilon must be a number"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0"),
        ({"planned_rounds": 0}, "planned_rounds must be >= 1"),
        ({"planned_rounds": 2.5}, "planned_rounds must be an integer"),
        ({"phases": ()}, "phases must name 'a', 'b' or both"),
        ({"phases": ("a", "c")}, "phases must name 'a', 'b' or both"),
        ({"phases": ("b", "b")}, "each once"),
        ({"accountant": "gdp"}, "'gdp' is not offered"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_privacy_settings_are_refused_clearly(changes, message):
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_privacy_section_in_an_experiment_config():
    base = {"data": {"source": "synthetic_ecg", "n_records": 20}}
    cfg = parse_config({**base, "privacy": {"target_epsilon": 8, "planned_rounds": 5, "phases": ["B"]}},
                       ExperimentConfig, "exp.yaml")
    assert cfg.privacy == PrivacySpec(target_epsilon=8.0, planned_rounds=5, phases=("b",))
    assert parse_config(base, ExperimentConfig, "exp.yaml").privacy is None
    with pytest.raises(ConfigError, match=r"exp\.yaml: privacy\.noise: unknown key"):
        parse_config({**base, "privacy": {"target_epsilon": 8, "planned_rounds": 5, "noise": 1}},
                     ExperimentConfig, "exp.yaml")
    with pytest.raises(ConfigError, match=r"exp\.yaml: privacy.*planned_rounds must be >= 1"):
        parse_config({**base, "privacy": {"target_epsilon": 8, "planned_rounds": 0}}, ExperimentConfig, "exp.yaml")


# ---- the ledger file -----------------------------------------------------------------------------


def saved_ledger(path) -> dict:
    ledger = PrivacyLedger(path=path)
    ledger.plan = NoisePlan(1.5, 0.25, 8, 4, 3.0, 1e-5, "rdp")
    ledger.record(1.5, 0.25, 8)
    ledger.record(1.5, 0.25, 8)
    ledger.save()
    return json.loads(path.read_text())


def test_ledger_round_trips_through_json(tmp_path):
    path = tmp_path / "ledger.json"
    data = saved_ledger(path)
    assert data["history"] == [[1.5, 0.25, 16]] and data["rounds"] == 2
    back = PrivacyLedger.load(path)
    assert back.history == [(1.5, 0.25, 16)] and back.rounds == 2
    assert back.plan == NoisePlan(1.5, 0.25, 8, 4, 3.0, 1e-5, "rdp")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text, d: text[: len(text) // 2], "not valid JSON"),
        (lambda text, d: "[]", "expected a JSON object"),
        (lambda text, d: {**d, "history": [[1.5, 0.25, -16]]}, r"history\[0\] steps must be an integer >= 1"),
        (lambda text, d: {**d, "history": [[-1.5, 0.25, 16]]}, r"history\[0\] noise_multiplier must be"),
        (lambda text, d: {**d, "history": [[1.5, 1.25, 16]]}, r"history\[0\] sample_rate must be a number in"),
        (lambda text, d: {**d, "history": [[1.5, 0.25]]}, r"history\[0\] must be \[noise_multiplier"),
        (lambda text, d: {**d, "rounds": -2}, "rounds must be an integer >= 1"),
        (lambda text, d: {**d, "plan": {**d["plan"], "accountant": "gdp"}}, "plan.accountant must be one of"),
        (lambda text, d: {k: v for k, v in d.items() if k != "sha256"}, "keys .* do not match"),
        # A plausible edit that only the checksum catches: fewer steps, so less epsilon spent.
        (lambda text, d: {**d, "history": [[1.5, 0.25, 8]]}, "checksum does not match"),
        (lambda text, d: {**d, "rounds": 1}, "checksum does not match"),
    ],
)
def test_tampered_or_corrupt_ledger_is_refused_with_a_clear_error(tmp_path, edit, message):
    path = tmp_path / "ledger.json"
    data = saved_ledger(path)
    new = edit(path.read_text(), data)
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(LedgerError, match=message) as err:
        SiloPrivacy(spec(), path)
    assert str(path) in str(err.value)


# ---- simulation ----------------------------------------------------------------------------------


def test_simulation_with_dp_spends_per_silo_and_declines_past_the_budget(tmp_path):
    tiny = {
        "name": "dp", "seed": 1, "device": "cpu",
        "data": {"source": "synthetic_ecg", "n_records": 50, "seed": 1, "seconds": 2.0},
        "missingness": {"ps": 0.8, "pw": 0.8, "seed": 0},
        "federation": {"silos": 2, "silos_per_round": 2, "rounds": 2, "partition": "iid"},
        "model": {
            "embed_dim": 8, "cond_dim": 8, "tokens_per_channel": 10,
            "denoiser": {"hidden": 16, "n_blocks": 1, "n_heads": 2},
            "context": {"stem_dim": 8, "expert_hidden": 16, "out_dim": 8},
            "classifier": {"hidden": 16, "n_blocks": 1, "n_heads": 2, "head_hidden": 16},
        },
        "training": {"epochs_a": 1, "epochs_b": 1, "batch_size": 8, "window": None, "min_local_steps": 0},
        "evaluation": {"n_samples": 1, "steps": 2},
        "privacy": {"target_epsilon": 4.0, "planned_rounds": 1},
    }
    result = run_simulation(parse_config(tiny, ExperimentConfig, "test"), run_dir=tmp_path)
    first, second = result.rounds
    assert set(first["epsilon"]) == {"0", "1"} and all(0 < e <= 4.0 for e in first["epsilon"].values())
    assert first["declined"] == [] and second["declined"] == [0, 1] and second["silos"] == []
    assert second["phase_a_loss"] is None
    final = result.final["privacy"]
    assert final["rounds"] == [1, 1] and all(0 < e <= 4.0 for e in final["epsilon_spent"])
    for k in (0, 1):
        assert PrivacyLedger.load(tmp_path / "privacy" / f"silo-{k}.json").rounds == 1
    # Nobody trained in round 2, so the global model and its validation metrics stay as they were.
    assert second["val"] == first["val"]
