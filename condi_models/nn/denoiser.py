"""The epsilon network of Phase A: a CSDI-style residual stack over patch tokens.

CSDI attends over every one of the L time steps of every channel, which is what makes it slow
(L = 250 at 100 Hz). Here a channel's series is cut into time patches and each patch is one
token, so the time transformer runs over N = L / patch tokens and the channel transformer over
the F channels of one patch (the cross-modal path: a missing lead is rebuilt from the other leads
at the same moment). A convolution along time at full resolution before patching and after
un-patching keeps point-level detail, so scattered missing points are filled from their observed
neighbours rather than smeared over a patch, and a light channel attention at every single time
step (the point mixer) passes exact same-instant relations between channels.

Every parameterised layer sees batch-first tensors (Opacus hooks rely on that); only the
parameter-free attention op reshapes the batch into sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from condi_models.nn.embeddings import from_tokens, n_patches, pad_time, sinusoidal_table, to_tokens
from condi_models.nn.prior import PriorEstimate


class AxisTransformerLayer(nn.Module):
    """Pre-norm transformer layer attending along one axis of a (B, S1, S2, H) token grid.

    ``axis=2`` attends over S2 within each (b, s1); ``axis=1`` over S1 within each (b, s2).
    Built from ``nn.Linear`` and ``nn.LayerNorm`` so per-sample gradients are available.
    With ``linear_values`` the values are projected from the un-normalised input (queries and
    keys still from the normalised one), so what the attention moves between tokens stays linear
    in the input; a LayerNorm in front of the values would divide each token by its own scale.
    """

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float = 0.0, linear_values: bool = False) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.heads = heads
        self.linear_values = linear_values
        self.norm_attn = nn.LayerNorm(hidden)
        if linear_values:
            self.qk = nn.Linear(hidden, 2 * hidden)
            self.v = nn.Linear(hidden, hidden)
        else:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.dropout = nn.Dropout(dropout)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
        b, s1, s2, hidden = q.shape
        dh = hidden // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            if axis == 1:
                t = t.transpose(1, 2)
            return t.reshape(-1, t.shape[2], self.heads, dh).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2)
        if axis == 1:
            return out.reshape(b, s2, s1, hidden).transpose(1, 2)
        return out.reshape(b, s1, s2, hidden)

    def forward(self, h: torch.Tensor, axis: int) -> torch.Tensor:
        """h (B, S1, S2, H) -> same shape, attention along ``axis`` (1 or 2)."""
        if axis not in (1, 2):
            raise ValueError(f"attention axis must be 1 or 2, got {axis}")
        normed = self.norm_attn(h)
        if self.linear_values:
            q, k = self.qk(normed).chunk(2, dim=-1)
            v = self.v(h)
        else:
            q, k, v = self.qkv(normed).chunk(3, dim=-1)
        h = h + self.dropout(self.attn_out(self._attend(q, k, v, axis)))
        return h + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.norm_ffn(h)))))


@dataclass(frozen=True)
class DenoiserConfig:
    """Sizes of the epsilon network (defaults sized for PTB-XL, 12 x 250)."""

    hidden: int = 64
    n_blocks: int = 4
    n_heads: int = 4
    ffn_mult: int = 2
    patch_size: int = 10
    conv_channels: int = 16
    conv_kernel: int = 9
    out_channels: int = 16
    time_embed_dim: int = 32
    channel_embed_dim: int = 16
    step_embed_dim: int = 128
    point_mixer_dim: int = 16
    point_mixer_heads: int = 2

    def __post_init__(self) -> None:
        for name in ("hidden", "n_blocks", "n_heads", "ffn_mult", "patch_size", "conv_channels",
                     "out_channels", "time_embed_dim", "channel_embed_dim", "step_embed_dim",
                     "point_mixer_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"denoiser.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.n_heads:
            raise ValueError(f"denoiser.hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if self.point_mixer_dim < 0 or self.point_mixer_dim % self.point_mixer_heads:
            raise ValueError(
                f"denoiser.point_mixer_dim ({self.point_mixer_dim}) must be >= 0 (0 turns the mixer off) "
                f"and divisible by point_mixer_heads ({self.point_mixer_heads})"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"denoiser.conv_kernel must be odd and positive, got {self.conv_kernel}")
        for name in ("time_embed_dim", "step_embed_dim"):
            if getattr(self, name) % 2:
                raise ValueError(f"denoiser.{name} must be even, got {getattr(self, name)}")


class StepEmbedding(nn.Module):
    """Diffusion-step embedding: fixed sinusoid of t followed by a small MLP (as CSDI)."""

    def __init__(self, n_steps: int, dim: int) -> None:
        super().__init__()
        self.n_steps = n_steps
        self.dim = dim
        self.proj1 = nn.Linear(dim, dim)
        self.proj2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) long -> (B, dim)."""
        table = sinusoidal_table(self.n_steps, self.dim, device=t.device)
        return F.silu(self.proj2(F.silu(self.proj1(table[t]))))


class ResidualBlock(nn.Module):
    """CSDI residual block: step shift, time and channel transformers, side-gated tanh*sigmoid unit."""

    def __init__(self, cfg: DenoiserConfig, side_dim: int) -> None:
        super().__init__()
        h = cfg.hidden
        self.step_proj = nn.Linear(cfg.step_embed_dim, h)
        self.time_layer = AxisTransformerLayer(h, cfg.n_heads, cfg.ffn_mult * h)
        self.channel_layer = AxisTransformerLayer(h, cfg.n_heads, cfg.ffn_mult * h)
        self.mid_proj = nn.Linear(h, 2 * h)
        self.side_proj = nn.Linear(side_dim, 2 * h)
        self.out_proj = nn.Linear(h, 2 * h)

    def forward(
        self, h: torch.Tensor, step: torch.Tensor, side: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, F, N, H), step (B, S_t), side (B, F, N, S) -> (new h, skip)."""
        y = self._transformers(h, step)
        return self._gated(h, self.mid_proj(y) + self.side_proj(side))

    def side_term(self, side: torch.Tensor) -> torch.Tensor:
        """side_proj(side) plus mid_proj's bias (B, F, N, 2H): the part of the gate input a sampler keeps."""
        return self.side_proj(side) + self.mid_proj.bias

    def forward_with_side_term(
        self, h: torch.Tensor, step: torch.Tensor, side_term: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with ``side_term(side)`` given; h may stack copies of side_term's B rows."""
        y = self._transformers(h, step)
        return self._gated(h, add_per_copy(F.linear(y, self.mid_proj.weight), side_term))

    def _transformers(self, h: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        y = h + self.step_proj(step)[:, None, None, :]
        y = self.time_layer(y, axis=2)
        return self.channel_layer(y, axis=1)

    def _gated(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, filt = y.chunk(2, dim=-1)
        y = self.out_proj(torch.sigmoid(gate) * torch.tanh(filt))
        residual, skip = y.chunk(2, dim=-1)
        return (h + residual) / math.sqrt(2.0), skip


def add_per_copy(x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """x (k * B, ...) + part (B, ...), part added to each of the k stacked copies, in place."""
    return x.view(-1, *part.shape).add_(part).view(x.shape)


@dataclass(frozen=True)
class DenoiserCondition:
    """What the denoiser's fixed inputs contribute, computed once per sampling run for B windows.

    Over a sampler's steps only the latent and the step change; the conditioning values, mask,
    prior and context c do not. The layers they reach through linear maps alone (the input
    convolution, the patch embedding, the side embedding and each block's side projection) are
    split into their part, kept here with the biases, and the latent's part, computed per step.
    A sampler may stack k copies of the B windows (one per draw): the kept parts are added to
    each copy rather than repeated.

    ``denoise`` keeps full-resolution data channels last, (B, F, Lp, C), so that every per-point
    layer is one matrix product; the weights it needs in that order are kept here too.
    """

    planes: torch.Tensor  # (B, F, Lp, n_in - 1): the input planes but the latent, time padded
    conv: torch.Tensor  # (B, F, Lp, C): conv_in of those planes, its bias included
    tokens: torch.Tensor  # (B, F, N, H): patch_in of those planes plus side_in(side)
    side_terms: tuple[torch.Tensor, ...]  # per block: ResidualBlock.side_term(side)
    weights: _ChannelsLastWeights
    length: int

    @property
    def rows(self) -> int:
        return self.planes.shape[0]

    def take(self, lo: int, hi: int) -> DenoiserCondition:
        """The condition of windows lo .. hi - 1 alone."""
        return replace(
            self,
            planes=self.planes[lo:hi],
            conv=self.conv[lo:hi],
            tokens=self.tokens[lo:hi],
            side_terms=tuple(s[lo:hi] for s in self.side_terms),
        )


@dataclass(frozen=True)
class _ChannelsLastWeights:
    """The denoiser's full-resolution weights for channels-last data (see ``Denoiser.denoise``)."""

    conv_in: torch.Tensor  # (K, C): conv_in on the latent plane, per kernel tap
    patch_in: torch.Tensor  # (H, P * (1 + C)): patch_in on [latent, conv features], step-major
    patch_out: torch.Tensor  # (P * OC, H) and its bias: patch_out's rows step-major
    patch_out_bias: torch.Tensor
    point_in: torch.Tensor | None  # (mix, point_dim)
    conv_out: torch.Tensor  # conv_out's weight, channels last in memory
    head: torch.Tensor  # (C_feats,)


class Denoiser(nn.Module):
    """epsilon_theta(z_t, t | c): noise estimate at every entry of a (B, F, L) sample.

    Inputs are kept apart as CSDI does: the clean conditioning values in one input channel, the
    noisy latent at the non-conditioning entries in another, and the conditioning mask in a third;
    a conditioning entry is never noised. With ``prior_input`` two more carry the prior's mean and
    log scale, of which the latent is a standardized residual (``condi_models.nn.prior``). Side
    information per token is the patch position code, a learned channel embedding and the sample
    context c (from the MoE encoder and W_cond).
    """

    def __init__(
        self, cfg: DenoiserConfig, n_features: int, n_steps: int, context_dim: int, prior_input: bool = False
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_features = n_features
        self.context_dim = context_dim
        self.prior_input = prior_input
        n_in = 5 if prior_input else 3
        pad = cfg.conv_kernel // 2
        self.conv_in = nn.Conv2d(n_in, cfg.conv_channels, (1, cfg.conv_kernel), padding=(0, pad))
        self.patch_in = nn.Linear((n_in + cfg.conv_channels) * cfg.patch_size, cfg.hidden)
        self.channel_embed = nn.Embedding(n_features, cfg.channel_embed_dim)
        side_dim = cfg.time_embed_dim + cfg.channel_embed_dim + context_dim
        self.side_in = nn.Linear(side_dim, cfg.hidden)
        self.step_embed = StepEmbedding(n_steps, cfg.step_embed_dim)
        self.blocks = nn.ModuleList(ResidualBlock(cfg, side_dim) for _ in range(cfg.n_blocks))
        self.skip_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.patch_out = nn.Linear(cfg.hidden, cfg.out_channels * cfg.patch_size)
        point_dim = n_in + cfg.conv_channels + cfg.out_channels
        mix = cfg.point_mixer_dim
        if mix:
            self.point_in = nn.Conv2d(point_dim, mix, 1)
            self.point_channel = nn.Embedding(n_features, mix)
            self.point_mixer = AxisTransformerLayer(mix, cfg.point_mixer_heads, 2 * mix, linear_values=True)
        self.conv_out = nn.Conv2d(point_dim + mix, cfg.conv_channels, (1, cfg.conv_kernel), padding=(0, pad))
        # The head also sees the point features directly: a linear route from the per-step
        # channel mix to the output, next to the convolutional one.
        self.head = nn.Conv2d(cfg.conv_channels + point_dim + mix, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def side_information(self, batch: int, length: int, context: torch.Tensor | None) -> torch.Tensor:
        """(B, F, N, S): patch position code, channel embedding and context c per token."""
        device = self.channel_embed.weight.device
        n = n_patches(length, self.cfg.patch_size)
        f = self.n_features
        time = sinusoidal_table(n, self.cfg.time_embed_dim, device=device).expand(batch, f, n, -1)
        index = torch.arange(f, device=device).expand(batch, -1).contiguous()
        chan = self.channel_embed(index)[:, :, None, :].expand(batch, f, n, -1)
        parts = [time, chan]
        if self.context_dim:
            if context is None or context.shape != (batch, n, self.context_dim):
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"denoiser context must be shaped {(batch, n, self.context_dim)}, got {got}")
            parts.append(context[:, None, :, :].expand(batch, f, n, -1))
        return torch.cat(parts, dim=-1)

    def forward(
        self,
        noisy: torch.Tensor,
        cond_values: torch.Tensor,
        cond_mask: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None,
        prior: PriorEstimate | None = None,
    ) -> torch.Tensor:
        """Noise estimate (B, F, L) from noisy latent, conditioning values and mask (all (B, F, L)).

        ``prior`` is required exactly when the denoiser was built with ``prior_input``.
        """
        b, _, length = noisy.shape
        fixed = self._fixed_planes(cond_values, cond_mask, prior)
        inp = torch.stack([fixed[0], noisy, *fixed[1:]], dim=1)
        inp = pad_time(inp, self.cfg.patch_size)
        full = F.silu(self.conv_in(inp))
        side = self.side_information(b, length, context)
        h = self.patch_in(to_tokens(torch.cat([inp, full], dim=1), self.cfg.patch_size))
        h = h + self.side_in(side)
        step = self.step_embed(t)
        skips = 0.0
        for block in self.blocks:
            h, skip = block(h, step, side)
            skips = skips + skip
        return self._tail(skips, [full, inp], length)

    def condition(
        self,
        cond_values: torch.Tensor,
        cond_mask: torch.Tensor,
        context: torch.Tensor | None,
        prior: PriorEstimate | None = None,
    ) -> DenoiserCondition:
        """The fixed inputs' share of ``forward`` for B windows, for ``denoise`` at every sampler step."""
        b, _, length = cond_values.shape
        p = self.cfg.patch_size
        planes = pad_time(torch.stack(self._fixed_planes(cond_values, cond_mask, prior), dim=1), p)
        # The latent is input plane 1 (see forward); patch_in's columns are plane-major, patch long.
        n_in = planes.shape[1] + 1
        conv_w, patch_w = self.conv_in.weight, self.patch_in.weight
        fixed_conv_w = torch.cat([conv_w[:, :1], conv_w[:, 2:]], dim=1)
        fixed_patch_w = torch.cat([patch_w[:, :p], patch_w[:, 2 * p : n_in * p]], dim=1)
        side = self.side_information(b, length, context)
        conv = F.conv2d(planes, fixed_conv_w, self.conv_in.bias, padding=self.conv_in.padding)
        return DenoiserCondition(
            planes=planes.permute(0, 2, 3, 1).contiguous(),
            conv=conv.permute(0, 2, 3, 1).contiguous(),
            tokens=F.linear(to_tokens(planes, p), fixed_patch_w, self.patch_in.bias) + self.side_in(side),
            side_terms=tuple(block.side_term(side) for block in self.blocks),
            weights=self._channels_last_weights(n_in),
            length=length,
        )

    def _channels_last_weights(self, n_in: int) -> _ChannelsLastWeights:
        p, h, oc = self.cfg.patch_size, self.cfg.hidden, self.cfg.out_channels
        patch_w = self.patch_in.weight
        latent_patch_w = torch.cat([patch_w[:, p : 2 * p], patch_w[:, n_in * p :]], dim=1)
        mix = self.cfg.point_mixer_dim
        return _ChannelsLastWeights(
            conv_in=self.conv_in.weight[:, 1, 0, :].t(),
            patch_in=latent_patch_w.view(h, -1, p).transpose(1, 2).reshape(h, -1),
            patch_out=self.patch_out.weight.view(oc, p, h).transpose(0, 1).reshape(p * oc, h),
            patch_out_bias=self.patch_out.bias.view(oc, p).t().reshape(-1),
            point_in=self.point_in.weight[:, :, 0, 0] if mix else None,
            conv_out=self.conv_out.weight.contiguous(memory_format=torch.channels_last),
            head=self.head.weight.view(-1),
        )

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond: DenoiserCondition) -> torch.Tensor:
        """``forward`` given ``condition(...)``: noisy (k * B, F, L) stacks k copies of its B windows.

        The same layers in the same order, with full-resolution data channels last, (R, F, Lp, C).
        """
        rows, f, length = noisy.shape
        if rows % cond.rows or length != cond.length:
            raise ValueError(
                f"latent {tuple(noisy.shape)} is not copies of the {cond.rows} conditioned windows of {cond.length}"
            )
        copies = rows // cond.rows
        p, w = self.cfg.patch_size, cond.weights
        latent = pad_time(noisy, p)
        pad = self.cfg.conv_kernel // 2
        # conv_in on the latent plane: each step's kernel neighbourhood times the kernel.
        taps = F.pad(latent, (pad, pad)).unfold(-1, self.cfg.conv_kernel, 1)
        full = F.silu(add_per_copy(taps @ w.conv_in, cond.conv))
        latent = latent[..., None]
        tokens = torch.cat([latent, full], dim=-1).view(rows, f, -1, p * (1 + full.shape[-1]))
        h = add_per_copy(F.linear(tokens, w.patch_in), cond.tokens)
        step = self.step_embed(t)
        skips = 0.0
        for block, side_term in zip(self.blocks, cond.side_terms, strict=True):
            h, skip = block.forward_with_side_term(h, step, side_term)
            skips = skips + skip
        out = F.silu(self.skip_proj(skips / math.sqrt(len(self.blocks))))
        out = F.linear(out, w.patch_out, w.patch_out_bias).view(rows, f, latent.shape[2], -1)
        planes = cond.planes.repeat(copies, 1, 1, 1) if copies > 1 else cond.planes
        points = torch.cat([out, full, planes[..., :1], latent, planes[..., 1:]], dim=-1)
        if self.cfg.point_mixer_dim:
            u = F.linear(points, w.point_in, self.point_in.bias) + self.point_channel.weight[:, None, :]
            # The mixer attends across channels at each step: steps before channels, as in _mix_channels.
            mixed = self.point_mixer(u.transpose(1, 2).contiguous(), axis=2)
            points = torch.cat([points, mixed.transpose(1, 2)], dim=-1)
        conv = F.conv2d(points.permute(0, 3, 1, 2), w.conv_out, self.conv_out.bias, padding=self.conv_out.padding)
        conv = F.silu(conv.permute(0, 2, 3, 1))
        c = conv.shape[-1]
        eps = conv @ w.head[:c] + points @ w.head[c:] + self.head.bias
        return eps[..., :length]

    def _fixed_planes(
        self, cond_values: torch.Tensor, cond_mask: torch.Tensor, prior: PriorEstimate | None
    ) -> list[torch.Tensor]:
        """The input planes but the latent: values, mask and, with the prior, its mean and log scale."""
        if (prior is not None) != self.prior_input:
            raise ValueError(f"denoiser built with prior_input={self.prior_input} got prior={prior is not None}")
        planes = [cond_values, cond_mask.to(cond_values.dtype)]
        if prior is not None:
            planes += [prior.mean, prior.scale.log()]
        return planes

    def _tail(self, skips: torch.Tensor, inputs: list[torch.Tensor], length: int) -> torch.Tensor:
        """From the blocks' summed skips to the noise estimate, at full resolution.

        ``inputs`` are the convolved features and the input planes, in forward's order, time padded.
        """
        out = F.silu(self.skip_proj(skips / math.sqrt(len(self.blocks))))
        out = from_tokens(self.patch_out(out), self.cfg.out_channels, inputs[0].shape[-1])
        points = torch.cat([out, *inputs], dim=1)
        if self.cfg.point_mixer_dim:
            points = torch.cat([points, self._mix_channels(points)], dim=1)
        feats = torch.cat([F.silu(self.conv_out(points)), points], dim=1)
        return self.head(feats)[:, 0, :, :length]

    def _mix_channels(self, points: torch.Tensor) -> torch.Tensor:
        """Attention across channels at every single time step, at full resolution.

        Leads are (near-)linear functions of one another at the same instant (Einthoven's law
        holds even for the noise), which patch tokens can only pass through approximately; this
        light per-step path lets an exact pointwise cross-channel combination be learned. It works
        in a (B, L, F, C) layout so the attention runs over the last-but-one axis without copies.
        """
        b, _, f, _ = points.shape
        u = self.point_in(points).permute(0, 3, 2, 1)
        index = torch.arange(f, device=u.device).expand(b, -1).contiguous()
        u = u + self.point_channel(index)[:, None, :, :]
        return self.point_mixer(u, axis=2).permute(0, 3, 2, 1)
