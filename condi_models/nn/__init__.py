"""CondI neural networks as plain torch modules: embeddings, context encoder, denoiser, diffusion, classifier."""

from condi_models.nn.classifier import ClassifierConfig
from condi_models.nn.config import VARIANTS, ModelConfig, Variant, VariantSpec
from condi_models.nn.context import ContextConfig
from condi_models.nn.denoiser import DenoiserConfig
from condi_models.nn.diffusion import DiffusionConfig, make_training_mask
from condi_models.nn.model import CondIModel, ParameterRoles, PhaseADraw, resolve_device
from condi_models.nn.sampling import Imputation, Prediction, SamplingOptions

__all__ = [
    "VARIANTS",
    "ClassifierConfig",
    "CondIModel",
    "ContextConfig",
    "DenoiserConfig",
    "DiffusionConfig",
    "Imputation",
    "ModelConfig",
    "ParameterRoles",
    "PhaseADraw",
    "Prediction",
    "SamplingOptions",
    "Variant",
    "VariantSpec",
    "make_training_mask",
    "resolve_device",
]
