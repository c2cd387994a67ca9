"""PTB-XL loader: the real sample, the labelling rule, and damaged copies of real records."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from condi_models.data.ptbxl import (
    DATABASE_CSV,
    PTBXL_LEADS,
    STATEMENTS_CSV,
    SUPERCLASSES,
    load_ptbxl,
    superclass_label,
)

shared_data = pytest.mark.shared_data

N_ROWS = 353


@pytest.fixture(scope="module")
def ptbxl(ptbxl_root: Path):
    return load_ptbxl(ptbxl_root)


def _copy_subset(src: Path, dst: Path, ecg_ids: list[int]) -> pd.DataFrame:
    """A PTB-XL folder in ``dst`` with only ``ecg_ids``: their 100 Hz files and their csv rows."""
    db = pd.read_csv(src / DATABASE_CSV)
    db = db[db["ecg_id"].isin(ecg_ids)]
    db.to_csv(dst / DATABASE_CSV, index=False)
    shutil.copyfile(src / STATEMENTS_CSV, dst / STATEMENTS_CSV)
    for rel in db["filename_lr"]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copyfile(src / (rel + ext), dst / (rel + ext))
    return db


@shared_data
def test_real_sample_shapes_labels_and_identities(ptbxl):
    unlabeled = [s for s in ptbxl.skipped if s.reason.startswith("unlabeled")]
    assert len(ptbxl) + len(unlabeled) == N_ROWS
    assert len(ptbxl.skipped) == len(unlabeled), "every 100 Hz record of the sample is readable"
    assert ptbxl.x.shape == (len(ptbxl), 12, 1000)
    assert ptbxl.info.sampling_rate_hz == 100.0
    assert ptbxl.info.name == "ptbxl" and ptbxl.info.task == "superclass"
    assert ptbxl.info.classes == SUPERCLASSES == ("NORM", "MI", "STTC", "CD", "HYP")
    assert ptbxl.info.channel_names == PTBXL_LEADS
    assert [m.name for m in ptbxl.info.modalities] == list(PTBXL_LEADS)
    counts = ptbxl.class_counts()
    assert sum(counts.values()) == len(ptbxl)
    assert all(counts[c] > 0 for c in SUPERCLASSES)
    assert all(p and p.isdigit() for p in ptbxl.patient_ids)
    assert ptbxl.sample_ids[0] == "ptbxl/1"
    assert set(np.unique(ptbxl.folds)) <= set(range(1, 9))
    # the single label is always one of the record's superclasses
    assert ptbxl.y_multi[np.arange(len(ptbxl)), ptbxl.y].all()
    assert ptbxl.observed.all() and np.isfinite(ptbxl.x).all()


@shared_data
def test_real_signals_are_in_millivolts_and_obey_einthoven(ptbxl):
    lead = {name: i for i, name in enumerate(PTBXL_LEADS)}
    x = ptbxl.x.astype(np.float64)
    assert 0.05 < float(np.median(x.std(axis=2))) < 1.0
    # PTB-XL limb leads are derived from I and II; rounding to 1 uV keeps the relations within a few uV
    np.testing.assert_allclose(x[:, lead["III"]], x[:, lead["II"]] - x[:, lead["I"]], atol=0.003)
    np.testing.assert_allclose(x[:, lead["aVR"]], -(x[:, lead["I"]] + x[:, lead["II"]]) / 2, atol=0.003)


@shared_data
def test_known_records(ptbxl, ptbxl_root: Path):
    db = pd.read_csv(ptbxl_root / DATABASE_CSV).set_index("ecg_id")
    i = ptbxl.sample_ids.index("ptbxl/1")
    assert ptbxl.info.classes[ptbxl.y[i]] == "NORM"
    assert ptbxl.patient_ids[i] == str(int(db.loc[1, "patient_id"]))
    assert ptbxl.folds[i] == db.loc[1, "strat_fold"]
    raw, _ = wfdb.rdsamp(str(ptbxl_root / db.loc[1, "filename_lr"]))
    np.testing.assert_allclose(ptbxl.x[i], raw.T, atol=1e-6)


def test_single_label_rule():
    classes = {"NORM": "NORM", "IMI": "MI", "NDT": "STTC", "CLBBB": "CD", "LVH": "HYP"}
    idx = {c: i for i, c in enumerate(SUPERCLASSES)}
    assert superclass_label({"NORM": 100.0, "SR": 0.0}, classes).label == idx["NORM"]
    assert superclass_label({"NORM": 80.0, "CLBBB": 100.0}, classes).label == idx["CD"]
    tie = superclass_label({"NDT": 50.0, "IMI": 50.0, "LVH": 50.0}, classes)
    assert tie.label == idx["MI"]
    assert superclass_label({"NDT": 100.0, "LVH": 100.0}, classes).label == idx["HYP"]
    assert superclass_label({"NORM": 100.0, "NDT": 100.0}, classes).label == idx["STTC"]
    # likelihood 0 means "unknown" in PTB-XL: it counts for the multi-label view
    multi = superclass_label({"IMI": 100.0, "LVH": 0.0}, classes)
    assert multi.label == idx["MI"]
    assert multi.multi.tolist() == [False, True, False, False, True]
    assert superclass_label({"SR": 0.0}, classes) is None


@shared_data
def test_records500_loads_the_high_resolution_records(ptbxl_root: Path):
    ds = load_ptbxl(ptbxl_root, resolution="records500")
    assert len(ds) == 12
    assert ds.x.shape == (12, 12, 5000)
    assert ds.info.sampling_rate_hz == 500.0 and ds.info.length == 5000
    assert len(ds) + len(ds.skipped) == N_ROWS
    absent = [s for s in ds.skipped if not s.reason.startswith("unlabeled")]
    assert absent and all(s.record.startswith("records500/") and "missing" in s.reason for s in absent)


@shared_data
def test_max_records(ptbxl_root: Path):
    ds = load_ptbxl(ptbxl_root, max_records=5)
    assert ds.sample_ids == ("ptbxl/1", "ptbxl/2", "ptbxl/3", "ptbxl/4", "ptbxl/5")


@shared_data
def test_corrupt_records_are_skipped_with_their_name(ptbxl_root: Path, tmp_path: Path):
    db = _copy_subset(ptbxl_root, tmp_path, [1, 2, 3, 4])
    rel = dict(zip(db["ecg_id"], db["filename_lr"], strict=True))
    dat = tmp_path / (rel[2] + ".dat")
    dat.write_bytes(dat.read_bytes()[:9984])  # whole frames, but 416 of the 1000 samples
    (tmp_path / (rel[3] + ".hea")).write_text("this is not a header\n")
    (tmp_path / (rel[4] + ".dat")).unlink()

    ds = load_ptbxl(tmp_path)
    assert ds.sample_ids == ("ptbxl/1",)
    reasons = {s.record: s.reason for s in ds.skipped}
    assert set(reasons) == {rel[2], rel[3], rel[4]}
    assert all(r.startswith("unreadable record") for r in reasons.values())
    assert "FileNotFoundError" in reasons[rel[4]]


@shared_data
def test_bad_scp_codes_cell_is_skipped_not_evaluated(ptbxl_root: Path, tmp_path: Path):
    db = _copy_subset(ptbxl_root, tmp_path, [1, 2])
    db.loc[db["ecg_id"] == 2, "scp_codes"] = "__import__('os').getcwd()"
    db.to_csv(tmp_path / DATABASE_CSV, index=False)
    ds = load_ptbxl(tmp_path)
    assert ds.sample_ids == ("ptbxl/1",)
    (bad,) = ds.skipped
    assert bad.record.endswith("00002_lr") and "scp_codes" in bad.reason


@shared_data
def test_nan_samples_reordered_and_miscased_leads(ptbxl_root: Path, tmp_path: Path):
    db = _copy_subset(ptbxl_root, tmp_path, [1, 2, 3])
    rel = dict(zip(db["ecg_id"], db["filename_lr"], strict=True))
    original, fields = wfdb.rdsamp(str(tmp_path / rel[2]))
    gapped = original.copy()
    gapped[100:150, 2] = np.nan  # lead III loses half a second
    # written back in reverse order with lower-case augmented lead names
    names = [n.lower() if n.upper().startswith("AV") else n for n in fields["sig_name"]][::-1]
    record_dir = (tmp_path / rel[2]).parent
    wfdb.wrsamp(
        Path(rel[2]).name, fs=100, units=["mV"] * 12, sig_name=names, p_signal=gapped[:, ::-1],
        fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(record_dir),
    )
    # an 11-lead record is not a PTB-XL record
    wfdb.wrsamp(
        Path(rel[3]).name, fs=100, units=["mV"] * 11, sig_name=list(fields["sig_name"][:11]),
        p_signal=original[:, :11], fmt=["16"] * 11, adc_gain=[1000.0] * 11, baseline=[0] * 11,
        write_dir=str((tmp_path / rel[3]).parent),
    )

    ds = load_ptbxl(tmp_path)
    assert ds.sample_ids == ("ptbxl/1", "ptbxl/2")
    x, obs = ds.x[1], ds.observed[1]
    assert not obs[2, 100:150].any() and obs[2, :100].all() and obs[2, 150:].all()
    assert (x[2, 100:150] == 0.0).all()
    assert obs[[0, 1, *range(3, 12)]].all()
    np.testing.assert_allclose(x[obs], original.T[obs], atol=1e-6)
    (bad,) = ds.skipped
    assert bad.record == rel[3] and "11 leads" in bad.reason


@shared_data
def test_missing_column_is_fatal_and_named(ptbxl_root: Path, tmp_path: Path):
    db = _copy_subset(ptbxl_root, tmp_path, [1])
    db.drop(columns=["scp_codes"]).to_csv(tmp_path / DATABASE_CSV, index=False)
    with pytest.raises(ValueError, match=r"ptbxl_database\.csv.*scp_codes"):
        load_ptbxl(tmp_path)


@shared_data
def test_missing_statement_table_is_fatal_and_named(ptbxl_root: Path, tmp_path: Path):
    _copy_subset(ptbxl_root, tmp_path, [1])
    (tmp_path / STATEMENTS_CSV).unlink()
    with pytest.raises(FileNotFoundError, match=r"scp_statements\.csv"):
        load_ptbxl(tmp_path)
    with pytest.raises(ValueError, match="resolution"):
        load_ptbxl(tmp_path, resolution="records250")  # type: ignore[arg-type]
