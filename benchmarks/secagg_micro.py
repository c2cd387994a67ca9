"""Secure-aggregation micro-benchmarks: keystream, quantization, masking and unmasking speed.

Run from the repository root:  .venv/bin/python benchmarks/secagg_micro.py [--repeats 3] [--out FILE]
Prints one JSON object (and writes it to --out when given). Every figure is the best of
``--repeats`` single-threaded wall times. Targets from the secure-aggregation issue: keystream
>= 3 GB/s per core; quantization <= 0.1 s and masking <= 0.2 s per 10M parameters at n = 6;
unmasking with one dropout <= 0.5 s at 1M parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from federation import pki
from federation.secagg.client import SecAggClient
from federation.secagg.messages import RoundAbort, RoundConfig, ShareDelivery, ca_cert_verifier
from federation.secagg.prg import BLOCK_BYTES, apply_masks
from federation.secagg.quantize import QuantConfig, quantize
from federation.secagg.server import SecAggServer

TEN_M = 10_000_000
ONE_M = 1_000_000
QUANT = QuantConfig(clip_bound=1000.0, frac_bits=16, ring_bits=32)


def best_time(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    """The smallest wall time of ``fn`` over ``repeats`` runs (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def keystream_gbps(repeats: int, total_bytes: int = 1 << 29) -> float:
    """Raw AES-256-CTR keystream into a reused buffer, in GB/s on one core."""
    zeros = bytes(BLOCK_BYTES)
    buffer = bytearray(BLOCK_BYTES + 15)

    def run() -> None:
        encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        for _ in range(total_bytes // BLOCK_BYTES):
            encryptor.update_into(zeros, buffer)

    return total_bytes / best_time(run, repeats) / 1e9


def masking(repeats: int, n_silos: int, ring_bits: int) -> dict:
    """One silo's masks at ``n_silos`` (its self mask and n - 1 pairwise masks) over 10M entries."""
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    acc = np.zeros(TEN_M, dtype=dtype)
    masks = [(os.urandom(32), 1 if i % 2 else -1) for i in range(n_silos)]
    seconds = best_time(lambda: apply_masks(acc, masks), repeats)
    mask_bytes = n_silos * acc.nbytes
    return {"seconds": round(seconds, 4), "keystream_plus_add_gbps": round(mask_bytes / seconds / 1e9, 2)}


def quantization(repeats: int, dtype: type) -> float:
    """Clip, scale and stochastically round 10M entries into the 32-bit ring."""
    x = np.random.default_rng(0).normal(0, 100, size=TEN_M).astype(dtype)
    rng = np.random.default_rng(1)
    return best_time(lambda: quantize(x, QUANT, rng), repeats)


class Federation:
    """A throwaway dev PKI with ``n_silos`` silo identities, ready to run rounds."""

    def __init__(self, root: Path, n_silos: int) -> None:
        dev = pki.dev_pki(root / f"pki-{n_silos}", n_silos)
        self.verify = ca_cert_verifier(pki.load_certificate(dev.ca.cert))
        self.ids = sorted(dev.silos)
        self.keys = {sid: pki.load_private_key(p.key) for sid, p in dev.silos.items()}
        self.certs = {sid: p.cert.read_bytes() for sid, p in dev.silos.items()}

    def to_delivery(
        self, round_id: str, length: int
    ) -> tuple[SecAggServer, dict[str, SecAggClient], dict[str, ShareDelivery]]:
        """A round run through ShareKeys by every silo: the coordinator, the silos and their deliveries."""
        config = RoundConfig(round_id, len(self.ids) // 2 + 1, length, QUANT)
        server = SecAggServer(config, self.ids, self.verify)
        clients = {
            sid: SecAggClient(
                config,
                sid,
                self.keys[sid],
                self.certs[sid],
                self.verify,
                rounding_seed=i,
                randbytes=os.urandom,
            )
            for i, sid in enumerate(self.ids)
        }
        for sid in self.ids:
            server.receive_advert(sid, clients[sid].advertise())
        roster = server.close_adverts()
        assert not isinstance(roster, RoundAbort)
        for sid in self.ids:
            server.receive_shares(sid, clients[sid].share_keys(roster))
        deliveries = server.close_shares()
        assert not isinstance(deliveries, RoundAbort)
        return server, clients, deliveries


def client_stage(repeats: int, fed: Federation) -> float:
    """One silo's whole MaskedInput stage at 10M entries: open shares, quantize, mask, serialise."""
    x = np.random.default_rng(3).normal(0, 100, size=TEN_M)
    times = []
    for rep in range(repeats):
        _, clients, deliveries = fed.to_delivery(f"stage-{rep}", TEN_M)
        sid = fed.ids[0]
        t0 = time.perf_counter()
        clients[sid].masked_input(deliveries[sid], x)
        times.append(time.perf_counter() - t0)
    return min(times)


def unmasking(repeats: int, fed: Federation) -> dict:
    """A round at 1M entries with one silo dropping after ShareKeys; times the coordinator's work."""
    n_silos = len(fed.ids)
    x = np.random.default_rng(2).uniform(-1, 1, size=ONE_M)
    dropped = fed.ids[n_silos // 2]
    sums, finishes = [], []
    for rep in range(repeats):
        server, clients, deliveries = fed.to_delivery(f"bench-{n_silos}-{rep}", ONE_M)
        for sid in fed.ids:
            if sid != dropped:
                server.receive_masked(sid, clients[sid].masked_input(deliveries[sid], x))
        t0 = time.perf_counter()
        request = server.close_masked()
        sums.append(time.perf_counter() - t0)
        assert not isinstance(request, RoundAbort)
        for sid in request.uploaded:
            server.receive_unmask(sid, clients[sid].unmask(request))
        t0 = time.perf_counter()
        result = server.finish()
        finishes.append(time.perf_counter() - t0)
        expected = (n_silos - 1) * x
        if not result.completed or np.max(np.abs(result.total - expected)) > n_silos * 2.0**-QUANT.frac_bits:
            raise RuntimeError(f"benchmark round with {n_silos} silos did not reproduce the sum")
    return {
        "n_silos": n_silos,
        "threshold": n_silos // 2 + 1,
        "sum_uploads_s": round(min(sums), 4),
        "unmask_s": round(min(finishes), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "keystream_gbps_per_core": round(keystream_gbps(args.repeats), 2),
        "quantize_10m_s": {
            "float64": round(quantization(args.repeats, np.float64), 4),
            "float32": round(quantization(args.repeats, np.float32), 4),
        },
        "masking_10m_n6": {
            "ring32": masking(args.repeats, 6, 32),
            "ring64": masking(args.repeats, 6, 64),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        feds = {n: Federation(Path(tmp), n) for n in (3, 6, 12)}
        report["client_masked_input_stage_10m_n6_s"] = round(client_stage(args.repeats, feds[6]), 4)
        report["unmask_1m_one_dropout"] = [unmasking(args.repeats, feds[n]) for n in (3, 6, 12)]
    report["targets"] = {
        "keystream_gbps_per_core": ">= 3",
        "quantize_10m_s": "<= 0.1",
        "masking_10m_n6_s": "<= 0.2",
        "unmask_1m_one_dropout_s": "<= 0.5",
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
