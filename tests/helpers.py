"""Small hand-built datasets and models for tests that need no loader, and silo identities from a dev PKI."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condi_models.data.dataset import ClinicalDataset, DatasetInfo, Modality
from condi_models.nn.classifier import ClassifierConfig
from condi_models.nn.config import ModelConfig
from condi_models.nn.context import ContextConfig
from condi_models.nn.denoiser import DenoiserConfig
from condi_models.nn.model import CondIModel
from federation import pki
from federation import secagg_wire as sw
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg import (
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    SecAggClient,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    ca_cert_verifier,
)
from federation.transfer import stage_key, stage_ref

REPO = Path(__file__).resolve().parent.parent


def toy_dataset(
    n: int = 200,
    *,
    modalities: tuple[int, ...] = (1, 2, 3),
    length: int = 50,
    n_classes: int = 3,
    records_per_patient: int = 1,
    seed: int = 0,
) -> ClinicalDataset:
    """``n`` random samples with the given channels per modality, fully observed."""
    rng = np.random.default_rng(seed)
    mods = tuple(
        Modality(name=f"m{i}", channels=tuple(f"m{i}c{j}" for j in range(k))) for i, k in enumerate(modalities)
    )
    info = DatasetInfo(
        name="toy",
        modalities=mods,
        sampling_rate_hz=1.0,
        length=length,
        classes=tuple(f"class{c}" for c in range(n_classes)),
        task="toy",
    )
    x = rng.normal(size=(n, info.n_features, length)).astype(np.float32)
    return ClinicalDataset(
        info=info,
        x=x,
        observed=np.ones_like(x, dtype=bool),
        y=rng.integers(0, n_classes, size=n),
        sample_ids=tuple(f"toy/{i}" for i in range(n)),
        patient_ids=tuple(f"p{i // records_per_patient}" for i in range(n)),
    )


def tiny_model(seed: int = 0) -> CondIModel:
    """A small CondI with its Gaussian prior, for 4 channels of 24 steps in 3 modalities (2, 1, 1
    channels) and 3 classes; without dropout, so a run repeats exactly."""
    torch.manual_seed(seed)
    return CondIModel(ModelConfig(
        channel_modality=(0, 0, 1, 2), n_classes=3, length=24, embed_dim=8, cond_dim=8,
        denoiser=DenoiserConfig(hidden=16, n_blocks=1, n_heads=2, patch_size=4, conv_channels=4, conv_kernel=3,
                                out_channels=4, time_embed_dim=8, channel_embed_dim=4, step_embed_dim=16),
        context=ContextConfig(stem_dim=8, n_experts=2, expert_hidden=16, out_dim=8),
        classifier=ClassifierConfig(hidden=16, n_blocks=1, n_heads=2, patch_size=4, conv_channels=2, conv_kernel=3,
                                    pos_embed_dim=8, head_hidden=16, dropout=0.0),
    ))


def secagg_identities(folder: Path, n: int):
    """A dev PKI for ``n`` silos in ``folder``: (CA verifier, signing key per silo, certificate PEM per silo)."""
    dev = pki.dev_pki(folder, n)
    verify = ca_cert_verifier(pki.load_certificate(dev.ca.cert))
    keys = {sid: pki.load_private_key(p.key) for sid, p in dev.silos.items()}
    certs = {sid: p.cert.read_bytes() for sid, p in dev.silos.items()}
    return verify, keys, certs


def through_proto(msg: Any) -> Any:
    """``msg`` as the far end of its gRPC call rebuilds it: converted to its proto fields,
    serialized, parsed and converted back by :mod:`federation.secagg_wire`.

    A masked input travels as a wire-format tensor, and an unmask request is rebuilt from the
    survivors and the receiving silo's own delivery, so those two come back as they are.
    """

    def trip(proto: Any) -> Any:
        return type(proto).FromString(proto.SerializeToString())

    if isinstance(msg, KeyAdvert):
        return sw.advert_from_proto(msg.round_id, msg.silo_id, trip(sw.advert_to_proto(pb.StageRef(), msg)))
    if isinstance(msg, KeyRoster):
        return sw.roster_from_proto(msg.round_id, trip(sw.roster_to_proto(msg)))
    if isinstance(msg, ShareKeys):
        shares = trip(pb.ShareKeysRequest(shares=sw.share_keys_to_proto(msg))).shares
        return sw.share_keys_from_proto(msg.round_id, msg.sender, shares)
    if isinstance(msg, ShareDelivery):
        return sw.delivery_from_proto(msg.round_id, msg.recipient, trip(sw.delivery_to_proto(msg)))
    if isinstance(msg, UnmaskResponse):
        shares = trip(pb.UnmaskRequest(shares=sw.unmask_response_to_proto(msg))).shares
        return sw.unmask_response_from_proto(msg.round_id, msg.sender, shares)
    if isinstance(msg, MaskedInput | UnmaskRequest):
        return msg
    raise TypeError(f"{type(msg).__name__} does not travel between coordinator and silos")


def submission_digest(msg: Any) -> str:
    """A digest of a secure-stage submission that repeats exactly when the submission does; the
    round machine only compares them (the coordinator digests the request it received)."""
    return hashlib.sha256(repr(msg).encode()).hexdigest()


_SECURE_STAGES = (pb.STAGE_ADVERTISE_KEYS, pb.STAGE_SHARE_KEYS, pb.STAGE_MASKED_INPUT, pb.STAGE_UNMASK)


def drive_secure_attempt(
    machine: Any,
    vector_for: Callable[[str], np.ndarray],
    identities: tuple[Any, dict, dict],
    *,
    dropped: str | None = None,
    start: float = 0.0,
) -> list[Any]:
    """Carry a coordinator RoundMachine's running secure attempt to its end with real protocol
    clients, every silo stage by stage through the wire conversions; ``dropped`` vanishes before
    its masked input. Returns the effects of the tick that left the secure stages."""
    verify, keys, certs = identities
    clients: dict[str, SecAggClient] = {}
    deliveries = {}
    now = start
    effects: list[Any] = []
    while machine.phase.value in ("advertise_keys", "share_keys", "masked_input", "unmask"):
        for sid in machine.plan.allowed:
            view = machine.task_for(sid, now)
            late = sid == dropped and view.key.stage in (pb.STAGE_MASKED_INPUT, pb.STAGE_UNMASK)
            if view.key.stage not in _SECURE_STAGES or late:
                continue
            rid = view.round_id
            if view.key.stage == pb.STAGE_ADVERTISE_KEYS:
                clients[sid] = SecAggClient(machine.secure_config, sid, keys[sid], certs[sid], verify, rounding_seed=3)
                msg = sw.advert_from_proto(rid, sid, sw.advert_to_proto(stage_ref(view.key), clients[sid].advertise()))
            elif view.key.stage == pb.STAGE_SHARE_KEYS:
                roster = sw.roster_from_proto(rid, sw.roster_to_proto(view.stage_input))
                msg = sw.share_keys_from_proto(rid, sid, sw.share_keys_to_proto(clients[sid].share_keys(roster)))
            elif view.key.stage == pb.STAGE_MASKED_INPUT:
                deliveries[sid] = sw.delivery_from_proto(rid, sid, sw.delivery_to_proto(view.stage_input))
                msg = clients[sid].masked_input(deliveries[sid], vector_for(sid))
            else:
                survivors = sw.unmask_request_to_proto(view.stage_input)
                request = sw.unmask_request_from_proto(rid, survivors, deliveries[sid])
                msg = sw.unmask_response_from_proto(rid, sid, sw.unmask_response_to_proto(clients[sid].unmask(request)))
            key = stage_key(stage_ref(view.key))
            machine.accept_secure(sid, key, submission_digest(msg), msg)
        now += 11.0
        effects = machine.tick(now)
    return effects
