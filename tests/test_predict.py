"""``condi predict``: real record formats in; imputation, probabilities and a figure out (tiny model)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from condi_models.batches import record_window_starts
from condi_models.checkpoint import load_checkpoint, save_checkpoint
from condi_models.data.dataset import DatasetInfo
from condi_models.data.mimic import load_mimic
from condi_models.data.normalize import ChannelNormalizer
from condi_models.data.ptbxl import PTBXL_LEADS
from condi_models.data.sleep_edf import sleep_edf_info
from condi_models.data.synthetic_ecg import generate_ecg
from condi_models.data.synthetic_icu import write_synthetic_mimic
from condi_models.data.synthetic_psg import generate_psg, write_synthetic_cassette
from condi_models.nn.classifier import ClassifierConfig
from condi_models.nn.config import ModelConfig, Variant
from condi_models.nn.context import ContextConfig
from condi_models.nn.denoiser import DenoiserConfig
from condi_models.nn.model import CondIModel
from condi_models.predict import (
    HideSpec,
    InputError,
    PredictOptions,
    add_predict_parser,
    load_record,
    predict_records,
)
from condi_models.predict.engine import stitch_bounds
from condi_models.predict.inputs import decimate_with_gaps

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = PredictOptions(n_samples=2, steps=3, seed=0)


def tiny_checkpoint(
    path: Path,
    info: DatasetInfo,
    window: int,
    patch: int,
    x: np.ndarray,
    observed: np.ndarray,
    variant: Variant = Variant.CONDI,
    head_std: float = 0.0,
) -> Path:
    """A small untrained model for ``info`` at input length ``window``, normalizer fitted on ``x``.

    ``head_std`` > 0 draws the denoiser's head (zero at initialisation), so the network's output
    reaches the imputation as a trained model's does.
    """
    cfg = ModelConfig.for_dataset(
        replace(info, length=window),
        variant,
        embed_dim=8,
        cond_dim=8,
        denoiser=DenoiserConfig(
            hidden=16,
            n_blocks=1,
            n_heads=2,
            patch_size=patch,
            conv_channels=4,
            conv_kernel=3,
            out_channels=4,
            time_embed_dim=8,
            channel_embed_dim=4,
            step_embed_dim=16,
        ),
        context=ContextConfig(stem_dim=8, n_experts=2, expert_hidden=16, out_dim=8),
        classifier=ClassifierConfig(
            hidden=16,
            n_blocks=1,
            n_heads=2,
            patch_size=patch,
            conv_channels=2,
            conv_kernel=3,
            pos_embed_dim=8,
            head_hidden=16,
            dropout=0.0,
        ),
    )
    torch.manual_seed(0)
    model = CondIModel(cfg)
    if head_std and model.denoiser is not None:
        with torch.no_grad():
            model.denoiser.head.weight.normal_(0.0, head_std)
    save_checkpoint(path, model, ChannelNormalizer.fit(x, observed), info, {"made_by": "test_predict"})
    return path


@pytest.fixture(scope="module")
def ecg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ecg = generate_ecg(6, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "ecg.npz"
    return tiny_checkpoint(path, ecg.info, 250, 10, ecg.x, ecg.observed)


def write_ecg(
    folder: Path, name: str, signal: np.ndarray, fs: float = 100.0, leads: tuple[str, ...] = PTBXL_LEADS
) -> Path:
    """(T, leads) in mV as a 16-bit WFDB record; NaN samples are written as WFDB's missing value."""
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(leads),
        sig_name=list(leads),
        p_signal=signal,
        fmt=["16"] * len(leads),
        adc_gain=[1000.0] * len(leads),
        baseline=[0] * len(leads),
        write_dir=str(folder),
    )
    return folder / name


def synthetic_signal(length: int, n_leads: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length)[:, None] / 100.0
    return np.round(
        0.5 * np.sin(2 * np.pi * 1.2 * t + rng.uniform(0, 6, n_leads))
        + 0.05 * rng.normal(size=(length, n_leads)),
        3,
    )


def load_outputs(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(folder / "imputed.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads((folder / "prediction.json").read_text())


@pytest.mark.shared_data
def test_real_ptbxl_record_with_hidden_blocks(ptbxl_root: Path, ecg_checkpoint: Path, tmp_path: Path) -> None:
    record = ptbxl_root / "records100" / "00000" / "00001_lr"
    opts = replace(FAST, hide=HideSpec("blocks", 0.5))
    (result,) = predict_records(ecg_checkpoint, [str(record) + ".hea"], tmp_path, opts)
    assert result.ok, result.error
    folder = tmp_path / "00001_lr"
    assert (folder / "record.png").read_bytes()[:8] == PNG_SIGNATURE
    arrays, doc = load_outputs(folder)

    signal, fields = wfdb.rdsamp(str(record))
    names = [n.upper() for n in fields["sig_name"]]
    source = signal.T[[names.index(c.upper()) for c in PTBXL_LEADS]][None].astype(np.float32)
    observed, hidden = arrays["observed"], arrays["hidden"]
    assert arrays["x_hat"].shape == (1, 12, 1000) and list(arrays["channel_names"]) == list(PTBXL_LEADS)
    assert float(arrays["sampling_rate_hz"]) == 100.0
    assert np.array_equal(arrays["x_hat"][observed], source[observed])
    # About half of every lead is hidden, its truth kept, and something other than the truth filled in.
    assert 0.4 < hidden.mean() < 0.6 and not (observed & hidden).any()
    assert np.array_equal(arrays["truth"][hidden], source[hidden])
    assert np.all(np.isfinite(arrays["x_hat"])) and not np.array_equal(
        arrays["x_hat"][hidden], source[hidden]
    )
    assert np.all(arrays["lower"] <= arrays["x_hat"] + 1e-5) and np.all(
        arrays["x_hat"] <= arrays["upper"] + 1e-5
    )

    assert [w["start"] for w in doc["windows"]] == [0, 250, 500, 750]
    probs = doc["prediction"]["probabilities"]
    assert list(probs) == list(doc["classes"]) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert doc["prediction"]["predicted"] == max(probs, key=probs.get)
    assert doc["variant"] == "condi" and doc["options"]["hide"] == "blocks 50% of every channel"
    assert doc["imputation_error_on_hidden"]["hidden_entries"] == int(hidden.sum())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["records"][0]["status"] == "ok" and summary["records"][0]["predicted"] in doc["classes"]


@pytest.mark.shared_data
def test_same_seed_same_output_and_500_hz_decimated(
    ptbxl_root: Path, ecg_checkpoint: Path, tmp_path: Path
) -> None:
    hr = ptbxl_root / "records500" / "00000" / "00001_hr"
    opts = replace(FAST, hide=HideSpec("points", 0.3))
    first = predict_records(ecg_checkpoint, [str(hr)], tmp_path / "a", opts)
    again = predict_records(ecg_checkpoint, [str(hr)], tmp_path / "b", opts)
    assert first[0].ok and again[0].ok
    a, doc = load_outputs(tmp_path / "a" / "00001_hr")
    b, _ = load_outputs(tmp_path / "b" / "00001_hr")
    assert a["x_hat"].shape == (1, 12, 1000) and any("decimated from 500 Hz" in n for n in doc["notes"])
    assert all(np.array_equal(a[k], b[k]) for k in ("x_hat", "lower", "upper", "observed"))
    assert first[0].segments == again[0].segments


def test_nan_samples_are_imputed_and_long_records_stitched(ecg_checkpoint: Path, tmp_path: Path) -> None:
    signal = synthetic_signal(1100)
    signal[300:420, 3] = np.nan
    signal[50:60, :] = np.nan
    path = write_ecg(tmp_path, "gappy", signal)
    (result,) = predict_records(ecg_checkpoint, [str(path)], tmp_path / "out", FAST)
    assert result.ok, result.error
    arrays, doc = load_outputs(tmp_path / "out" / "gappy")
    read, _ = wfdb.rdsamp(str(path))
    source = read.T.astype(np.float32)
    observed = arrays["observed"][0]
    assert np.array_equal(observed, ~np.isnan(source))
    x_hat = arrays["x_hat"][0]
    assert np.all(np.isfinite(x_hat[~observed])) and np.array_equal(x_hat[observed], source[observed])
    # 1100 steps with windows of 250: four back to back and a fifth aligned to the end.
    assert [w["start"] for w in doc["windows"]] == [0, 250, 500, 750, 850]
    assert result.segments[0].n_windows == 5 and "hidden" not in arrays


def test_window_plan_covers_every_step_once() -> None:
    assert record_window_starts(1000, 250).tolist() == [0, 250, 500, 750]
    starts = record_window_starts(1100, 250)
    bounds = stitch_bounds(starts, 250, 1100)
    assert bounds == [(0, 250), (250, 500), (500, 750), (750, 925), (925, 1100)]
    for (lo, hi), start in zip(bounds, starts):
        assert start <= lo < hi <= start + 250
    with pytest.raises(ValueError, match="longer than the records"):
        record_window_starts(200, 250)


def test_decimation_marks_steps_near_gaps_missing() -> None:
    t = np.arange(1000) / 500.0
    signal = np.stack([np.sin(2 * np.pi * 2 * t), np.cos(2 * np.pi * 3 * t)])
    signal[0, 400:410] = np.nan
    out = decimate_with_gaps(signal, 5, 500.0)
    assert out.shape == (2, 200)
    assert np.isnan(out[0, 80:82]).all() and not np.isnan(out[1]).any() and not np.isnan(out[0, :78]).any()
    assert np.allclose(out[1, 20:180], signal[1, 100:900:5], atol=0.02)


def test_corrupt_record_is_reported_and_the_rest_done(
    ecg_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_ecg(tmp_path, "good", synthetic_signal(1000, seed=1))
    other = write_ecg(tmp_path, "other", synthetic_signal(1000, seed=2))
    broken = write_ecg(tmp_path, "broken", synthetic_signal(1000, seed=3))
    data = broken.with_suffix(".dat")
    data.write_bytes(data.read_bytes()[:5000])
    garbled = tmp_path / "garbled.hea"
    garbled.write_text("this is not a header\n")
    parser = argparse.ArgumentParser(prog="condi")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "predict",
            "--checkpoint",
            str(ecg_checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--samples",
            "2",
            "--steps",
            "3",
            "--input",
            str(good),
            str(broken),
            str(garbled),
            str(other),
        ]
    )
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and str(garbled) in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {r["input"]: r["status"] for r in summary["records"]}
    assert status == {str(good): "ok", str(broken): "error", str(garbled): "error", str(other): "ok"}
    assert (tmp_path / "out" / "other" / "record.png").is_file() and not (
        tmp_path / "out" / "broken"
    ).exists()


def test_wrong_leads_and_rate_are_refused_clearly(ecg_checkpoint: Path, tmp_path: Path) -> None:
    eight = write_ecg(tmp_path, "eight", synthetic_signal(1000, n_leads=8), leads=PTBXL_LEADS[:8])
    odd_rate = write_ecg(tmp_path, "odd_rate", synthetic_signal(1000), fs=250.0)
    results = predict_records(ecg_checkpoint, [str(eight), str(odd_rate)], tmp_path / "out", FAST)
    assert not any(r.ok for r in results)
    assert (
        str(eight) in results[0].error and "8 leads" in results[0].error and "expected 12" in results[0].error
    )
    assert "250 Hz" in results[1].error and "100 Hz" in results[1].error


def test_hide_drop_removes_only_the_listed_channels(ecg_checkpoint: Path, tmp_path: Path) -> None:
    path = write_ecg(tmp_path, "full", synthetic_signal(1000, seed=4))
    opts = replace(FAST, hide=HideSpec.parse("drop", ["V1", "v2"]))
    (result,) = predict_records(ecg_checkpoint, [str(path)], tmp_path / "out", opts)
    assert result.ok, result.error
    arrays, _ = load_outputs(tmp_path / "out" / "full")
    dropped = [PTBXL_LEADS.index("V1"), PTBXL_LEADS.index("V2")]
    assert arrays["hidden"][0, dropped].all() and arrays["hidden"].sum() == 2 * 1000
    with pytest.raises(ValueError, match="expected points:<fraction>"):
        HideSpec.parse("blocks:half")
    with pytest.raises(ValueError, match="needs a list of channels"):
        HideSpec.parse("drop")
    with pytest.raises(ValueError, match="not channels of the checkpoint"):
        predict_records(
            ecg_checkpoint, [str(path)], tmp_path / "x", replace(FAST, hide=HideSpec("points", 0.2, ("V9",)))
        )


def test_hide_scores_crps_and_band_coverage_with_the_checkpoints_band(
    ecg_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_ecg(tmp_path, "full", synthetic_signal(1000, seed=5))
    # A checkpoint written before the band calibration and the network gate has neither: its band
    # is the draws' own and the network's correction applies whole.
    old = tmp_path / "old.npz"
    with np.load(ecg_checkpoint, allow_pickle=False) as npz:
        added = ("param/band.factors", "param/band.draws", "param/network_gate")
        np.savez(old, **{k: npz[k] for k in npz.files if k not in added})
    checkpoint = load_checkpoint(old)
    assert checkpoint.model.band.values() == (1.0, 1.0) and float(checkpoint.model.network_gate) == 1.0
    opts = replace(FAST, hide=HideSpec.parse("blocks:0.5"))
    (plain,) = predict_records(checkpoint, [str(path)], tmp_path / "plain", opts)
    checkpoint.model.band.set_factors([2.0, 3.0], draws=0)  # for any number of draws
    (wide,) = predict_records(checkpoint, [str(path)], tmp_path / "wide", opts)
    assert plain.ok and wide.ok, (plain.error, wide.error)
    a, doc_a = load_outputs(tmp_path / "plain" / "full")
    b, doc_b = load_outputs(tmp_path / "wide" / "full")
    err_a, err_b = doc_a["imputation_error_on_hidden"], doc_b["imputation_error_on_hidden"]
    assert doc_a["band"]["factors"] == [1.0, 1.0]
    assert doc_b["band"] == {"level": 0.9, "quantiles": [0.05, 0.95], "factors": [2.0, 3.0]}
    # The same draws, scored on independent ones: the point scores agree, the bands are wider.
    assert err_b["mae"] == err_a["mae"] and err_b["crps"] == pytest.approx(err_a["crps"])
    assert err_b["band_width_50"] == pytest.approx(2 * err_a["band_width_50"], rel=1e-4)
    assert err_b["band_width_90"] == pytest.approx(3 * err_a["band_width_90"], rel=1e-4)
    assert 0 <= err_a["coverage_50"] <= err_b["coverage_50"] <= 1
    assert err_a["coverage_90"] <= err_b["coverage_90"] <= 1
    assert err_b["scored_draws"].startswith("2 independent")
    hidden = b["hidden"]
    np.testing.assert_allclose(
        (b["upper"] - b["x_hat"])[hidden], 3 * (a["upper"] - a["x_hat"])[hidden], rtol=1e-3, atol=1e-4
    )
    summary = json.loads((tmp_path / "wide" / "summary.json").read_text())
    assert summary["records"][0]["imputation_error_on_hidden"]["coverage_90"] == err_b["coverage_90"]
    # The command line prints the scores beside the prediction.
    parser = argparse.ArgumentParser(prog="condi")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["predict", "--checkpoint", str(old), "--out", str(tmp_path / "cli"), "--samples", "2", "--steps", "3",
         "--hide", "points:0.3", "--no-figures", "--input", str(path)]
    )
    assert args.func(args) == 0
    assert "band coverage 50 %" in capsys.readouterr().out


def test_variant_without_imputation_classifies_observed_data(tmp_path: Path) -> None:
    ecg = generate_ecg(4, seed=1)
    ckpt = tiny_checkpoint(
        tmp_path / "zero.npz", ecg.info, 250, 10, ecg.x, ecg.observed, Variant.FEDAVG_ZERO_FILL
    )
    signal = synthetic_signal(1000, seed=5)
    signal[100:200, 0] = np.nan
    path = write_ecg(tmp_path, "rec", signal)
    (result,) = predict_records(ckpt, [str(path)], tmp_path / "out", FAST)
    assert result.ok and not result.imputed
    arrays, doc = load_outputs(tmp_path / "out" / "rec")
    assert "x_hat" not in arrays and not doc["imputed"] and doc["variant"] == "fedavg_zero_fill"
    assert sum(doc["prediction"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "out" / "rec" / "record.png").read_bytes()[:8] == PNG_SIGNATURE


def test_sleep_edf_psg_gets_a_stage_per_epoch(tmp_path: Path) -> None:
    psg_data = generate_psg(1, seed=0, epochs_per_night=3)
    ckpt = tiny_checkpoint(tmp_path / "psg.npz", psg_data.info, 1000, 40, psg_data.x, psg_data.observed)
    ((psg, _hypnogram),) = write_synthetic_cassette(tmp_path / "night", 1, seed=0, epochs_per_night=3)
    alone = tmp_path / "alone" / psg.name
    alone.parent.mkdir()
    shutil.copy(psg, alone)
    opts = replace(FAST, hide=HideSpec("blocks", 0.4, ("EEG Fpz-Cz",)))
    paired, unpaired = predict_records(ckpt, [str(psg), str(alone)], tmp_path / "out", opts)
    assert paired.ok and unpaired.ok, (paired.error, unpaired.error)
    assert [s.index for s in paired.segments] == [0, 1, 2] and all(s.n_windows == 3 for s in paired.segments)
    assert all(s.reference == c for s, c in zip(paired.segments, np.array(psg_data.info.classes)[psg_data.y]))
    assert unpaired.name == "SC4001E0-PSG-2" and all(s.reference is None for s in unpaired.segments)

    arrays, doc = load_outputs(tmp_path / "out" / "SC4001E0-PSG")
    assert arrays["x_hat"].shape == (3, 5, 3000) and arrays["segment_start_s"].tolist() == [0.0, 30.0, 60.0]
    assert arrays["hidden"][:, 0].any() and not arrays["hidden"][:, 1:].any()
    assert len(doc["epochs"]) == 3 and sum(doc["stage_counts"].values()) == 3
    for epoch in doc["epochs"]:
        assert sum(epoch["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert epoch["predicted"] == max(epoch["probabilities"], key=epoch["probabilities"].get)
    # The generator's own signals, resampled the same way, up to the EDF's 16-bit quantization.
    assert np.allclose(arrays["x_hat"][arrays["observed"]], psg_data.x[arrays["observed"]], atol=0.05)
    assert (tmp_path / "out" / "SC4001E0-PSG" / "record.png").read_bytes()[:8] == PNG_SIGNATURE
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [(row["record"], row["epoch"]) for row in rows] == [
        (name, str(k)) for name in ("SC4001E0-PSG", "SC4001E0-PSG-2") for k in range(3)
    ]
    assert [row["predicted"] for row in rows[:3]] == [e["predicted"] for e in doc["epochs"]]


def test_mimic_stay_and_unknown_stay(tmp_path: Path) -> None:
    root = write_synthetic_mimic(tmp_path / "mimic", 4, seed=0, hours=60)
    stays = load_mimic(root)
    ckpt = tiny_checkpoint(tmp_path / "icu.npz", stays.info, 48, 2, stays.x, stays.observed)
    stay_id = stays.sample_ids[0].split("/")[1]
    good, unknown, malformed = predict_records(
        ckpt, [f"mimic:{root}#{stay_id}", f"mimic:{root}#1", f"mimic:{root}"], tmp_path / "out", FAST
    )
    assert good.ok, good.error
    arrays, doc = load_outputs(tmp_path / "out" / f"mimic-{stay_id}")
    assert arrays["x_hat"].shape == (1, stays.info.n_features, 48)
    assert np.array_equal(arrays["observed"][0], stays.observed[0])
    assert np.array_equal(arrays["x_hat"][0][stays.observed[0]], stays.x[0][stays.observed[0]])
    assert list(doc["classes"]) == ["survived", "died"] and len(doc["windows"]) == 1
    assert "stay 1 is not among" in unknown.error and "mimic:<root>#<stay_id>" in malformed.error


def test_input_of_another_layout_is_refused(ecg_checkpoint: Path, tmp_path: Path) -> None:
    ((psg, _),) = write_synthetic_cassette(tmp_path / "night", 1, seed=0, epochs_per_night=1)
    (result,) = predict_records(ecg_checkpoint, [str(psg)], tmp_path / "out", FAST)
    assert not result.ok and "EEG Fpz-Cz" in result.error and "expects" in result.error
    with pytest.raises(InputError, match="a WFDB record is read as a 12-lead ECG"):
        load_record(str(tmp_path / "any"), sleep_edf_info(100.0))


def test_unreadable_checkpoint_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="condi")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    missing = tmp_path / "nowhere.npz"
    args = parser.parse_args(
        ["predict", "--checkpoint", str(missing), "--input", "x", "--out", str(tmp_path)]
    )
    assert args.func(args) == 2
    assert str(missing) in capsys.readouterr().err and not (tmp_path / "summary.json").exists()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_folder_and_list_inputs_batch_records_without_changing_them(tmp_path: Path) -> None:
    ecg = generate_ecg(6, seed=0)
    ckpt = tiny_checkpoint(tmp_path / "live.npz", ecg.info, 250, 10, ecg.x, ecg.observed, head_std=0.3)
    folder = tmp_path / "archive"
    paths = {"a": folder / "a", "c": folder / "c", "b": folder / "sub" / "b"}  # path order: a, c, sub/b
    paths["b"].parent.mkdir(parents=True)
    for i, (name, path) in enumerate(paths.items()):
        signal = synthetic_signal(1100 if name == "c" else 1000, seed=10 + i)
        signal[200 + 50 * i : 300 + 50 * i, i] = np.nan
        write_ecg(path.parent, name, signal)
    listed = tmp_path / "records.txt"
    listed.write_text(f"# two of them\n{paths['b']}\n\n{paths['c']}.hea\n")
    opts = replace(FAST, n_samples=3, hide=HideSpec("points", 0.2))

    # Calls of 8 windows: a (4 windows) and b (4) share one, c (5) runs beside it on a second model
    # worker; records read in a worker process. Then each alone, read in this process.
    together = predict_records(ckpt, [str(folder)], tmp_path / "together", replace(opts, workers=2, batch_size=8))
    alone = {
        n: predict_records(ckpt, [str(p)], tmp_path / n, replace(opts, read_workers=0))[0] for n, p in paths.items()
    }
    assert [r.name for r in together] == list(paths) and all(r.ok for r in together)
    for r in together:
        a, _ = load_outputs(tmp_path / "together" / r.name)
        b, _ = load_outputs(tmp_path / r.name / r.name)
        np.testing.assert_allclose(a["x_hat"], b["x_hat"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a["upper"], b["upper"], atol=1e-5, rtol=0)
        assert np.abs(a["x_hat"] - a["upper"])[~a["observed"]].max() > 0  # the draws spread
        np.testing.assert_allclose(r.segments[0].probabilities, alone[r.name].segments[0].probabilities, atol=1e-6)
    rows = read_csv(tmp_path / "together" / "predictions.csv")
    assert [row["record"] for row in rows] == list(paths) and {row["status"] for row in rows} == {"ok"}
    for row, r in zip(rows, together):
        assert row["predicted"] == r.segments[0].predicted
        probs = [float(row[c]) for c in ecg.info.classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(probs, r.segments[0].probabilities, atol=1e-6)

    parser = argparse.ArgumentParser(prog="condi")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["predict", "--checkpoint", str(ckpt), "--input", str(listed), str(tmp_path / "nowhere"),
         "--out", str(tmp_path / "listed"), "--samples", "3", "--steps", "3", "--hide", "points:0.2",
         "--no-figures", "--read-workers", "0", "--batch-size", "8"]
    )
    assert args.func(args) == 1
    rows = read_csv(tmp_path / "listed" / "predictions.csv")
    assert [(row["record"], row["status"]) for row in rows] == [("b", "ok"), ("c", "ok"), ("nowhere", "error")]
    assert not list((tmp_path / "listed").rglob("record.png"))
    for row in rows[:2]:
        want = alone[row["record"]].segments[0].probabilities
        np.testing.assert_allclose([float(row[c]) for c in ecg.info.classes], want, atol=1e-6)
    with pytest.raises(ValueError, match="a folder without WFDB records"):
        predict_records(ckpt, [str(tmp_path / "listed" / "b")], tmp_path / "x", opts)
