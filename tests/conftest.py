"""Shared fixtures: where the real clinical samples are, and how their absence is handled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CONDI_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_SHARED = os.environ.get("CONDI_REQUIRE_SHARED_DATA") == "1"


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        msg = f"real clinical samples not found at {path} (set CONDI_SHARED_DATA or lay ../shared beside the repo)"
        if REQUIRE_SHARED:
            pytest.fail(msg + "; CONDI_REQUIRE_SHARED_DATA=1 makes this a failure")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def ptbxl_root() -> Path:
    """The shared PTB-XL sample (353 records at 100 Hz)."""
    return _shared("ptbxl")


@pytest.fixture(scope="session")
def mimic_root() -> Path:
    """The shared MIMIC-IV clinical database demo (without chartevents)."""
    return _shared("mimic-iv-demo")


@pytest.fixture(scope="session")
def sleep_edf_root() -> Path:
    """The shared Sleep-EDF cassette hypnograms (no PSG signal files)."""
    return _shared("sleep-edf")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train as fast on one thread, and much faster when other work shares the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
