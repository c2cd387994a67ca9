"""A silo on several workers (``compute: {workers: N}``): two CPU processes against one.

"The same update" means: with the same seed the two workers draw the same global batches as one
process (order, crops, Phase A's draws; under DP the same Poisson samples and noise), each
trains on its half of every batch, and the gradients are combined into the global batch's, so
after a round every parameter is within 1e-5 of one process's (measured: 2e-7, and 3e-8 under
DP). One exception is bounded instead of compared: the attention keys' bias (see
:func:`assert_same_update`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from condi_models.batches import PreparedSplit, prepare_split
from condi_models.configfile import ConfigError, parse_config
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from condi_models.distributed import train_on_workers, worker_devices
from condi_models.privacy import PrivacySpec, SiloPrivacy
from condi_models.training import LocalTrainingConfig, TrainingProgress, train_local
from silo_agent.config import SiteConfig
from tests.helpers import tiny_model, toy_dataset

CPU = torch.device("cpu")
# Batches of 10 leave a last batch of 1 record, of which the second worker has no row.
N = 41
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split() -> PreparedSplit:
    ds = toy_dataset(N, modalities=(2, 1, 1), length=24, n_classes=3, seed=1)
    return prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), MissingnessSpec(ps=0.5, pw=0.5, seed=0))


def assert_same_update(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], bound: float) -> None:
    """Every parameter within TOLERANCE, but the attention keys' bias: within ``bound``.

    Softmax ignores a shift shared by all keys, so the keys' bias has a zero gradient in exact
    arithmetic; what each run computes for it is rounding noise, which AdamW divides by its own
    size into steps of up to the learning rate, in no particular direction. Either run's value is
    as good; ``bound`` (learning rate times steps) is all that can be said of their difference.
    """
    assert list(one) == list(two)
    for name, a in one.items():
        diff = (a - two[name]).abs().flatten()
        if name.endswith("qkv.bias"):
            third = diff.numel() // 3
            assert float(diff[third : 2 * third].max()) <= bound, name
            diff = torch.cat([diff[:third], diff[2 * third :]])
        assert float(diff.max()) < TOLERANCE, name


def test_two_workers_train_the_same_update_as_one_process(split: PreparedSplit) -> None:
    cfg = LocalTrainingConfig(
        epochs_a=1, epochs_b=2, batch_size=10, window=16, min_local_steps=0, class_weighting="balanced"
    )
    start = tiny_model().state_to_named_tensors()
    runs = {}
    for workers in (1, 2):
        model, seen = tiny_model(), []
        train = train_local if workers == 1 else lambda *a, **k: train_on_workers(*a, workers=2, **k)
        result = train(model, split, cfg, seed=3, device=CPU, progress=seen.append)
        runs[workers] = (model.state_to_named_tensors(), result, seen)
    (one, res1, seen1), (two, res2, seen2) = runs[1], runs[2]
    steps = 3 * 5  # three epochs over 41 records in batches of 10
    assert_same_update(one, two, bound=cfg.lr_b * steps)
    assert max(float((one[n] - start[n]).abs().max()) for n in one) > 1e-2  # the round did move the model
    assert res2.phase_a_loss == pytest.approx(res1.phase_a_loss, abs=1e-6)
    assert res2.phase_b_loss == pytest.approx(res1.phase_b_loss, abs=1e-6)
    assert (res2.n_samples, res2.group_weights, res2.extra) == (res1.n_samples, res1.group_weights, {})
    # Rank 0 reports every global step, as one process does; its loss is that of its own rows.
    assert [(p.phase, p.epoch, p.batch) for p in seen2] == [(p.phase, p.epoch, p.batch) for p in seen1]
    assert all(isinstance(p, TrainingProgress) for p in seen2)


def test_under_dp_two_workers_take_the_same_private_steps_and_spend_the_same_budget(
    split: PreparedSplit, tmp_path
) -> None:
    cfg = LocalTrainingConfig(epochs_a=1, epochs_b=1, batch_size=10, window=None, min_local_steps=0)
    counts = np.array([14, 14, 13])
    runs = {}
    for workers in (1, 2):
        model = tiny_model()
        ledger = tmp_path / f"ledger-{workers}.json"
        privacy = SiloPrivacy(PrivacySpec(target_epsilon=3.0, planned_rounds=2), ledger, secret=bytes(range(32)))
        train = train_local if workers == 1 else lambda *a, **k: train_on_workers(*a, workers=2, **k)
        result = train(model, split, cfg, seed=3, device=CPU, privacy=privacy, class_counts=counts)
        runs[workers] = (model.state_to_named_tensors(), result, json.loads(ledger.read_text()))
    (one, res1, ledger1), (two, res2, ledger2) = runs[1], runs[2]
    assert_same_update(one, two, bound=cfg.lr_b * res1.extra["dp_steps"])
    # One Poisson sample of all N records per step, noised once: the ledger holds what one process's holds.
    assert res2.extra == res1.extra and res1.extra["dp_steps"] == 2 * 5
    assert ledger2["history"] == ledger1["history"] == [[res1.extra["noise_multiplier"], 10 / N, 10]]
    assert ledger2["rounds"] == 1


def test_a_failing_worker_ends_the_group_and_its_error_reaches_the_caller(split: PreparedSplit) -> None:
    x = split.x.copy()
    x[7] = np.nan  # one record: one worker's loss, while the other waits for its gradients
    poisoned = PreparedSplit(split.info, x, split.observed, split.y, split.truth, split.hidden, split.sample_ids)
    cfg = LocalTrainingConfig(epochs_a=0, epochs_b=1, batch_size=N, window=None, phase_b_input="observed")
    model = tiny_model()
    before = model.state_to_named_tensors()
    with pytest.raises(FloatingPointError, match="phase B loss became nan") as err:
        train_on_workers(model, poisoned, cfg, workers=2, seed=0, device=CPU)
    assert any("in training worker" in note for note in err.value.__notes__)
    after = model.state_to_named_tensors()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_compute_workers_is_validated_naming_the_field() -> None:
    base = {"silo_id": "silo-1", "data": {"source": "synthetic_ecg", "n_records": 12}}
    assert parse_config(base, SiteConfig, "site.yaml").compute.workers == 1
    assert parse_config({**base, "compute": {"workers": 2}}, SiteConfig, "site.yaml").compute.workers == 2
    with pytest.raises(ConfigError, match=r"site\.yaml: compute\.workers: .*greater than or equal to 1"):
        parse_config({**base, "compute": {"workers": 0}}, SiteConfig, "site.yaml")
    many = 1 + (os.cpu_count() or 1)
    with pytest.raises(ConfigError, match=rf"compute\.workers: .*{many} workers on a host with .* CPU cores"):
        parse_config({**base, "compute": {"workers": many}}, SiteConfig, "site.yaml")
    assert worker_devices(CPU, 3) == (CPU, CPU, CPU)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=r"compute\.workers: 2 workers on CUDA need one GPU each"):
            worker_devices(torch.device("cuda"), 2)
