"""Simulated missingness: rates, patterns and that a sample's mask is a fixed property of it."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condi_models.data.missingness import MissingnessSpec, simulate_missingness
from tests.helpers import REPO, toy_dataset

DS = toy_dataset(n=400, modalities=(1, 2, 3), length=60)


def _runs(row: np.ndarray) -> int:
    """Number of contiguous True runs in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(int)
    return int((np.diff(padded) == 1).sum())


@settings(max_examples=25, deadline=None)
@given(
    ps=st.floats(0.0, 1.0),
    pw=st.floats(0.0, 1.0),
    modality_prob=st.floats(0.0, 1.0),
    pattern=st.sampled_from(["points", "blocks"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_realised_rates_match_ps_and_pw(ps, pw, modality_prob, pattern, seed):
    spec = MissingnessSpec(ps=ps, pw=pw, modality_prob=modality_prob, pattern=pattern, seed=seed)
    view = simulate_missingness(DS, spec)
    n = len(DS)
    # ps: a binomial count, checked within 5 standard deviations.
    sd = np.sqrt(n * ps * (1 - ps))
    assert abs(view.affected.sum() - n * ps) <= 5 * sd + 1e-9
    # pw: every affected modality loses exactly round(pw * L) steps, on all its channels.
    lost_expected = int(round(pw * DS.info.length))
    chan_mod = DS.info.channel_modality
    for i in np.flatnonzero(view.affected):
        touched = [m for m in range(DS.info.n_modalities) if view.hidden[i, chan_mod == m].any()]
        if lost_expected > 0:
            assert touched, "an affected sample has at least one affected modality"
        for m in touched:
            block = view.hidden[i, chan_mod == m]
            assert (block == block[0]).all(), "a modality loses the same steps on all its channels"
            assert block[0].sum() == lost_expected
            if pattern == "blocks":
                assert _runs(block[0]) <= spec.max_blocks
    assert not view.hidden[~view.affected].any()


def test_view_is_consistent_and_hides_values():
    view = simulate_missingness(DS, MissingnessSpec(ps=0.8, pw=0.5, seed=3))
    assert not (view.hidden & view.data.observed).any()
    assert ((view.data.observed | view.hidden) == DS.observed).all()
    assert (view.data.x[~view.data.observed] == 0).all()
    assert np.array_equal(view.truth[view.hidden], DS.x[view.hidden])
    assert view.hidden.any()


def test_p_drop_removes_whole_modalities():
    view = simulate_missingness(DS, MissingnessSpec(ps=1.0, pw=0.2, p_drop=1.0, seed=1))
    chan_mod = DS.info.channel_modality
    for i in range(len(DS)):
        for m in np.flatnonzero(view.dropped_modalities[i]):
            assert view.hidden[i, chan_mod == m].all()
    assert view.dropped_modalities.any(axis=1).all()


def test_mask_depends_only_on_sample_identity():
    spec = MissingnessSpec(ps=0.8, pw=0.8, pattern="blocks", seed=7)
    full = simulate_missingness(DS, spec)
    again = simulate_missingness(DS, spec)
    assert np.array_equal(full.hidden, again.hidden)
    idx = np.array([5, 300, 17, 42])
    part = simulate_missingness(DS.subset(idx), spec)
    assert np.array_equal(part.hidden, full.hidden[idx])
    other = simulate_missingness(DS, MissingnessSpec(ps=0.8, pw=0.8, pattern="blocks", seed=8))
    assert not np.array_equal(other.hidden, full.hidden)


def _mask_digest_code() -> str:
    return (
        "import hashlib, numpy as np\n"
        "from condi_models.data.missingness import MissingnessSpec, simulate_missingness\n"
        "from tests.helpers import toy_dataset\n"
        "v = simulate_missingness(toy_dataset(n=400, modalities=(1, 2, 3), length=60),"
        " MissingnessSpec(ps=0.8, pw=0.8, pattern='points', seed=11))\n"
        "print(hashlib.sha256(np.packbits(v.hidden).tobytes()).hexdigest())\n"
    )


def test_mask_identical_across_processes():
    view = simulate_missingness(DS, MissingnessSpec(ps=0.8, pw=0.8, pattern="points", seed=11))
    here = hashlib.sha256(np.packbits(view.hidden).tobytes()).hexdigest()
    # A different string-hash salt must not change the masks.
    for hs in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", _mask_digest_code()],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hs, "PATH": "/usr/bin:/bin"},
            cwd=REPO,
        )
        assert out.stdout.strip() == here


@pytest.mark.parametrize("bad", [{"ps": 1.5}, {"pw": -0.1}, {"pattern": "stripes"}, {"max_blocks": 0}])
def test_bad_spec_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MissingnessSpec(**bad)
