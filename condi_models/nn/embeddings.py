"""Learned prompt embeddings W_mod and W_cond, the equation-4 routing, and fixed positional tables.

W_mod is an (M, D) table of modality profiles; W_cond an (M, M, D) table whose entry [i, m] is the
contribution of source modality i to target modality m. Both are ``nn.Embedding`` lookups with
a per-sample index tensor (batch first) so that Opacus computes per-sample gradients for them;
a bare ``nn.Parameter`` indexed directly would get none.

Also here: per-modality availability and observed fractions derived from an entry mask, and the
time-patching helpers shared by every network that turns a (B, F, L) series into tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def modality_onehot(channel_modality: torch.Tensor, n_modalities: int) -> torch.Tensor:
    """(F, M) float matrix with a one where channel f belongs to modality m."""
    return nn.functional.one_hot(channel_modality, n_modalities).to(torch.float32)


def modality_availability(
    mask: torch.Tensor, channel_modality: torch.Tensor, n_modalities: int
) -> torch.Tensor:
    """r (B, M) bool: modality m has at least one True entry of ``mask`` (B, F, L) in sample b."""
    per_channel = mask.any(dim=-1).to(torch.float32)
    onehot = modality_onehot(channel_modality, n_modalities).to(mask.device)
    return (per_channel @ onehot) > 0


def modality_fraction(mask: torch.Tensor, channel_modality: torch.Tensor, n_modalities: int) -> torch.Tensor:
    """(B, M) float: fraction of modality m's entries (all its channels and steps) that ``mask`` marks."""
    per_channel = mask.to(torch.float32).mean(dim=-1)
    onehot = modality_onehot(channel_modality, n_modalities).to(mask.device)
    return (per_channel @ onehot) / onehot.sum(dim=0).clamp_min(1.0)


def condition_routing(availability: torch.Tensor) -> torch.Tensor:
    """Equation-4 mixing weights a[b, i, m] such that omega_cond(b, m) = sum_i a[b, i, m] W_cond[i, m].

    For an available target m the weight is one on i = m. For a missing target it is uniform over
    the available sources i (1 / |O_b|). A sample with no modality available at all has no source
    to route from, so it falls back to the uniform mean over every source i (1 / M): the condition
    then says "nothing observed" in the same learned vocabulary instead of a zero vector.
    """
    r = availability.to(torch.float32)
    m = r.shape[1]
    eye = torch.eye(m, device=r.device, dtype=r.dtype)
    n_avail = r.sum(dim=1, keepdim=True)
    sources = torch.where(n_avail > 0, r / n_avail.clamp_min(1.0), torch.full_like(r, 1.0 / m))
    missing_target = sources[:, :, None] * (1.0 - r)[:, None, :]
    present_target = eye[None, :, :] * r[:, None, :]
    return present_target + missing_target


class ModalityEmbedding(nn.Module):
    """W_mod: one learned D-vector per modality, the modality's profile (paper eq. 8)."""

    def __init__(self, n_modalities: int, dim: int) -> None:
        super().__init__()
        self.n_modalities = n_modalities
        self.table = nn.Embedding(n_modalities, dim)

    def forward(self, batch_size: int) -> torch.Tensor:
        """(B, M, D): W_mod repeated per sample through a batch-first lookup."""
        device = self.table.weight.device
        index = torch.arange(self.n_modalities, device=device).expand(batch_size, -1).contiguous()
        return self.table(index)

    def matrix(self) -> torch.Tensor:
        """W_mod as an (M, D) tensor (a view of the embedding weight)."""
        return self.table.weight


class ConditionEmbedding(nn.Module):
    """W_cond: learned (M, M, D) cross-modal conditions, stored row-major as M*M rows (row i*M + m)."""

    def __init__(self, n_modalities: int, dim: int) -> None:
        super().__init__()
        self.n_modalities = n_modalities
        self.dim = dim
        self.table = nn.Embedding(n_modalities * n_modalities, dim)

    def forward(self, availability: torch.Tensor) -> torch.Tensor:
        """omega_cond (B, M, D) for availability r (B, M) bool, exactly equation 4."""
        batch = availability.shape[0]
        m = self.n_modalities
        index = torch.arange(m * m, device=self.table.weight.device).expand(batch, -1).contiguous()
        rows = self.table(index).view(batch, m, m, self.dim)
        weights = condition_routing(availability).to(rows.dtype)
        return torch.einsum("bim,bimd->bmd", weights, rows)

    def matrix(self) -> torch.Tensor:
        """W_cond as an (M, M, D) tensor, [source, target, :]."""
        return self.table.weight.view(self.n_modalities, self.n_modalities, self.dim)


def sinusoidal_table(n_positions: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_positions, dim) fixed sin/cos position code (transformer style); dim must be even."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    pos = torch.arange(n_positions, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    )
    table = torch.zeros(n_positions, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


def n_patches(length: int, patch: int) -> int:
    """Tokens per channel when ``length`` steps are cut into patches of ``patch`` (last one padded)."""
    return -(-length // patch)


def pad_time(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Right-pad the last (time) axis with zeros to a multiple of ``patch``."""
    extra = n_patches(x.shape[-1], patch) * patch - x.shape[-1]
    return nn.functional.pad(x, (0, extra)) if extra else x


def to_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, F, L) -> (B, F, N, C*patch): one token per channel and time patch, batch first."""
    b, c, f, _ = x.shape
    x = pad_time(x, patch)
    n = x.shape[-1] // patch
    return x.view(b, c, f, n, patch).permute(0, 2, 3, 1, 4).reshape(b, f, n, c * patch)


def from_tokens(tokens: torch.Tensor, channels: int, length: int) -> torch.Tensor:
    """Inverse of ``to_tokens``: (B, F, N, C*patch) -> (B, C, F, length), dropping the padding."""
    b, f, n, cp = tokens.shape
    patch = cp // channels
    x = tokens.view(b, f, n, channels, patch).permute(0, 3, 1, 2, 4).reshape(b, channels, f, n * patch)
    return x[..., :length]
