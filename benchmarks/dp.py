"""DP-SGD cost and utility: accuracy and imputation MAE by epsilon, and the training-time overhead.

Run from the repository root:  .venv/bin/python benchmarks/dp.py [--records 300] [--rounds 4] [--seeds 1]

Synthetic 12-lead ECG with simulated missingness ps = pw = 0.8, federated through
``run_simulation`` (the code ``condi sim`` runs): every silo takes part in every round, so each
silo plans exactly ``--rounds`` rounds and spends its whole budget. One run per epsilon in
``--epsilons`` ("inf" = no DP), all from the same seed, so the only difference is DP-SGD.
Reports the test accuracy, macro F1 and imputation MAE / RMSE (standardized units) of the final
global model, each silo's noise multiplier and epsilon spent, and seconds per training round
(rounds without evaluation; wall and process CPU time) with their ratios to the non-private
run. The defaults finish in about ten minutes on two idle CPU cores; raise ``--records``,
``--rounds`` and ``--seeds`` for real numbers. At small training budgets the diffusion imputer
is far from converged (its MAE is well above 1 standardized unit even without DP), so compare
MAE across epsilons, not with the paper.
Prints one JSON object and writes it to ``--out`` (default benchmarks/results/dp.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from condi_models.configfile import parse_config
from condi_models.simulation import ExperimentConfig, run_simulation

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dp.json"


def experiment(args: argparse.Namespace, epsilon: float, seed: int) -> ExperimentConfig:
    """The simulation for one epsilon (math.inf: no DP) and seed."""
    data: dict[str, Any] = {
        "name": f"dp-eps-{epsilon:g}-seed-{seed}",
        "seed": seed,
        "device": args.device,
        "data": {"source": "synthetic_ecg", "n_records": args.records, "seed": seed, "seconds": args.seconds},
        "missingness": {"ps": 0.8, "pw": 0.8, "pattern": "points", "seed": seed},
        "federation": {
            "silos": args.silos, "silos_per_round": args.silos, "rounds": args.rounds,
            "partition": "iid", "eval_every": args.rounds,
        },
        "model": {
            "variant": "condi", "embed_dim": 16, "cond_dim": 16,
            "denoiser": {"hidden": 32, "n_blocks": 2, "n_heads": 2},
            "context": {"stem_dim": 16, "expert_hidden": 32, "out_dim": 16},
            "classifier": {"hidden": 32, "n_blocks": 1, "n_heads": 2, "head_hidden": 64},
        },
        "training": {
            "epochs_a": args.epochs_a, "epochs_b": args.epochs_b, "batch_size": args.batch_size, "window": None,
        },
        "evaluation": {"n_samples": args.eval_samples, "method": args.eval_method, "steps": args.eval_steps},
    }
    if math.isfinite(epsilon):
        data["privacy"] = {
            "target_epsilon": epsilon, "delta": args.delta, "max_grad_norm": args.max_grad_norm,
            "phases": ["a", "b"], "accountant": "rdp", "planned_rounds": args.rounds,
        }
    return parse_config(data, ExperimentConfig, "benchmarks/dp.py")


def run_one(args: argparse.Namespace, epsilon: float, seed: int) -> dict[str, Any]:
    """One simulation: final test metrics, training seconds per round, and the privacy spent."""
    cpu_marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_simulation(
            experiment(args, epsilon, seed), run_dir=Path(tmp), progress=lambda _: cpu_marks.append(time.process_time())
        )
        wall = time.perf_counter() - t0
    test = result.final["test"]
    # The last round also evaluates; the others only train. CPU time is read at the end of each
    # round, so it is known for rounds 2 .. R-1; it is steadier than wall time on a shared machine.
    train_rounds = [r["seconds"] for r in result.rounds if "val" not in r]
    cpu_rounds = [b - a for a, b in itertools.pairwise(cpu_marks[:-1])]
    row: dict[str, Any] = {
        "seed": seed,
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "imputation_mae": test.get("imputation_mae"),
        "imputation_rmse": test.get("imputation_rmse"),
        "seconds_per_round": statistics.median(train_rounds),
        "cpu_seconds_per_round": statistics.median(cpu_rounds) if cpu_rounds else None,
        "wall_seconds": round(wall, 2),
        "silo_sizes": result.final["silo_sizes"],
    }
    if "privacy" in result.final:
        row["noise_multiplier"] = result.final["privacy"]["noise_multiplier"]
        row["epsilon_spent"] = result.final["privacy"]["epsilon_spent"]
    return row


def summarize(epsilon: float, runs: list[dict[str, Any]], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Means over seeds, with the per-seed runs kept; time ratios against the ``baseline`` summary."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    out: dict[str, Any] = {
        "epsilon": epsilon if math.isfinite(epsilon) else "inf",
        "accuracy": mean("accuracy"),
        "macro_f1": mean("macro_f1"),
        "imputation_mae": mean("imputation_mae"),
        "imputation_rmse": mean("imputation_rmse"),
        "seconds_per_round": mean("seconds_per_round"),
        "cpu_seconds_per_round": mean("cpu_seconds_per_round"),
    }
    if baseline is not None:
        for key in ("seconds_per_round", "cpu_seconds_per_round"):
            if out[key] is not None and baseline.get(key):
                out[f"{key.removesuffix('_per_round')}_ratio_vs_no_dp"] = out[key] / baseline[key]
    if math.isfinite(epsilon):
        out["noise_multiplier_range"] = [
            min(min(r["noise_multiplier"]) for r in runs), max(max(r["noise_multiplier"]) for r in runs)
        ]
        out["max_epsilon_spent"] = max(max(r["epsilon_spent"]) for r in runs)
    out["runs"] = runs
    return out


def parse_epsilons(text: str) -> list[float]:
    """'inf,8,3,1' -> [inf, 8.0, 3.0, 1.0]; the non-private run is always done first, as the baseline."""
    values = [math.inf if part.strip().lower() == "inf" else float(part) for part in text.split(",") if part.strip()]
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be > 0 or 'inf', got {text!r}")
    return sorted(set(values) | {math.inf}, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300, help="synthetic ECG records in all (default 300)")
    parser.add_argument("--seconds", type=float, default=2.5,
                        help="record length in seconds at 100 Hz (default 2.5: 250 steps, PTB-XL's length here)")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="federated rounds, >= 3 (default 4)")
    parser.add_argument("--epochs-a", type=int, default=3, help="Phase A epochs per round (the imputer needs several)")
    parser.add_argument("--epochs-b", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epsilons", type=parse_epsilons, default=parse_epsilons("inf,8,3,1"))
    parser.add_argument("--seeds", type=int, default=1, help="runs per epsilon, seeds 0..N-1 (default 1)")
    parser.add_argument("--eval-samples", type=int, default=3, help="imputation samples per test record")
    parser.add_argument("--eval-method", choices=["ddim", "ddpm"], default="ddim", help="imputation sampler")
    parser.add_argument("--eval-steps", type=int, default=10, help="DDIM steps per imputation (DDPM runs all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (the first round's CPU time includes setup, the last evaluates)")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    results, baseline = [], None
    for epsilon in args.epsilons:
        runs = [run_one(args, epsilon, seed) for seed in range(args.seeds)]
        summary = summarize(epsilon, runs, baseline)
        if not math.isfinite(epsilon):
            baseline = summary
        results.append(summary)
    report = {
        "benchmark": "dp",
        "command": "benchmarks/dp.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                  if k not in ("out", "epsilons")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "epsilons"},
        "epsilons": ["inf" if not math.isfinite(e) else e for e in args.epsilons],
        "machine": {"platform": platform.platform(), "cpu_threads": args.threads, "torch": torch.__version__},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
