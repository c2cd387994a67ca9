"""benchmarks/pypots_baselines.py: SAITS and BRITS from PyPOTS train on observed entries and impute
only hidden ones, reproducibly. PyPOTS is the optional ``bench`` extra; without it these skip."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.helpers import REPO, toy_dataset

sys.path.insert(0, str(REPO / "benchmarks"))
import imputation as bench
import pypots_baselines as pb

SKIP_REASON = "PyPOTS is the optional bench extra (pip install -e '.[bench]')"


def test_record_windows_cut_every_record_and_drop_empty_windows() -> None:
    x = np.arange(2 * 3 * 10, dtype=np.float32).reshape(2, 3, 10)
    observed = np.ones_like(x, dtype=bool)
    observed[1, :, :4] = False  # record 1's first window sees nothing
    xs, obs = pb.record_windows(x, observed, 4)
    # Starts 0, 4 and 6 (the last one ends at the record's end): 3 per record, one dropped.
    assert xs.shape == (5, 3, 4) and obs.shape == xs.shape
    np.testing.assert_array_equal(xs[0], x[0, :, 0:4])
    np.testing.assert_array_equal(xs[2], x[0, :, 6:10])
    np.testing.assert_array_equal(xs[3], x[1, :, 4:8])


def test_to_pypots_is_time_major_with_nan_where_unobserved() -> None:
    x = np.ones((1, 2, 3), dtype=np.float32)
    observed = np.array([[[True, False, True], [True, True, False]]])
    out = pb.to_pypots(x, observed)
    assert out.shape == (1, 3, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out[0]), ~observed[0].T)


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Smooth cross-correlated channels; (train x, train observed, test x, test observed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(40, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(14, 1, 1))
    x = np.sin(0.3 * t + phase) * np.array([1.0, -0.5, 0.8], dtype=np.float32)[None, :, None]
    x = (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    observed = rng.random(x.shape) > 0.3
    x = np.where(observed, x, np.float32(0.0))
    return x[:10], observed[:10], x[10:, :, :20], observed[10:, :, :20]


@pytest.mark.parametrize("method", pb.METHODS)
def test_fit_and_impute_keep_observed_entries_and_repeat_with_the_seed(method: str) -> None:
    pytest.importorskip("pypots", reason=SKIP_REASON)
    x, observed, tx, tobs = _data(0)
    small = pb.Settings(epochs=2, batch_size=8, d_model=16, n_heads=2, d_ffn=16, rnn_hidden_size=8)
    torch_state = torch.get_rng_state()
    np_draw = np.random.get_state()[1][:4].copy()
    fitted = pb.fit(method, x, observed, window=20, seed=3, settings=small)
    # The fit is seeded and leaves the caller's global random states as they were.
    np.testing.assert_array_equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1][:4], np_draw)
    assert fitted.windows == 20 and fitted.seconds > 0 and 1 <= fitted.best_epoch <= 2
    est = fitted.impute(tx, tobs)
    assert est.shape == tx.shape and est.dtype == np.float32 and np.isfinite(est).all()
    np.testing.assert_array_equal(est[tobs], tx[tobs])
    assert np.abs(est[~tobs]).sum() > 0  # the unobserved entries were filled, not left at 0.0
    again = pb.fit(method, x, observed, window=20, seed=3, settings=small).impute(tx, tobs)
    np.testing.assert_array_equal(again, est)
    other = pb.fit(method, x, observed, window=20, seed=4, settings=small).impute(tx, tobs)
    assert not np.array_equal(other, est)


def test_hidden_values_do_not_reach_the_model() -> None:
    pytest.importorskip("pypots", reason=SKIP_REASON)
    x, observed, tx, tobs = _data(1)
    small = pb.Settings(epochs=1, batch_size=8, d_model=16, n_heads=2, d_ffn=16)
    fitted = pb.fit("saits", x, observed, window=20, seed=0, settings=small)
    # Whatever sits at the unobserved entries (the truth, or noise) gives the same imputation.
    noisy = np.where(tobs, tx, np.float32(9.0))
    np.testing.assert_array_equal(fitted.impute(noisy, tobs)[~tobs], fitted.impute(tx, tobs)[~tobs])


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pb, "available", lambda: False)
    with pytest.raises(ImportError, match=r"\.\[bench\]"):
        pb.require()
    with pytest.raises(ImportError, match="bench"):
        pb.build("saits", 3, 20, pb.Settings())


def test_unknown_method_is_an_error() -> None:
    pytest.importorskip("pypots", reason=SKIP_REASON)
    with pytest.raises(ValueError, match="unknown PyPOTS method"):
        pb.build("mrnn", 3, 20, pb.Settings())
    x, observed, _, _ = _data(0)
    with pytest.raises(ValueError, match="unknown PyPOTS method"):
        pb.fit("mrnn", x, observed, window=20, seed=0)


def test_threads_are_left_as_the_caller_set_them() -> None:
    pytest.importorskip("pypots", reason=SKIP_REASON)
    threads = torch.get_num_threads()
    x, observed, _, _ = _data(2)
    pb.fit("brits", x, observed, window=20, seed=0, settings=pb.Settings(epochs=1, batch_size=8, rnn_hidden_size=4))
    assert torch.get_num_threads() == threads


def test_benchmark_flag_needs_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pb, "available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_args(["--pypots"])
    assert not bench.parse_args([]).pypots


def test_benchmark_scores_pypots_rows_on_the_same_windows() -> None:
    pytest.importorskip("pypots", reason=SKIP_REASON)
    args = bench.parse_args(["--quick", "--pypots", "--window", "24", "--samples", "2", "--steps", "2",
                             "--eval-batch", "4", "--test-windows", "4"])
    ds = toy_dataset(16, length=48)
    section, _ = bench.imputation_table("toy", ds.subset(np.arange(12)), ds.subset(np.arange(12, 16)), [0.8], args,
                                        torch.device("cpu"))
    for pattern in bench.PATTERNS:
        rows = bench._rows(section, pattern, 0.8)
        for method in pb.METHODS:
            row = rows[pb.LABELS[method]]
            # A point method: CRPS is its MAE; scored on the ridge's windows and hidden entries.
            assert row["crps"] == row["mae"] and np.isfinite(row["rmse"])
            assert (row["windows"], row["n_entries"]) == (rows["ridge"]["windows"], rows["ridge"]["n_entries"])
            assert section["training"][f"{method}/{pattern}"]["epochs_a"] == 1
    assert "SAITS (PyPOTS)" in bench.report({"ptbxl": section})
