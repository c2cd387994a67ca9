"""Hostile-silo attacks on a live coordinator, timed (issue 13, "Security and faults").

Run from the repository root:
    .venv/bin/python benchmarks/attacks.py [--repeats 20] [--out benchmarks/results/attacks.json]

A real coordinator (mutual TLS on loopback, the project's dev PKI, plain mode, two allowed silos)
is attacked by silo-1, which holds a valid certificate:

- an upload header whose manifest lists 100,000 dimensions for one tensor;
- during round 0's training, one chunk claiming a total of 30,000,000 and one claiming 2^32 - 1
  (Chunk.total is a uint32, so 2^32 itself cannot be sent);
- 40 concurrent long-poll GetTask calls, while silo-2 sends heartbeats: silo-2's heartbeat
  latency with and without the flood (median and p99 over ``--repeats`` x 5 heartbeats).

Each refusal is timed from sending the call to its error on the client (wall clock, one call at a
time). The figures land in the JSON file and in a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from _common import RESULTS, machine, markdown_table, write_json

from condi_models.configfile import parse_config
from condi_models.data.synthetic_ecg import synthetic_ecg_info
from coordinator.app import CoordinatorServer
from coordinator.config import FederationConfig
from federation import pki, tls, wire
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.proto_gen.condi.v1 import federation_pb2_grpc as pb_grpc
from federation.transfer import chunk_to_proto, data_summary

TIMEOUT = 30


def _start(root: Path, material: pki.DevPki) -> CoordinatorServer:
    doc = {
        "name": "attacks",
        "silos": ["silo-1", "silo-2"],
        "rounds": 2,
        "silos_per_round": 2,
        "min_silos": 1,
        "run_dir": str(root / "run"),
        "listen": "127.0.0.1:0",
        "tls": material.coordinator_tls(),
        "poll_interval_ms": 100,
        "timeouts": {"gather_s": 600, "train_s": 600, "evaluate_s": 600, "liveness_s": 600},
        "aggregation": {"mode": "plain"},
    }
    server = CoordinatorServer(parse_config(doc, FederationConfig, "attacks"), "attacks")
    server.start()
    threading.Thread(target=server.coordinator.run, daemon=True).start()
    return server


def _stub(material: pki.DevPki, silo: str, port: int) -> pb_grpc.FederationStub:
    paths = material.silos[silo]
    creds = tls.channel_credentials(material.ca.cert, paths.cert, paths.key)
    return pb_grpc.FederationStub(tls.secure_channel(f"127.0.0.1:{port}", creds))


def _refusal_ms(call: Any) -> tuple[float, str]:
    """Milliseconds until ``call()`` fails, and its status code."""
    t0 = time.perf_counter()
    try:
        call()
    except grpc.RpcError as err:
        return 1000 * (time.perf_counter() - t0), err.code().name
    raise RuntimeError("the attack was not refused")


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"median": float(np.median(arr)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "attacks.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        material = pki.dev_pki(root / "pki", 2)
        server = _start(root, material)
        try:
            results = _attack(material, server, args.repeats)
        finally:
            server.stop()
    results["machine"] = machine(torch.device("cpu"))
    write_json(Path(args.out), results)
    rows = [
        [name, r["status"], f"{r['median_ms']:.1f}", f"{r['max_ms']:.1f}"] for name, r in results["refusals"].items()
    ]
    print(markdown_table(["attack", "answer", "median ms", "max ms"], rows))
    hb = results["heartbeat_ms"]
    print(markdown_table(
        ["silo-2 heartbeat", "median ms", "p99 ms", "max ms"],
        [[k, f"{v['median']:.1f}", f"{v['p99']:.1f}", f"{v['max']:.1f}"] for k, v in hb.items()],
    ))
    return 0


def _attack(material: pki.DevPki, server: CoordinatorServer, repeats: int) -> dict[str, Any]:
    info = synthetic_ecg_info(seconds=1.0)
    attacker, other = _stub(material, "silo-1", server.port), _stub(material, "silo-2", server.port)
    join = pb.JoinRequest(protocol_version=1, software_version="bench", data=data_summary(info))
    assert attacker.Join(join, timeout=TIMEOUT).accepted

    # Heartbeats of silo-2 (not in the run, so the gather holds still) with and without a flood.
    def beats() -> list[float]:
        out = []
        for _ in range(repeats * 5):
            t0 = time.perf_counter()
            other.Heartbeat(pb.HeartbeatRequest(status="ok"), timeout=TIMEOUT)
            out.append(1000 * (time.perf_counter() - t0))
        return out

    quiet = beats()
    current = attacker.GetTask(pb.TaskRequest(wait_ms=0), timeout=TIMEOUT).ref
    held = pb.TaskRequest(ref=current, wait_ms=60_000)
    with futures.ThreadPoolExecutor(max_workers=40) as pool:
        flood = [pool.submit(attacker.GetTask.future(held, timeout=TIMEOUT).exception) for _ in range(40)]
        time.sleep(0.5)
        flooded = beats()
        refused_polls = sum(1 for f in flood if f.done() and f.result() is not None)
        assert other.Join(join, timeout=TIMEOUT).accepted  # ends the gather: the held polls return
        futures.wait(flood, timeout=TIMEOUT)

    # Statistics from both silos, then round 0's training tasks.
    stats = {"channel_count": [40.0] * info.n_features, "channel_sum": [0.0] * info.n_features,
             "channel_sq_sum": [40.0] * info.n_features, "class_counts": [1] + [0] * (len(info.classes) - 1)}
    tasks = {}
    for name, stub in (("silo-1", attacker), ("silo-2", other)):
        task = stub.GetTask(pb.TaskRequest(wait_ms=0), timeout=TIMEOUT)
        while task.ref.stage != pb.STAGE_STATISTICS:
            task = stub.GetTask(pb.TaskRequest(ref=task.ref, wait_ms=2000), timeout=TIMEOUT)
        report = pb.MetricsReport(ref=task.ref, metrics_json=json.dumps({"statistics": stats}))
        stub.ReportMetrics(report, timeout=TIMEOUT)
        tasks[name] = task
    task = tasks["silo-1"]
    while task.ref.stage != pb.STAGE_TRAIN:
        task = attacker.GetTask(pb.TaskRequest(ref=task.ref, wait_ms=2000), timeout=TIMEOUT)

    encoded = wire.encode_state({"x": np.zeros(4096, np.float32)})
    manifest = encoded.manifest.to_dict()
    manifest["tensors"][0]["shape"] = [2] * 100_000
    deep = pb.UpdateHeader(ref=task.ref, encoding=pb.UPDATE_ENCODING_PLAIN, base_state_sha256=task.state_sha256,
                           num_examples=1, manifest_json=json.dumps(manifest))
    header = pb.UpdateHeader(ref=task.ref, encoding=pb.UPDATE_ENCODING_PLAIN, base_state_sha256=task.state_sha256,
                             num_examples=1, manifest_json=encoded.manifest.to_json())

    def chunk_with_total(total: int) -> list[pb.UpdatePart]:
        piece = chunk_to_proto(wire.chunk(encoded, 4096)[0])
        piece.total = total
        return [pb.UpdatePart(header=header), pb.UpdatePart(chunk=piece)]

    attacks = {
        "upload header, manifest with 100,000 dimensions": lambda: attacker.UploadUpdate(
            iter([pb.UpdatePart(header=deep)]), timeout=TIMEOUT),
        "one chunk claiming total = 30,000,000": lambda: attacker.UploadUpdate(
            iter(chunk_with_total(30_000_000)), timeout=TIMEOUT),
        "one chunk claiming total = 2^32 - 1 (the most uint32 carries)": lambda: attacker.UploadUpdate(
            iter(chunk_with_total(2**32 - 1)), timeout=TIMEOUT),
    }
    refusals = {}
    for name, call in attacks.items():
        timed = [_refusal_ms(call) for _ in range(repeats)]
        ms = [t for t, _ in timed]
        refusals[name] = {"status": timed[0][1], "median_ms": float(np.median(ms)), "max_ms": float(max(ms))}
    return {
        "refusals": refusals,
        "heartbeat_ms": {"no flood": _stats(quiet), "40 concurrent long polls from silo-1": _stats(flooded)},
        "flood_refused": refused_polls,
    }


if __name__ == "__main__":
    sys.exit(main())
