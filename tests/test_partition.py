"""Patient-disjoint splits, silo partitions and normalization fitted on training data only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.partition import partition_silos, patient_folds, split_by_folds, split_by_patient
from tests.helpers import toy_dataset


def _patients(ds, idx):
    return {ds.patient_ids[i] for i in idx}


def test_split_by_patient_is_disjoint_and_complete():
    ds = toy_dataset(n=300, records_per_patient=3)
    split = split_by_patient(ds.patient_ids, (0.7, 0.15, 0.15), seed=1)
    parts = [split.train, split.val, split.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    sets = [_patients(ds, p) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert abs(len(split.train) - 210) <= 3
    assert np.array_equal(split.test, split_by_patient(ds.patient_ids, (0.7, 0.15, 0.15), seed=1).test)


def test_split_by_folds():
    folds = np.array([1, 2, 3, 1, 2, 3, 4])
    s = split_by_folds(folds, [1, 2], [3], [4])
    assert s.train.tolist() == [0, 1, 3, 4] and s.val.tolist() == [2, 5] and s.test.tolist() == [6]
    with pytest.raises(ValueError, match="overlap"):
        split_by_folds(folds, [1, 2], [2], [4])


@settings(max_examples=30, deadline=None)
@given(
    n_silos=st.integers(2, 8),
    alpha=st.floats(0.1, 10.0),
    seed=st.integers(0, 10_000),
    per_patient=st.integers(1, 3),
)
def test_dirichlet_partition_properties(n_silos, alpha, seed, per_patient):
    ds = toy_dataset(n=240, n_classes=5, records_per_patient=per_patient, seed=seed % 7)
    silos = partition_silos(ds.y, ds.patient_ids, n_silos, scheme="dirichlet", alpha=alpha, seed=seed)
    assert len(silos) == n_silos
    assert all(len(s) > 0 for s in silos)
    allidx = np.concatenate(silos)
    assert sorted(allidx.tolist()) == list(range(len(ds))), "each sample in exactly one silo"
    pats = [_patients(ds, s) for s in silos]
    for a in range(n_silos):
        for b in range(a + 1, n_silos):
            assert not pats[a] & pats[b]


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    ds = toy_dataset(n=1200, n_classes=5, seed=2)

    def skew(silos):
        # Mean total-variation distance of silo label histograms from the global one.
        glob = np.bincount(ds.y, minlength=5) / len(ds)
        return np.mean([0.5 * np.abs(np.bincount(ds.y[s], minlength=5) / len(s) - glob).sum() for s in silos])

    iid = partition_silos(ds.y, ds.patient_ids, 6, scheme="iid", seed=0)
    dirich = partition_silos(ds.y, ds.patient_ids, 6, scheme="dirichlet", alpha=0.5, seed=0)
    assert skew(dirich) > 3 * skew(iid)
    assert partition_silos(ds.y, ds.patient_ids, 6, alpha=0.5, seed=0)[2].tolist() == dirich[2].tolist()


def test_partition_refuses_too_few_patients():
    ds = toy_dataset(n=6, records_per_patient=3)
    with pytest.raises(ValueError, match="only 2 patients"):
        partition_silos(ds.y, ds.patient_ids, 3)


def test_normalizer_uses_observed_training_entries_only():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(50, 3, 40)).astype(np.float32)
    observed = rng.random(x.shape) > 0.3
    x_masked = np.where(observed, x, 1e6).astype(np.float32)  # a leak would show up as a huge mean
    norm = ChannelNormalizer.fit(x_masked, observed)
    assert np.allclose(norm.mean, [x[:, c][observed[:, c]].mean() for c in range(3)], atol=1e-4)
    z = norm.apply(x_masked, observed)
    assert (z[~observed] == 0).all()
    assert abs(z[observed].mean()) < 1e-3 and abs(z[observed].std() - 1) < 1e-2
    assert np.allclose(norm.invert(z)[observed], x[observed], atol=1e-3)
    empty = ChannelNormalizer.fit(x, np.zeros_like(observed))
    assert (empty.std == 1).all() and (empty.mean == 0).all()


def test_pooled_statistics_equal_those_of_the_union():
    rng = np.random.default_rng(1)
    parts = [rng.normal(m, s, size=(n, 2, 30)).astype(np.float32) for m, s, n in ((0, 1, 10), (3, 2, 25), (-1, 0.5, 5))]
    masks = [rng.random(p.shape) > 0.2 for p in parts]
    pooled = ChannelNormalizer.pool([ChannelNormalizer.fit(p, m) for p, m in zip(parts, masks)])
    whole = ChannelNormalizer.fit(np.concatenate(parts), np.concatenate(masks))
    assert np.allclose(pooled.mean, whole.mean, atol=1e-4)
    assert np.allclose(pooled.std, whole.std, atol=1e-4)
    assert np.array_equal(pooled.count, whole.count)


def test_patient_folds_keep_patients_whole_and_ignore_the_run_seed():
    pids = [f"p{i // 3}" for i in range(60)] + ["solo"]  # 20 patients of 3 records and one of 1
    folds = patient_folds(pids, 8, seed=0)
    assert set(folds.tolist()) == set(range(1, 9))
    for p in set(pids):
        assert len({int(f) for f, q in zip(folds, pids) if q == p}) == 1
    per_fold = [len({q for f, q in zip(folds, pids) if f == k}) for k in range(1, 9)]
    assert max(per_fold) - min(per_fold) <= 1
    assert np.array_equal(folds, patient_folds(pids, 8, seed=0))
    assert not np.array_equal(folds, patient_folds(pids, 8, seed=1))
    with pytest.raises(ValueError, match="n_folds"):
        patient_folds(pids, 40, seed=0)
