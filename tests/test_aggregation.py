"""Federated averaging: sample weights, per-modality row groups, untrained groups kept."""

from __future__ import annotations

import numpy as np
import pytest

from condi_models.aggregation import ParameterGroups, SiloUpdate, fedavg

GROUPS = ParameterGroups({"theta": "all", "w_mod": ("modality/0", "modality/1", "modality/2"), "stem0": "modality/0"})
GLOBAL = {"theta": np.zeros(4, np.float32), "w_mod": np.full((3, 2), 9.0, np.float32), "stem0": np.ones(2, np.float32)}


def test_sample_weighted_mean():
    a = SiloUpdate({**GLOBAL, "theta": np.full(4, 1.0, np.float32)}, {"all": 10})
    b = SiloUpdate({**GLOBAL, "theta": np.full(4, 4.0, np.float32)}, {"all": 30})
    out = fedavg(GLOBAL, [a, b], GROUPS)
    assert np.allclose(out["theta"], (10 * 1 + 30 * 4) / 40)
    assert out["theta"].dtype == np.float32


def test_modality_rows_average_over_holders_only():
    wa = np.array([[1, 1], [2, 2], [3, 3]], np.float32)
    wb = np.array([[5, 5], [6, 6], [7, 7]], np.float32)
    # Silo a holds modalities 0 and 1; silo b holds 1 only; nobody holds 2.
    a = SiloUpdate(
        {**GLOBAL, "w_mod": wa, "stem0": np.full(2, 3.0, np.float32)}, {"all": 1, "modality/0": 4, "modality/1": 4}
    )
    b = SiloUpdate({**GLOBAL, "w_mod": wb, "stem0": np.full(2, 100.0, np.float32)}, {"all": 1, "modality/1": 12})
    out = fedavg(GLOBAL, [a, b], GROUPS)
    assert np.allclose(out["w_mod"][0], 1)  # only a
    assert np.allclose(out["w_mod"][1], (4 * 2 + 12 * 6) / 16)
    assert np.allclose(out["w_mod"][2], 9)  # untouched: keeps the global value
    assert np.allclose(out["stem0"], 3.0)  # b has no modality 0, its stem does not count


def test_bad_weights_and_row_counts_rejected():
    with pytest.raises(ValueError, match="finite"):
        fedavg(GLOBAL, [SiloUpdate(GLOBAL, {"all": float("nan")})], GROUPS)
    with pytest.raises(ValueError, match="row groups"):
        fedavg(GLOBAL, [SiloUpdate(GLOBAL, {"all": 1})], ParameterGroups({"w_mod": ("modality/0",)}))
    with pytest.raises(ValueError, match="at least one"):
        fedavg(GLOBAL, [], GROUPS)
    assert GROUPS.group_names() == ("all", "modality/0", "modality/1", "modality/2")
