"""Pseudorandom masks: AES-256-CTR keystreams read as little-endian ring words.

A mask seed is a 256-bit AES key used for exactly one keystream per round: either a silo's
fresh self-mask seed, or a pairwise seed from :func:`pair_seed` (HKDF-SHA256 of an X25519
agreement, bound to the round and the unordered pair of silo ids, so both ends derive the same
key and no other round can). The counter starts at zero; key uniqueness makes that safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.secagg.messages import KEY_BYTES, ProtocolError, context_bytes
from federation.secagg.quantize import ring_dtype

# Bytes of keystream per call: large enough to amortise the call, small enough to stay in L2.
BLOCK_BYTES = 1 << 18
_ZEROS = bytes(BLOCK_BYTES)
_COUNTER_ZERO = bytes(16)


def pair_seed(private_key: X25519PrivateKey, peer_public: bytes, round_id: str, a: str, b: str) -> bytes:
    """The pairwise mask seed of silos ``a`` and ``b`` (either order) for ``round_id``."""
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(
            f"round {round_id!r}: X25519 agreement of {a!r} and {b!r} failed ({exc})"
        ) from exc
    low, high = sorted((a, b))
    info = context_bytes("mask", round_id, low, high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _encryptor(seed: bytes) -> CipherContext:
    if len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_COUNTER_ZERO)).encryptor()


def keystream(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """The first ``length`` ring words of the keystream of ``seed`` as a new array."""
    dtype = ring_dtype(ring_bits)
    out = np.zeros(length, dtype=dtype)
    apply_masks(out, [(seed, 1)])
    return out


def apply_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """Add (sign +1) or subtract (sign -1) each seed's keystream to the ring vector ``acc`` in place.

    Arithmetic wraps modulo 2^32 or 2^64 with the dtype. The vector is walked block by block with
    every stream advanced in turn, so each block is read from cache rather than memory per mask.
    """
    if acc.ndim != 1 or acc.dtype.kind != "u" or acc.dtype.itemsize not in (4, 8):
        raise ValueError(f"masks apply to a 1-D uint32 or uint64 vector, got {acc.dtype} {acc.shape}")
    if not acc.flags.writeable:
        raise ValueError("mask target vector is read-only")
    for _, sign in masks:
        if sign not in (1, -1):
            raise ValueError(f"mask sign must be +1 or -1, got {sign!r}")
    dtype = ring_dtype(8 * acc.dtype.itemsize)
    streams = [(_encryptor(seed), sign) for seed, sign in masks]
    # update_into needs room for one extra cipher block beyond the input.
    buffer = bytearray(BLOCK_BYTES + 15)
    words_per_block = BLOCK_BYTES // dtype.itemsize
    for start in range(0, acc.size, words_per_block):
        target = acc[start : start + words_per_block]
        n_bytes = target.size * dtype.itemsize
        zeros = _ZEROS if n_bytes == BLOCK_BYTES else _ZEROS[:n_bytes]
        words = np.frombuffer(buffer, dtype=dtype, count=target.size)
        for encryptor, sign in streams:
            encryptor.update_into(zeros, buffer)
            if sign > 0:
                np.add(target, words, out=target)
            else:
                np.subtract(target, words, out=target)
