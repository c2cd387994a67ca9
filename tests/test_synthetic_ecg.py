"""Synthetic 12-lead ECG generator: layout, lead physics, determinism, class structure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import find_peaks

from condi_models.data.ptbxl import PTBXL_LEADS, SUPERCLASSES
from condi_models.data.synthetic_ecg import DEFAULT_CLASS_WEIGHTS, generate_ecg

LEAD = {name: i for i, name in enumerate(PTBXL_LEADS)}
UNIFORM = [1.0] * len(SUPERCLASSES)


@pytest.fixture(scope="module")
def balanced():
    return generate_ecg(300, seed=11, class_weights=UNIFORM)


def _features(x: np.ndarray, fs: float) -> np.ndarray:
    """Per-lead upper and lower amplitude percentiles and high-frequency share: no beat detection."""
    x = x.astype(np.float64) - np.median(x, axis=2, keepdims=True)
    hi, lo = np.percentile(x, 99, axis=2), np.percentile(x, 1, axis=2)
    power = np.abs(np.fft.rfft(x, axis=2)) ** 2
    f = np.fft.rfftfreq(x.shape[2], 1.0 / fs)
    hf = np.log(power[:, :, f > 15].sum(2) / power[:, :, (f > 1) & (f <= 15)].sum(2))
    return np.concatenate([hi, lo, hf], axis=1)


def test_layout_matches_ptbxl(balanced):
    ds = balanced
    assert ds.info.name == "synthetic_ecg" and ds.info.task == "superclass"
    assert ds.info.channel_names == PTBXL_LEADS and ds.info.classes == SUPERCLASSES
    assert ds.info.sampling_rate_hz == 100.0 and ds.info.length == 1000
    assert ds.x.shape == (300, 12, 1000) and ds.x.dtype == np.float32
    assert ds.observed.all() and np.isfinite(ds.x).all()
    assert ds.sample_ids[:2] == ("synecg/0", "synecg/1") and ds.patient_ids[:2] == ("synecg-p0", "synecg-p1")
    assert (ds.y_multi.sum(axis=1) == 1).all() and ds.y_multi[np.arange(len(ds)), ds.y].all()
    assert set(np.unique(ds.folds)) == set(range(1, 11))


def test_limb_leads_obey_einthoven_and_goldberger_exactly(balanced):
    # the noise is added to I and II before the other limb leads are derived, as an ECG machine does
    x = balanced.x.astype(np.float64)
    lead_i, lead_ii = x[:, LEAD["I"]], x[:, LEAD["II"]]
    tol = 1e-6
    np.testing.assert_allclose(x[:, LEAD["III"]], lead_ii - lead_i, atol=tol)
    np.testing.assert_allclose(x[:, LEAD["aVR"]], -(lead_i + lead_ii) / 2, atol=tol)
    np.testing.assert_allclose(x[:, LEAD["aVL"]], lead_i - lead_ii / 2, atol=tol)
    np.testing.assert_allclose(x[:, LEAD["aVF"]], lead_ii - lead_i / 2, atol=tol)
    # the precordial leads are not combinations of the limb leads
    v_share = np.linalg.lstsq(x[:, :2].transpose(0, 2, 1).reshape(-1, 2), x[:, LEAD["V2"]].ravel(), rcond=None)
    assert v_share[1][0] > 0.1 * float((x[:, LEAD["V2"]] ** 2).sum())


def test_amplitudes_and_heart_rate_are_physiological(balanced):
    x = balanced.x.astype(np.float64)
    spread = np.percentile(x, 99, axis=2) - np.percentile(x, 1, axis=2)  # (N, 12) mV
    assert 0.4 < float(np.median(spread[:, LEAD["II"]])) < 2.5
    assert 0.7 < float(np.median(spread[:, LEAD["V2"]])) < 3.5
    assert float(spread.max()) < 8.0
    # beats from the spatial QRS energy; 45-120 bpm drawn, so 7-20 R peaks in 10 s
    energy = np.abs(np.diff(x, axis=2)).sum(axis=1)
    counts = []
    for e in energy:
        peaks, _ = find_peaks(e, distance=30, height=0.4 * np.percentile(e, 99))
        counts.append(len(peaks))
    counts = np.array(counts)
    assert np.mean((counts >= 6) & (counts <= 22)) > 0.9


def test_same_seed_same_data_and_records_do_not_depend_on_n():
    a = generate_ecg(12, seed=3)
    b = generate_ecg(12, seed=3)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    head = generate_ecg(5, seed=3)
    np.testing.assert_array_equal(head.x, a.x[:5])
    np.testing.assert_array_equal(head.y, a.y[:5])
    other = generate_ecg(12, seed=4)
    assert not np.allclose(other.x, a.x)


def test_records_per_patient_share_patient_and_class():
    ds = generate_ecg(30, seed=5, records_per_patient=3, class_weights=UNIFORM)
    assert ds.patient_ids[:4] == ("synecg-p0", "synecg-p0", "synecg-p0", "synecg-p1")
    assert len(set(ds.patient_ids)) == 10
    assert (ds.y.reshape(10, 3) == ds.y[::3, None]).all()
    assert (ds.folds.reshape(10, 3) == ds.folds[::3, None]).all()
    # records of one patient are distinct recordings, not copies
    assert not np.allclose(ds.x[0], ds.x[1])


def test_class_balance_follows_weights():
    n = 1500
    ds = generate_ecg(n, seed=7, seconds=1.0)
    share = np.bincount(ds.y, minlength=5) / n
    np.testing.assert_allclose(share, DEFAULT_CLASS_WEIGHTS, atol=0.04)
    skewed = generate_ecg(400, seed=7, seconds=1.0, class_weights=[0, 1, 0, 3, 0])
    counts = skewed.class_counts()
    assert counts["NORM"] == counts["STTC"] == counts["HYP"] == 0
    assert 0.65 < counts["CD"] / 400 < 0.85


def test_class_morphology_goes_the_expected_way(balanced):
    ds = balanced
    f = _features(ds.x, ds.info.sampling_rate_hz)
    voltage = (f[:, :12] - f[:, 12:24]).sum(axis=1)
    hf = f[:, 24:].mean(axis=1)
    by = {c: ds.y == i for i, c in enumerate(SUPERCLASSES)}
    assert np.median(voltage[by["HYP"]]) > 1.3 * np.median(voltage[by["NORM"]])
    # wide QRS puts less of the energy at high frequency
    assert np.median(hf[by["CD"]]) < np.median(hf[by["NORM"]])


def test_classes_are_learnable_but_not_trivial(balanced):
    ds = balanced
    z = _features(ds.x, ds.info.sampling_rate_hz)
    train, test = np.arange(200), np.arange(200, 300)
    mu, sd = z[train].mean(0), z[train].std(0) + 1e-9
    z = (z - mu) / sd
    centroids = np.stack([z[train][ds.y[train] == c].mean(0) for c in range(len(SUPERCLASSES))])
    pred = np.argmin(((z[test, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    accuracy = float((pred == ds.y[test]).mean())
    assert 0.4 < accuracy < 0.9, accuracy  # chance is 0.2


def test_higher_rate_is_the_same_heart():
    low = generate_ecg(4, seed=9, fs=100.0)
    high = generate_ecg(4, seed=9, fs=500.0)
    assert high.x.shape == (4, 12, 5000) and high.info.sampling_rate_hz == 500.0
    a, b = low.x.reshape(4, -1), high.x[:, :, ::5].reshape(4, -1)
    for u, v in zip(a, b, strict=True):
        assert np.corrcoef(u, v)[0, 1] > 0.97


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_records": -1}, "n_records"),
        ({"class_weights": [1, 1]}, "class_weights"),
        ({"class_weights": [1, -1, 1, 1, 1]}, "class_weights"),
        ({"class_weights": [0, 0, 0, 0, 0]}, "class_weights"),
        ({"records_per_patient": 0}, "records_per_patient"),
        ({"fs": 0.0}, "fs"),
        ({"seed": -2}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"n_records": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_ecg(**args)
