"""Seconds per training step and per imputation batch of the CondI model (PTB-XL default sizes).

Run from the repository root:
    .venv/bin/python benchmarks/model_speed.py [--device cpu] [--threads 2] [--repeats 5]
Measures, at batch 32 of 12 x 250 windows: one Phase A step and one Phase B step (forward, backward,
Adam), and one ``impute`` call with DDIM-10 and with DDPM-50. Prints JSON and writes it to
benchmarks/results/model_speed[_<device>].json. Times are medians of ``--repeats`` after one
warm-up (plus process CPU time, steadier on a shared CPU); on a shared CPU wall times are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from condi_models.nn import CondIModel, ModelConfig, SamplingOptions, Variant, resolve_device

REPO = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> dict[str, float]:
    """Median and min wall time of ``fn`` over ``repeats`` runs after one warm-up.

    Also the median process CPU time (all threads together): on a CPU shared with other work the
    wall time swings, the CPU time much less; on an idle machine wall ~ cpu / threads.
    """
    fn()
    times, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "cpu_median_s": round(statistics.median(cpu), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impute-samples", type=int, default=1, help="imputation draws per window")
    parser.add_argument("--variant", default=Variant.CONDI.value, choices=[v.value for v in Variant])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(channel_modality=tuple(range(12)), n_classes=5, length=250, variant=Variant(args.variant))
    model = CondIModel(cfg).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    observed = torch.rand(args.batch, 12, 250, generator=g, device=device) > 0.3
    x = torch.randn(args.batch, 12, 250, generator=g, device=device) * observed
    y = torch.randint(0, 5, (args.batch,), generator=g, device=device)
    opt_a = torch.optim.Adam(model.phase_parameters("a"), lr=1e-3) if model.spec.diffusion else None
    opt_b = torch.optim.Adam(model.phase_parameters("b"), lr=1e-3)

    def step_a() -> None:
        loss = model.phase_a_loss(x, observed, g)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()

    def step_b() -> None:
        loss = model.phase_b_loss(x, observed, y)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()

    def impute(method: str, steps: int) -> Callable[[], None]:
        opts = SamplingOptions(n_samples=args.impute_samples, steps=steps, method=method)
        return lambda: model.impute(x, observed, opts, generator=g)

    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "variant": cfg.variant.value,
        "batch": args.batch,
        "shape": [12, 250],
        "parameters": sum(p.numel() for p in model.parameters()),
        "impute_samples_per_window": args.impute_samples,
        "phase_b_step": timed(step_b, args.repeats, device),
    }
    if opt_a is not None:
        result["phase_a_step"] = timed(step_a, args.repeats, device)
        result["impute_ddim10"] = timed(impute("ddim", 10), max(1, args.repeats // 2), device)
        result["impute_ddpm50"] = timed(impute("ddpm", 50), max(1, args.repeats // 2), device)
    text = json.dumps(result, indent=2)
    print(text)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = REPO / "benchmarks" / "results" / f"model_speed{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
