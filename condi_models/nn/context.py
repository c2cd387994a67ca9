"""c_O: the mixture-of-experts encoder of the observed (conditioning) data of a sample.

Each modality has its own stem that embeds the modality's values and mask per time patch; a
missing modality's stem output is zeroed, so it contributes nothing and receives no gradient.
The stems' outputs are concatenated and fed to E dense experts; a softmax gate that looks only at
what is observed (availability r and the observed fraction of every modality) mixes the experts,
so different missingness situations can be routed to different experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from condi_models.nn.embeddings import to_tokens


@dataclass(frozen=True)
class ContextConfig:
    """Sizes of the observed-context encoder."""

    stem_dim: int = 32
    n_experts: int = 4
    expert_hidden: int = 64
    out_dim: int = 32

    def __post_init__(self) -> None:
        for name in ("stem_dim", "n_experts", "expert_hidden", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"context.{name} must be >= 1, got {getattr(self, name)}")


class Expert(nn.Module):
    """One expert: a two-layer MLP over the concatenated modality stems of a time patch."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(h)))


class ObservedContextEncoder(nn.Module):
    """(observed values, mask, r, fractions) -> c_O (B, N, out_dim), one vector per time patch."""

    def __init__(
        self, cfg: ContextConfig, channel_modality: tuple[int, ...], n_modalities: int, patch_size: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_modalities = n_modalities
        self.patch_size = patch_size
        groups = [[f for f, m in enumerate(channel_modality) if m == i] for i in range(n_modalities)]
        for i, g in enumerate(groups):
            self.register_buffer(f"channels_{i}", torch.tensor(g, dtype=torch.long), persistent=False)
        self.stems = nn.ModuleList(nn.Linear(2 * len(g) * patch_size, cfg.stem_dim) for g in groups)
        self.stem_norm = nn.LayerNorm(n_modalities * cfg.stem_dim)
        self.experts = nn.ModuleList(
            Expert(n_modalities * cfg.stem_dim, cfg.expert_hidden, cfg.out_dim) for _ in range(cfg.n_experts)
        )
        self.gate = nn.Linear(2 * n_modalities, cfg.n_experts)

    def gate_weights(self, availability: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
        """(B, E) softmax weights of the experts, from r (B, M) and observed fractions (B, M)."""
        return torch.softmax(self.gate(torch.cat([availability.to(fraction.dtype), fraction], dim=-1)), dim=-1)

    def forward(
        self, values: torch.Tensor, mask: torch.Tensor, availability: torch.Tensor, fraction: torch.Tensor
    ) -> torch.Tensor:
        """values, mask (B, F, L); availability (B, M) bool; fraction (B, M) -> c_O (B, N, out_dim)."""
        r = availability.to(values.dtype)
        inp = torch.stack([values, mask.to(values.dtype)], dim=1)
        stems = []
        for i, stem in enumerate(self.stems):
            channels = getattr(self, f"channels_{i}")
            tokens = to_tokens(inp.index_select(2, channels), self.patch_size)
            b, f_m, n, cp = tokens.shape
            tokens = tokens.permute(0, 2, 1, 3).reshape(b, n, f_m * cp)
            stems.append(F.silu(stem(tokens)) * r[:, i, None, None])
        h = self.stem_norm(torch.cat(stems, dim=-1))
        experts = torch.stack([e(h) for e in self.experts], dim=2)
        gate = self.gate_weights(availability, fraction)
        return torch.einsum("be,bned->bnd", gate, experts)
