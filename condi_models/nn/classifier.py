"""Phase B: instance encoders, the per-modality fusion of eq. 10 and the classification head.

omega_ins(b, m) comes from a per-modality stem (a patch embedding of that modality's channels)
followed by a backbone shared by all modalities (a shared full-resolution convolution in front,
a transformer over time patches behind, then mean pooling). The fusion concatenates, per
modality, the parts a variant uses (instance feature, W_mod row, omega_cond) and then all
modalities, and an MLP maps that vector to class logits.

Each part is layer-normalized on its own before the concatenation (``fusion_norm: per_part``).
W_mod rows are the same for every sample, and omega_cond is too unless whole modalities are
missing; starting at N(0, 1) they made up two thirds of the fused vector, and one LayerNorm over
all of it (``joint``, the layout of checkpoints written before) scaled the only sample-dependent
third down with them. Normalized apart, each part has unit scale and the constant ones act as
per-modality biases of the head.

The PEPSY-style baseline replaces the instance feature of a missing modality with the mean of the
available modalities' features plus a learned per-modality missing embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from condi_models.nn.denoiser import AxisTransformerLayer
from condi_models.nn.embeddings import n_patches, pad_time, sinusoidal_table, to_tokens


@dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of the Phase B encoders and head."""

    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 4
    ffn_mult: int = 2
    patch_size: int = 10
    conv_channels: int = 8
    conv_kernel: int = 7
    pos_embed_dim: int = 32
    head_hidden: int = 128
    dropout: float = 0.1
    fusion_norm: Literal["joint", "per_part"] = "per_part"

    def __post_init__(self) -> None:
        for name in ("hidden", "n_heads", "ffn_mult", "patch_size", "pos_embed_dim", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"classifier.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_blocks < 0 or self.conv_channels < 0:
            raise ValueError("classifier.n_blocks and classifier.conv_channels must be >= 0")
        if self.hidden % self.n_heads:
            raise ValueError(f"classifier.hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"classifier.conv_kernel must be odd and positive, got {self.conv_kernel}")
        if self.pos_embed_dim % 2:
            raise ValueError(f"classifier.pos_embed_dim must be even, got {self.pos_embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"classifier.dropout must be in [0, 1), got {self.dropout}")
        if self.fusion_norm not in ("joint", "per_part"):
            raise ValueError(f"classifier.fusion_norm must be 'joint' or 'per_part', got {self.fusion_norm!r}")


class InstanceEncoder(nn.Module):
    """f_ins: (values, mask) (B, F, L) -> omega_ins (B, M, D), one D-vector per modality."""

    def __init__(
        self, cfg: ClassifierConfig, channel_modality: tuple[int, ...], n_modalities: int, out_dim: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        groups = [[f for f, m in enumerate(channel_modality) if m == i] for i in range(n_modalities)]
        for i, g in enumerate(groups):
            self.register_buffer(f"channels_{i}", torch.tensor(g, dtype=torch.long), persistent=False)
        self.conv = (
            nn.Conv2d(2, cfg.conv_channels, (1, cfg.conv_kernel), padding=(0, cfg.conv_kernel // 2))
            if cfg.conv_channels
            else None
        )
        token_in = (2 + cfg.conv_channels) * cfg.patch_size
        self.stems = nn.ModuleList(nn.Linear(len(g) * token_in, cfg.hidden) for g in groups)
        self.pos_proj = nn.Linear(cfg.pos_embed_dim, cfg.hidden)
        self.layers = nn.ModuleList(
            AxisTransformerLayer(cfg.hidden, cfg.n_heads, cfg.ffn_mult * cfg.hidden, cfg.dropout)
            for _ in range(cfg.n_blocks)
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, out_dim)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, length = values.shape
        inp = pad_time(torch.stack([values, mask.to(values.dtype)], dim=1), self.cfg.patch_size)
        if self.conv is not None:
            inp = torch.cat([inp, F.silu(self.conv(inp))], dim=1)
        tokens = []
        for i, stem in enumerate(self.stems):
            part = to_tokens(inp.index_select(2, getattr(self, f"channels_{i}")), self.cfg.patch_size)
            _, f_m, n, cp = part.shape
            tokens.append(stem(part.permute(0, 2, 1, 3).reshape(b, n, f_m * cp)))
        h = torch.stack(tokens, dim=1)
        n = n_patches(length, self.cfg.patch_size)
        pos = sinusoidal_table(n, self.cfg.pos_embed_dim, device=h.device).expand(b, n, -1)
        h = h + self.pos_proj(pos)[:, None, :, :]
        for layer in self.layers:
            h = layer(h, axis=2)
        return self.out(self.norm(h).mean(dim=2))


class MissingEmbeddingPool(nn.Module):
    """PEPSY-style fill: missing modality m gets mean(available features) + E_miss[m]."""

    def __init__(self, n_modalities: int, dim: int) -> None:
        super().__init__()
        self.n_modalities = n_modalities
        self.table = nn.Embedding(n_modalities, dim)

    def forward(self, features: torch.Tensor, availability: torch.Tensor) -> torch.Tensor:
        """features (B, M, D), availability (B, M) bool -> (B, M, D) with missing slots filled."""
        b = features.shape[0]
        r = availability.to(features.dtype)[:, :, None]
        mean = (features * r).sum(dim=1, keepdim=True) / r.sum(dim=1, keepdim=True).clamp_min(1.0)
        index = torch.arange(self.n_modalities, device=features.device).expand(b, -1).contiguous()
        return r * features + (1.0 - r) * (mean + self.table(index))


class FusionHead(nn.Module):
    """MLP from the concatenated per-modality representations to class logits; ``normalize`` puts
    one LayerNorm over the whole input first (the ``joint`` fusion norm)."""

    def __init__(self, in_dim: int, hidden: int, n_classes: int, dropout: float, normalize: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim) if normalize else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(self.norm(features)))))


class Classifier(nn.Module):
    """Encoder, optional missing-embedding pool and head; W_mod / omega_cond are passed in.

    The shared embeddings live on the CondI model because Phase A uses W_cond too; here they are
    inputs, each (B, M, D) or None when the variant leaves that part out of the fusion.
    """

    def __init__(
        self,
        cfg: ClassifierConfig,
        channel_modality: tuple[int, ...],
        n_modalities: int,
        embed_dim: int,
        n_parts: int,
        n_classes: int,
        missing_pool: bool,
    ) -> None:
        super().__init__()
        self.n_parts = n_parts
        self.encoder = InstanceEncoder(cfg, channel_modality, n_modalities, embed_dim)
        self.pool = MissingEmbeddingPool(n_modalities, embed_dim) if missing_pool else None
        per_part = cfg.fusion_norm == "per_part"
        self.part_norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(n_parts)) if per_part else None
        self.head = FusionHead(
            n_modalities * n_parts * embed_dim, cfg.head_hidden, n_classes, cfg.dropout, normalize=not per_part
        )

    def features(
        self,
        values: torch.Tensor,
        mask: torch.Tensor,
        availability: torch.Tensor,
        w_mod: torch.Tensor | None,
        omega_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        """The classifier input: per modality [omega_ins ; W_mod[m] ; omega_cond(b, m)], flattened."""
        ins = self.encoder(values, mask)
        if self.pool is not None:
            ins = self.pool(ins, availability)
        parts = [p for p in (ins, w_mod, omega_cond) if p is not None]
        if len(parts) != self.n_parts:
            raise ValueError(f"classifier was built for {self.n_parts} fusion parts, got {len(parts)}")
        if self.part_norms is not None:
            parts = [norm(p) for norm, p in zip(self.part_norms, parts, strict=True)]
        return torch.cat(parts, dim=-1).flatten(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from the fused feature vector."""
        return self.head(features)
