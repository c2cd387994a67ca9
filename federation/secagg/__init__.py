"""Secure aggregation after Bonawitz et al. (CCS 2017): pure, transport-free protocol code.

:mod:`~federation.secagg.shamir`, :mod:`~federation.secagg.prg` and
:mod:`~federation.secagg.quantize` are the primitives; :mod:`~federation.secagg.messages` the
stage messages; :class:`SecAggClient` (silo) and :class:`SecAggServer` (coordinator) the state
machines. The gRPC layer carries the messages as protobuf fields (:mod:`federation.secagg_wire`).
"""

from federation.secagg.client import ClientStage, SecAggClient
from federation.secagg.messages import (
    CertVerifier,
    IdentityError,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    MessageError,
    ProtocolError,
    RoundAbort,
    RoundConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    ca_cert_verifier,
    pinned_cert_verifier,
)
from federation.secagg.quantize import (
    OverflowConfigError,
    QuantConfig,
    check_overflow_bounds,
    choose_ring_bits,
    dequantize,
    quantize,
)
from federation.secagg.server import RoundResult, SecAggServer, ServerStage

__all__ = [
    "CertVerifier",
    "ClientStage",
    "IdentityError",
    "KeyAdvert",
    "KeyRoster",
    "MaskedInput",
    "MessageError",
    "OverflowConfigError",
    "ProtocolError",
    "QuantConfig",
    "RoundAbort",
    "RoundConfig",
    "RoundResult",
    "SecAggClient",
    "SecAggServer",
    "ServerStage",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "ca_cert_verifier",
    "check_overflow_bounds",
    "choose_ring_bits",
    "dequantize",
    "pinned_cert_verifier",
    "quantize",
]
