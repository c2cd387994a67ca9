"""What a CondI model is built from: its variant and ``ModelConfig``, with the config's plain-data form.

Baselines and ablations are CondI with parts switched off: ``Variant`` names them and
``VARIANTS`` says which parts each has. ``ModelConfig`` holds every size and switch needed to
build a ``CondIModel``; ``to_dict`` / ``from_dict`` carry it in checkpoints and on the wire,
validated by pydantic so an unknown, missing or mistyped key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from condi_models.configfile import describe_validation_error
from condi_models.data.dataset import DatasetInfo
from condi_models.nn.classifier import ClassifierConfig
from condi_models.nn.context import ContextConfig
from condi_models.nn.denoiser import DenoiserConfig
from condi_models.nn.diffusion import DiffusionConfig
from condi_models.nn.prior import DEFAULT_INTERPOLATION_SPAN, DEFAULT_PRIOR_RIDGE


class Variant(enum.StrEnum):
    """CondI and the baselines / ablations that share its code."""

    CONDI = "condi"
    NO_IMPUTATION = "no_imputation"
    NO_WCOND = "no_wcond"
    NO_IMPUTATION_NO_WCOND = "no_imputation_no_wcond"
    FEDAVG_ZERO_FILL = "fedavg_zero_fill"
    PEPSY = "pepsy"
    CSDI_UNIMODAL = "csdi_unimodal"


@dataclass(frozen=True)
class VariantSpec:
    """Which parts a variant has.

    ``diffusion``: a Phase A imputer exists; ``diffusion_wcond`` / ``diffusion_context``: it is
    conditioned on c_cond (W_cond) / on c_O (MoE encoder); ``impute_for_classification``:
    inference classifies the imputed sample; ``fuse_mod`` / ``fuse_cond``: W_mod[m] /
    omega_cond(b, m) join omega_ins(b, m) in the fusion; ``missing_pool``: PEPSY-style fill;
    ``diffusion_prior``: the imputer diffuses the residual around the cross-channel Gaussian
    prior (``condi_models.nn.prior``), when the config enables it.
    """

    diffusion: bool
    diffusion_wcond: bool
    diffusion_context: bool
    impute_for_classification: bool
    fuse_mod: bool
    fuse_cond: bool
    missing_pool: bool
    diffusion_prior: bool = True

    @property
    def uses_wcond(self) -> bool:
        return self.diffusion_wcond or self.fuse_cond

    @property
    def fusion_parts(self) -> int:
        return 1 + int(self.fuse_mod) + int(self.fuse_cond)


# no_imputation_no_wcond has no diffusion: with neither imputation nor W_cond, nothing Phase A
# learns reaches the classifier, so training it would only cost time.
VARIANTS: dict[Variant, VariantSpec] = {
    Variant.CONDI: VariantSpec(True, True, True, True, True, True, False),
    Variant.NO_IMPUTATION: VariantSpec(True, True, True, False, True, True, False),
    Variant.NO_WCOND: VariantSpec(True, False, True, True, True, False, False),
    Variant.NO_IMPUTATION_NO_WCOND: VariantSpec(False, False, False, False, True, False, False),
    Variant.FEDAVG_ZERO_FILL: VariantSpec(False, False, False, False, False, False, False),
    Variant.PEPSY: VariantSpec(False, False, False, False, True, False, True),
    # The CSDI-style baseline has no cross-modal conditioning, so no cross-channel prior either.
    Variant.CSDI_UNIMODAL: VariantSpec(True, False, False, True, False, False, False, diffusion_prior=False),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a CondIModel; ``channel_modality[f]`` is channel f's modality."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    channel_modality: tuple[int, ...]
    n_classes: int
    length: int
    variant: Variant = Variant.CONDI
    embed_dim: int = 32
    cond_dim: int = 32
    modality_names: tuple[str, ...] = ()
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    gaussian_prior: bool = True
    prior_lags: int = 0
    prior_template: bool = False
    prior_interpolation: bool = False
    prior_interpolation_span: int = DEFAULT_INTERPOLATION_SPAN
    prior_interpolation_edges: bool = False
    prior_ridge: float = DEFAULT_PRIOR_RIDGE

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "variant", Variant(self.variant))
        except ValueError:
            raise ValueError(
                f"variant must be one of {[v.value for v in Variant]}, got {self.variant!r}"
            ) from None
        object.__setattr__(self, "channel_modality", tuple(int(m) for m in self.channel_modality))
        object.__setattr__(self, "modality_names", tuple(self.modality_names))
        if not self.channel_modality:
            raise ValueError("channel_modality must name the modality of at least one channel")
        m = max(self.channel_modality) + 1
        missing = sorted(set(range(m)) - set(self.channel_modality))
        if min(self.channel_modality) < 0 or missing:
            raise ValueError(
                f"channel_modality must use modality indices 0..M-1 with every modality present; "
                f"got {self.channel_modality} (modalities without channels: {missing})"
            )
        if self.modality_names and len(self.modality_names) != m:
            raise ValueError(f"modality_names has {len(self.modality_names)} names for {m} modalities")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        for name in ("length", "embed_dim", "cond_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prior_lags < 0:
            raise ValueError(f"prior_lags must be >= 0, got {self.prior_lags}")
        if self.prior_interpolation_span < 1:
            raise ValueError(f"prior_interpolation_span must be >= 1, got {self.prior_interpolation_span}")
        if not (math.isfinite(self.prior_ridge) and self.prior_ridge > 0):
            raise ValueError(f"prior_ridge must be a positive number, got {self.prior_ridge}")

    @property
    def n_features(self) -> int:
        return len(self.channel_modality)

    @property
    def n_modalities(self) -> int:
        return max(self.channel_modality) + 1

    @property
    def spec(self) -> VariantSpec:
        return VARIANTS[self.variant]

    @classmethod
    def for_dataset(
        cls,
        info: DatasetInfo,
        variant: Variant | str = Variant.CONDI,
        tokens_per_channel: int = 25,
        **overrides: Any,
    ) -> ModelConfig:
        """Defaults for a dataset: patch sizes chosen so each channel becomes ~``tokens_per_channel`` tokens.

        PTB-XL (L = 250) gets patches of 10; Sleep-EDF (L = 3000) patches of 120; MIMIC (L = 48)
        patches of 2. Keyword ``overrides`` replace any top-level field (e.g. ``denoiser=...``).
        """
        patch = max(1, math.ceil(info.length / tokens_per_channel))
        base = cls(
            channel_modality=tuple(int(m) for m in info.channel_modality),
            n_classes=len(info.classes),
            length=info.length,
            variant=Variant(variant),
            modality_names=tuple(m.name for m in info.modalities),
            denoiser=DenoiserConfig(patch_size=patch),
            classifier=ClassifierConfig(patch_size=patch),
        )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, numbers, strings) for checkpoints and the wire."""
        return _CODEC.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; an unknown, missing or invalid key is a ValueError that names it."""
        if isinstance(data, Mapping):
            # A config written before the prior existed describes a model without one, and one
            # written before the prior looked at neighbouring instants, beat templates or
            # interpolation, a prior over one instant without them.
            data = {
                "gaussian_prior": False, "prior_lags": 0, "prior_template": False, "prior_interpolation": False, **data
            }
            if isinstance(data.get("classifier"), Mapping):
                # A config written before per-part fusion norms fused under one LayerNorm.
                data["classifier"] = {"fusion_norm": "joint", **data["classifier"]}
        try:
            return _CODEC.validate_python(data)
        except ValidationError as err:
            raise ValueError(describe_validation_error("model config", err, data)) from None


# Validates and dumps ModelConfig; its nested part configs (plain dataclasses) are validated under
# ModelConfig's pydantic config, so they refuse unknown keys too.
_CODEC = TypeAdapter(ModelConfig)
