"""Load throughput of every data source, in records (samples) per second.

Run from the repository root:  .venv/bin/python benchmarks/data_loading.py [--repeats 3]
Writes benchmarks/results/data_loading.json and prints it. The real sources are read from
../shared/data (skipped with a note when absent).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from condi_models.data.dataset import ClinicalDataset
from condi_models.data.mimic import load_mimic
from condi_models.data.ptbxl import load_ptbxl
from condi_models.data.sleep_edf import load_sleep_edf
from condi_models.data.synthetic_ecg import generate_ecg
from condi_models.data.synthetic_icu import generate_icu
from condi_models.data.synthetic_psg import generate_psg, write_synthetic_cassette

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "data_loading.json"


def measure(name: str, unit: str, fn: Callable[[], ClinicalDataset], repeats: int) -> dict:
    """Best of ``repeats`` wall times of ``fn`` and the throughput it gives."""
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ds = fn()
        times.append(time.perf_counter() - t0)
        n = len(ds)
    best = min(times)
    row = {"source": name, "unit": unit, "count": n, "best_s": round(best, 3), "per_s": round(n / best, 1)}
    print(f"{name:<34} {n:>6} {unit:<7} {best:8.2f} s  {n / best:10.1f} {unit}/s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    if (SHARED / "ptbxl").is_dir():
        rows.append(measure("ptbxl records100 (shared)", "records", lambda: load_ptbxl(SHARED / "ptbxl"), args.repeats))
    if (SHARED / "mimic-iv-demo").is_dir():
        rows.append(
            measure("mimic-iv demo ihm48 (shared)", "stays", lambda: load_mimic(SHARED / "mimic-iv-demo"), args.repeats)
        )
        rows.append(
            measure(
                "mimic-iv demo los3 (shared)",
                "stays",
                lambda: load_mimic(SHARED / "mimic-iv-demo", task="los3"),
                args.repeats,
            )
        )
    rows.append(measure("synthetic ecg 12x1000", "records", lambda: generate_ecg(1000, seed=0), args.repeats))
    rows.append(measure("synthetic psg 5x3000", "epochs", lambda: generate_psg(4, seed=0), args.repeats))
    rows.append(measure("synthetic icu (write + load)", "stays", lambda: generate_icu(300, seed=0), args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cassette(Path(tmp), 2, seed=0)
        rows.append(measure("sleep-edf EDF pairs (written)", "epochs", lambda: load_sleep_edf(Path(tmp)), args.repeats))
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
