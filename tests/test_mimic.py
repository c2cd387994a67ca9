"""The MIMIC-IV loader on the real demo: cohort, labels, channels, and values landing in the right hour."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from condi_models.data.mimic import load_mimic, load_mimic_with_stats
from condi_models.data.mimic_items import MODALITY_ORDER, VARIABLES

pytestmark = pytest.mark.shared_data

DEMO_STAYS = 140
DEMO_IHM48_STAYS = 74  # stays of at least 2 days in the demo, found by the loader and by pandas below


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def demo(mimic_root: Path):
    return load_mimic_with_stats(mimic_root, task="ihm48", hours=48)


@pytest.fixture(scope="module")
def icustays(mimic_root: Path) -> pd.DataFrame:
    return pd.read_csv(mimic_root / "icu" / "icustays.csv.gz")


def _channel(name: str) -> int:
    return [v.name for v in VARIABLES].index(name)


def test_items_exist_in_the_demo_dictionaries(mimic_root: Path) -> None:
    d_items = pd.read_csv(mimic_root / "icu" / "d_items.csv.gz").set_index("itemid")
    d_labitems = pd.read_csv(mimic_root / "hosp" / "d_labitems.csv.gz").set_index("itemid")
    for var in VARIABLES:
        assert var.low < var.high, var.name
        assert var.modality in MODALITY_ORDER, var.name
        if var.source == "labevents":
            missing = [i for i in var.itemids if i not in d_labitems.index]
            assert not missing, f"{var.name}: {missing} not in d_labitems"
            assert all(d_labitems.loc[i, "fluid"] == "Blood" for i in var.itemids), var.name
        else:
            missing = [i for i in var.itemids if i not in d_items.index]
            assert not missing, f"{var.name}: {missing} not in d_items"
            assert set(d_items.loc[list(var.itemids), "linksto"]) <= {var.source}, var.name
    assert d_items.loc[223761, "unitname"] == "°F" and d_items.loc[223762, "unitname"] == "°C"
    for modality in MODALITY_ORDER:
        assert any(v.modality == modality for v in VARIABLES), modality


def test_ihm48_cohort_matches_a_direct_computation(demo, icustays: pd.DataFrame, mimic_root: Path) -> None:
    dataset, stats = demo
    admissions = pd.read_csv(mimic_root / "hosp" / "admissions.csv.gz")
    cohort = (
        icustays[icustays["los"] >= 2.0]
        .merge(admissions[["hadm_id", "hospital_expire_flag"]], on="hadm_id", how="inner")
        .sort_values("stay_id")
    )
    assert len(icustays) == DEMO_STAYS == stats.stays_in_table
    assert len(cohort) == DEMO_IHM48_STAYS == len(dataset) == stats.stays_kept
    assert dataset.sample_ids == tuple(f"mimic/{s}" for s in cohort["stay_id"])
    assert dataset.patient_ids == tuple(str(s) for s in cohort["subject_id"])
    np.testing.assert_array_equal(dataset.y, cohort["hospital_expire_flag"].to_numpy())
    counts = dataset.class_counts()
    print("demo ihm48 classes:", counts)
    assert counts == {
        "survived": int((cohort["hospital_expire_flag"] == 0).sum()),
        "died": int((cohort["hospital_expire_flag"] == 1).sum()),
    }
    assert counts["died"] > 0 and counts["survived"] > counts["died"]
    assert stats.excluded["ICU stay shorter than 48 h"] == DEMO_STAYS - DEMO_IHM48_STAYS
    assert stats.skipped == 0 and dataset.skipped == ()
    assert all(v == 0 for v in stats.malformed_rows.values())


def test_shape_info_and_observed_fraction_by_modality(demo) -> None:
    dataset, stats = demo
    info = dataset.info
    assert dataset.x.shape == (DEMO_IHM48_STAYS, len(VARIABLES), 48)
    assert (info.name, info.task, info.length, info.classes) == ("mimic_iv", "ihm48", 48, ("survived", "died"))
    assert info.sampling_rate_hz == pytest.approx(1 / 3600)
    assert tuple(m.name for m in info.modalities) == MODALITY_ORDER
    fractions = dataset.observed_fraction_by_modality()
    print("demo observed fraction:", {k: round(v, 3) for k, v in fractions.items()})
    assert fractions["vitals"] == 0.0 and fractions["neuro"] == 0.0
    for labs in ("chemistry", "hematology", "blood_gas"):
        assert 0.0 < fractions[labs] < 0.5
    assert fractions["fluids"] > 0.0
    assert stats.absent_tables == ("icu/chartevents",)
    assert stats.unobserved_modalities == ("vitals", "neuro")
    assert not dataset.x[~dataset.observed].any()
    assert np.isfinite(dataset.x).all()


@pytest.mark.parametrize("itemid", [50912, 50813, 51222])
def test_a_known_lab_value_lands_in_its_hour(demo, icustays: pd.DataFrame, mimic_root: Path, itemid: int) -> None:
    dataset, _ = demo
    var = next(v for v in VARIABLES if itemid in v.itemids)
    columns = ["subject_id", "itemid", "charttime", "valuenum"]
    labs = pd.read_csv(mimic_root / "hosp" / "labevents.csv.gz", usecols=columns)
    labs = labs[labs["itemid"].isin(var.itemids) & labs["valuenum"].notna()]
    kept = icustays.set_index("stay_id").loc[[int(s.split("/")[1]) for s in dataset.sample_ids]]
    # The first result in file order that falls in the first 48 h of a kept stay.
    found = None
    for row in labs.itertuples():
        for stay_id, stay in kept[kept["subject_id"] == row.subject_id].iterrows():
            offset_h = (_time(row.charttime) - _time(stay["intime"])).total_seconds() / 3600.0
            if 0.0 <= offset_h < 48.0:
                found = (row, stay_id, _time(stay["intime"]), int(offset_h // 1))
                break
        if found:
            break
    assert found, f"no result of itemid {itemid} inside a kept stay's window"
    row, stay_id, intime, hour = found
    same_hour = [
        r.valuenum
        for r in labs[labs["subject_id"] == row.subject_id].itertuples()
        if hour <= (_time(r.charttime) - intime).total_seconds() / 3600.0 < hour + 1
    ]
    i = dataset.sample_ids.index(f"mimic/{stay_id}")
    c = _channel(var.name)
    assert dataset.observed[i, c, hour]
    assert dataset.x[i, c, hour] == pytest.approx(np.mean(same_hour), rel=1e-5)
    assert row.valuenum in same_hour


def test_infused_volume_is_shared_over_the_hours_it_spans(demo, icustays: pd.DataFrame, mimic_root: Path) -> None:
    dataset, _ = demo
    inputs = pd.read_csv(mimic_root / "icu" / "inputevents.csv.gz")
    kept_ids = [int(s.split("/")[1]) for s in dataset.sample_ids]
    ml = inputs[(inputs["amountuom"].str.lower() == "ml") & inputs["stay_id"].isin(kept_ids)]
    stay_id = int(ml["stay_id"].value_counts().index[0])
    intime = _time(icustays.set_index("stay_id").loc[stay_id, "intime"])
    expected = np.zeros(48)
    touched = np.zeros(48, dtype=bool)
    for r in ml[ml["stay_id"] == stay_id].itertuples():
        start = (_time(r.starttime) - intime).total_seconds() / 3600.0
        end = (_time(r.endtime) - intime).total_seconds() / 3600.0
        for h in range(48):
            if end == start and h <= start < h + 1:
                expected[h] += r.amount
                touched[h] = True
            overlap = min(end, h + 1) - max(start, h)
            if end > start and overlap > 0:
                expected[h] += r.amount * overlap / (end - start)
                touched[h] = True
    i = dataset.sample_ids.index(f"mimic/{stay_id}")
    c = _channel("input_total")
    assert touched.sum() > 10
    np.testing.assert_array_equal(dataset.observed[i, c], touched)
    np.testing.assert_allclose(dataset.x[i, c], expected, rtol=1e-4, atol=1e-3)


def test_vasopressor_channel_is_on_exactly_in_infusion_hours(demo, icustays: pd.DataFrame, mimic_root: Path) -> None:
    dataset, _ = demo
    var = VARIABLES[_channel("vasopressor")]
    inputs = pd.read_csv(mimic_root / "icu" / "inputevents.csv.gz")
    kept_ids = [int(s.split("/")[1]) for s in dataset.sample_ids]
    pressors = inputs[inputs["itemid"].isin(var.itemids) & inputs["stay_id"].isin(kept_ids)]
    stay_id = int(pressors["stay_id"].value_counts().index[0])
    intime = _time(icustays.set_index("stay_id").loc[stay_id, "intime"])
    on = np.zeros(48)
    for r in pressors[pressors["stay_id"] == stay_id].itertuples():
        start = (_time(r.starttime) - intime).total_seconds() / 3600.0
        end = (_time(r.endtime) - intime).total_seconds() / 3600.0
        for h in range(48):
            if min(end, h + 1) - max(start, h) > 0 or (end == start and h <= start < h + 1):
                on[h] = 1.0
    i = dataset.sample_ids.index(f"mimic/{stay_id}")
    c = _channel("vasopressor")
    assert 0 < on.sum() < 48
    assert dataset.observed[:, c].all()
    np.testing.assert_array_equal(dataset.x[i, c], on)


def test_los3_labels_and_a_shorter_window(mimic_root: Path, icustays: pd.DataFrame) -> None:
    los3 = load_mimic(mimic_root, task="los3", hours=24)
    cohort = icustays[icustays["los"] >= 1.0].sort_values("stay_id")
    assert los3.x.shape == (len(cohort), len(VARIABLES), 24)
    assert los3.info.classes == ("los<=3d", "los>3d")
    np.testing.assert_array_equal(los3.y, (cohort["los"] > 3.0).astype(np.int64).to_numpy())
    print("demo los3 (24 h) classes:", los3.class_counts())
    assert min(los3.class_counts().values()) > 0


def test_the_window_must_not_reveal_the_los3_label(mimic_root: Path) -> None:
    with pytest.raises(ValueError, match="los3"):
        load_mimic(mimic_root, task="los3", hours=72)
