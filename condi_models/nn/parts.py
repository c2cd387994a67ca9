"""The denoiser on a CPU: a sampler's rows in parts small enough to stay in a core's caches.

Every row of a sampler's batch (a window, times a draw) goes through the denoiser on its own, so
the batch may be cut into parts. The activations of about 16 windows of 12 x 250 stay in the
caches; per window, one call for 64 runs about a third slower than calls for 8 or 16
(benchmarks/predict_speed.py, "Batch inference" in BENCHMARKS.md). On a GPU the whole batch is
one call.
"""

from __future__ import annotations

import torch

from condi_models.nn.denoiser import Denoiser, DenoiserCondition

CPU_ROWS_PER_PART = 16


def split_rows(copies: int, windows: int, rows_per_part: int) -> list[tuple[int, int, int, int]]:
    """Parts (first copy, end copy, first window, end window) of at most ``rows_per_part`` rows.

    A part takes windows of one copy, or, when a copy has fewer rows than a part, whole copies.
    """
    if windows >= rows_per_part:
        return [
            (c, c + 1, lo, min(windows, lo + rows_per_part))
            for c in range(copies)
            for lo in range(0, windows, rows_per_part)
        ]
    step = rows_per_part // windows
    return [(c, min(copies, c + step), 0, windows) for c in range(0, copies, step)]


def denoise_in_parts(
    denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, condition: DenoiserCondition
) -> torch.Tensor:
    """``denoiser.denoise`` on ``z`` (copies of the conditioned windows), in cache-sized parts on a CPU.

    The network treats each row on its own, so the parts give the whole call's result.
    """
    windows = condition.rows
    copies = z.shape[0] // windows
    if z.device.type != "cpu" or copies * windows <= CPU_ROWS_PER_PART:
        return denoiser.denoise(z, t, condition)
    zs = z.view(copies, windows, *z.shape[1:])
    out = torch.empty_like(zs)
    for c0, c1, lo, hi in split_rows(copies, windows, CPU_ROWS_PER_PART):
        piece = zs[c0:c1, lo:hi]
        n = piece.shape[0] * piece.shape[1]
        eps = denoiser.denoise(piece.reshape(n, *z.shape[1:]), t[:n], condition.take(lo, hi))
        out[c0:c1, lo:hi] = eps.view(piece.shape)
    return out.view(z.shape)
