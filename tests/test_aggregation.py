"""Federated averaging: sample weights, per-modality row groups, untrained groups kept."""

from __future__ import annotations

import numpy as np
import pytest

from condi_models.aggregation import ParameterGroups, SecureLayout, SiloUpdate, fedavg

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


def _layout() -> SecureLayout:
    shapes = {k: v.shape for k, v in GLOBAL.items()}
    return SecureLayout(GROUPS, shapes, clip_bound=1.0, weight_unit=100.0)


def test_a_sum_of_clipped_capped_contributions_passes_the_bounds_and_a_forged_one_does_not() -> None:
    layout = _layout()
    rng = np.random.default_rng(0)
    honest = [
        layout.contribution(GLOBAL, SiloUpdate({k: v + rng.normal(scale=3.0, size=v.shape) for k, v in GLOBAL.items()},
                                               {"all": w, "modality/0": w, "modality/1": 5, "modality/2": 0}))
        for w in (50, 500, 7)
    ]
    total = np.sum([c.vector for c in honest], axis=0)
    layout.check_total(total, 3, 2.0**-24)
    # A silo that skipped clipping: its stem0 (first in the layout) moved by 27,174 at a plausible weight.
    forged = honest[0].vector.copy()
    forged[:2] = 27_174.0 * 0.5
    with pytest.raises(ValueError, match="stem0: 2 entries exceed clip_bound x their group's summed weight"):
        layout.check_total(forged + honest[1].vector + honest[2].vector, 3, 2.0**-24)
    # A silo that skipped capping its weight (10^10 samples as 10^8 weight units).
    heavy = honest[0].vector.copy()
    heavy[-4] = 1e8
    with pytest.raises(ValueError, match=r"summed group weights outside \[0, 3\] for 3 silos: \{'all'"):
        layout.check_total(heavy + honest[1].vector + honest[2].vector, 3, 2.0**-24)


def test_plain_updates_averaged_through_the_layout_are_capped_and_clipped() -> None:
    layout = _layout()
    honest = SiloUpdate({**GLOBAL, "theta": np.full(4, 0.5, np.float32)}, {"all": 100})
    # A silo claiming 10^12 samples and moving every entry by 1,000.
    hostile = SiloUpdate({k: v + 1000.0 for k, v in GLOBAL.items()}, {g: 1e12 for g in GROUPS.group_names()})
    total = sum(layout.contribution(GLOBAL, u).vector for u in (honest, hostile))
    out = layout.average(GLOBAL, total)
    # Capped at one weight unit each and clipped to +-1: theta moves to the mean of 0.5 and 1.
    np.testing.assert_allclose(out["theta"], 0.75)
    np.testing.assert_allclose(out["w_mod"], 10.0)  # only the hostile silo holds modalities: +1
    assert layout.contribution(GLOBAL, hostile).clipped == sum(v.size for v in GLOBAL.values())
