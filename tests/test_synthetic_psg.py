"""Synthetic PSG: determinism, stage signatures, the Markov chain, and the cassette files it writes."""

from __future__ import annotations

import math
from pathlib import Path

import edfio
import mne
import numpy as np
import pytest
from scipy.signal import welch

from condi_models.data.sleep_edf import CASSETTE_RATES, CHANNELS, CLASSES, load_sleep_edf
from condi_models.data.synthetic_psg import (
    STAGE_TRANSITIONS,
    generate_psg,
    markov_stages,
    simulate_signals,
    stages_to_hypnogram,
    write_cassette_night,
    write_synthetic_cassette,
)

EPOCHS_PER_STAGE = 10


def band_power(x: np.ndarray, fs: float, lo: float, hi: float) -> np.ndarray:
    """Mean power in [lo, hi) Hz of each row of x."""
    f, p = welch(x, fs=fs, nperseg=400, axis=-1)
    sel = (f >= lo) & (f < hi)
    return p[..., sel].sum(axis=-1) * (f[1] - f[0])


@pytest.fixture(scope="module")
def by_stage() -> dict[str, dict[str, np.ndarray]]:
    """Native-rate signals of a night with EPOCHS_PER_STAGE epochs of each stage, cut per stage."""
    stages = [s for s in CLASSES for _ in range(EPOCHS_PER_STAGE)]
    signals = simulate_signals(stages, np.random.default_rng(11))
    out: dict[str, dict[str, np.ndarray]] = {}
    for i, stage in enumerate(CLASSES):
        out[stage] = {}
        for channel, x in signals.items():
            per_epoch = round(30 * CASSETTE_RATES[channel])
            # Leave out the first epoch of each stage, where the previous stage fades out.
            lo, hi = (i * EPOCHS_PER_STAGE + 1) * per_epoch, (i + 1) * EPOCHS_PER_STAGE * per_epoch
            out[stage][channel] = x[lo:hi].reshape(-1, per_epoch)
    return out


def test_same_seed_same_data_and_nights_are_independent_of_count() -> None:
    a = generate_psg(3, seed=7, epochs_per_night=8)
    b = generate_psg(3, seed=7, epochs_per_night=8)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.sample_ids == b.sample_ids
    c = generate_psg(2, seed=7, epochs_per_night=8)
    np.testing.assert_array_equal(c.x, a.x[:16])
    d = generate_psg(3, seed=8, epochs_per_night=8)
    assert not np.allclose(d.x, a.x)


def test_dataset_shape_ids_and_subjects() -> None:
    ds = generate_psg(3, seed=1, epochs_per_night=6, fs=50.0)
    assert ds.x.shape == (18, 5, 1500) and ds.x.dtype == np.float32 and ds.observed.all()
    assert ds.info.name == "synthetic_psg" and ds.info.channel_names == CHANNELS
    assert ds.info.sampling_rate_hz == 50.0 and ds.info.classes == CLASSES
    assert ds.sample_ids[:2] == ("synpsg/0/0", "synpsg/0/1") and ds.sample_ids[-1] == "synpsg/2/5"
    assert ds.patient_ids[0] == ds.patient_ids[11] == "synpsg/subject-0"
    assert ds.patient_ids[12] == "synpsg/subject-1"
    assert ds.y[0] == CLASSES.index("W")  # nights start awake
    assert np.all(np.isfinite(ds.x))


def test_markov_chain_follows_the_transition_matrix() -> None:
    stages = markov_stages(np.random.default_rng(0), 40_000, STAGE_TRANSITIONS)
    idx = np.array([CLASSES.index(s) for s in stages])
    counts = np.zeros((5, 5))
    np.add.at(counts, (idx[:-1], idx[1:]), 1)
    observed = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(observed, STAGE_TRANSITIONS, atol=0.03)
    with pytest.raises(ValueError, match="rows sum to 1"):
        generate_psg(1, seed=0, transitions=np.eye(5) * 0.5)


def test_eeg_spectral_signatures_by_stage(by_stage) -> None:
    fpz = {s: by_stage[s]["EEG Fpz-Cz"] for s in CLASSES}
    pz = {s: by_stage[s]["EEG Pz-Oz"] for s in CLASSES}
    delta = {s: band_power(fpz[s], 100.0, 0.5, 2.0).mean() for s in CLASSES}
    alpha = {s: band_power(pz[s], 100.0, 8.0, 12.0).mean() for s in CLASSES}
    sigma = {s: band_power(fpz[s], 100.0, 12.0, 15.0).mean() for s in CLASSES}
    theta = {s: band_power(fpz[s], 100.0, 4.0, 7.0).mean() for s in CLASSES}
    assert delta["N3"] > 10 * delta["W"] and delta["N3"] > 3 * delta["N2"]
    assert alpha["W"] > 10 * alpha["N3"] and alpha["W"] > 3 * alpha["N1"]
    assert sigma["N2"] > 2 * sigma["N1"]  # spindles
    assert theta["N1"] > 2 * theta["W"] and theta["REM"] > 2 * theta["W"]
    # N3 is high-amplitude: well above 75 uV peak to peak in every epoch.
    assert np.ptp(fpz["N3"], axis=1).min() > 75.0


def test_eog_emg_and_breathing_by_stage(by_stage) -> None:
    eog_var = {s: by_stage[s]["EOG horizontal"].var(axis=1).mean() for s in CLASSES}
    assert eog_var["REM"] > 10 * eog_var["N2"]
    assert eog_var["W"] > 5 * eog_var["N2"]
    slow = {s: band_power(by_stage[s]["EOG horizontal"], 100.0, 0.1, 0.7).mean() for s in CLASSES}
    assert slow["N1"] > 10 * slow["N2"]  # slow rolling eye movements
    emg = {s: by_stage[s]["EMG submental"].mean() for s in CLASSES}
    assert emg["REM"] < emg["W"] / 4 and emg["REM"] < emg["N3"]  # REM atonia
    assert emg["W"] > emg["N1"] > emg["N2"]
    # Breathing: about 0.23 Hz in N3, faster and less regular in W.
    breaths = {}
    for s in CLASSES:
        r = by_stage[s]["Resp oro-nasal"].ravel()
        crossings = np.flatnonzero((r[:-1] < 0) & (r[1:] >= 0))
        breaths[s] = (len(crossings) / len(r), np.diff(crossings).std())
    assert 0.2 < breaths["N3"][0] < 0.26 and breaths["W"][0] > breaths["N3"][0]
    assert breaths["W"][1] > breaths["N3"][1]


def test_eeg_channels_share_sources(by_stage) -> None:
    for stage in CLASSES:
        a, b = by_stage[stage]["EEG Fpz-Cz"].ravel(), by_stage[stage]["EEG Pz-Oz"].ravel()
        r = np.corrcoef(a, b)[0, 1]
        assert 0.5 < r < 0.97, stage


def test_written_cassette_is_real_edf_and_loads_back_as_generated(tmp_path: Path) -> None:
    paths = write_synthetic_cassette(tmp_path, 2, seed=3, epochs_per_night=40)
    assert [p.name for pair in paths for p in pair] == [
        "SC4001E0-PSG.edf",
        "SC4001EC-Hypnogram.edf",
        "SC4002E0-PSG.edf",
        "SC4002EC-Hypnogram.edf",
    ]
    psg = edfio.read_edf(paths[0][0])
    assert psg.labels == CHANNELS
    assert {s.label: s.sampling_frequency for s in psg.signals} == CASSETTE_RATES
    assert psg.duration == 40 * 30
    raw = mne.io.read_raw_edf(paths[0][0], verbose="error")
    assert raw.ch_names == list(CHANNELS)
    texts = set(mne.read_annotations(paths[0][1]).description)
    assert texts <= {"Sleep stage W", "Sleep stage 1", "Sleep stage 2", "Sleep stage 3", "Sleep stage R"}

    loaded = load_sleep_edf(tmp_path, trim_wake_minutes=math.inf)
    generated = generate_psg(2, seed=3, epochs_per_night=40)
    np.testing.assert_array_equal(loaded.y, generated.y)
    assert len(set(loaded.y.tolist())) >= 3
    assert loaded.patient_ids[0] == "sleep_edf/subject-00"
    # Equal up to the 16-bit quantisation of EDF.
    for c in range(5):
        span = np.ptp(generated.x[:, c])
        np.testing.assert_allclose(loaded.x[:, c], generated.x[:, c], atol=2 * span / 65535 + 1e-3)


def test_hypnogram_runs_and_writer_validation(tmp_path: Path) -> None:
    assert stages_to_hypnogram(["W", "W", "N2", None, None, "W"]) == [
        (0.0, 60.0, "W"),
        (60.0, 30.0, "N2"),
        (90.0, 60.0, None),
        (150.0, 30.0, "W"),
    ]
    signals = simulate_signals(["W", "N1"], np.random.default_rng(0))
    hyp = stages_to_hypnogram(["W", "N1"])
    with pytest.raises(ValueError, match="SC4ssN"):
        write_cassette_night(tmp_path, "SC4001E0", signals, CASSETTE_RATES, hyp)
    short = dict(signals, **{"EMG submental": signals["EMG submental"][:-30]})
    with pytest.raises(ValueError, match="differ in duration"):
        write_cassette_night(tmp_path, "SC4001", short, CASSETTE_RATES, hyp)
    odd = {k: v[: len(v) - round(CASSETTE_RATES[k])] for k, v in signals.items()}
    with pytest.raises(ValueError, match="multiple of 30 s"):
        write_cassette_night(tmp_path, "SC4001", odd, CASSETTE_RATES, hyp)
    with pytest.raises(ValueError, match="'N4'"):
        write_cassette_night(tmp_path, "SC4001", signals, CASSETTE_RATES, [(0.0, 60.0, "N4")])
