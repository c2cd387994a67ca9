"""Synthetic ICU stays in MIMIC-IV layout, read back through the real loader; malformed input handling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from condi_models.data.mimic import MimicFormatError, load_mimic, load_mimic_with_stats
from condi_models.data.mimic_items import MODALITY_ORDER, VARIABLES
from condi_models.data.synthetic_icu import generate_icu, write_synthetic_mimic

TABLES = (
    "hosp/patients", "hosp/admissions", "hosp/d_labitems", "hosp/labevents", "icu/icustays",
    "icu/d_items", "icu/chartevents", "icu/inputevents", "icu/outputevents",
)
# The published MIMIC-IV 2.2 chartevents header (the one table the shared demo lacks).
CHARTEVENTS_COLUMNS = (
    "subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
    "valuenum", "valueuom", "warning",
)


def _channel(name: str) -> int:
    return [v.name for v in VARIABLES].index(name)


def _auroc(score: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _within_stay_correlations(dataset, a: str, b: str) -> np.ndarray:
    ia, ib = _channel(a), _channel(b)
    out = []
    for i in range(len(dataset)):
        both = dataset.observed[i, ia] & dataset.observed[i, ib]
        if both.sum() >= 10:
            out.append(np.corrcoef(dataset.x[i, ia, both], dataset.x[i, ib, both])[0, 1])
    return np.array(out)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mimic(tmp_path_factory.mktemp("icu_gz"), 240, seed=11, hours=72, gzip=True)


@pytest.fixture(scope="module")
def loaded(written: Path):
    return load_mimic_with_stats(written, task="ihm48", hours=48)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mimic(tmp_path_factory.mktemp("icu_plain"), 40, seed=5, hours=48, gzip=False)


@pytest.fixture
def plain_copy(plain: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(plain, tmp_path / "copy"))


def _rewrite(path: Path, edit) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(frame)
    frame.to_csv(path, index=False)


def test_all_tables_are_written_in_mimic_layout(written: Path) -> None:
    for table in TABLES:
        assert (written / f"{table}.csv.gz").is_file(), table
    header = pd.read_csv(written / "icu" / "chartevents.csv.gz", nrows=0).columns
    assert tuple(header) == CHARTEVENTS_COLUMNS
    d_items = pd.read_csv(written / "icu" / "d_items.csv.gz")
    d_labitems = pd.read_csv(written / "hosp" / "d_labitems.csv.gz")
    for table, dictionary in (("icu/chartevents", d_items), ("icu/inputevents", d_items),
                              ("icu/outputevents", d_items), ("hosp/labevents", d_labitems)):
        used = set(pd.read_csv(written / f"{table}.csv.gz", usecols=["itemid"])["itemid"])
        assert used <= set(dictionary["itemid"]), table


def test_column_names_are_those_of_the_real_demo(written: Path, mimic_root: Path) -> None:
    for table in TABLES:
        if table == "icu/chartevents":
            continue
        ours = set(pd.read_csv(written / f"{table}.csv.gz", nrows=0).columns)
        real = set(pd.read_csv(mimic_root / f"{table}.csv.gz", nrows=0).columns)
        assert ours <= real, f"{table}: {sorted(ours - real)} not in MIMIC-IV"


def test_written_stays_load_with_every_modality_observed(loaded) -> None:
    dataset, stats = loaded
    assert stats.stays_in_table == 240
    assert 0 < len(dataset) < 240 and stats.excluded["ICU stay shorter than 48 h"] == 240 - len(dataset)
    assert stats.absent_tables == () and stats.unobserved_modalities == ()
    assert all(v == 0 for v in stats.malformed_rows.values())
    assert all(v == 0 for v in stats.out_of_range.values())
    fractions = dataset.observed_fraction_by_modality()
    assert set(fractions) == set(MODALITY_ORDER)
    assert fractions["vitals"] > 0.6 and fractions["neuro"] > 0.1
    assert all(fractions[m] > 0.02 for m in ("chemistry", "hematology", "blood_gas"))
    assert min(dataset.class_counts().values()) > 10
    assert len(set(dataset.patient_ids)) < len(dataset)  # some patients were readmitted
    temperature = dataset.x[:, _channel("temperature")][dataset.observed[:, _channel("temperature")]]
    assert temperature.min() > 34.0 and temperature.max() < 42.0  # °F entries came back as °C


def test_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    a = write_synthetic_mimic(tmp_path / "a", 12, seed=3, hours=48)
    b = write_synthetic_mimic(tmp_path / "b", 12, seed=3, hours=48)
    c = write_synthetic_mimic(tmp_path / "c", 12, seed=4, hours=48)
    for table in TABLES:
        name = f"{table}.csv.gz"
        assert (a / name).read_bytes() == (b / name).read_bytes(), table
    assert (a / "hosp/labevents.csv.gz").read_bytes() != (c / "hosp/labevents.csv.gz").read_bytes()


def test_generate_icu_is_deterministic_and_goes_through_the_loader() -> None:
    first = generate_icu(30, seed=8, task="los3", hours=24)
    second = generate_icu(30, seed=8, task="los3", hours=24)
    assert first.info.name == "mimic_iv" and first.info.task == "los3" and first.x.shape[2] == 24
    assert first.sample_ids == second.sample_ids and first.sample_ids[0].startswith("mimic/3")
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.observed, second.observed)
    np.testing.assert_array_equal(first.y, second.y)
    assert not np.array_equal(generate_icu(30, seed=9, task="los3", hours=24).x[:5], first.x[:5])


def test_blood_pressure_drop_raises_heart_rate_and_hypoxia_raises_breathing(loaded) -> None:
    dataset, _ = loaded
    hr_map = _within_stay_correlations(dataset, "heart_rate", "mbp")
    spo2_rr = _within_stay_correlations(dataset, "spo2", "resp_rate")
    assert len(hr_map) > 100 and len(spo2_rr) > 100
    assert np.median(hr_map) < -0.5 and (hr_map < 0).mean() > 0.9
    assert np.median(spo2_rr) < -0.3 and (spo2_rr < 0).mean() > 0.8


def test_outcomes_follow_deterioration(loaded, written: Path) -> None:
    dataset, _ = loaded
    lac = _channel("lactate")
    seen = dataset.observed[:, lac, 24:]
    has = seen.any(axis=1)
    late = (dataset.x[:, lac, 24:] * seen).sum(axis=1) / np.maximum(seen.sum(axis=1), 1)
    died, y = late[has & (dataset.y == 1)], dataset.y[has]
    assert len(died) > 10
    assert died.mean() > 1.3 * late[has & (dataset.y == 0)].mean()
    assert _auroc(late[has], y) > 0.7

    los3 = load_mimic(written, task="los3", hours=48)
    cr = _channel("creatinine")
    mean_cr = (los3.x[:, cr] * los3.observed[:, cr]).sum(axis=1) / np.maximum(los3.observed[:, cr].sum(axis=1), 1)
    assert _auroc(mean_cr, los3.y) > 0.6


def test_plain_csv_loads_like_gzip(plain: Path, tmp_path: Path) -> None:
    gz = write_synthetic_mimic(tmp_path / "gz", 40, seed=5, hours=48, gzip=True)
    assert not list(plain.rglob("*.gz")) and (plain / "hosp" / "labevents.csv").is_file()
    from_plain, from_gz = load_mimic(plain), load_mimic(gz)
    assert from_plain.sample_ids == from_gz.sample_ids and len(from_plain) > 15
    np.testing.assert_array_equal(from_plain.x, from_gz.x)
    np.testing.assert_array_equal(from_plain.observed, from_gz.observed)
    np.testing.assert_array_equal(from_plain.y, from_gz.y)


def test_missing_column_is_an_error_naming_file_and_column(plain_copy: Path) -> None:
    _rewrite(plain_copy / "hosp" / "labevents.csv", lambda f: f.pop("valuenum"))
    with pytest.raises(MimicFormatError, match=r"labevents\.csv: required column 'valuenum'"):
        load_mimic(plain_copy)


def test_missing_table_is_an_error_naming_the_file(plain_copy: Path) -> None:
    (plain_copy / "icu" / "outputevents.csv").unlink()
    with pytest.raises(MimicFormatError, match=r"outputevents\.csv\.gz \(or \.csv\): required"):
        load_mimic(plain_copy)


def test_absent_chartevents_leaves_vitals_and_neuro_unobserved(plain_copy: Path) -> None:
    (plain_copy / "icu" / "chartevents.csv").unlink()
    dataset, stats = load_mimic_with_stats(plain_copy)
    assert stats.absent_tables == ("icu/chartevents",)
    assert stats.unobserved_modalities == ("vitals", "neuro")
    assert len(dataset) > 15 and dataset.observed_fraction_by_modality()["chemistry"] > 0


def test_garbage_rows_are_counted_and_dropped(plain: Path, plain_copy: Path) -> None:
    clean, clean_stats = load_mimic_with_stats(plain)
    stays = pd.read_csv(plain / "icu" / "icustays.csv", parse_dates=["intime"])
    kept = stays[stays["stay_id"].isin([int(s.split("/")[1]) for s in clean.sample_ids])]
    labs = pd.read_csv(plain / "hosp" / "labevents.csv", parse_dates=["charttime"])
    joined = labs.reset_index().merge(kept[["subject_id", "stay_id", "intime"]], on="subject_id")
    offset_h = (joined["charttime"] - joined["intime"]).dt.total_seconds() / 3600.0
    creatinine = joined[(offset_h >= 0) & (offset_h < 48) & (joined["itemid"] == 50912)]
    garbled = creatinine.iloc[:6]
    bad_value, bad_time, too_high = garbled["index"][:3], garbled["index"][3:5], garbled["index"].iloc[5]
    victim = int(kept.loc[~kept["stay_id"].isin(garbled["stay_id"]), "stay_id"].iloc[0])
    victim_values = int((creatinine["stay_id"] == victim).sum())

    def garble_labs(frame: pd.DataFrame) -> None:
        frame.loc[bad_value, "valuenum"] = "abc"
        frame.loc[bad_time, "charttime"] = "yesterday"
        frame.loc[too_high, "valuenum"] = "99"

    def garble_itemids(frame: pd.DataFrame) -> None:
        frame.loc[[0, 1], "itemid"] = ["hr?", "x"]

    def garble_intime(frame: pd.DataFrame) -> None:
        frame.loc[frame["stay_id"] == str(victim), "intime"] = "not a time"

    _rewrite(plain_copy / "hosp" / "labevents.csv", garble_labs)
    _rewrite(plain_copy / "icu" / "chartevents.csv", garble_itemids)
    _rewrite(plain_copy / "icu" / "icustays.csv", garble_intime)

    dataset, stats = load_mimic_with_stats(plain_copy)
    assert stats.malformed_rows["labevents"] == 5
    assert stats.malformed_rows["chartevents"] == 2
    assert stats.malformed_rows["icustays"] == 1 and stats.skipped == 1
    assert dataset.skipped[0].record == f"mimic/{victim}" and "intime" in dataset.skipped[0].reason
    assert f"mimic/{victim}" not in dataset.sample_ids and len(dataset) == len(clean) - 1
    assert stats.out_of_range["creatinine"] == 1
    assert victim_values > 0
    assert stats.values_used["creatinine"] == clean_stats.values_used["creatinine"] - 6 - victim_values
    assert stats.values_used["heart_rate"] + stats.values_used["sbp"] < (
        clean_stats.values_used["heart_rate"] + clean_stats.values_used["sbp"]
    )


def test_bad_arguments_are_rejected(plain: Path) -> None:
    with pytest.raises(ValueError, match="unknown MIMIC-IV task"):
        load_mimic(plain, task="mortality")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_stays"):
        write_synthetic_mimic(plain / "unused", 0, seed=1)
