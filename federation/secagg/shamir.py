"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree ``threshold - 1``; share ``x`` is
the polynomial at ``x``. Any ``threshold`` shares give the secret back by Lagrange interpolation at
zero; fewer reveal nothing. The Mersenne prime 2^521 - 1 is far larger than any 256-bit secret, so
secrets embed without reduction and a share's value fits in :data:`SHARE_BYTES` bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
SHARE_BYTES = 66
SECRET_BYTES = 32
MAX_SHARES = 65535

RandBytes = Callable[[int], bytes]


class ShamirError(ValueError):
    """Shares or parameters that cannot produce a secret; the message says which and why."""


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` on a sharing polynomial; ``x`` is 1-based and never zero."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_SHARES:
            raise ShamirError(f"share x must be in 1..{MAX_SHARES}, got {self.x}")
        if not 0 <= self.y < PRIME:
            raise ShamirError(f"share y for x={self.x} is outside the field GF(2^521 - 1)")

    def y_bytes(self) -> bytes:
        """The share value as :data:`SHARE_BYTES` big-endian bytes."""
        return self.y.to_bytes(SHARE_BYTES, "big")


def _field_element(randbytes: RandBytes) -> int:
    # Rejection sampling keeps the coefficients exactly uniform; the only rejected value is 2^521 - 1.
    while True:
        value = int.from_bytes(randbytes(SHARE_BYTES), "big") & PRIME
        if value < PRIME:
            return value


def split(secret: bytes, threshold: int, xs: Sequence[int], randbytes: RandBytes = os.urandom) -> list[Share]:
    """Shares of ``secret`` at the points ``xs`` (in that order), any ``threshold`` of which recover it.

    ``randbytes`` supplies the polynomial's coefficients; leave it at ``os.urandom`` outside tests.
    """
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs):
        raise ShamirError(f"share points must be distinct, got {list(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in 1..{len(xs)} (the number of shares), got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [_field_element(randbytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def lagrange_coefficients(xs: Sequence[int], at: int = 0) -> list[int]:
    """The Lagrange basis values at ``at`` for the points ``xs``; reusable for every secret on them."""
    if len(set(xs)) != len(xs):
        raise ShamirError(f"share points must be distinct, got {list(xs)}")
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def _interpolate(ys: Sequence[int], coefficients: Sequence[int]) -> int:
    return sum(y * c for y, c in zip(ys, coefficients, strict=True)) % PRIME


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret behind ``shares``; at least ``threshold`` are needed.

    Shares beyond the threshold are checked against the polynomial the first ``threshold`` define,
    so a corrupted or mismatched share raises :class:`ShamirError` instead of giving a wrong secret.
    """
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to recover the secret, got {len(shares)}")
    ordered = sorted(shares, key=lambda s: s.x)
    xs = [s.x for s in ordered]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"two shares have the same x: {xs}")
    base, extra = ordered[:threshold], ordered[threshold:]
    base_xs = [s.x for s in base]
    base_ys = [s.y for s in base]
    secret = _interpolate(base_ys, lagrange_coefficients(base_xs))
    for share in extra:
        if _interpolate(base_ys, lagrange_coefficients(base_xs, at=share.x)) != share.y:
            raise ShamirError(f"share at x={share.x} does not lie on the polynomial of the other shares")
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError(f"shares do not encode a {SECRET_BYTES}-byte secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")
