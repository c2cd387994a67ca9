"""CondI neural networks as plain torch modules: embeddings, context encoder, denoiser, diffusion, classifier."""

from condi_models.nn.classifier import ClassifierConfig
from condi_models.nn.context import ContextConfig
from condi_models.nn.denoiser import DenoiserConfig
from condi_models.nn.diffusion import DiffusionConfig, make_training_mask
from condi_models.nn.model import (
    VARIANTS,
    CondIModel,
    Imputation,
    ModelConfig,
    ParameterGroups,
    PhaseADraw,
    Prediction,
    SamplingOptions,
    Variant,
    VariantSpec,
    resolve_device,
)

__all__ = [
    "VARIANTS",
    "ClassifierConfig",
    "CondIModel",
    "ContextConfig",
    "DenoiserConfig",
    "DiffusionConfig",
    "Imputation",
    "ModelConfig",
    "ParameterGroups",
    "PhaseADraw",
    "Prediction",
    "SamplingOptions",
    "Variant",
    "VariantSpec",
    "make_training_mask",
    "resolve_device",
]
