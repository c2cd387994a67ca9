"""Secure-aggregation benchmark of issue 5: keystream, masking, unmasking, wire bytes, harness rounds.

Run from the repository root:

    .venv/bin/python benchmarks/secagg.py                # full run -> benchmarks/results/secagg.json
    .venv/bin/python benchmarks/secagg.py --quick        # smoke run -> benchmarks/results/secagg_quick.json

Five parts, each printed as a markdown table and kept in the JSON:

1. Keystream: the raw AES-256-CTR keystream the PRG is built on, and ``prg.apply_masks`` with one
   and with six streams (keystream plus ring addition), single-threaded.
2. Protocol rounds: for every n in ``--ns`` and size in ``--sizes``, a full round of the real
   :class:`SecAggClient` / :class:`SecAggServer` (X25519, ECDSA-signed adverts against a throwaway
   dev CA, AES-GCM shares, Shamir) with no dropout and with n - t silos dropping after ShareKeys,
   ``t`` and the quantization as the coordinator's defaults choose them. Timed: every uploader's
   ``masked_input`` (the silo's whole stage: open shares, derive pair seeds, quantize, mask), the
   coordinator's ``close_masked`` (summing the uploads) and ``finish`` (recovering seeds and keys,
   removing the masks, dequantizing), over ``--round-repeats`` fresh rounds per point. The
   unmasked sum is checked against the plaintext sum within the quantization error; a mismatch
   stops the run. Quantization and masking alone are timed separately through the same library
   functions (best of ``--repeats``).
3. The issue's goals as a targets table.
4. Upload bytes of one silo in the demo configuration (``make demo``), secure vs plain, from the
   protobuf messages the silo agent sends (``ByteSize`` summed), key and share traffic apart.
5. ``condi harness`` in the demo configuration with one seed, secure and ``--plain`` alternated
   ``--harness-pairs`` times: per-round stage times from the coordinator's metrics.jsonl and
   events.jsonl (``--skip-harness`` leaves this part out).

The machine is often shared, so single-threaded timings are given as wall and CPU (thread) time,
and the 1-minute load average is recorded with each part.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from _common import RESULTS, Target, fmt, machine, markdown_table, targets_table, write_json
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from condi_models.aggregation import SecureLayout, SiloUpdate
from condi_models.nn.model import CondIModel
from condi_models.training import aggregation_groups
from coordinator.config import AggregationConfig, load_federation_config
from coordinator.layout import build_model_config
from federation import pki, wire
from federation import secagg_wire as sw
from federation.harness import HarnessOptions, free_port, run_harness, write_configs
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg.client import SecAggClient
from federation.secagg.messages import (
    CertVerifier,
    MaskedInput,
    RoundAbort,
    RoundConfig,
    ca_cert_verifier,
)
from federation.secagg.prg import BLOCK_BYTES, apply_masks
from federation.secagg.quantize import QuantConfig, quantize
from federation.secagg.server import SecAggServer
from federation.stages import StageKey
from federation.transfer import encode_plain_update, stage_ref, update_parts
from silo_agent.config import load_site_config
from silo_agent.local_data import load_local_data

SIZES_FULL = (1_000_000, 10_000_000)
SIZES_QUICK = (10_000, 100_000)
NS_FULL = (3, 6, 12, 24)
NS_QUICK = (3, 6)
TEN_M = 10_000_000
T = TypeVar("T")
# The demo configuration of ``make demo``.
DEMO = {"silos": 6, "per_round": 3, "profile": "demo"}


def load_1m() -> float:
    """The 1-minute load average (other work shares this machine)."""
    return round(os.getloadavg()[0], 2)


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, its wall time and its CPU time on this thread (the CPU time is what load cannot inflate)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    out = fn()
    return out, time.perf_counter() - w0, time.thread_time() - c0


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """The smallest wall time and the smallest CPU time of ``fn`` over ``repeats`` runs."""
    runs = [timed(fn)[1:] for _ in range(repeats)]
    return min(w for w, _ in runs), min(c for _, c in runs)


# ---------------------------------------------------------------------------------------------
# 1. Keystream


def keystream(repeats: int, total_bytes: int) -> dict[str, Any]:
    """Single-core keystream throughput: raw AES-256-CTR in the PRG's block size, and the PRG itself."""
    zeros = bytes(BLOCK_BYTES)
    buffer = bytearray(BLOCK_BYTES + 15)

    def raw() -> None:
        encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        for _ in range(total_bytes // BLOCK_BYTES):
            encryptor.update_into(zeros, buffer)

    acc = np.zeros(total_bytes // 4, dtype=np.uint32)
    seeds = [(os.urandom(32), 1 if i % 2 else -1) for i in range(6)]
    raw_s = best_time(raw, repeats)
    one_s = best_time(lambda: apply_masks(acc, seeds[:1]), repeats)
    # With several streams each block of the vector stays in cache while every stream is added to it.
    six_s = best_time(lambda: apply_masks(acc, seeds), repeats)

    def gbps(n_bytes: int, seconds: float) -> float:
        return round(n_bytes / seconds / 1e9, 2)

    return {
        "bytes": total_bytes,
        "load_1m": load_1m(),
        "raw_aes_ctr_gbps": gbps(total_bytes, raw_s[0]),
        "prg_apply_masks_one_stream_gbps": gbps(total_bytes, one_s[0]),
        "prg_apply_masks_six_streams_gbps": gbps(6 * total_bytes, six_s[0]),
        # Per CPU second of this thread: what a core does when other work does not take it away.
        "cpu": {
            "raw_aes_ctr_gbps": gbps(total_bytes, raw_s[1]),
            "prg_apply_masks_one_stream_gbps": gbps(total_bytes, one_s[1]),
            "prg_apply_masks_six_streams_gbps": gbps(6 * total_bytes, six_s[1]),
        },
    }


# ---------------------------------------------------------------------------------------------
# 2. Protocol rounds


class Federation:
    """A throwaway dev PKI with ``n`` silo identities (real certificates, as the harness makes them)."""

    def __init__(self, root: Path, n: int) -> None:
        dev = pki.dev_pki(root / f"pki-{n}", n)
        self.verify: CertVerifier = ca_cert_verifier(pki.load_certificate(dev.ca.cert))
        self.ids = tuple(sorted(dev.silos))
        self.keys = {sid: pki.load_private_key(p.key) for sid, p in dev.silos.items()}
        self.certs = {sid: p.cert.read_bytes() for sid, p in dev.silos.items()}


def silo_input(seed: int, length: int) -> np.ndarray:
    """One silo's float vector for the sum, inside the clip bound as SecureLayout's entries are."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=length)


def run_round(fed: Federation, length: int, dropouts: int, agg: AggregationConfig, seed: int) -> dict[str, Any]:
    """One full round over all of ``fed``'s silos, ``dropouts`` of them leaving after ShareKeys.

    Masked inputs go to the server as the objects the clients return (not re-decoded), so that
    only one copy of each large upload is held at a time; every other message crosses its proto
    form as the silo agent and the coordinator convert it (:mod:`federation.secagg_wire`).
    """
    n = len(fed.ids)
    t = agg.threshold_for(n)
    quant = QuantConfig(agg.clip_bound, agg.frac_bits, agg.resolved_ring_bits(n))
    config = RoundConfig(f"bench/n{n}/l{length}/d{dropouts}/s{seed}", t, length, quant)
    rng = np.random.default_rng(seed)
    dropped = set(rng.choice(fed.ids, size=dropouts, replace=False).tolist()) if dropouts else set()
    server = SecAggServer(config, fed.ids, fed.verify)
    clients = {
        sid: SecAggClient(
            config, sid, fed.keys[sid], fed.certs[sid], fed.verify, rounding_seed=seed + i, randbytes=os.urandom
        )
        for i, sid in enumerate(fed.ids)
    }
    rid = config.round_id
    for sid in fed.ids:
        advert = sw.advert_to_proto(pb.StageRef(), clients[sid].advertise())
        server.receive_advert(sid, sw.advert_from_proto(rid, sid, advert))
    roster = server.close_adverts()
    if isinstance(roster, RoundAbort):
        raise RuntimeError(f"n={n}: the round aborted at the adverts: {roster.reason}")
    for sid in fed.ids:
        shares = sw.share_keys_to_proto(clients[sid].share_keys(sw.roster_from_proto(rid, sw.roster_to_proto(roster))))
        server.receive_shares(sid, sw.share_keys_from_proto(rid, sid, shares))
    deliveries = server.close_shares()
    if isinstance(deliveries, RoundAbort):
        raise RuntimeError(f"n={n}: the round aborted at the shares: {deliveries.reason}")
    expected = np.zeros(length, dtype=np.float64)
    mask_wall, mask_cpu = [], []
    received = {}
    for i, sid in enumerate(fed.ids):
        if sid in dropped:
            continue
        x = silo_input(seed * 1000 + i, length)
        delivery = received[sid] = sw.delivery_from_proto(rid, sid, sw.delivery_to_proto(deliveries[sid]))
        masked, wall, cpu = timed(lambda sid=sid, delivery=delivery, x=x: clients[sid].masked_input(delivery, x))
        mask_wall.append(wall)
        mask_cpu.append(cpu)
        expected += x
        server.receive_masked(sid, masked)
    request, sum_s, _ = timed(server.close_masked)
    if isinstance(request, RoundAbort):
        raise RuntimeError(f"n={n}: the round aborted at the masked inputs: {request.reason}")
    for sid in request.uploaded:
        asked = sw.unmask_request_from_proto(rid, sw.unmask_request_to_proto(request), received[sid])
        revealed = sw.unmask_response_to_proto(clients[sid].unmask(asked))
        server.receive_unmask(sid, sw.unmask_response_from_proto(rid, sid, revealed))
    result, unmask_s, unmask_cpu = timed(server.finish)
    if not result.completed or result.total is None:
        raise RuntimeError(f"n={n}, length {length}, {dropouts} dropouts: the round did not complete ({result.reason})")
    # Stochastic rounding moves each entry by less than one code unit per silo.
    tolerance = len(request.uploaded) * 2.0**-quant.frac_bits
    error = float(np.max(np.abs(result.total - expected)))
    if error > tolerance:
        raise RuntimeError(
            f"n={n}, length {length}, {dropouts} dropouts: the unmasked sum is off by {error:.3g},"
            f" more than the quantization error {tolerance:.3g}"
        )
    return {
        "n": n,
        "length": length,
        "threshold": t,
        "ring_bits": quant.ring_bits,
        "dropouts": dropouts,
        "dropped": sorted(dropped),
        "uploaders": len(request.uploaded),
        "masked_input_wall_s": mask_wall,
        "masked_input_cpu_s": mask_cpu,
        "sum_uploads_s": sum_s,
        "unmask_s": unmask_s,
        "unmask_cpu_s": unmask_cpu,
        "max_abs_error": error,
        "error_bound": tolerance,
    }


def measure_point(
    fed: Federation, length: int, dropouts: int, agg: AggregationConfig, seed: int, repeats: int
) -> dict[str, Any]:
    """``repeats`` fresh rounds at one point: per-silo times pooled over all uploaders of all rounds,
    coordinator times as the best and the median round."""
    rounds = [run_round(fed, length, dropouts, agg, seed + r) for r in range(repeats)]
    walls = [w for r in rounds for w in r["masked_input_wall_s"]]
    cpus = [c for r in rounds for c in r["masked_input_cpu_s"]]
    unmask = [r["unmask_s"] for r in rounds]
    first = rounds[0]
    return {
        **{k: first[k] for k in ("n", "length", "threshold", "ring_bits", "dropouts", "uploaders")},
        "rounds": repeats,
        "masked_input_s_median": round(statistics.median(walls), 4),
        "masked_input_s_min": round(min(walls), 4),
        "masked_input_s_max": round(max(walls), 4),
        "masked_input_cpu_s_median": round(statistics.median(cpus), 4),
        "sum_uploads_s": round(min(r["sum_uploads_s"] for r in rounds), 4),
        "unmask_s": round(min(unmask), 4),
        "unmask_s_median": round(statistics.median(unmask), 4),
        "unmask_cpu_s": round(min(r["unmask_cpu_s"] for r in rounds), 4),
        "max_abs_error": max(r["max_abs_error"] for r in rounds),
        "error_bound": min(r["error_bound"] for r in rounds),
        "load_1m": load_1m(),
    }


def primitives(n: int, length: int, agg: AggregationConfig, repeats: int) -> dict[str, Any]:
    """Quantization of one silo's vector and its n masks (self mask + n - 1 pairwise), timed apart."""
    quant = QuantConfig(agg.clip_bound, agg.frac_bits, agg.resolved_ring_bits(n))
    x = silo_input(n, length)
    rng = np.random.default_rng(0)
    quantize_s, quantize_cpu = best_time(lambda: quantize(x, quant, rng), repeats)
    codes = quantize(x, quant, rng)
    masks = [(os.urandom(32), 1 if i % 2 else -1) for i in range(n)]
    mask_s, mask_cpu = best_time(lambda: apply_masks(codes, masks), repeats)
    return {
        "n": n,
        "length": length,
        "quantize_s": round(quantize_s, 4),
        "quantize_cpu_s": round(quantize_cpu, 4),
        "mask_s": round(mask_s, 4),
        "mask_cpu_s": round(mask_cpu, 4),
    }


def protocol(
    root: Path, ns: tuple[int, ...], sizes: tuple[int, ...], repeats: int, round_repeats: int
) -> dict[str, Any]:
    """Every (n, size) with no dropout and with n - t dropouts, plus the primitives at each point."""
    agg = AggregationConfig()
    rounds, prims = [], []
    for n in ns:
        fed = Federation(root, n)
        t = agg.threshold_for(n)
        for length in sizes:
            prims.append(primitives(n, length, agg, repeats))
            for dropouts in sorted({0, n - t}):
                row = measure_point(fed, length, dropouts, agg, 100 * len(rounds), round_repeats)
                rounds.append(row)
                print(
                    f"n={n} t={t} length={length:,} dropouts={dropouts}: masked_input"
                    f" {row['masked_input_s_median']:.3f} s (median), unmask {row['unmask_s']:.3f} s (best),"
                    f" error {row['max_abs_error']:.2e} <= {row['error_bound']:.2e}",
                    flush=True,
                )
    return {
        "aggregation": {
            "threshold": agg.threshold,
            "clip_bound": agg.clip_bound,
            "frac_bits": agg.frac_bits,
            "ring_bits": agg.ring_bits,
        },
        "rounds": rounds,
        "primitives": prims,
    }


# ---------------------------------------------------------------------------------------------
# 4. Upload bytes in the demo configuration


def _bytes(messages: Iterator[Any] | list[Any]) -> int:
    return sum(m.ByteSize() for m in messages)


def demo_bytes(root: Path) -> dict[str, Any]:
    """One silo's per-round traffic in the demo configuration, plain vs secure, from the real messages.

    The model, layout and quantization come from the harness's own configuration files for
    ``make demo``; the "trained" parameters are the initial ones plus small noise. The update
    headers are built with the fields silo_agent/agent.py fills in (its claims with typical values).
    """
    opts = HarnessOptions(out=root / "demo", rounds=8, seed=0, **DEMO)
    fed_yaml, sites = write_configs(opts, free_port())
    cfg = load_federation_config(fed_yaml)
    site_path = sites["silo-1"]
    data = load_local_data(load_site_config(site_path), site_path)
    model_cfg, _ = build_model_config(data.info, cfg.model, cfg.training)
    torch.manual_seed(cfg.seed)
    model = CondIModel(model_cfg)
    groups = aggregation_groups(model)
    names = groups.group_names()
    named = {k: v.numpy() for k, v in model.state_to_named_tensors().items()}
    start = {n: named[n].copy() for n in groups.assignment}
    noise = np.random.default_rng(0)
    params = {n: (v + noise.normal(0, 1e-3, v.shape)).astype(v.dtype) for n, v in start.items()}
    weights = {g: float(len(data.train)) for g in names}
    run_id = "condi-harness-20261127T000000Z-000000"
    state_sha = "0" * 64
    claims: dict[str, Any] = {
        "phase_a_loss": 0.98765,
        "phase_b_loss": 1.23456,
        "phase_a_s": 6.123456789,
        "phase_b_s": 1.456789012,
        "download_s": 0.027257461,
        "download_bytes": 856660,
    }

    def ref(stage: int) -> pb.StageRef:
        return stage_ref(StageKey(run_id, 3, 0, stage))

    plain_header = pb.UpdateHeader(
        ref=ref(pb.STAGE_TRAIN),
        encoding=pb.UPDATE_ENCODING_PLAIN,
        base_state_sha256=state_sha,
        num_examples=len(data.train),
        claims_json=json.dumps(claims),
    )
    plain_encoded = encode_plain_update(params, weights, names)
    plain = _bytes(update_parts(plain_header, plain_encoded, cfg.max_chunk_bytes))

    agg = cfg.aggregation
    n = cfg.silos_per_round
    quant = QuantConfig(agg.clip_bound, agg.frac_bits, agg.resolved_ring_bits(n))
    layout = SecureLayout(groups, {k: v.shape for k, v in start.items()}, agg.clip_bound, agg.weight_unit)
    contribution = layout.contribution(start, SiloUpdate(params, weights))
    selected = [f"silo-{i}" for i in (1, 2, 3)]
    tls = {sid: load_site_config(sites[sid]).tls for sid in selected}
    verify = ca_cert_verifier(pki.load_certificate(Path(tls[selected[0]].ca)))
    config = RoundConfig(sw.secure_round_id(run_id, 3, 0), agg.threshold_for(n), layout.vector_length, quant)
    server = SecAggServer(config, selected, verify)
    clients = {
        sid: SecAggClient(
            config,
            sid,
            pki.load_private_key(Path(tls[sid].key)),
            Path(tls[sid].cert).read_bytes(),
            verify,
            rounding_seed=i,
        )
        for i, sid in enumerate(selected)
    }
    adverts = {sid: c.advertise() for sid, c in clients.items()}
    for sid, advert in adverts.items():
        server.receive_advert(sid, advert)
    roster = server.close_adverts()
    assert not isinstance(roster, RoundAbort)
    share_msgs = {sid: c.share_keys(roster) for sid, c in clients.items()}
    for sid, msg in share_msgs.items():
        server.receive_shares(sid, msg)
    deliveries = server.close_shares()
    assert not isinstance(deliveries, RoundAbort)
    masked: dict[str, MaskedInput] = {}
    for sid, c in clients.items():
        masked[sid] = c.masked_input(deliveries[sid], contribution.vector)
        server.receive_masked(sid, masked[sid])
    request = server.close_masked()
    assert not isinstance(request, RoundAbort)
    responses = {sid: c.unmask(request) for sid, c in clients.items()}
    for sid, response in responses.items():
        server.receive_unmask(sid, response)
    if not server.finish().completed:
        raise RuntimeError("the demo-configuration round did not complete")

    sid = selected[0]
    secure_claims = {**claims, "clipped": contribution.clipped, "capped_weights": 0, "samples": len(data.train)}
    m = masked[sid]
    masked_header = pb.UpdateHeader(
        ref=ref(pb.STAGE_MASKED_INPUT),
        encoding=pb.UPDATE_ENCODING_MASKED,
        base_state_sha256=state_sha,
        claims_json=json.dumps(secure_claims),
    )
    encoded = wire.encode_state({"masked": np.frombuffer(m.data, dtype=np.dtype(f"<u{m.ring_bits // 8}"))})
    masked_upload = _bytes(update_parts(masked_header, encoded, cfg.max_chunk_bytes))
    advertise = sw.advert_to_proto(ref(pb.STAGE_ADVERTISE_KEYS), adverts[sid])
    share = pb.ShareKeysRequest(ref=ref(pb.STAGE_SHARE_KEYS), shares=sw.share_keys_to_proto(share_msgs[sid]))
    unmask = pb.UnmaskRequest(ref=ref(pb.STAGE_UNMASK), shares=sw.unmask_response_to_proto(responses[sid]))
    up_keys = advertise.ByteSize() + share.ByteSize() + unmask.ByteSize()
    # What the coordinator sends this silo for the secure stages (fields of its Task messages).
    down = {
        "key_roster": sw.roster_to_proto(roster).ByteSize(),
        "share_bundle": sw.delivery_to_proto(deliveries[sid]).ByteSize(),
        "survivors": sw.unmask_request_to_proto(request).ByteSize(),
    }
    return {
        "configuration": f"condi harness --silos {opts.silos} --per-round {n} --profile demo",
        "parameters": int(sum(v.size for v in start.values())),
        "groups": len(names),
        "vector_length": layout.vector_length,
        "ring_bits": quant.ring_bits,
        "threshold": config.threshold,
        "max_chunk_bytes": cfg.max_chunk_bytes,
        "plain_upload_bytes": plain,
        "masked_upload_bytes": masked_upload,
        "upload_ratio": round(masked_upload / plain, 4),
        # The tensor bytes alone, without the header and its manifest (which lists every tensor when plain).
        "plain_payload_bytes": plain_encoded.manifest.payload_bytes,
        "masked_payload_bytes": encoded.manifest.payload_bytes,
        "payload_ratio": round(encoded.manifest.payload_bytes / plain_encoded.manifest.payload_bytes, 5),
        "key_share_upload_bytes": {
            "advertise_keys": advertise.ByteSize(),
            "share_keys": share.ByteSize(),
            "unmask": unmask.ByteSize(),
            "total": up_keys,
        },
        "upload_ratio_with_keys": round((masked_upload + up_keys) / plain, 4),
        "key_share_download_bytes": {**down, "total": sum(down.values())},
    }


# ---------------------------------------------------------------------------------------------
# 5. Harness rounds, secure vs plain


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def phase_sequence(events_path: Path) -> dict[int, list[tuple[str, float]]]:
    """For each round, its phases in the order reported, each with its start (seconds since the epoch).

    Read from the progress events in events.jsonl; a phase is one run of equal consecutive phases, so
    the secure stages of a round's evaluation (secure metrics) come out apart from its training's.
    """
    sequence: dict[int, list[tuple[str, float]]] = {}
    for line in events_path.read_text().splitlines():
        event = json.loads(line)
        # The data statistics before round 0 and the final test after the last round are no round's.
        if event.get("event") != "progress" or event.get("pending") in ("statistics", "final"):
            continue
        phases = sequence.setdefault(int(event["round"]), [])
        if not phases or phases[-1][0] != event["phase"]:
            phases.append((event["phase"], _timestamp(event["time"])))
    return sequence


def phase_durations(phases: list[tuple[str, float]]) -> tuple[dict[str, float], float]:
    """Seconds per phase from the round's training task to its recorded evaluation, and their sum.

    Phases after the aggregation of the updates belong to the evaluation and are named ``eval <phase>``.
    """
    names = [p for p, _ in phases]
    first = next(i for i, p in enumerate(names) if p in ("train", "advertise_keys"))
    last = names.index("record", first)
    durations: dict[str, float] = {}
    evaluating = False
    for (phase, t0), (_, t1) in itertools.pairwise(phases[first : last + 1]):
        label = f"eval {phase}" if evaluating and phase != "evaluate" else phase
        evaluating = evaluating or phase == "aggregate"
        durations[label] = round(durations.get(label, 0.0) + t1 - t0, 3)
    return durations, round(phases[last][1] - phases[first][1], 3)


def harness_run(out: Path, rounds: int, secure: bool, secure_metrics: bool, seed: int) -> dict[str, Any]:
    """One ``condi harness`` run in the demo configuration; per-round stage times from its run directory."""
    load_before = load_1m()
    t0 = time.perf_counter()
    options = HarnessOptions(
        out=out, rounds=rounds, seed=seed, secure=secure, secure_metrics=secure and secure_metrics, **DEMO
    )
    result = run_harness(options)
    wall = time.perf_counter() - t0
    if result.report is None or result.coordinator_exit != 0:
        raise RuntimeError(f"harness run in {out} failed (coordinator exit {result.coordinator_exit}); see {out}/logs")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    sequence = phase_sequence(result.run_dir / "events.jsonl")
    per_round = []
    for row in rows:
        durations, round_s = phase_durations(sequence[row["round"]])
        timing = row["timing"]
        per_round.append(
            {
                "round": row["round"],
                "attempt": row["attempt"],
                "aggregation": row["aggregation"],
                # Secure: from the training task to the unmasked sum; plain: until the last upload.
                "train_stage_s": timing["train_stage_s"],
                "aggregation_s": timing["aggregation_s"],
                "evaluate_stage_s": timing["evaluate_stage_s"],
                "phase_a_s": timing["phase_a_s"],
                "phase_b_s": timing["phase_b_s"],
                "upload_per_silo_bytes": row["bytes"]["upload_per_silo"],
                "round_s": round_s,
                "phases_s": durations,
                "val_accuracy": row.get("val", {}).get("accuracy"),
            }
        )
    return {
        "secure": secure,
        "secure_metrics": options.secure_metrics,
        "run_dir": str(out),
        "wall_s": round(wall, 1),
        "load_1m_before": load_before,
        "load_1m_after": load_1m(),
        "rounds": per_round,
    }


# Stages only secure aggregation has; its first stage (advertise_keys) is the training stage itself.
SECURE_ONLY = ("share_keys", "masked_input", "unmask")


def harness(root: Path, rounds: int, pairs: int, secure_metrics: bool, seed: int) -> dict[str, Any]:
    """``pairs`` secure and plain harness runs of the demo configuration, alternated so that changes in
    the machine's load fall on both modes, and the ratios of their mean stage times."""
    runs: dict[str, list[dict[str, Any]]] = {"secure": [], "plain": []}
    for pair in range(1, pairs + 1):
        for mode in ("secure", "plain"):
            runs[mode].append(harness_run(root / f"{mode}-{pair}", rounds, mode == "secure", secure_metrics, seed))
    return summarize_harness(runs, rounds, seed)


def summarize_harness(runs: dict[str, list[dict[str, Any]]], rounds: int, seed: int) -> dict[str, Any]:
    """Mean stage times per mode over every round of every run, and their ratios."""

    def mean(mode: str, value: Callable[[dict[str, Any]], float]) -> float:
        return statistics.fmean(value(r) for run in runs[mode] for r in run["rounds"])

    train_s = {m: mean(m, lambda r: r["train_stage_s"]) for m in runs}
    round_s = {m: mean(m, lambda r: r["round_s"]) for m in runs}
    evaluate_s = {m: mean(m, lambda r: r["evaluate_stage_s"]) for m in runs}
    local_s = {m: mean(m, lambda r: r["phase_a_s"] + r["phase_b_s"]) for m in runs}
    secure_only = mean("secure", lambda r: sum(r["phases_s"].get(p, 0.0) for p in SECURE_ONLY))
    return {
        "configuration": f"condi harness --silos {DEMO['silos']} --per-round {DEMO['per_round']}"
        f" --profile demo --rounds {rounds} --seed {seed}"
        + (" --secure-metrics" if runs["secure"][0]["secure_metrics"] else "")
        + " / the same with --plain",
        "pairs": len(runs["secure"]),
        **runs,
        "mean_train_stage_s": train_s,
        "mean_round_s": round_s,
        "mean_evaluate_stage_s": evaluate_s,
        "mean_local_training_s": local_s,
        "mean_secure_only_stages_s": round(secure_only, 3),
        "train_stage_ratio": round(train_s["secure"] / train_s["plain"], 3),
        "round_ratio": round(round_s["secure"] / round_s["plain"], 3),
        # The plain training stage plus the stages secure aggregation adds, over the plain stage.
        "secure_only_overhead_ratio": round((train_s["plain"] + secure_only) / train_s["plain"], 3),
    }


# ---------------------------------------------------------------------------------------------
# Report


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def targets(report: Mapping[str, Any]) -> list[Target]:
    """The issue's goals against what this run measured (n/a where the run did not measure the point)."""
    ks = report["keystream"]
    proto = report.get("protocol", {})
    prim = _find(proto.get("primitives", []), n=6, length=TEN_M)
    unmask = _find(proto.get("rounds", []), n=6, length=TEN_M, dropouts=1)
    demo = report.get("bytes")
    runs = report.get("harness")

    def get(row: Mapping[str, Any] | None, key: str) -> float | None:
        return row[key] if row else None

    gbps = " GB/s"
    return [
        Target("keystream, raw AES-256-CTR, wall", ks["raw_aes_ctr_gbps"], 3.0, "min", gbps),
        Target("keystream, raw AES-256-CTR, CPU time", ks["cpu"]["raw_aes_ctr_gbps"], 3.0, "min", gbps),
        Target(
            "keystream, prg.apply_masks one stream (+ add), wall",
            ks["prg_apply_masks_one_stream_gbps"],
            3.0,
            "min",
            gbps,
        ),
        Target(
            "keystream, prg.apply_masks one stream (+ add), CPU time",
            ks["cpu"]["prg_apply_masks_one_stream_gbps"],
            3.0,
            "min",
            gbps,
        ),
        Target("quantization, 10M parameters, wall", get(prim, "quantize_s"), 0.1, "max", " s"),
        Target("quantization, 10M parameters, CPU time", get(prim, "quantize_cpu_s"), 0.1, "max", " s"),
        Target("masking, 10M parameters, n = 6, wall", get(prim, "mask_s"), 0.2, "max", " s"),
        Target("masking, 10M parameters, n = 6, CPU time", get(prim, "mask_cpu_s"), 0.2, "max", " s"),
        Target("unmasking, 10M parameters, n = 6, one dropout, wall", get(unmask, "unmask_s"), 0.5, "max", " s"),
        Target(
            "unmasking, 10M parameters, n = 6, one dropout, CPU time", get(unmask, "unmask_cpu_s"), 0.5, "max", " s"
        ),
        Target("upload bytes secure / plain (demo)", get(demo, "upload_ratio"), 1.05, "max"),
        Target(
            "training-stage time secure / plain (demo harness), measured", get(runs, "train_stage_ratio"), 1.15, "max"
        ),
        Target(
            "training-stage time, plain + secure-only stages over plain (demo harness)",
            get(runs, "secure_only_overhead_ratio"),
            1.15,
            "max",
        ),
    ]


def tables(report: Mapping[str, Any]) -> str:
    """The report as markdown tables."""
    out = []
    ks = report["keystream"]
    out.append(
        markdown_table(
            ["keystream, one core", "GB/s (wall)", "GB/s (CPU time)"],
            [
                [label, fmt(ks[key], 2), fmt(ks["cpu"][key], 2)]
                for label, key in (
                    ("raw AES-256-CTR (`update_into` a reused 256 KiB buffer)", "raw_aes_ctr_gbps"),
                    ("`prg.apply_masks`, one stream (keystream + ring add)", "prg_apply_masks_one_stream_gbps"),
                    (
                        "`prg.apply_masks`, six streams (keystream bytes + ring adds per second)",
                        "prg_apply_masks_six_streams_gbps",
                    ),
                )
            ],
        )
    )
    proto = report.get("protocol")
    if proto:
        prims = {(p["n"], p["length"]): p for p in proto["primitives"]}
        rows = []
        for r in proto["rounds"]:
            p = prims[(r["n"], r["length"])]
            rows.append(
                [
                    str(r["n"]),
                    str(r["threshold"]),
                    f"{r['length'] / 1e6:g}M",
                    str(r["dropouts"]),
                    f"{fmt(p['quantize_s'], 4)} / {fmt(p['quantize_cpu_s'], 4)}",
                    f"{fmt(p['mask_s'], 4)} / {fmt(p['mask_cpu_s'], 4)}",
                    f"{fmt(r['masked_input_s_median'], 4)} / {fmt(r['masked_input_cpu_s_median'], 4)}"
                    f" (max {fmt(r['masked_input_s_max'], 3)})",
                    fmt(r["sum_uploads_s"], 4),
                    f"{fmt(r['unmask_s'], 4)} / {fmt(r['unmask_cpu_s'], 4)} (median {fmt(r['unmask_s_median'], 3)})",
                    f"{r['max_abs_error']:.1e} <= {r['error_bound']:.1e}",
                ]
            )
        out.append(
            markdown_table(
                [
                    "n",
                    "t",
                    "params",
                    "dropouts",
                    "quantize, wall / CPU (s)",
                    "mask, n streams, wall / CPU (s)",
                    "silo `masked_input`, median wall / CPU (s)",
                    "coordinator sum of uploads (s)",
                    "coordinator unmask `finish()`, best wall / CPU (s)",
                    "sum error",
                ],
                rows,
            )
        )
    demo = report.get("bytes")
    if demo:
        keys = demo["key_share_upload_bytes"]
        down = demo["key_share_download_bytes"]
        out.append(
            markdown_table(
                ["per silo per round (demo)", "bytes"],
                [
                    ["plain update upload (UpdatePart stream)", f"{demo['plain_upload_bytes']:,}"],
                    ["masked update upload (UpdatePart stream)", f"{demo['masked_upload_bytes']:,}"],
                    ["ratio masked / plain", f"{demo['upload_ratio']:.4f}"],
                    [
                        "tensor payload alone, plain / masked (ratio)",
                        f"{demo['plain_payload_bytes']:,} / {demo['masked_payload_bytes']:,}"
                        f" ({demo['payload_ratio']:.5f})",
                    ],
                    ["AdvertiseKeysRequest", f"{keys['advertise_keys']:,}"],
                    ["ShareKeysRequest", f"{keys['share_keys']:,}"],
                    ["UnmaskRequest", f"{keys['unmask']:,}"],
                    ["ratio (masked + key/share uploads) / plain", f"{demo['upload_ratio_with_keys']:.4f}"],
                    [
                        "down: key roster / share bundle / survivors",
                        f"{down['key_roster']:,} / {down['share_bundle']:,} / {down['survivors']:,}",
                    ],
                ],
            )
        )
    runs = report.get("harness")
    if runs:
        rows = []
        for mode in ("secure", "plain"):
            for index, run in enumerate(runs[mode], start=1):
                for r in run["rounds"]:
                    phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
                    rows.append(
                        [
                            f"{mode} {index}",
                            str(r["round"]),
                            fmt(r["train_stage_s"], 2),
                            fmt(r["phase_a_s"] + r["phase_b_s"], 2),
                            fmt(r["evaluate_stage_s"], 2),
                            fmt(r["round_s"], 2),
                            phases,
                            f"{run['load_1m_before']} / {run['load_1m_after']}",
                        ]
                    )
        out.append(
            markdown_table(
                [
                    "mode",
                    "round",
                    "training stage (s)",
                    "phase A + B per silo (s)",
                    "evaluation (s)",
                    "round (s)",
                    "phases (s)",
                    "load (1 min) at start / end of run",
                ],
                rows,
            )
        )
        out.append(
            markdown_table(
                ["harness means", "secure", "plain", "ratio"],
                [
                    [
                        "training stage (s)",
                        fmt(runs["mean_train_stage_s"]["secure"], 2),
                        fmt(runs["mean_train_stage_s"]["plain"], 2),
                        fmt(runs["train_stage_ratio"]),
                    ],
                    [
                        "evaluation stage (s)",
                        fmt(runs["mean_evaluate_stage_s"]["secure"], 2),
                        fmt(runs["mean_evaluate_stage_s"]["plain"], 2),
                        fmt(runs["mean_evaluate_stage_s"]["secure"] / runs["mean_evaluate_stage_s"]["plain"]),
                    ],
                    [
                        "round, training to record (s)",
                        fmt(runs["mean_round_s"]["secure"], 2),
                        fmt(runs["mean_round_s"]["plain"], 2),
                        fmt(runs["round_ratio"]),
                    ],
                    [
                        "local training, phase A + B per silo (s)",
                        fmt(runs["mean_local_training_s"]["secure"], 2),
                        fmt(runs["mean_local_training_s"]["plain"], 2),
                        fmt(runs["mean_local_training_s"]["secure"] / runs["mean_local_training_s"]["plain"]),
                    ],
                    [
                        "stages only secure aggregation has (share keys, masked input, unmask) (s)",
                        fmt(runs["mean_secure_only_stages_s"], 2),
                        "",
                        f"{fmt(runs['secure_only_overhead_ratio'])} (plain training stage + these, over it)",
                    ],
                ],
            )
        )
    out.append(targets_table(targets(report)))
    return "\n\n".join(out)


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(v)) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small vectors, n in {3, 6}, 1 harness round")
    parser.add_argument("--ns", type=_csv_ints, default=None, help="silo counts, comma-separated (default 3,6,12,24)")
    parser.add_argument(
        "--sizes", type=_csv_ints, default=None, help="vector lengths, comma-separated (default 1e6,1e7)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best-of count for keystream and primitives")
    parser.add_argument(
        "--round-repeats", type=int, default=None, help="protocol rounds per (n, size, dropouts) (default 3)"
    )
    parser.add_argument("--harness-rounds", type=int, default=None, help="rounds per harness run (default 3)")
    parser.add_argument(
        "--harness-pairs", type=int, default=1, help="secure/plain harness run pairs, alternated (default 1)"
    )
    parser.add_argument("--skip-harness", action="store_true", help="do not run the secure/plain harness pair")
    parser.add_argument(
        "--no-secure-metrics",
        action="store_true",
        help="secure harness runs sum only the updates securely (make demo sums evaluation scores securely too)",
    )
    parser.add_argument("--seed", type=int, default=0, help="harness seed")
    parser.add_argument(
        "--runs-dir", type=Path, default=None, help="where harness runs go (default runs/secagg-<time>)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/secagg[_quick].json)"
    )
    args = parser.parse_args()
    ns = args.ns or (NS_QUICK if args.quick else NS_FULL)
    sizes = args.sizes or (SIZES_QUICK if args.quick else SIZES_FULL)
    harness_rounds = args.harness_rounds or (1 if args.quick else 3)
    round_repeats = args.round_repeats or (1 if args.quick else 3)
    out = args.out or RESULTS / ("secagg_quick.json" if args.quick else "secagg.json")
    runs_dir = args.runs_dir or Path("runs") / f"secagg-{time.strftime('%Y%m%d-%H%M%S')}"
    torch.set_num_threads(1)

    report: dict[str, Any] = {
        "command": "benchmarks/secagg.py "
        + " ".join(
            a
            for a in (
                "--quick" if args.quick else "",
                f"--ns {','.join(map(str, ns))}",
                f"--sizes {','.join(map(str, sizes))}",
                f"--repeats {args.repeats}",
                f"--round-repeats {round_repeats}",
                "--skip-harness"
                if args.skip_harness
                else f"--harness-rounds {harness_rounds} --harness-pairs {args.harness_pairs}",
                "--no-secure-metrics" if args.no_secure_metrics else "",
            )
            if a
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
    }
    report["keystream"] = keystream(args.repeats, (1 << 24) if args.quick else (1 << 28))
    print(f"keystream: {report['keystream']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["protocol"] = protocol(Path(tmp), ns, sizes, args.repeats, round_repeats)
        report["bytes"] = demo_bytes(Path(tmp))
    print(f"demo bytes: {report['bytes']}", flush=True)
    if not args.skip_harness:
        report["harness"] = harness(
            runs_dir.resolve(), harness_rounds, args.harness_pairs, not args.no_secure_metrics, args.seed
        )
    report["targets"] = [t.to_dict() for t in targets(report)]
    write_json(out, report)
    print(tables(report))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
