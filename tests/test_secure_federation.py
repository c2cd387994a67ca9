"""Secure aggregation as the federation uses it: silo vectors from real updates, sums back to FedAvg.

Rounds run the real protocol state machines (X25519, ECDSA certificates from a dev PKI, AES-GCM,
AES-CTR masks) in process; the coordinator side only ever touches masked vectors and the sum.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest

from condi_models.aggregation import ParameterGroups, SecureLayout, SiloUpdate, fedavg
from condi_models.configfile import ConfigError, parse_config
from coordinator.config import FederationConfig, load_federation_config
from coordinator.rounds import Aggregate, Phase, Retry, RoundMachine, RoundPlan, RoundProgress, SecurePlan
from federation import pki
from federation import secagg_wire as sw
from federation.identity import RevocationList
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg import (
    IdentityError,
    KeyRoster,
    MessageError,
    ProtocolError,
    QuantConfig,
    RoundAbort,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    ca_cert_verifier,
    pinned_cert_verifier,
)
from federation.secagg.messages import MAX_CERT_BYTES, MAX_SIGNATURE_BYTES
from federation.secagg.shamir import MAX_SHARES
from federation.transfer import stage_key, stage_ref
from tests.helpers import secagg_identities, submission_digest, through_proto

GROUPS = ParameterGroups({"theta": "all", "w_mod": ("modality/0", "modality/1"), "stem": "modality/1"})
SHAPES = {"theta": (4, 3), "w_mod": (2, 5), "stem": (6,)}
STAGES = ("advert", "shares", "masked", "unmask")
N = 5


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory):
    return secagg_identities(tmp_path_factory.mktemp("pki"), N)


def _world(seed: int):
    rng = np.random.default_rng(seed)
    global_params = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    updates = {}
    for i in range(N):
        params = {n: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32) for n, v in global_params.items()}
        # Silo 0 never observes modality 1: its rows and the stem must not move because of it.
        weights = {"all": float(rng.integers(20, 400)), "modality/0": float(rng.integers(1, 300))}
        weights["modality/1"] = 0.0 if i == 0 else float(rng.integers(1, 300))
        updates[f"silo-{i + 1}"] = SiloUpdate(params, weights)
    return global_params, updates


def _secure_round(silos, layout, global_params, updates, drop, threshold=3, seed=0):
    """One secure round, every message across the federation contract; returns the new global state,
    or the abort notice."""
    verify, keys, certs = silos
    ids = sorted(updates)
    config = RoundConfig("r7-a0", threshold, layout.vector_length, QuantConfig(layout.clip_bound, 24, 32))
    source = random.Random(seed).randbytes
    clients = {
        s: SecAggClient(config, s, keys[s], certs[s], verify, rounding_seed=seed + i, randbytes=source)
        for i, s in enumerate(ids)
    }
    server = SecAggServer(config, ids, verify)

    def alive(s: str, stage: str) -> bool:
        return s not in drop or STAGES.index(drop[s]) > STAGES.index(stage)

    for s in ids:
        if alive(s, "advert"):
            server.receive_advert(s, through_proto(clients[s].advertise()))
    roster = server.close_adverts()
    if isinstance(roster, RoundAbort):
        return roster
    assert isinstance(roster, KeyRoster)
    for s in roster.silo_ids():
        if alive(s, "shares"):
            server.receive_shares(s, through_proto(clients[s].share_keys(through_proto(roster))))
    deliveries = server.close_shares()
    if isinstance(deliveries, RoundAbort):
        return deliveries
    for s, delivery in deliveries.items():
        if alive(s, "masked"):
            vector = layout.contribution(global_params, updates[s]).vector
            server.receive_masked(s, through_proto(clients[s].masked_input(through_proto(delivery), vector)))
    request = server.close_masked()
    if isinstance(request, RoundAbort):
        return request
    for s in request.uploaded:
        if alive(s, "unmask"):
            server.receive_unmask(s, through_proto(clients[s].unmask(through_proto(request))))
    result = server.finish()
    if not result.completed:
        return result
    return layout.average(global_params, result.total), request.uploaded


def _layout() -> SecureLayout:
    return SecureLayout(GROUPS, SHAPES, clip_bound=1.0, weight_unit=1000.0)


def _check_matches_fedavg(new, global_params, updates, uploaded, layout) -> None:
    expected = fedavg(
        global_params,
        [SiloUpdate(updates[s].params, layout.ring_weights(updates[s].weights)) for s in uploaded],
        GROUPS,
    )
    for name in SHAPES:
        assert new[name].dtype == global_params[name].dtype
        np.testing.assert_allclose(new[name], expected[name], atol=1e-4)


@pytest.mark.parametrize("drop_stage", [None, *STAGES])
def test_secure_round_gives_fedavg_of_the_uploaders(silos, drop_stage) -> None:
    layout = _layout()
    global_params, updates = _world(1)
    drop = {} if drop_stage is None else {"silo-3": drop_stage}
    out = _secure_round(silos, layout, global_params, updates, drop)
    new, uploaded = out
    # A silo that dropped before its masked vector arrived is left out of the average; one that
    # dropped only at unmasking is still in it (its vector is in the sum).
    assert ("silo-3" in uploaded) == (drop_stage in (None, "unmask"))
    _check_matches_fedavg(new, global_params, updates, uploaded, layout)
    # Silo 1 has no modality-1 weight: a modality-1 row moves only by the others' deltas.
    assert not np.allclose(new["theta"], global_params["theta"])


def test_group_nobody_trained_keeps_its_global_value(silos) -> None:
    layout = _layout()
    global_params, updates = _world(2)
    for s, u in updates.items():
        updates[s] = SiloUpdate(u.params, {**u.weights, "modality/1": 0.0})
    new, _ = _secure_round(silos, layout, global_params, updates, {})
    np.testing.assert_array_equal(new["stem"], global_params["stem"])
    np.testing.assert_array_equal(new["w_mod"][1], global_params["w_mod"][1])
    assert not np.array_equal(new["w_mod"][0], global_params["w_mod"][0])


def test_fewer_than_threshold_survivors_abort_and_reveal_nothing(silos) -> None:
    layout = _layout()
    global_params, updates = _world(3)
    for stage in STAGES:
        drop = {"silo-1": stage, "silo-2": stage, "silo-4": stage}
        out = _secure_round(silos, layout, global_params, updates, drop, threshold=3)
        if isinstance(out, RoundAbort):
            assert "3" in out.reason
        else:
            assert not out.completed and out.total is None, stage


def test_clipping_is_counted_and_bounds_every_entry() -> None:
    layout = _layout()
    global_params, updates = _world(4)
    u = updates["silo-2"]
    big = {**u.params, "stem": global_params["stem"] + np.array([5, -5, 0, 0, 0, 0], dtype=np.float32)}
    c = layout.contribution(global_params, SiloUpdate(big, {**u.weights, "all": 5000.0}))
    assert c.clipped == 2
    assert c.vector.shape == (layout.vector_length,) and np.max(np.abs(c.vector)) <= 1.0
    assert c.vector[-3] == 1.0  # the "all" weight is capped at one weight unit
    with pytest.raises(ValueError, match="non-finite"):
        layout.contribution(global_params, SiloUpdate({**u.params, "stem": np.full(6, np.nan)}, u.weights))


def test_federation_config_secure_by_default_and_checks_overflow(tmp_path: Path, caplog) -> None:
    base = {"name": "f", "silos": ["a", "b", "c"], "silos_per_round": 3}
    cfg = parse_config(base, FederationConfig, "x")
    assert cfg.secure and cfg.aggregation.threshold_for(3) == 2 and cfg.aggregation.resolved_ring_bits(3) == 32
    two = parse_config({**base, "aggregation": {"threshold": 2}}, FederationConfig, "x")
    assert two.aggregation.threshold_for(3) == 2
    for bad, key in (
        ({"frac_bits": 31, "ring_bits": 32}, "aggregation.clip_bound/frac_bits/ring_bits"),
        ({"threshold": 1}, "aggregation.threshold"),
        ({"threshold": 0.5}, "aggregation.threshold"),
        ({"frac_bits": 8}, "aggregation.frac_bits"),
        ({"mode": "plain", "secure_metrics": True}, "aggregation.secure_metrics"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config({**base, "aggregation": bad}, FederationConfig, "x")
    path = tmp_path / "fed.yaml"
    path.write_text("name: f\nsilos: [a, b]\nsilos_per_round: 2\naggregation: {mode: plain}\n")
    with caplog.at_level(logging.WARNING, logger="coordinator.config"):
        cfg = load_federation_config(path)
    assert not cfg.secure and "sees every silo's individual update" in caplog.text
    with pytest.raises(ConfigError, match="silos_per_round >= 2"):
        parse_config({"name": "f", "silos": ["a"], "silos_per_round": 1, "min_silos": 1,
                      "aggregation": {"mode": "secure"}}, FederationConfig, "x")


# ---------------------------------------------------------------------------------------------
# The coordinator's round machine driving the protocol (no sockets; messages cross the proto form)


def _machine(silos, layout: SecureLayout, threshold: int = 3, max_attempts: int = 3):

    verify, _, _ = silos
    secure = SecurePlan(lambda n: min(n, threshold), 10.0, QuantConfig(1.0, 24, 32), verify, 1000.0)
    plan = RoundPlan(
        allowed=tuple(f"silo-{i + 1}" for i in range(N)), rounds=1, silos_per_round=N, min_silos=2,
        max_attempts=max_attempts, seed=0, gather_s=5.0, train_s=10.0, evaluate_s=10.0, liveness_s=1000.0,
        secure=secure,
    )
    machine = RoundMachine(plan, "run-1", RoundProgress.start(0, statistics=False), "sha", 0.0)
    machine.vector_length = layout.vector_length
    for sid in plan.allowed:
        machine.join(sid, 0.0)
    return machine


def _drive_attempt(
    machine, silos, layout, global_params, updates, drop: dict[str, str], now: float, *, rejoin=(), step=11.0
):
    """Run one attempt through the machine; a silo in ``drop`` never answers from that stage on.

    A dropped silo in ``rejoin`` joins again when it drops (a restarted process); ``step`` is how
    far the clock moves after each stage (past the 10 s deadline by default).
    """

    _, keys, certs = silos
    effects = machine.tick(now)
    assert machine.phase == Phase.ADVERTISE, effects
    clients: dict[str, SecAggClient] = {}
    deliveries = {}
    order = {Phase.ADVERTISE: "advert", Phase.SHARE: "shares", Phase.MASKED: "masked", Phase.UNMASK: "unmask"}
    while machine.phase in order:
        stage = order[machine.phase]
        for sid in machine.plan.allowed:
            view = machine.task_for(sid, now)
            if view.key.stage in (pb.STAGE_WAIT,) or (sid in drop and STAGES.index(drop[sid]) <= STAGES.index(stage)):
                if sid in rejoin and drop[sid] == stage:
                    machine.join(sid, now)
                continue
            key = stage_key(stage_ref(view.key))
            rid = view.round_id
            if view.key.stage == pb.STAGE_ADVERTISE_KEYS:
                config = machine.secure_config
                clients[sid] = SecAggClient(config, sid, keys[sid], certs[sid], silos[0], rounding_seed=1)
                msg = sw.advert_from_proto(rid, sid, sw.advert_to_proto(stage_ref(view.key), clients[sid].advertise()))
            elif view.key.stage == pb.STAGE_SHARE_KEYS:
                roster = sw.roster_from_proto(rid, sw.roster_to_proto(view.stage_input))
                out = sw.share_keys_to_proto(clients[sid].share_keys(roster))
                msg = sw.share_keys_from_proto(rid, sid, out)
            elif view.key.stage == pb.STAGE_MASKED_INPUT:
                deliveries[sid] = sw.delivery_from_proto(rid, sid, sw.delivery_to_proto(view.stage_input))
                vector = layout.contribution(global_params, updates[sid]).vector
                msg = clients[sid].masked_input(deliveries[sid], vector)
            else:
                survivors = sw.unmask_request_to_proto(view.stage_input)
                request = sw.unmask_request_from_proto(rid, survivors, deliveries[sid])
                out = sw.unmask_response_to_proto(clients[sid].unmask(request))
                msg = sw.unmask_response_from_proto(rid, sid, out)
            digest = submission_digest(msg)
            assert machine.accept_secure(sid, key, digest, msg, {"clipped": 0}) is False
            assert machine.accept_secure(sid, key, digest, msg) is True
        now += step  # past the stage deadline by default: the dropped silos are waited for no longer
        effects = machine.tick(now)
    return effects, now


@pytest.mark.parametrize("drop_stage", STAGES)
def test_round_machine_secure_round_matches_fedavg(silos, drop_stage) -> None:

    layout = _layout()
    global_params, updates = _world(5)
    machine = _machine(silos, layout)
    effects, _ = _drive_attempt(machine, silos, layout, global_params, updates, {"silo-2": drop_stage}, 0.0)
    assert machine.phase == Phase.AGGREGATE
    (agg,) = effects
    assert isinstance(agg, Aggregate) and agg.total is not None
    uploaded = tuple(sorted(agg.updates))
    assert ("silo-2" in uploaded) == (drop_stage == "unmask")
    assert agg.selected == machine.plan.allowed
    _check_matches_fedavg(layout.average(global_params, agg.total), global_params, updates, uploaded, layout)


@pytest.mark.parametrize("drop_stage", ["shares", "masked", "unmask"])
def test_a_member_restarted_mid_attempt_is_not_waited_for_until_the_deadline(silos, drop_stage) -> None:
    layout = _layout()
    global_params, updates = _world(5)
    machine = _machine(silos, layout)
    # silo-2's process restarts in the middle of the attempt: it is connected again but holds none
    # of the attempt's keys. The clock moves 1 s a stage, far from the 10 s deadline.
    drop = {"silo-2": drop_stage}
    effects, now = _drive_attempt(
        machine, silos, layout, global_params, updates, drop, 0.0, rejoin=("silo-2",), step=1.0
    )
    assert machine.phase == Phase.AGGREGATE and now <= 4.0
    (agg,) = effects
    assert ("silo-2" in agg.updates) == (drop_stage == "unmask")
    _check_matches_fedavg(layout.average(global_params, agg.total), global_params, updates, tuple(sorted(agg.updates)),
                          layout)


def test_round_machine_too_few_survivors_retry_with_fresh_round_id(silos) -> None:

    layout = _layout()
    global_params, updates = _world(6)
    machine = _machine(silos, layout)
    drop = {"silo-1": "masked", "silo-3": "masked", "silo-5": "unmask"}
    effects, now = _drive_attempt(machine, silos, layout, global_params, updates, drop, 0.0)
    assert machine.phase == Phase.GATHER and any(isinstance(e, Retry) for e in effects)
    assert "nothing was revealed" in next(e for e in effects if isinstance(e, Retry)).message
    assert not any(isinstance(e, Aggregate) for e in effects)
    effects, _ = _drive_attempt(machine, silos, layout, global_params, updates, {}, now)
    assert machine.attempt == 1 and isinstance(effects[0], Aggregate)
    _check_matches_fedavg(
        layout.average(global_params, effects[0].total), global_params, updates, tuple(sorted(updates)), layout
    )


def _advert(silos, silo: str = "silo-1"):
    verify, keys, certs = silos
    config = RoundConfig("run/r0/a0", 2, 4, QuantConfig(1.0, 16, 32))
    return SecAggClient(config, silo, keys[silo], certs[silo], verify, rounding_seed=0).advertise()


def test_proto_mapping_refuses_substituted_ids_and_bad_lengths(silos) -> None:
    verify, _, certs = silos
    advert = _advert(silos)
    request = sw.advert_to_proto(pb.StageRef(), advert)
    assert sw.advert_from_proto("run/r0/a0", "silo-1", request) == advert
    # The round and the silo id are the call's, not the request's, and the signature binds both.
    with pytest.raises(ProtocolError, match="certificate belongs to silo 'silo-1'"):
        sw.advert_from_proto("run/r0/a0", "silo-2", request).verify(verify)
    with pytest.raises(ProtocolError, match="signature does not match the keys, round and silo id"):
        sw.advert_from_proto("run/r0/a1", "silo-1", request).verify(verify)
    roster = sw.roster_to_proto(KeyRoster("run/r0/a0", (advert,)))
    roster.entries[0].certificate_pem = certs["silo-2"]
    with pytest.raises(ProtocolError, match="certificate belongs to silo 'silo-2'"):
        sw.roster_from_proto("run/r0/a0", roster).adverts[0].verify(verify)
    with pytest.raises(MessageError, match="bytes, expected"):
        sw.share_keys_from_proto("run/r0/a0", "silo-1", [pb.OutgoingShare(recipient="silo-2", ciphertext=b"x" * 10)])
    bad_kind = pb.RevealedShare(owner="silo-2", kind=pb.SHARE_KIND_UNSPECIFIED, share=b"\x00\x01" + bytes(66))
    with pytest.raises(MessageError, match="neither seed nor key"):
        sw.unmask_response_from_proto("run/r0/a0", "silo-1", [bad_kind])
    zero_x = pb.RevealedShare(owner="silo-2", kind=pb.SHARE_KIND_MASK_KEY, share=bytes(68))
    with pytest.raises(MessageError, match="revealed share of 'silo-2'"):
        sw.unmask_response_from_proto("run/r0/a0", "silo-1", [zero_x])


@pytest.mark.parametrize(
    ("field", "size", "refusal"),
    [
        ("encryption_public_key", 31, "encryption_public_key must be 32 bytes, got 31"),
        ("mask_public_key", 33, "mask_public_key must be 32 bytes, got 33"),
        ("signature", MAX_SIGNATURE_BYTES + 1, "signature may hold at most 80 bytes, got 81"),
        ("certificate_pem", MAX_CERT_BYTES + 1, "certificate_pem may hold at most 16384 bytes, got 16385"),
    ],
)
def test_a_hostile_advert_field_is_refused_naming_the_field_and_the_silo(silos, field, size, refusal) -> None:
    """What a hostile silo puts in its AdvertiseKeys request, or a hostile coordinator in a
    roster entry, is refused by size before any advert is built from it."""
    request = sw.advert_to_proto(pb.StageRef(), _advert(silos))
    setattr(request, field, b"\x01" * size)
    with pytest.raises(MessageError, match=f"^key advert of 'silo-1': {refusal}$"):
        sw.advert_from_proto("run/r0/a0", "silo-1", request)
    roster = sw.roster_to_proto(KeyRoster("run/r0/a0", (_advert(silos, "silo-2"),)))
    setattr(roster.entries[0], field, b"\x01" * size)
    with pytest.raises(MessageError, match=f"^key advert of 'silo-2': {refusal}$"):
        sw.roster_from_proto("run/r0/a0", roster)


def test_proto_lists_and_ids_are_bounded_before_their_entries_are_read(silos) -> None:
    request = sw.advert_to_proto(pb.StageRef(), _advert(silos))
    with pytest.raises(MessageError, match="key advert of 'silo-1': KeyAdvert: round_id must be"):
        sw.advert_from_proto("run r0", "silo-1", request)
    roster = sw.roster_to_proto(KeyRoster("run/r0/a0", (_advert(silos),)))
    roster.entries[0].silo_id = "Silo 1"
    with pytest.raises(MessageError, match=r"key advert of 'Silo 1': KeyAdvert\.silo_id: silo id must match"):
        sw.roster_from_proto("run/r0/a0", roster)
    # Empty entries, one more than any round can have: reading the first would fail on its keys.
    over = MAX_SHARES + 1
    refusal = f"at most {MAX_SHARES} entries allowed, got {over}"
    with pytest.raises(MessageError, match=f"^key_roster.entries: {refusal}$"):
        sw.roster_from_proto("run/r0/a0", pb.KeyRoster(entries=[pb.AdvertisedKeys()] * over))
    with pytest.raises(MessageError, match=f"^shares from 'silo-1': {refusal}$"):
        sw.share_keys_from_proto("run/r0/a0", "silo-1", [pb.OutgoingShare()] * over)
    with pytest.raises(MessageError, match=f"^shares for 'silo-1': {refusal}$"):
        sw.delivery_from_proto("run/r0/a0", "silo-1", pb.ShareBundle(shares=[pb.IncomingShare()] * over))
    with pytest.raises(MessageError, match=f"^revealed shares from 'silo-1': {refusal}$"):
        sw.unmask_response_from_proto("run/r0/a0", "silo-1", [pb.RevealedShare()] * over)
    delivery = sw.delivery_from_proto("run/r0/a0", "silo-1", pb.ShareBundle())
    survivors = pb.SurvivorList(silo_ids=["Silo"] * over)
    with pytest.raises(MessageError, match=f"^survivors.silo_ids: {refusal}$"):
        sw.unmask_request_from_proto("run/r0/a0", survivors, delivery)


def test_pinned_peers_refuse_sybil_and_second_certificates_of_the_same_ca(tmp_path: Path) -> None:
    """Issue 13, item 8: the operator holds the CA, so it can issue certificates for silos that do
    not exist, or a second one for a real silo; a silo that pins its peers sums with neither."""
    dev = pki.dev_pki(tmp_path / "pki", 3, silo_ids=["silo-1", "silo-2", "silo-sybil"])
    ca = pki.load_certificate(dev.ca.cert)
    pins = {s: pki.certificate_fingerprint(pki.load_certificate(dev.silos[s].cert)) for s in ("silo-1", "silo-2")}
    verify = pinned_cert_verifier(ca_cert_verifier(ca), pins)
    assert verify(dev.silos["silo-2"].cert.read_bytes()) == "silo-2"
    with pytest.raises(ProtocolError, match="'silo-sybil': not among the peers pinned"):
        verify(dev.silos["silo-sybil"].cert.read_bytes())
    # A second certificate for silo-2, from the same CA, with a key the operator holds.
    request = pki.make_request(tmp_path / "again", "silo-2")
    second = pki.sign_request(request.csr, dev.ca.key.parent, tmp_path / "again" / "silo-2.crt")
    assert ca_cert_verifier(ca)(second.read_bytes()) == "silo-2"  # the CA alone accepts it
    with pytest.raises(ProtocolError, match="'silo-2': its certificate is not the one pinned"):
        verify(second.read_bytes())


def test_a_revoked_certificates_advert_is_refused_once_the_crl_says_so(tmp_path: Path) -> None:
    dev = pki.dev_pki(tmp_path / "pki", 2)
    ca = pki.load_certificate(dev.ca.cert)
    verify = ca_cert_verifier(ca, revoked=RevocationList(dev.ca.crl, ca).serials)
    advert_cert = dev.silos["silo-2"].cert.read_bytes()
    assert verify(advert_cert) == "silo-2"
    pki.revoke(dev.ca.key.parent, dev.silos["silo-2"].cert)  # the CRL file is re-read on change
    with pytest.raises(pki.PkiError, match="revoked"):
        verify(advert_cert)


def test_a_silo_whose_own_certificate_is_refused_cannot_start_a_round(tmp_path: Path) -> None:
    """Its adverts would be refused by every peer: the client says so instead of a PKI traceback."""
    dev = pki.dev_pki(tmp_path / "pki", 2)
    ca = pki.load_certificate(dev.ca.cert)
    verify = ca_cert_verifier(ca, revoked=RevocationList(dev.ca.crl, ca).serials)
    config = RoundConfig("run/r0/a0", 2, 4, QuantConfig(1.0, 16, 32))
    key, cert = pki.load_private_key(dev.silos["silo-1"].key), dev.silos["silo-1"].cert.read_bytes()
    assert SecAggClient(config, "silo-1", key, cert, verify, rounding_seed=0).stage.value == "new"
    refused = "the certificate of silo 'silo-1' is refused: "
    with pytest.raises(IdentityError, match=rf"{refused}.* not among the peers pinned"):
        SecAggClient(config, "silo-1", key, cert, pinned_cert_verifier(verify, {}), rounding_seed=0)
    pki.revoke(dev.ca.key.parent, dev.silos["silo-1"].cert)
    with pytest.raises(IdentityError, match=rf"{refused}.* revoked \(serial"):
        SecAggClient(config, "silo-1", key, cert, verify, rounding_seed=0)
