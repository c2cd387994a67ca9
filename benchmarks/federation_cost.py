"""Federation cost: round time by stage, bytes per silo, and state transfer throughput over mutual TLS.

Run from the repository root:  .venv/bin/python benchmarks/federation_cost.py [--rounds 2] [--silos 3]

Two measurements, written to benchmarks/results/federation.json and printed:

- ``harness``: ``condi harness`` runs (one coordinator and N silo-agent processes on loopback,
  every silo selected every round, demo profile data) for the demo model and a ~10M-parameter
  model. Per round: the training stage's wall time and its parts as measured where they happen
  (download of the global state and Phase A / Phase B at the silo, the upload as received by the
  coordinator, the coordinator's averaging), the evaluation stage, and the bytes moved per silo.
- ``transfer``: one silo's state download and update upload of the ~10M-parameter model through
  the real coordinator and client code over loopback mutual TLS, repeated, in MB/s (10^6 bytes).
  Server and client share one process here, so this is a floor for two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from condi_models.configfile import parse_config
from condi_models.data.synthetic_ecg import generate_ecg
from condi_models.nn.model import CondIModel
from condi_models.training import aggregation_groups
from coordinator.app import CoordinatorServer
from coordinator.config import FederationConfig
from federation import pki
from federation.harness import PROFILES, HarnessOptions, run_harness
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.settings import RunSettings
from federation.transfer import PROTOCOL_VERSION, data_summary, encode_plain_update, stage_key
from silo_agent.client import CoordinatorClient
from silo_agent.config import CoordinatorEndpoint, SiloTls

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "federation.json"

# About 10M parameters on the 12-lead layout (9,979,701 with window 250).
LARGE_MODEL = {
    "embed_dim": 64,
    "cond_dim": 64,
    "denoiser": {"hidden": 256, "n_blocks": 4, "n_heads": 4},
    "context": {"stem_dim": 64, "expert_hidden": 256, "out_dim": 64},
    "classifier": {"hidden": 256, "n_blocks": 4, "n_heads": 4, "head_hidden": 256},
}
_TIMING = (
    "train_stage_s",
    "download_s",
    "phase_a_s",
    "phase_b_s",
    "upload_s",
    "aggregation_s",
    "evaluate_stage_s",
)


def harness_case(
    name: str, model: dict[str, Any] | None, silos: int, rounds: int, root: Path
) -> dict[str, Any]:
    """One harness run; per-round timing means and bytes per silo from its metrics.jsonl."""
    opts = HarnessOptions(
        out=root / name,
        silos=silos,
        rounds=rounds,
        per_round=silos,
        min_silos=silos,
        profile="demo",
        model=model,
        timeouts={"train_s": 3600.0, "evaluate_s": 3600.0, "liveness_s": 60.0},
        timeout_s=7200.0,
    )
    t0 = time.perf_counter()
    result = run_harness(opts)
    wall = time.perf_counter() - t0
    if result.coordinator_exit != 0:
        raise RuntimeError(f"harness run {name} failed; see {result.out / 'logs'}")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = [{k: row["timing"].get(k) for k in _TIMING} for row in rows]
    return {
        "parameters": rows[0]["bytes"]["state"] // 4,
        "state_bytes": rows[0]["bytes"]["state"],
        "silos": silos,
        "rounds": rounds,
        "wall_s": round(wall, 1),
        "per_round": per_round,
        "mean_s": {k: round(statistics.fmean(r[k] for r in per_round), 3) for k in _TIMING},
        # Per selected silo: the state for training (skipped when the silo holds it from the last
        # evaluation), the state for evaluation, and the update.
        "bytes_per_silo_per_round": {
            "train_download": statistics.fmean(row["bytes"]["download_per_silo"] for row in rows),
            "eval_download": statistics.fmean(row["bytes"]["eval_download_per_silo"] for row in rows),
            "upload": statistics.fmean(row["bytes"]["upload_per_silo"] for row in rows),
        },
        "val_accuracy": [row["val"]["accuracy"] for row in rows],
    }


def transfer_case(repeats: int, root: Path) -> dict[str, Any]:
    """Download and upload the ~10M-parameter model's state through the real client and server."""
    material = pki.dev_pki(root / "pki", 1)
    doc = {
        "name": "transfer-bench",
        "silos": ["silo-1"],
        "silos_per_round": 1,
        "min_silos": 1,
        "run_dir": str(root / "run"),
        "listen": "127.0.0.1:0",
        "tls": material.coordinator_tls(),
        "model": LARGE_MODEL,
        "timeouts": {"train_s": 3600.0, "liveness_s": 600.0},
    }
    server = CoordinatorServer(parse_config(doc, FederationConfig, "federation.yaml"), "federation.yaml")
    server.start()
    driver = threading.Thread(target=server.coordinator.run, daemon=True)
    driver.start()
    endpoint = CoordinatorEndpoint(address=f"127.0.0.1:{server.port}", rpc_timeout_s=120.0)
    paths = material.silos["silo-1"]
    client = CoordinatorClient(
        endpoint, SiloTls(ca=str(material.ca.cert), cert=str(paths.cert), key=str(paths.key)), "silo-1"
    )
    try:
        info = generate_ecg(4, seed=0, seconds=2.5).info
        reply = client.join(
            pb.JoinRequest(
                protocol_version=PROTOCOL_VERSION,
                data=data_summary(info),
            )
        )
        settings = RunSettings.from_json(reply.model_config_json)
        task = client.get_task(None, 0)
        while task.ref.stage != pb.STAGE_TRAIN:
            task = client.get_task(stage_key(task.ref), 5000)
        key = stage_key(task.ref)
        model = CondIModel(settings.model)
        state_bytes = sum(t.numel() * t.element_size() for t in model.state_to_named_tensors().values())
        down = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoded, _ = client.download_state(key, task.state_sha256, state_bytes)
            down.append(time.perf_counter() - t0)
        groups = aggregation_groups(model)
        named = {k: v.numpy() for k, v in model.state_to_named_tensors().items()}
        update = encode_plain_update(
            {n: named[n] for n in groups.assignment},
            {g: 100.0 for g in groups.group_names()},
            groups.group_names(),
        )
        header = pb.UpdateHeader(
            ref=task.ref,
            encoding=pb.UPDATE_ENCODING_PLAIN,
            base_state_sha256=task.state_sha256,
            num_examples=100,
        )
        up = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.upload(header, update)  # repeats are answered as duplicates after a full transfer
            up.append(time.perf_counter() - t0)
    finally:
        client.close()
        server.stop()
    mb_down = encoded.manifest.payload_bytes / 1e6
    mb_up = update.manifest.payload_bytes / 1e6
    return {
        "parameters": state_bytes // 4,
        "state_mb": round(mb_down, 2),
        "update_mb": round(mb_up, 2),
        "repeats": repeats,
        "download_s": [round(t, 3) for t in down],
        "upload_s": [round(t, 3) for t in up],
        "download_mb_per_s_best": round(mb_down / min(down), 1),
        "download_mb_per_s_median": round(mb_down / statistics.median(down), 1),
        "upload_mb_per_s_best": round(mb_up / min(up), 1),
        "upload_mb_per_s_median": round(mb_up / statistics.median(up), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "command": "benchmarks/federation_cost.py "
        + " ".join(f"--{k} {getattr(args, k)}" for k in ("silos", "rounds", "repeats")),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "torch_threads_per_process": 1,
        },
        "profile": {
            "records_per_silo": PROFILES["demo"].records_per_silo,
            "training": dict(PROFILES["demo"].training),
        },
    }
    with tempfile.TemporaryDirectory(prefix="condi-bench-") as tmp:
        root = Path(tmp)
        results["transfer"] = transfer_case(args.repeats, root / "transfer")
        results["harness"] = {
            "demo_model": harness_case("demo", None, args.silos, args.rounds, root),
            "model_10m": harness_case("large", LARGE_MODEL, args.silos, args.rounds, root),
        }
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
