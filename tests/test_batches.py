"""Training batches: random crops when training, the fixed centre crop when evaluating."""

from __future__ import annotations

import numpy as np
import torch

from condi_models.batches import crop, iterate_batches, prepare_split
from condi_models.data.missingness import MissingnessSpec
from condi_models.data.normalize import ChannelNormalizer
from tests.helpers import toy_dataset


def test_crop_takes_each_rows_window():
    arr = np.arange(2 * 3 * 10).reshape(2, 3, 10)
    out = crop(arr, np.array([1, 0]), np.array([2, 5]), 4)
    assert out.shape == (2, 3, 4)
    assert np.array_equal(out[0], arr[1, :, 2:6]) and np.array_equal(out[1], arr[0, :, 5:9])


def test_prepare_split_hides_values_and_keeps_truth_apart():
    ds = toy_dataset(n=50, length=40)
    norm = ChannelNormalizer.fit(ds.x, ds.observed)
    split = prepare_split(ds, norm, MissingnessSpec(ps=1.0, pw=0.5, seed=0))
    assert (split.x[~split.observed] == 0).all()
    assert split.hidden.any() and not (split.hidden & split.observed).any()
    assert np.allclose(split.truth[split.observed], split.x[split.observed])
    assert split.modality_counts().tolist() == [50, 50, 50]


def test_evaluation_batches_are_deterministic_and_training_ones_shuffle():
    ds = toy_dataset(n=20, length=40)
    split = prepare_split(ds, ChannelNormalizer.fit(ds.x, ds.observed), None)
    cpu = torch.device("cpu")
    ev1 = list(iterate_batches(split, 8, window=10, rng=None, device=cpu))
    ev2 = list(iterate_batches(split, 8, window=10, rng=None, device=cpu))
    assert [len(b.index) for b in ev1] == [8, 8, 4]
    assert all((b.start == 15).all() for b in ev1)
    assert all(torch.equal(a.x, b.x) for a, b in zip(ev1, ev2))
    tr = list(iterate_batches(split, 8, window=10, rng=np.random.default_rng(0), device=cpu))
    assert sorted(np.concatenate([b.index for b in tr]).tolist()) == list(range(20))
    assert len({int(s) for b in tr for s in b.start}) > 1
    b = tr[0]
    assert torch.equal(b.x[0], torch.from_numpy(split.x[b.index[0], :, b.start[0] : b.start[0] + 10]))
