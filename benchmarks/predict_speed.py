"""Impute-and-classify throughput, record by record and in shared batches (issue 14, batch inference).

Run from the repository root:
    .venv/bin/python benchmarks/predict_speed.py [--threads 2] [--records 32] [--repeats 3]
    .venv/bin/python benchmarks/predict_speed.py --code-from /tmp/before --label before   # another tree's code

The workload is the one of ``benchmarks/imputation.py --throughput-only``: synthetic 12-lead ECG
records of 10 s at 100 Hz (four windows of 250 steps each), missingness as simulated there
(ps = pw = 0.8, points), standardized; the default PTB-XL model size, freshly initialised (its
speed does not depend on the weights); ``CondIModel.predict`` (impute, then classify every window),
DDIM-10 with one and with five antithetic draws, on the CPU with ``--threads`` torch threads. A
record's probabilities are the mean over its windows.

Three ways of calling the model are timed on the same records:
- ``per record``: one call per record (its four windows), as ``condi predict`` called it before
  issue 14, with ``--threads`` torch threads;
- ``batched``: ``--batch-size`` windows of consecutive records per call, each record with its own
  generator (``RowGenerators``; a tree without them draws from one generator, at the same cost),
  with ``--threads`` torch threads;
- ``batched, workers``: the same calls, ``--threads`` of them at once on threads of one torch
  thread each, as ``condi predict`` runs them (``condi_models.predict.engine``).

Times are the median of ``--repeats`` passes over all ``--records`` records after one warm-up
call; process CPU time is kept beside them, steadier on a shared machine. Complete records (no
entry missing: about a fifth at ps = 0.8) need no sampling, so their share is reported too.
``--code-from DIR`` imports ``condi_models`` from DIR (say, a ``git worktree`` of an older commit)
instead of this tree, to time the code before a change on the same machine and load.

``--end-to-end FOLDER`` times ``condi predict`` itself (``predict_records``) on the records of a
PTB-XL folder instead: reading in a worker process, batching, model workers, and writing
imputed.npz, prediction.json and predictions.csv (no figures), with a freshly initialised
checkpoint of the default size. PTB-XL records miss nothing, so ``--hide`` (default points:0.3)
gives every window gaps to impute.

Results are merged into ``--out`` (default benchmarks/results/predict_speed.json) under
``--label`` (default ``current``, or ``end-to-end``), and a markdown table and the issue's
targets are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, Target, machine, markdown_table, median, read_json, targets_table, write_json


def use_code_from(tree: Path) -> None:
    """Import ``condi_models`` from ``tree``: its folder first on the path, this tree's editable install out."""
    if not (tree / "condi_models" / "__init__.py").is_file():
        raise SystemExit(f"--code-from {tree}: no condi_models package there")
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(f) and "editable" not in type(f).__module__]
    sys.path.insert(0, str(tree))


def records(args: argparse.Namespace) -> tuple[Any, np.ndarray, np.ndarray]:
    """(model, x, observed): the default-size model and ``--records`` standardized records (N, F, T)."""
    from condi_models.batches import prepare_split
    from condi_models.data.missingness import MissingnessSpec
    from condi_models.data.normalize import ChannelNormalizer
    from condi_models.data.synthetic_ecg import generate_ecg
    from condi_models.nn.config import Variant
    from condi_models.nn.model import CondIModel
    from condi_models.simulation import ModelSpec

    ds = generate_ecg(args.records, seed=args.seed)
    split = prepare_split(
        ds, ChannelNormalizer.fit(ds.x, ds.observed), MissingnessSpec(ps=args.ps, pw=args.pw, seed=args.seed)
    )
    torch.manual_seed(args.seed)
    model = CondIModel(ModelSpec(variant=Variant.CONDI).build(ds.info, args.window)).eval()
    set_gate(model, args)
    return model, split.x, split.observed


def set_gate(model: Any, args: argparse.Namespace) -> None:
    """``--network-gate``, where given and the model has a gate."""
    if args.network_gate is not None and getattr(model, "network_gate", None) is not None:
        with torch.no_grad():
            model.network_gate.fill_(args.network_gate)


def windows(a: np.ndarray, rows: range, window: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows of records ``rows``, record-major: (len(rows) * T / window, F, window)."""
    n_per = a.shape[-1] // window
    w = a[rows.start : rows.stop, :, : n_per * window].reshape(len(rows), a.shape[1], n_per, window)
    return torch.from_numpy(np.ascontiguousarray(w.transpose(0, 2, 1, 3).reshape(-1, a.shape[1], window)))


def generators_for(rows: range, per_record: int, seed: int) -> Any:
    """One generator per record (RowGenerators), or one for the call where the code has none."""
    try:
        from condi_models.nn.sampling import RowGenerators
    except ImportError:
        return torch.Generator().manual_seed(seed + rows.start)
    return RowGenerators([torch.Generator().manual_seed(seed + r) for r in rows], [per_record] * len(rows))


def _one_thread() -> None:
    torch.set_num_threads(1)


def time_pass(
    model: Any, x: np.ndarray, observed: np.ndarray, args: argparse.Namespace, draws: int, per_call: int, workers: int
) -> dict[str, float]:
    """Wall and CPU seconds to impute and classify every record, ``per_call`` records per model call.

    With ``workers`` > 1 that many calls run at once, each on a thread of one torch thread.
    """
    from condi_models.nn.sampling import SamplingOptions

    opts = SamplingOptions(n_samples=draws, method="ddim", steps=args.steps)
    per_record = x.shape[-1] // args.window
    n = x.shape[0]

    def call(lo: int) -> None:
        rows = range(lo, min(n, lo + per_call))
        pred = model.predict(
            windows(x, rows, args.window), windows(observed, rows, args.window), opts,
            generators_for(rows, per_record, args.seed) if per_call > 1 else torch.Generator().manual_seed(lo),
        )
        probs = torch.softmax(pred.logits, dim=1).view(len(rows), per_record, -1).mean(dim=1)
        if probs.shape[0] != len(rows):
            raise RuntimeError("record-level probabilities lost a record")

    with ThreadPoolExecutor(workers, initializer=_one_thread) as pool:
        for _ in pool.map(call, range(0, min(n, workers * per_call), per_call)):  # warm-up: a call per worker
            pass
        walls, cpus = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            if workers == 1:
                for lo in range(0, n, per_call):
                    call(lo)
            else:
                for _ in pool.map(call, range(0, n, per_call)):
                    pass
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    wall, cpu = median(walls), median(cpus)
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "records_per_s": round(n / wall, 3),
            "cpu_seconds_per_record": round(cpu / n, 4)}


def end_to_end(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``predict_records`` on every record under ``args.end_to_end``, once per number of draws."""
    import tempfile

    from condi_models.checkpoint import save_checkpoint
    from condi_models.data.normalize import ChannelNormalizer
    from condi_models.data.ptbxl import load_ptbxl, ptbxl_info
    from condi_models.nn.config import Variant
    from condi_models.nn.model import CondIModel
    from condi_models.predict import HideSpec, PredictOptions, expand_inputs, predict_records
    from condi_models.simulation import ModelSpec

    folder = args.end_to_end
    inputs = expand_inputs([str(folder)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sample = load_ptbxl(args.ptbxl_root, max_records=20)
        torch.manual_seed(args.seed)
        model = CondIModel(ModelSpec(variant=Variant.CONDI).build(ptbxl_info(), args.window))
        set_gate(model, args)
        ckpt = Path(tmp) / "default.npz"
        save_checkpoint(ckpt, model, ChannelNormalizer.fit(sample.x, sample.observed), ptbxl_info())
        for draws in (int(d) for d in args.draws.split(",")):
            opts = PredictOptions(
                n_samples=draws, steps=args.steps, seed=args.seed, hide=HideSpec.parse(args.hide),
                batch_size=args.batch_size, device="cpu", figures=False,
            )
            t0, c0 = time.perf_counter(), time.process_time()
            results = predict_records(ckpt, inputs, Path(tmp) / f"out-{draws}", opts)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            ok = sum(r.ok for r in results)
            rows.append({"calls": f"condi predict, {len(inputs)} records", "draws": draws, "records": ok,
                         "seconds": round(wall, 1), "records_per_s": round(ok / wall, 3),
                         "cpu_seconds_per_record": round(cpu / ok, 4)})
            print(f"condi predict, {draws} draw(s): {ok / wall:.2f} records/s", file=sys.stderr, flush=True)
    return rows


def report(results: dict[str, Any]) -> str:
    """Markdown: one row per label, way of calling and draws; the issue's targets for the batched path."""
    rows = []
    for label, run in results.get("runs", {}).items():
        for r in run["rows"]:
            rows.append([label, r["calls"], str(r["draws"]), f"{r['records_per_s']:.2f}",
                         f"{r['cpu_seconds_per_record']:.3f}", f"{run['load_average'][0]:.2f}"])
    parts = [markdown_table(["code", "calls", "draws", "records/s", "CPU s per record", "load (1 min)"], rows)]
    current = results.get("runs", {}).get("current")
    if current:
        best = {d: max(r["records_per_s"] for r in current["rows"] if r["draws"] == d) for d in (1, 5)
                if any(r["draws"] == d for r in current["rows"])}
        targets = [Target(f"records/s, {d} DDIM-10 draw{'s' if d > 1 else ''}", v, 10.0 if d == 1 else 3.0, "min")
                   for d, v in best.items()]
        parts.append(targets_table(targets))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--records", type=int, default=32, help="records per pass (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after a warm-up call (default 3)")
    parser.add_argument("--draws", default="1,5", help="imputation draws to time (default 1,5)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batched call (default 16)")
    parser.add_argument(
        "--ways",
        default="per-record,batched,workers",
        help="ways of calling the model to time, of per-record, batched, workers (default all three)",
    )
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--ps", type=float, default=0.8, help="share of records with simulated missingness")
    parser.add_argument("--pw", type=float, default=0.8, help="share of steps hidden in an affected lead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--code-from", type=Path, help="import condi_models from this tree instead")
    parser.add_argument("--label", default="current", help="name of this run in the results (default current)")
    parser.add_argument("--end-to-end", type=Path, metavar="FOLDER", help="time condi predict on this PTB-XL folder")
    parser.add_argument("--ptbxl-root", type=Path, default=Path("../shared/data/ptbxl"),
                        help="PTB-XL root whose first records give --end-to-end's normalizer")
    parser.add_argument("--hide", default="points:0.3", help="--end-to-end's missingness, as condi predict --hide")
    parser.add_argument("--network-gate", type=float,
                        help="set the model's network gate (a trained model's fit_gate may close it: 0 skips the "
                             "denoiser); default: a fresh model's 1")
    parser.add_argument("--out", type=Path, default=RESULTS / "predict_speed.json")
    args = parser.parse_args(argv)
    unknown = set(args.ways.split(",")) - {"per-record", "batched", "workers"}
    if unknown:
        parser.error(f"--ways: unknown {sorted(unknown)}")
    if args.code_from:
        use_code_from(args.code_from.resolve())
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if args.end_to_end:
        rows = end_to_end(args)
        label = args.label if args.label != "current" else "end-to-end"
        save(args, label, load_before, rows, folder=str(args.end_to_end), hide=args.hide)
        return
    model, x, observed = records(args)
    per_record = x.shape[-1] // args.window
    per_call = max(1, args.batch_size // per_record)
    rows = []
    batched = f"batched, {per_call * per_record} windows"
    ways = {
        "per-record": ("per record", 1, 1),
        "batched": (batched, per_call, 1),
        "workers": (f"{batched}, {args.threads} workers x 1 thread", per_call, args.threads),
    }
    for draws in (int(d) for d in args.draws.split(",")):
        for calls, records_per_call, workers in (ways[w] for w in args.ways.split(",")):
            timing = time_pass(model, x, observed, args, draws, records_per_call, workers)
            rows.append({"calls": calls, "records_per_call": records_per_call, "workers": workers, "draws": draws,
                         **timing})
            print(f"{calls}, {draws} draw(s): {timing['records_per_s']:.2f} records/s", file=sys.stderr, flush=True)
    missing = ~observed[:, :, : per_record * args.window].reshape(*observed.shape[:2], per_record, args.window)
    save(
        args, args.label, load_before, rows,
        parameters=sum(p.numel() for p in model.parameters()),
        windows_per_record=per_record,
        complete_windows=round(float((~missing.any(axis=(1, 3))).mean()), 3),
    )


def save(args: argparse.Namespace, label: str, load_before: tuple[float, ...], rows: list[dict[str, Any]],
         **details: Any) -> None:
    """Merge one run into ``--out`` under ``label``, with where and when it ran, and print the report."""
    results = read_json(args.out)
    results.setdefault("runs", {})[label] = {
        "rows": rows,
        "code": str(args.code_from) if args.code_from else "this tree",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **details,
        "machine": machine(torch.device("cpu")),
        "load_average": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json(args.out, results)
    print(report(results))

if __name__ == "__main__":
    main()
