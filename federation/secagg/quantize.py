"""Clipped fixed-point encoding of float vectors into the ring Z_{2^32} or Z_{2^64}, and back.

A silo's input (weighted parameters and per-group weights in one vector) is clipped to
``[-clip_bound, clip_bound]``, scaled by ``2^frac_bits`` and rounded stochastically (up with
probability equal to the fractional part, so the rounding is unbiased), then stored in two's
complement. Ring addition of such encodings is integer addition as long as the true sum stays in
the signed range, which :func:`check_overflow_bounds` guarantees for a configuration before any
round runs. Rounding randomness is not secret and comes from a seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RING_BITS = (32, 64)
# float64 holds integers exactly up to 2^53; one bit of headroom keeps the fractional part of the
# scaled value meaningful for stochastic rounding.
MAX_SCALED_BITS = 52
# Elements per block: small enough that the float64 temporaries stay in a core's L2 cache.
_BLOCK = 1 << 16


class OverflowConfigError(ValueError):
    """A quantization setting under which a secure sum could wrap or lose precision."""


def ring_dtype(ring_bits: int) -> np.dtype:
    """The little-endian unsigned dtype that holds ring elements of ``ring_bits`` bits."""
    if ring_bits == 32:
        return np.dtype("<u4")
    if ring_bits == 64:
        return np.dtype("<u8")
    raise OverflowConfigError(f"ring_bits must be one of {RING_BITS}, got {ring_bits!r}")


def _signed_dtype(ring_bits: int) -> np.dtype:
    return np.dtype("<i4") if ring_bits == 32 else np.dtype("<i8")


@dataclass(frozen=True)
class QuantConfig:
    """How floats become ring elements: clip bound, fractional bits, ring width."""

    clip_bound: float
    frac_bits: int
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if (
            not isinstance(self.clip_bound, int | float)
            or not math.isfinite(self.clip_bound)
            or self.clip_bound <= 0
        ):
            raise OverflowConfigError(f"clip_bound must be a finite number > 0, got {self.clip_bound!r}")
        if not isinstance(self.frac_bits, int) or isinstance(self.frac_bits, bool) or self.frac_bits < 0:
            raise OverflowConfigError(f"frac_bits must be a whole number >= 0, got {self.frac_bits!r}")
        ring_dtype(self.ring_bits)
        if self.max_abs_code() >= 1 << MAX_SCALED_BITS:
            raise OverflowConfigError(
                f"clip_bound={self.clip_bound} x 2^frac_bits (frac_bits={self.frac_bits})"
                f" reaches 2^{MAX_SCALED_BITS};"
                " float64 cannot round such values; lower clip_bound or frac_bits"
            )

    @property
    def scale(self) -> float:
        """Multiplier from real values to fixed-point codes."""
        return float(2**self.frac_bits)

    def max_abs_code(self) -> int:
        """The largest magnitude one quantized entry can take (rounding up included)."""
        return math.ceil(self.clip_bound * 2**self.frac_bits)


def max_silos(clip_bound: float, frac_bits: int, ring_bits: int) -> int:
    """How many silos' worst-case inputs the ring can sum without wrapping."""
    config = QuantConfig(clip_bound, frac_bits, ring_bits)
    return ((1 << (ring_bits - 1)) - 1) // config.max_abs_code()


def check_overflow_bounds(
    n_silos: int, clip_bound: float, frac_bits: int, ring_bits: int, max_weight: float
) -> None:
    """Raise :class:`OverflowConfigError` unless a sum of ``n_silos`` inputs provably fits the ring.

    ``max_weight`` is the largest per-group weight a silo may report; weights travel inside the
    clipped vector, so it must not exceed ``clip_bound``. The error names the offending fields.
    """
    if not isinstance(n_silos, int) or isinstance(n_silos, bool) or n_silos < 1:
        raise OverflowConfigError(f"n_silos must be a whole number >= 1, got {n_silos!r}")
    if not isinstance(max_weight, int | float) or not math.isfinite(max_weight) or max_weight <= 0:
        raise OverflowConfigError(f"max_weight must be a finite number > 0, got {max_weight!r}")
    config = QuantConfig(clip_bound, frac_bits, ring_bits)
    if max_weight > clip_bound:
        raise OverflowConfigError(
            f"max_weight={max_weight} exceeds clip_bound={clip_bound}: per-group weights are entries of the"
            " clipped vector and would be clipped; raise clip_bound or lower max_weight"
        )
    limit = max_silos(clip_bound, frac_bits, ring_bits)
    if n_silos > limit:
        worst = n_silos * config.max_abs_code()
        raise OverflowConfigError(
            f"n_silos={n_silos} x ceil(clip_bound={clip_bound} x 2^frac_bits={frac_bits}) = {worst}"
            " exceeds the"
            f" signed range of ring_bits={ring_bits} (2^{ring_bits - 1} - 1); at most {limit} silos fit:"
            " lower clip_bound or frac_bits, or use ring_bits=64"
        )


def choose_ring_bits(n_silos: int, clip_bound: float, frac_bits: int, max_weight: float) -> int:
    """The narrowest ring (32 or 64 bits) in which ``n_silos`` inputs sum without wrapping."""
    try:
        check_overflow_bounds(n_silos, clip_bound, frac_bits, 32, max_weight)
    except OverflowConfigError:
        check_overflow_bounds(n_silos, clip_bound, frac_bits, 64, max_weight)
        return 64
    return 32


def quantize(x: np.ndarray, config: QuantConfig, rng: np.random.Generator) -> np.ndarray:
    """Encode a float vector as ring elements: clip, scale, round stochastically, two's complement.

    Non-finite entries are refused (they would encode as garbage); the error gives the first index.
    The same ``rng`` state always gives the same encoding.
    """
    x = np.asarray(x)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise ValueError(f"quantize expects a 1-D float vector, got dtype {x.dtype} and shape {x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"input vector has a non-finite entry at index {bad} ({x[bad]})")
    out = np.empty(x.size, dtype=ring_dtype(config.ring_bits))
    signed = out.view(_signed_dtype(config.ring_bits))
    n = min(_BLOCK, x.size)
    scaled = np.empty(n, dtype=np.float64)
    floor = np.empty(n, dtype=np.float64)
    draw = np.empty(n, dtype=np.float32)
    up = np.empty(n, dtype=bool)
    for start in range(0, x.size, _BLOCK):
        stop = min(start + _BLOCK, x.size)
        m = stop - start
        v, f, u, b = scaled[:m], floor[:m], draw[:m], up[:m]
        np.clip(x[start:stop], -config.clip_bound, config.clip_bound, out=v)
        np.multiply(v, config.scale, out=v)
        np.floor(v, out=f)
        np.subtract(v, f, out=v)
        # float32 draws resolve the rounding probability to 2^-24, far below the code's unit.
        rng.random(out=u, dtype=np.float32)
        np.less(u, v, out=b)
        np.add(f, b, out=f)
        np.copyto(signed[start:stop], f, casting="unsafe")
    return out


def dequantize(codes: np.ndarray, config: QuantConfig) -> np.ndarray:
    """Ring elements (one encoding or a sum of them) back to float64 via their signed value."""
    codes = np.asarray(codes)
    expected = ring_dtype(config.ring_bits)
    if codes.dtype.kind != "u" or codes.dtype.itemsize != expected.itemsize or codes.ndim != 1:
        raise ValueError(
            f"dequantize expects a 1-D {expected} vector, got dtype {codes.dtype} and shape {codes.shape}"
        )
    return (
        codes.astype(expected, copy=False).view(_signed_dtype(config.ring_bits)).astype(np.float64)
        / config.scale
    )
