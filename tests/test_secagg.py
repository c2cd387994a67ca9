"""Secure aggregation: primitives, messages, and full rounds of the client/server state machines.

Rounds run entirely in process: every message crosses its protobuf form as the federation
contract moves it (``tests.helpers.through_proto``), with a real dev PKI, real X25519, ECDSA,
AES-GCM and AES-CTR.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from federation import pki
from federation import secagg_wire as sw
from federation.secagg import shamir
from federation.secagg.client import ClientStage, SecAggClient
from federation.secagg.messages import (
    CertVerifier,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    MessageError,
    ProtocolError,
    RevealedShare,
    RoundAbort,
    RoundConfig,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    ca_cert_verifier,
)
from federation.secagg.prg import apply_masks, keystream, pair_seed
from federation.secagg.quantize import (
    OverflowConfigError,
    QuantConfig,
    check_overflow_bounds,
    choose_ring_bits,
    dequantize,
    quantize,
)
from federation.secagg.server import SecAggServer, ServerStage
from tests.helpers import through_proto

N_SILOS = 6
STAGES = ("advert", "shares", "masked", "unmask")


@dataclass(frozen=True)
class Federation:
    ids: tuple[str, ...]
    keys: dict[str, ec.EllipticCurvePrivateKey]
    certs: dict[str, bytes]
    verify: CertVerifier
    root: Path


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("secagg-pki")
    dev = pki.dev_pki(root, N_SILOS)
    ca_cert = pki.load_certificate(dev.ca.cert)
    keys = {sid: pki.load_private_key(p.key) for sid, p in dev.silos.items()}
    certs = {sid: p.cert.read_bytes() for sid, p in dev.silos.items()}
    return Federation(tuple(sorted(dev.silos)), keys, certs, ca_cert_verifier(ca_cert), root)


def _config(round_id: str = "r1", threshold: int = 2, length: int = 8, ring_bits: int = 32) -> RoundConfig:
    return RoundConfig(
        round_id, threshold, length, QuantConfig(clip_bound=16.0, frac_bits=16, ring_bits=ring_bits)
    )


@dataclass
class Trace:
    server: SecAggServer
    clients: dict[str, SecAggClient]
    roster: KeyRoster | None = None
    deliveries: dict[str, ShareDelivery] = field(default_factory=dict)
    masked: dict[str, MaskedInput] = field(default_factory=dict)
    request: UnmaskRequest | None = None
    responses: dict[str, UnmaskResponse] = field(default_factory=dict)
    abort: RoundAbort | None = None


def _alive(drop: dict[str, str], sid: str, stage: str) -> bool:
    return sid not in drop or STAGES.index(drop[sid]) > STAGES.index(stage)


def _clients(fed: Federation, config: RoundConfig, ids, seed: int, randbytes=None) -> dict[str, SecAggClient]:
    source = randbytes or random.Random(seed).randbytes
    return {
        sid: SecAggClient(
            config, sid, fed.keys[sid], fed.certs[sid], fed.verify, rounding_seed=seed + i, randbytes=source
        )
        for i, sid in enumerate(ids)
    }


def run_round(
    fed: Federation,
    config: RoundConfig,
    inputs: dict[str, np.ndarray],
    drop: dict[str, str] | None = None,
    *,
    seed: int = 0,
    randbytes=None,
    stop_after: str | None = None,
) -> Trace:
    """Run one round over the silos in ``inputs``; ``drop[sid]`` is the stage whose message it never sends."""
    drop = drop or {}
    ids = sorted(inputs)
    trace = Trace(SecAggServer(config, ids, fed.verify), _clients(fed, config, ids, seed, randbytes))
    server, clients = trace.server, trace.clients
    for sid in ids:
        if _alive(drop, sid, "advert"):
            server.receive_advert(sid, through_proto(clients[sid].advertise()))
    out = server.close_adverts()
    if isinstance(out, RoundAbort):
        trace.abort = out
        return trace
    trace.roster = out
    for sid in out.silo_ids():
        if _alive(drop, sid, "shares"):
            server.receive_shares(sid, through_proto(clients[sid].share_keys(through_proto(out))))
    out = server.close_shares()
    if isinstance(out, RoundAbort):
        trace.abort = out
        return trace
    trace.deliveries = out
    if stop_after == "shares":
        return trace
    for sid, delivery in out.items():
        if _alive(drop, sid, "masked"):
            trace.masked[sid] = clients[sid].masked_input(through_proto(delivery), inputs[sid])
            server.receive_masked(sid, through_proto(trace.masked[sid]))
    out = server.close_masked()
    if isinstance(out, RoundAbort):
        trace.abort = out
        return trace
    trace.request = out
    if stop_after == "masked":
        return trace
    for sid in out.uploaded:
        if _alive(drop, sid, "unmask"):
            trace.responses[sid] = clients[sid].unmask(through_proto(out))
            server.receive_unmask(sid, through_proto(trace.responses[sid]))
    server.finish()
    return trace


def _inputs(ids, length: int, seed: int, bound: float = 10.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {sid: rng.uniform(-bound, bound, size=length) for sid in ids}


# ---------------------------------------------------------------------------------------------
# Primitives


def test_shamir_any_threshold_subset_recovers_and_fewer_fail() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5], random.Random(1).randbytes)
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4], [0, 1, 2, 3, 4]):
        assert shamir.combine([shares[i] for i in subset], 3) == secret
    with pytest.raises(shamir.ShamirError, match="need 3 shares"):
        shamir.combine(shares[:2], 3)
    # Two shares are consistent with every candidate secret: some third point completes each one.
    for candidate in (bytes(32), b"\xff" * 32):
        ys = [int.from_bytes(candidate, "big"), shares[0].y, shares[1].y]
        third = sum(y * c for y, c in zip(ys, shamir.lagrange_coefficients([0, 1, 2], at=3))) % shamir.PRIME
        assert shamir.combine([shares[0], shares[1], shamir.Share(3, third)], 3) == candidate


def test_shamir_extra_shares_detect_a_corrupted_one() -> None:
    shares = shamir.split(b"\x07" * 32, 3, [1, 2, 3, 4], random.Random(3).randbytes)
    bad = shamir.Share(shares[3].x, (shares[3].y + 1) % shamir.PRIME)
    with pytest.raises(shamir.ShamirError, match="x=4 does not lie"):
        shamir.combine([*shares[:3], bad], 3)
    with pytest.raises(shamir.ShamirError, match="same x"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)


def test_keystream_is_aes_ctr_of_zeros_read_little_endian() -> None:
    seed = bytes(range(32))
    n = (1 << 18) // 4 * 2 + 37  # spans two full blocks and a ragged tail
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    reference = np.frombuffer(encryptor.update(bytes(4 * n)), dtype="<u4")
    np.testing.assert_array_equal(keystream(seed, n, 32), reference)
    reference64 = np.frombuffer(
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 100)), dtype="<u8"
    )
    np.testing.assert_array_equal(keystream(seed, 100, 64), reference64)
    assert not np.array_equal(keystream(seed, 100, 32), keystream(bytes(32), 100, 32))


def test_masks_cancel_and_wrap_in_the_ring() -> None:
    acc = np.arange(1000, dtype=np.uint32)
    apply_masks(acc, [(b"a" * 32, 1), (b"b" * 32, 1)])
    assert not np.array_equal(acc, np.arange(1000, dtype=np.uint32))
    apply_masks(acc, [(b"b" * 32, -1), (b"a" * 32, -1)])
    np.testing.assert_array_equal(acc, np.arange(1000, dtype=np.uint32))
    with pytest.raises(ValueError, match="sign"):
        apply_masks(acc, [(b"a" * 32, 2)])


def test_pair_seed_is_symmetric_and_bound_to_the_round() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    a_pub, b_pub = a.public_key().public_bytes(*raw), b.public_key().public_bytes(*raw)
    assert pair_seed(a, b_pub, "r1", "silo-1", "silo-2") == pair_seed(b, a_pub, "r1", "silo-2", "silo-1")
    assert pair_seed(a, b_pub, "r1", "silo-1", "silo-2") != pair_seed(a, b_pub, "r2", "silo-1", "silo-2")
    assert pair_seed(a, b_pub, "r1", "silo-1", "silo-2") != pair_seed(a, b_pub, "r1", "silo-1", "silo-3")


def test_quantize_is_seeded_unbiased_and_within_one_unit() -> None:
    config = QuantConfig(clip_bound=4.0, frac_bits=8, ring_bits=32)
    x = np.random.default_rng(0).uniform(-5, 5, size=200_000)
    codes = quantize(x, config, np.random.default_rng(7))
    np.testing.assert_array_equal(codes, quantize(x, config, np.random.default_rng(7)))
    assert not np.array_equal(codes, quantize(x, config, np.random.default_rng(8)))
    back = dequantize(codes, config)
    clipped = np.clip(x, -4, 4)
    assert np.max(np.abs(back - clipped)) < 2**-8
    # Stochastic rounding is unbiased: a quarter unit rounds up a quarter of the time.
    quarter = np.full(100_000, 0.25 * 2**-8)
    up = dequantize(quantize(quarter, config, np.random.default_rng(1)), config) * 2**8
    assert set(np.unique(up)) == {0.0, 1.0}
    assert abs(up.mean() - 0.25) < 0.01
    assert quantize(x.astype(np.float32), config, np.random.default_rng(7)).dtype == np.uint32


def test_quantize_two_complement_sum_recovers_negative_totals() -> None:
    config = QuantConfig(clip_bound=100.0, frac_bits=10, ring_bits=64)
    rng = np.random.default_rng(3)
    parts = [rng.uniform(-100, 0, size=50) for _ in range(5)]
    total = np.zeros(50, dtype=np.uint64)
    for p in parts:
        np.add(total, quantize(p, config, rng), out=total)
    assert np.max(np.abs(dequantize(total, config) - np.sum(parts, axis=0))) < 5 * 2**-10


def test_quantize_refuses_non_finite_and_non_float() -> None:
    config = QuantConfig(1.0, 8)
    with pytest.raises(ValueError, match="index 2"):
        quantize(np.array([0.0, 1.0, np.nan]), config, np.random.default_rng(0))
    with pytest.raises(ValueError, match="float vector"):
        quantize(np.array([1, 2, 3]), config, np.random.default_rng(0))


def test_overflow_config_rejected_with_field_names() -> None:
    check_overflow_bounds(6, 1000.0, 16, 32, 100.0)
    with pytest.raises(OverflowConfigError) as err:
        check_overflow_bounds(6, 10000.0, 16, 32, 100.0)
    for name in ("n_silos=6", "clip_bound=10000.0", "frac_bits=16", "ring_bits=32"):
        assert name in str(err.value)
    check_overflow_bounds(6, 10000.0, 16, 64, 100.0)
    with pytest.raises(OverflowConfigError, match=r"max_weight=500\.0 exceeds clip_bound=100\.0"):
        check_overflow_bounds(3, 100.0, 8, 32, 500.0)
    with pytest.raises(OverflowConfigError, match="ring_bits must be one of"):
        check_overflow_bounds(3, 1.0, 8, 16, 1.0)
    with pytest.raises(OverflowConfigError, match="float64"):
        check_overflow_bounds(3, 2.0**40, 16, 64, 1.0)
    with pytest.raises(OverflowConfigError, match="n_silos"):
        check_overflow_bounds(0, 1.0, 8, 32, 1.0)
    assert choose_ring_bits(6, 1000.0, 16, 1.0) == 32
    assert choose_ring_bits(6, 10000.0, 16, 1.0) == 64


def test_a_rejected_config_really_wraps() -> None:
    # The bound is tight: 3 silos at the clip bound fit a 32-bit ring, the 4th that it rejects wraps.
    config = QuantConfig(clip_bound=2.0**14, frac_bits=15, ring_bits=32)
    check_overflow_bounds(3, config.clip_bound, config.frac_bits, 32, 1.0)
    with pytest.raises(OverflowConfigError, match="at most 3 silos fit"):
        check_overflow_bounds(4, config.clip_bound, config.frac_bits, 32, 1.0)
    x = np.full(4, 2.0**14)
    for n_silos, fits in ((3, True), (4, False)):
        total = np.zeros(4, dtype=np.uint32)
        for i in range(n_silos):
            np.add(total, quantize(x, config, np.random.default_rng(i)), out=total)
        assert np.allclose(dequantize(total, config), n_silos * x) == fits


# ---------------------------------------------------------------------------------------------
# Full rounds


def test_round_without_dropouts_gives_the_sum(fed: Federation) -> None:
    ids = fed.ids[:4]
    inputs = _inputs(ids, 50, seed=1)
    trace = run_round(fed, _config(threshold=3, length=50), inputs, seed=1)
    result = trace.server.result
    assert result is not None and result.completed
    assert result.uploaded == tuple(ids) and result.dropped == ()
    np.testing.assert_allclose(result.total, sum(inputs.values()), atol=4 * 2**-16)
    assert all(c.stage is ClientStage.DONE for c in trace.clients.values())
    assert trace.server.stage is ServerStage.DONE


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 6),
    extra_t=st.integers(0, 2),
    length=st.integers(1, 40),
    ring_bits=st.sampled_from([32, 64]),
    drops=st.lists(st.sampled_from(("advert", "shares", "masked", "unmask", None)), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_sum_survives_any_dropouts_or_aborts(
    fed: Federation, n: int, extra_t: int, length: int, ring_bits: int, drops: list, seed: int
) -> None:
    ids = fed.ids[:n]
    t = min(n // 2 + 1 + extra_t, n)
    drop = {sid: stage for sid, stage in zip(ids, drops) if stage is not None}
    # Weighted updates and, at the end, per-group weights: the layout silos really send.
    rng = np.random.default_rng(seed)
    inputs = {
        sid: np.concatenate([rng.uniform(-15, 15, size=length), rng.integers(0, 16, size=2).astype(float)])
        for sid in ids
    }
    trace = run_round(fed, _config("prop", t, length + 2, ring_bits), inputs, drop, seed=seed)
    u1 = [s for s in ids if _alive(drop, s, "advert")]
    u2 = [s for s in u1 if _alive(drop, s, "shares")]
    u3 = [s for s in u2 if _alive(drop, s, "masked")]
    u4 = [s for s in u3 if _alive(drop, s, "unmask")]
    result = trace.server.result
    assert result is not None
    if min(len(u1), len(u2), len(u3), len(u4)) < t:
        assert not result.completed and result.total is None
        assert trace.server.stage is ServerStage.ABORTED
        if len(u3) < t:
            assert trace.request is None and not trace.responses
        return
    assert result.completed
    assert result.uploaded == tuple(u3)
    assert result.dropped == tuple(s for s in u2 if s not in u3)
    expected = sum(inputs[s] for s in u3)
    assert np.all(np.abs(result.total - expected) <= len(u3) * 2**-16)


@pytest.mark.parametrize("stage", STAGES)
def test_fewer_than_t_survivors_abort_and_reveal_nothing(fed: Federation, stage: str) -> None:
    ids = fed.ids[:5]
    drop = {ids[0]: stage, ids[1]: stage, ids[2]: stage}
    trace = run_round(fed, _config(threshold=3, length=6), _inputs(ids, 6, seed=2), drop)
    result = trace.server.result
    assert result is not None and not result.completed and result.total is None
    assert "fewer than the threshold t=3" in (result.reason or "")
    if stage != "unmask":
        # No unmask request ever left the coordinator, so no silo revealed a single share.
        assert trace.request is None and trace.abort is not None
        assert all(c.stage is not ClientStage.DONE for c in trace.clients.values())
    for client in trace.clients.values():
        client.abort(RoundAbort("r1", "test", "abort"))
        assert client.stage is ClientStage.ABORTED
    with pytest.raises(ProtocolError):
        trace.server.receive_advert(ids[0], trace.clients[ids[0]].advertise())


def test_masked_upload_is_indistinguishable_from_uniform(fed: Federation) -> None:
    ids = fed.ids[:3]
    length = 1 << 15
    # A structured input: small values, mostly zeros; its plain encoding is far from uniform.
    x = np.zeros(length)
    x[::7] = 1.5
    inputs = {sid: x for sid in ids}
    trace = run_round(fed, _config(threshold=2, length=length), inputs, seed=5, stop_after="masked")
    upload = trace.masked[ids[0]].values()
    plain = quantize(x, _config().quant, np.random.default_rng(0))

    def ks_p(values: np.ndarray) -> float:
        return stats.kstest(values.astype(np.float64) / 2**32, "uniform").pvalue

    def byte_chi2_p(values: np.ndarray) -> float:
        counts = np.bincount(values.view(np.uint8), minlength=256)
        return stats.chisquare(counts).pvalue

    assert ks_p(upload) > 1e-3 and byte_chi2_p(upload) > 1e-3
    assert ks_p(plain) < 1e-12 and byte_chi2_p(plain) < 1e-12
    bits = np.unpackbits(upload.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.02)
    # The coordinator legitimately learns every uploader's self-mask seed; the pairwise masks
    # still hide the upload from it.
    assert trace.request is not None
    responses = [trace.clients[s].unmask(trace.request) for s in ids]
    seed = shamir.combine(
        [next(r.share for r in resp.seed_shares if r.peer == ids[0]) for resp in responses], 2
    )
    without_self_mask = upload - keystream(seed, length, 32)
    assert ks_p(without_self_mask) > 1e-3 and byte_chi2_p(without_self_mask) > 1e-3
    assert not np.array_equal(without_self_mask, plain)


# ---------------------------------------------------------------------------------------------
# Refusals


def _masked_trace(fed: Federation, n: int = 4, t: int = 3, drop: dict | None = None) -> Trace:
    ids = fed.ids[:n]
    return run_round(fed, _config(threshold=t, length=4), _inputs(ids, 4, 3), drop, stop_after="masked")


def test_client_refuses_a_request_for_both_shares_of_one_peer(fed: Federation) -> None:
    trace = _masked_trace(fed)
    ids = fed.ids[:4]
    victim, asked = trace.clients[ids[0]], ids[3]
    request = UnmaskRequest("r1", tuple(ids), (asked,))
    with pytest.raises(ProtocolError, match=r"both uploaded and dropped"):
        victim.unmask(request)
    assert victim.stage is ClientStage.ABORTED
    with pytest.raises(ProtocolError, match="aborted"):
        victim.unmask(trace.request)


@pytest.mark.parametrize(
    ("uploaded", "dropped", "match"),
    [
        ((0, 1, 2), (), "does not account for"),
        ((0, 1, 2, 3, 4), (), "never received"),
        ((0, 1), (2, 3), "fewer than the threshold"),
    ],
)
def test_client_refuses_inconsistent_unmask_requests(
    fed: Federation, uploaded: tuple[int, ...], dropped: tuple[int, ...], match: str
) -> None:
    trace = _masked_trace(fed)
    ids = fed.ids
    request = UnmaskRequest("r1", tuple(ids[i] for i in uploaded), tuple(ids[i] for i in dropped))
    with pytest.raises(ProtocolError, match=match):
        trace.clients[ids[0]].unmask(request)


def test_client_refuses_a_threshold_that_is_no_majority_of_the_roster(fed: Federation) -> None:
    ids = fed.ids[:4]
    clients = _clients(fed, _config(threshold=2), ids, seed=0)
    roster = KeyRoster("r1", tuple(c.advertise() for c in clients.values()))
    with pytest.raises(ProtocolError, match="t=2 is not a strict majority of the 4"):
        clients[ids[0]].share_keys(roster)
    lone = _clients(fed, _config(threshold=2), ids[:1], seed=0)[ids[0]]
    with pytest.raises(ProtocolError, match="roster has 1 silos; this site sums with at least 2"):
        lone.share_keys(KeyRoster("r1", (lone.advertise(),)))


def test_client_refuses_a_roster_smaller_than_its_sites_policy(fed: Federation) -> None:
    ids = fed.ids[:3]
    config = _config(threshold=2)
    strict = SecAggClient(config, ids[0], fed.keys[ids[0]], fed.certs[ids[0]], fed.verify, rounding_seed=0,
                          min_roster=3)
    others = _clients(fed, config, ids[1:2], seed=1)
    # Selected with three, left with two after advertising: t = 2 is still a majority, but this
    # site's policy sums with no fewer than three.
    roster = KeyRoster("r1", (strict.advertise(), *(c.advertise() for c in others.values())))
    with pytest.raises(ProtocolError, match="roster has 2 silos; this site sums with at least 3"):
        strict.share_keys(roster)
    assert others[ids[1]].share_keys(roster).sender == ids[1]


def test_client_answers_one_unmask_request_only(fed: Federation) -> None:
    trace = _masked_trace(fed)
    ids = fed.ids[:4]
    client = trace.clients[ids[0]]
    assert trace.request is not None
    first = client.unmask(trace.request)
    assert client.unmask(through_proto(trace.request)) == first  # a retry gets the same answer
    other = UnmaskRequest("r1", tuple(ids[:3]), (ids[3],))
    with pytest.raises(ProtocolError, match="second, different UnmaskRequest"):
        client.unmask(other)


def test_equivocating_server_cannot_get_both_secrets(fed: Federation) -> None:
    # Telling half the silos that ids[3] uploaded and the other half that it dropped: with t a
    # strict majority, neither half reaches t shares of the secret it was meant to expose.
    trace = _masked_trace(fed, n=4, t=3)
    ids = fed.ids[:4]
    said_uploaded = UnmaskRequest("r1", tuple(ids), ())
    said_dropped = UnmaskRequest("r1", tuple(ids[:3]), (ids[3],))
    seeds = [trace.clients[s].unmask(said_uploaded) for s in ids[:2]]
    keys = [trace.clients[s].unmask(said_dropped) for s in ids[2:]]
    seed_shares = [next(r.share for r in resp.seed_shares if r.peer == ids[3]) for resp in seeds]
    key_shares = [next(r.share for r in resp.key_shares if r.peer == ids[3]) for resp in keys]
    with pytest.raises(shamir.ShamirError):
        shamir.combine(seed_shares, 3)
    with pytest.raises(shamir.ShamirError):
        shamir.combine(key_shares, 3)


def test_keys_and_masks_are_fresh_every_round(fed: Federation) -> None:
    ids = fed.ids[:3]
    inputs = _inputs(ids, 16, seed=4)
    rounds = [run_round(fed, _config(f"r{k}", 2, 16), inputs, seed=9, randbytes=os.urandom) for k in (1, 2)]
    first, second = (r.roster for r in rounds)
    assert first is not None and second is not None
    keys1 = {k for a in first.adverts for k in (a.c_public, a.s_public)}
    keys2 = {k for a in second.adverts for k in (a.c_public, a.s_public)}
    assert len(keys1) == 6 and not keys1 & keys2
    for sid in ids:
        assert rounds[0].masked[sid].data != rounds[1].masked[sid].data
    np.testing.assert_allclose(rounds[0].server.result.total, rounds[1].server.result.total, atol=3 * 2**-16)


def _roster_with(roster: KeyRoster, index: int, **changes: object) -> KeyRoster:
    adverts = list(roster.adverts)
    adverts[index] = dataclasses.replace(adverts[index], **changes)
    return KeyRoster(roster.round_id, tuple(adverts))


def test_substituted_public_key_fails_the_signature_check(fed: Federation) -> None:
    ids = fed.ids[:3]
    config = _config()
    clients = _clients(fed, config, ids, seed=0)
    adverts = [c.advertise() for c in clients.values()]
    roster = KeyRoster("r1", tuple(adverts))
    attacker = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    forged = _roster_with(roster, 1, s_public=attacker)
    with pytest.raises(ProtocolError, match="signature does not match"):
        clients[ids[0]].share_keys(forged)
    assert clients[ids[0]].stage is ClientStage.ABORTED
    server = SecAggServer(config, ids, fed.verify)
    with pytest.raises(ProtocolError, match="signature does not match"):
        server.receive_advert(ids[1], dataclasses.replace(adverts[1], c_public=attacker))
    # The right signature under another silo's certificate does not pass either.
    with pytest.raises(ProtocolError, match="certificate belongs to silo"):
        clients[ids[1]].share_keys(_roster_with(roster, 2, cert_pem=fed.certs[ids[0]]))


def test_certificate_from_another_ca_is_refused(fed: Federation, tmp_path: Path) -> None:
    rogue = pki.dev_pki(tmp_path / "rogue", 1, silo_ids=[fed.ids[1]])
    rogue_key = pki.load_private_key(rogue.silos[fed.ids[1]].key)
    rogue_cert = rogue.silos[fed.ids[1]].cert.read_bytes()
    ids = fed.ids[:3]
    clients = _clients(fed, _config(), ids, seed=0)
    adverts = [c.advertise() for c in clients.values()]
    fake = KeyAdvert.signed("r1", ids[1], adverts[1].c_public, adverts[1].s_public, rogue_cert, rogue_key)
    roster = KeyRoster("r1", (adverts[0], fake, adverts[2]))
    with pytest.raises(ProtocolError, match=r"certificate rejected: .*not issued by this CA"):
        clients[ids[0]].share_keys(roster)


def test_tampered_encrypted_share_fails_aes_gcm(fed: Federation) -> None:
    ids = fed.ids[:3]
    # A round up to share delivery, then one ciphertext bit flipped.
    trace = run_round(fed, _config(threshold=2, length=4), _inputs(ids, 4, 3), stop_after="shares")
    delivery = trace.deliveries[ids[0]]
    item = delivery.shares[0]
    flipped = bytes([item.ciphertext[0] ^ 1]) + item.ciphertext[1:]
    bad = ShareDelivery("r1", ids[0], (dataclasses.replace(item, ciphertext=flipped), *delivery.shares[1:]))
    client = trace.clients[ids[0]]
    with pytest.raises(ProtocolError, match="fail AES-GCM authentication"):
        client.masked_input(bad, np.zeros(4))
    assert client.stage is ClientStage.ABORTED
    # Reflecting a silo's own share back to it as if its peer had sent it fails too: both
    # directions of a pair agree the same X25519 secret, but the direction is bound into the key.
    reflected = next(s for s in trace.deliveries[ids[1]].shares if s.sender == ids[2])
    reflected = dataclasses.replace(reflected, sender=ids[1], recipient=ids[2])
    rest = tuple(s for s in trace.deliveries[ids[2]].shares if s.sender != ids[1])
    with pytest.raises(ProtocolError, match="fail AES-GCM authentication"):
        trace.clients[ids[2]].masked_input(ShareDelivery("r1", ids[2], (reflected, *rest)), np.zeros(4))


def test_client_refuses_a_delivery_from_fewer_than_t_silos(fed: Federation) -> None:
    ids = fed.ids[:4]
    trace = run_round(fed, _config(threshold=3, length=4), _inputs(ids, 4, 3), stop_after="shares")
    delivery = trace.deliveries[ids[0]]
    thin = ShareDelivery("r1", ids[0], delivery.shares[:1])
    with pytest.raises(ProtocolError, match="only 2 silos shared keys, fewer than the threshold t=3"):
        trace.clients[ids[0]].masked_input(thin, np.zeros(4))


def test_replay_from_another_round_is_refused(fed: Federation) -> None:
    ids = fed.ids[:3]
    old = run_round(fed, _config("r1", 2, 4), _inputs(ids, 4, 1), stop_after="shares")
    assert old.roster is not None
    config = _config("r2", 2, 4)
    clients = _clients(fed, config, ids, seed=1)
    for c in clients.values():
        c.advertise()
    with pytest.raises(ProtocolError, match="belongs to round 'r1'"):
        clients[ids[0]].share_keys(old.roster)
    assert clients[ids[0]].stage is ClientStage.ADVERTISED  # refused, not derailed
    # Relabelling an old advert with the new round id breaks its signature.
    fresh = [c.advertise() for c in clients.values() if c.silo_id != ids[1]]
    stale = dataclasses.replace(old.roster.adverts[1], round_id="r2")
    relabelled = KeyRoster("r2", tuple(sorted([*fresh, stale], key=lambda a: a.silo_id)))
    with pytest.raises(ProtocolError, match="signature does not match"):
        clients[ids[0]].share_keys(relabelled)
    server = SecAggServer(config, ids, fed.verify)
    with pytest.raises(ProtocolError, match="belongs to round 'r1'"):
        server.receive_advert(ids[1], old.roster.adverts[1])


def test_server_checks_identity_stage_and_duplicates(fed: Federation) -> None:
    ids = fed.ids[:4]
    config = _config(threshold=3)
    server = SecAggServer(config, ids[:3], fed.verify)
    clients = _clients(fed, config, ids, seed=0)
    advert = clients[ids[0]].advertise()
    with pytest.raises(ProtocolError, match="claims to come from"):
        server.receive_advert(ids[1], advert)
    with pytest.raises(ProtocolError, match="was not selected"):
        server.receive_advert(ids[3], clients[ids[3]].advertise())
    server.receive_advert(ids[0], advert)
    server.receive_advert(ids[0], advert)  # an idempotent retry
    assert server.pending() == ids[1:3]
    with pytest.raises(ProtocolError, match="arrived while collecting adverts"):
        server.receive_masked(ids[0], MaskedInput("r1", ids[0], 32, bytes(32)))
    with pytest.raises(ValueError, match="more than half"):
        SecAggServer(_config(threshold=2), ids, fed.verify)


def test_server_aborts_on_inconsistent_unmask_shares(fed: Federation) -> None:
    ids = fed.ids[:4]
    trace = _masked_trace(fed, n=4, t=3)
    server, request = trace.server, trace.request
    assert request is not None
    for sid in ids[:3]:
        server.receive_unmask(sid, trace.clients[sid].unmask(request))
    honest = trace.clients[ids[3]].unmask(request)
    first = honest.seed_shares[0]
    bent = RevealedShare(first.peer, shamir.Share(first.share.x, (first.share.y + 1) % shamir.PRIME))
    server.receive_unmask(ids[3], dataclasses.replace(honest, seed_shares=(bent, *honest.seed_shares[1:])))
    result = server.finish()
    assert not result.completed and "inconsistent" in (result.reason or "")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("ring_bits", [32, 64])
def test_one_or_two_dropouts_at_each_stage(fed: Federation, stage: str, ring_bits: int) -> None:
    ids = fed.ids[:5]
    inputs = _inputs(ids, 30, seed=6)
    drop = {ids[1]: stage, ids[3]: stage}
    result = run_round(fed, _config(threshold=3, length=30, ring_bits=ring_bits), inputs, drop).server.result
    assert result is not None and result.completed
    survivors = [s for s in ids if s not in drop or stage == "unmask"]
    assert result.uploaded == tuple(survivors)
    assert result.dropped == ((ids[1], ids[3]) if stage == "masked" else ())
    np.testing.assert_allclose(result.total, sum(inputs[s] for s in survivors), atol=5 * 2**-16)


# ---------------------------------------------------------------------------------------------
# Messages on the federation contract


def test_every_message_round_trips_through_its_proto_form(fed: Federation) -> None:
    ids = fed.ids[:4]
    trace = _masked_trace(fed, n=4, t=3, drop={ids[3]: "masked"})
    assert trace.roster is not None and trace.request is not None
    response = trace.clients[ids[0]].unmask(trace.request)
    shares = trace.clients[ids[0]].share_keys(trace.roster)
    messages = [trace.roster.adverts[0], trace.roster, shares, *trace.deliveries.values(), response]
    for msg in messages:
        assert through_proto(msg) == msg
    # The unmask request is rebuilt from the survivors and what the silo holds shares of.
    for sid, delivery in trace.deliveries.items():
        survivors = sw.unmask_request_to_proto(trace.request)
        assert sw.unmask_request_from_proto(trace.request.round_id, survivors, delivery) == trace.request, sid


def test_invalid_fields_are_rejected_clearly(fed: Federation) -> None:
    advert = _clients(fed, _config(), fed.ids[:1], seed=0)[fed.ids[0]].advertise()
    with pytest.raises(MessageError, match="c_public: expected 32 bytes"):
        dataclasses.replace(advert, c_public=b"short")
    with pytest.raises(MessageError, match="signature: at most 80 bytes allowed, got 81"):
        dataclasses.replace(advert, signature=bytes(81))
    with pytest.raises(MessageError, match="round_id must be"):
        dataclasses.replace(advert, round_id="round 1")
    with pytest.raises(MessageError, match="silo id must match"):
        UnmaskRequest("r1", ("Silo 1",), ())
    many = tuple(f"silo-{i}" for i in range(shamir.MAX_SHARES + 1))
    with pytest.raises(MessageError, match=rf"UnmaskRequest\.dropped: at most {shamir.MAX_SHARES} silo ids allowed"):
        UnmaskRequest("r1", (), many)
    with pytest.raises(MessageError, match="32-bit words"):
        MaskedInput("r1", "silo-1", 32, b"abc")
    with pytest.raises(MessageError, match="both shares revealed"):
        share = RevealedShare("silo-1", shamir.Share(1, 5))
        UnmaskResponse("r1", "silo-2", (share,), (share,))
    with pytest.raises(MessageError, match=r"RoundAbort\.stage: at most 4096 bytes allowed"):
        RoundAbort("r1", "x" * 4097, "too long a stage name")


def test_cert_verifier_rejects_non_pem(fed: Federation) -> None:
    with pytest.raises(ProtocolError, match="not a PEM"):
        fed.verify(b"not a certificate")
    assert fed.verify(fed.certs[fed.ids[0]]) == fed.ids[0]
    cert = x509.load_pem_x509_certificate(fed.certs[fed.ids[0]])
    assert pki.silo_id_from_certificate(cert) == fed.ids[0]
