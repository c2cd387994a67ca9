"""Sleep-EDF cassette loader: real hypnograms, and PSG files written in the cassette layout."""

from __future__ import annotations

import datetime
import itertools
import math
import shutil
from pathlib import Path

import edfio
import mne
import numpy as np
import pytest

from condi_models.data.sleep_edf import (
    CASSETTE_RATES,
    CHANNELS,
    CLASSES,
    HypnogramError,
    check_edf_size,
    load_sleep_edf,
    read_hypnogram,
    sleep_period,
    stage_epochs,
)
from condi_models.data.synthetic_psg import (
    STAGE_TRANSITIONS,
    estimate_transitions,
    simulate_signals,
    stages_to_hypnogram,
    write_cassette_night,
)

TEXT_TO_STAGE = {
    "Sleep stage W": "W",
    "Sleep stage 1": "N1",
    "Sleep stage 2": "N2",
    "Sleep stage 3": "N3",
    "Sleep stage 4": "N3",
    "Sleep stage R": "REM",
}
SPIKE_UV = 5000.0
EMG_BUMP_UV = 800.0
TRIM_MINUTES = 10.0  # 20 epochs of wake kept on each side of sleep


def hypnogram_paths(root: Path) -> list[Path]:
    return sorted((root / "sleep-cassette").glob("*-Hypnogram.edf"))


def expected_epochs(hyp_path: Path, trim_epochs: int) -> dict[int, str]:
    """Labelled epochs after trimming, worked out here straight from mne's annotations."""
    labels: dict[int, str | None] = {}
    ann = mne.read_annotations(hyp_path)
    for onset, duration, text in zip(ann.onset, ann.duration, ann.description):
        for j in range(int(duration // 30)):
            labels[int(onset // 30) + j] = TEXT_TO_STAGE.get(text)
    asleep = [k for k, s in labels.items() if s not in (None, "W")]
    lo, hi = min(asleep) - trim_epochs, max(asleep) + trim_epochs
    return {k: s for k, s in sorted(labels.items()) if s is not None and lo <= k <= hi}


# Real hypnograms ---------------------------------------------------------------------------


def test_read_hypnogram_on_real_cassette_hypnograms(sleep_edf_root: Path) -> None:
    paths = hypnogram_paths(sleep_edf_root)
    assert len(paths) == 20
    for path in paths:
        hyp = read_hypnogram(path)
        assert {s for _, _, s in hyp} <= {*CLASSES, None}
        assert {"W", "N1", "N2", "N3", "REM"} <= {s for _, _, s in hyp}
        # Onsets and durations are seconds: contiguous, on the 30 s grid, 24 h in all.
        assert hyp[0][0] == 0.0
        for (on, dur, _), (next_on, _, _) in itertools.pairwise(hyp):
            assert next_on == pytest.approx(on + dur)
        assert all(on % 30 == 0 and dur % 30 == 0 and dur > 0 for on, dur, _ in hyp)
        assert sum(dur for _, dur, _ in hyp) == pytest.approx(86400.0)
        # Stages 3 and 4 together make N3.
        ann = mne.read_annotations(path)
        deep = sum(d for d, t in zip(ann.duration, ann.description) if t in ("Sleep stage 3", "Sleep stage 4"))
        assert sum(d for _, d, s in hyp if s == "N3") == pytest.approx(deep)


def test_known_values_of_sc4001(sleep_edf_root: Path) -> None:
    path = sleep_edf_root / "sleep-cassette" / "SC4001EC-Hypnogram.edf"
    hyp = read_hypnogram(path)
    assert hyp[:3] == [(0.0, 30630.0, "W"), (30630.0, 120.0, "N1"), (30750.0, 390.0, "N2")]
    stages = stage_epochs(hyp)
    assert len(stages) == 2880
    assert stages[1020] == "W" and stages[1021] == "N1" and stages[1025] == "N2"
    kept = sleep_period(stages, 30.0)
    assert (kept.start, kept.stop) == (1021 - 60, kept.stop)
    assert len(kept) == 841  # the usual size of this night after 30 min wake trimming
    assert sleep_period(stages, math.inf) == range(2880)


def test_transitions_estimated_from_real_hypnograms(sleep_edf_root: Path) -> None:
    p = estimate_transitions(hypnogram_paths(sleep_edf_root))
    assert p.shape == (5, 5)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p, STAGE_TRANSITIONS, atol=2e-4)
    assert np.all(np.diag(p) > 0.6)  # stages persist over several epochs


def test_malformed_hypnograms_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(HypnogramError, match="multiple of 30"):
        stage_epochs([(0.0, 45.0, "W")], source="x.edf")
    with pytest.raises(HypnogramError, match="overlap"):
        stage_epochs([(0.0, 90.0, "W"), (60.0, 30.0, "N1")], source="x.edf")
    bad = tmp_path / "SC4001EC-Hypnogram.edf"
    edfio.Edf([], annotations=[edfio.EdfAnnotation(0.0, 30.0, "Lights off")]).write(bad)
    with pytest.raises(HypnogramError, match=r"SC4001EC-Hypnogram\.edf.*'Lights off'"):
        read_hypnogram(bad)
    bad.write_bytes(b"garbage" * 50)
    with pytest.raises(HypnogramError, match=r"SC4001EC-Hypnogram\.edf"):
        read_hypnogram(bad)


# Written cassette nights -----------------------------------------------------------------


def _night_a(real_hypnogram: Path) -> tuple[list[tuple[float, float, str | None]], int]:
    """The real hypnogram around sleep onset: 40 wake epochs before it, 160 epochs after, with
    onsets moved to the start of that window. Returns it and its number of epochs."""
    hyp = read_hypnogram(real_hypnogram)
    first_sleep = next(on for on, _, s in hyp if s not in (None, "W"))
    w0, w1 = first_sleep - 40 * 30, first_sleep + 160 * 30
    out = []
    for on, dur, s in hyp:
        lo, hi = max(on, w0), min(on + dur, w1)
        if hi > lo:
            out.append((lo - w0, hi - lo, s))
    return out, 200


NIGHT_B = ["W"] * 30 + ["N1"] * 3 + ["N2"] * 10 + [None] + ["N3"] * 8 + ["N2"] * 2 + [None] + ["REM"] * 6 + ["W"] * 25
MARKED_EPOCH = 47  # an N3 epoch of night B
BREATH_HZ = 0.2


def _signals(stages: list[str | None], seed: int) -> dict[str, np.ndarray]:
    return simulate_signals(stages, np.random.default_rng(seed))


def _mark(signals: dict[str, np.ndarray], psg_seconds: float) -> None:
    """A spike in EEG Fpz-Cz at ``psg_seconds`` + 7.5 s and an EMG bump at + 12 s."""
    signals["EEG Fpz-Cz"][round((psg_seconds + 7.5) * 100)] = SPIKE_UV
    signals["EMG submental"][round(psg_seconds + 12)] = EMG_BUMP_UV


NIGHT_C = ["W"] * 3 + ["N2"] * 4 + ["REM"] * 2 + ["W"] * 3


@pytest.fixture(scope="module")
def cassette(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Night B (subject 01) with an analytic airflow and markers, and a short night C (subject 00)."""
    out = tmp_path_factory.mktemp("cassette")
    signals_b = _signals(NIGHT_B, 2)
    seconds = np.arange(len(NIGHT_B) * 30, dtype=np.float64)
    signals_b["Resp oro-nasal"] = 100.0 * np.sin(2 * np.pi * BREATH_HZ * seconds + 0.3)
    _mark(signals_b, MARKED_EPOCH * 30.0)
    write_cassette_night(out, "SC4012", signals_b, CASSETTE_RATES, stages_to_hypnogram(NIGHT_B))
    write_cassette_night(out, "SC4002", _signals(NIGHT_C, 1), CASSETTE_RATES, stages_to_hypnogram(NIGHT_C))
    return out


@pytest.fixture(scope="module")
def loaded(cassette: Path):
    return load_sleep_edf(cassette, trim_wake_minutes=TRIM_MINUTES)


def _labels_of(ds, key: str) -> dict[int, str]:
    return {
        int(sid.rsplit("/", 1)[1]): CLASSES[y]
        for sid, y in zip(ds.sample_ids, ds.y)
        if sid.startswith(f"sleep_edf/{key}/")
    }


def test_loader_epochs_and_labels_match_the_hypnograms(cassette: Path, loaded) -> None:
    assert loaded.skipped == ()
    assert loaded.info.name == "sleep_edf" and loaded.info.task == "sleep_stage"
    assert loaded.info.classes == CLASSES and loaded.info.channel_names == CHANNELS
    assert [m.channels for m in loaded.info.modalities] == [(c,) for c in CHANNELS]
    assert loaded.x.shape[1:] == (5, 3000) and loaded.observed.all()
    for key, hyp_name in (("SC4002E", "SC4002EC-Hypnogram.edf"), ("SC4012E", "SC4012EC-Hypnogram.edf")):
        assert _labels_of(loaded, key) == expected_epochs(cassette / hyp_name, trim_epochs=20), key
    # Night B by hand: epochs 10..80 kept by trimming, the unknown and movement epochs dropped.
    b_ids = [s for s in loaded.sample_ids if s.startswith("sleep_edf/SC4012E/")]
    assert len(b_ids) == 71 - 2
    assert b_ids[0] == "sleep_edf/SC4012E/10" and b_ids[-1] == "sleep_edf/SC4012E/80"
    assert "sleep_edf/SC4012E/43" not in b_ids
    # Night C is short: nothing to trim.
    assert _labels_of(loaded, "SC4002E") == dict(enumerate(NIGHT_C))
    assert set(loaded.patient_ids) == {"sleep_edf/subject-00", "sleep_edf/subject-01"}
    assert loaded.patient_ids[loaded.sample_ids.index(b_ids[0])] == "sleep_edf/subject-01"


def test_loader_on_a_real_hypnogram(sleep_edf_root: Path, tmp_path: Path) -> None:
    """A written night whose stage sequence is the real SC4001 hypnogram around sleep onset."""
    hyp, n_epochs = _night_a(sleep_edf_root / "sleep-cassette" / "SC4001EC-Hypnogram.edf")
    stages: list[str | None] = [None] * n_epochs
    for on, dur, s in hyp:
        stages[round(on / 30) : round((on + dur) / 30)] = [s] * round(dur / 30)
    marked = stages.index("N3")
    signals = _signals(stages, 1)
    _mark(signals, marked * 30.0)
    write_cassette_night(tmp_path, "SC4001", signals, CASSETTE_RATES, hyp)

    ds = load_sleep_edf(tmp_path, trim_wake_minutes=TRIM_MINUTES)
    labels = _labels_of(ds, "SC4001E")
    assert labels == expected_epochs(tmp_path / "SC4001EC-Hypnogram.edf", trim_epochs=20)
    assert min(labels) == 20  # 40 wake epochs written before sleep onset, 20 kept
    assert {"W", "N1", "N2", "N3"} <= set(labels.values())
    i = ds.sample_ids.index(f"sleep_edf/SC4001E/{marked}")
    assert CLASSES[ds.y[i]] == "N3"
    assert np.argmax(np.abs(ds.x[i, 0])) == 750
    assert abs(int(np.argmax(ds.x[i, 4])) - 1200) <= 1


def test_marker_lands_in_its_epoch_at_the_right_sample(loaded) -> None:
    i = loaded.sample_ids.index(f"sleep_edf/SC4012E/{MARKED_EPOCH}")
    assert loaded.y[i] == CLASSES.index("N3")
    eeg = np.abs(loaded.x[:, 0, :])
    assert np.argmax(eeg[i]) == 750
    assert eeg[i, 750] == pytest.approx(SPIKE_UV, rel=1e-3)
    others = np.delete(np.arange(len(loaded)), i)
    assert eeg[others].max() < 1000.0
    # The 1 Hz EMG bump, interpolated to 100 Hz, peaks at 12 s into the same epoch.
    emg = loaded.x[i, 4]
    assert abs(int(np.argmax(emg)) - 1200) <= 1
    assert emg.max() == pytest.approx(EMG_BUMP_UV, rel=0.02)


def test_one_hz_channels_are_interpolated_not_held(loaded) -> None:
    """The 0.2 Hz airflow written at 1 Hz comes back at 100 Hz as the continuous sinusoid."""
    rows = [i for i, sid in enumerate(loaded.sample_ids) if sid.startswith("sleep_edf/SC4012E/")]
    epochs = np.array([int(loaded.sample_ids[i].rsplit("/", 1)[1]) for i in rows])
    t = epochs[:, None] * 30.0 + np.arange(3000)[None, :] / 100.0
    truth = 100.0 * np.sin(2 * np.pi * BREATH_HZ * t + 0.3)
    resp = loaded.x[rows, 3]
    # Sample-and-hold would be off by up to 100 * 2 sin(pi * 0.2 / 2) = 62 uV, in 62 uV jumps.
    assert np.abs(resp - truth).max() < 2.0
    assert np.abs(np.diff(resp, axis=1)).max() < 100.0 * 2 * np.pi * BREATH_HZ / 100.0 * 1.05


def test_resampling_to_another_rate(cassette: Path) -> None:
    ds = load_sleep_edf(cassette, resample_hz=50.0, trim_wake_minutes=TRIM_MINUTES, max_nights=1)
    assert ds.info.sampling_rate_hz == 50.0 and ds.info.length == 1500
    assert {s.split("/")[1] for s in ds.sample_ids} == {"SC4002E"}
    with pytest.raises(ValueError, match="whole samples"):
        load_sleep_edf(cassette, resample_hz=33.33)


def test_marker_at_50_hz(cassette: Path) -> None:
    ds = load_sleep_edf(cassette, resample_hz=50.0, trim_wake_minutes=TRIM_MINUTES)
    i = ds.sample_ids.index(f"sleep_edf/SC4012E/{MARKED_EPOCH}")
    assert np.argmax(np.abs(ds.x[i, 0])) == 375


def test_hypnogram_starting_after_the_psg_is_aligned_by_its_start_time(tmp_path: Path) -> None:
    stages = ["W"] * 4 + ["N2"] * 6 + ["W"] * 2
    signals = _signals([*stages, "W", "W"], 3)  # the PSG runs 60 s longer than the hypnogram
    epoch = 6
    _mark(signals, 60.0 + epoch * 30.0)
    start = datetime.datetime(1989, 4, 24, 23, 0, 0)
    write_cassette_night(tmp_path / "a", "SC4001", signals, CASSETTE_RATES, stages_to_hypnogram(stages), start=start)
    late = start + datetime.timedelta(seconds=60)
    write_cassette_night(tmp_path / "b", "SC4001", signals, CASSETTE_RATES, stages_to_hypnogram(stages), start=late)
    shutil.copy(tmp_path / "b" / "SC4001EC-Hypnogram.edf", tmp_path / "a" / "SC4001EC-Hypnogram.edf")
    ds = load_sleep_edf(tmp_path / "a", trim_wake_minutes=math.inf)
    i = ds.sample_ids.index(f"sleep_edf/SC4001E/{epoch}")
    assert np.argmax(np.abs(ds.x[i, 0])) == 750
    assert len(ds) == len(stages)


def test_unreadable_nights_are_skipped_with_reasons(tmp_path: Path) -> None:
    stages = ["W"] * 2 + ["N1", "N2", "N2", "REM"] + ["W"] * 2
    hyp = stages_to_hypnogram(stages)
    good = write_cassette_night(tmp_path, "SC4001", _signals(stages, 4), CASSETTE_RATES, hyp)
    truncated, _ = write_cassette_night(tmp_path, "SC4002", _signals(stages, 5), CASSETTE_RATES, hyp)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 700])
    _, broken_hyp = write_cassette_night(tmp_path, "SC4011", _signals(stages, 6), CASSETTE_RATES, hyp)
    broken_hyp.write_bytes(broken_hyp.read_bytes()[:300])
    no_emg = {k: v for k, v in _signals(stages, 7).items() if k != "EMG submental"}
    write_cassette_night(tmp_path, "SC4012", no_emg, CASSETTE_RATES, hyp)
    (tmp_path / "SC4021E0-PSG.edf").write_bytes(good[0].read_bytes())  # a PSG without hypnogram

    ds = load_sleep_edf(tmp_path, trim_wake_minutes=math.inf)
    assert {s.split("/")[1] for s in ds.sample_ids} == {"SC4001E"}
    assert len(ds) == len(stages)
    reasons = {s.record: s.reason for s in ds.skipped}
    assert set(reasons) == {
        "SC4002E0-PSG.edf",
        "SC4011EC-Hypnogram.edf",
        "SC4012E0-PSG.edf",
        "SC4021E0-PSG.edf",
    }
    assert "truncated" in reasons["SC4002E0-PSG.edf"]
    assert "SC4011EC-Hypnogram.edf" in reasons["SC4011EC-Hypnogram.edf"]
    assert "missing channel" in reasons["SC4012E0-PSG.edf"] and "EMG submental" in reasons["SC4012E0-PSG.edf"]
    assert "Hypnogram" in reasons["SC4021E0-PSG.edf"]
    with pytest.raises(ValueError, match="truncated"):
        check_edf_size(truncated)


def test_no_pairs_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_sleep_edf(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sleep_edf(tmp_path / "nowhere")


def test_hypnograms_without_psg_files_are_an_error(sleep_edf_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"sleep-cassette \(20 unpaired files\)"):
        load_sleep_edf(sleep_edf_root)
