"""The federation's data layout and the model built for it.

The coordinator never reads data. federation.yaml's ``layout:`` pins the layout (modalities and
their channels in order, classes, sampling rate, record length, task); without it the first silo
the coordinator accepts fixes it. The initial global model is built from that layout and
federation.yaml's ``model:`` and ``training.window``, and every silo must match the layout exactly.
Layout and model config are checkpointed, so a restarted coordinator keeps them.
"""

from __future__ import annotations

import dataclasses

import torch

from condi_models.data.dataset import DatasetInfo
from condi_models.nn.config import ModelConfig
from condi_models.nn.model import CondIModel
from condi_models.simulation import ModelSpec
from condi_models.training import LocalTrainingConfig


def layout_mismatch(expected: DatasetInfo, got: DatasetInfo) -> str | None:
    """Why a silo's data layout does not fit the federation's, or None when it does.

    The source name may differ (a site may hold real PTB-XL where another holds the synthetic
    ECG with the same leads and classes); everything the model's shape or labels depend on may not.
    """
    if got.task != expected.task:
        return f"task {got.task!r}, the federation's is {expected.task!r}"
    if got.classes != expected.classes:
        return f"classes {list(got.classes)}, the federation's are {list(expected.classes)}"
    if got.sampling_rate_hz != expected.sampling_rate_hz:
        return f"sampling rate {got.sampling_rate_hz:g} Hz, the federation's is {expected.sampling_rate_hz:g} Hz"
    if got.length != expected.length:
        return f"records of {got.length} steps, the federation's have {expected.length}"
    want = [m.name for m in expected.modalities]
    have = [m.name for m in got.modalities]
    if have != want:
        return f"modalities {have}, the federation's are {want} (same names in the same order)"
    for mine, theirs in zip(got.modalities, expected.modalities, strict=True):
        if mine.channels != theirs.channels:
            return (
                f"modality {mine.name!r} has channels {list(mine.channels)}, "
                f"the federation's are {list(theirs.channels)}"
            )
    return None


def initial_model(model_cfg: ModelConfig, seed: int) -> CondIModel:
    """The run's initial global model: seeded, so every start and a replay of one config build the
    same weights."""
    torch.manual_seed(seed)
    return CondIModel(model_cfg)


def build_model_config(
    layout: DatasetInfo, spec: ModelSpec, training: LocalTrainingConfig
) -> tuple[ModelConfig, LocalTrainingConfig]:
    """The model config for ``layout`` and the training config with its window resolved.

    The window is ``training.window`` cut to the record length (the whole record when unset),
    as the in-process simulation does.
    """
    window = layout.length if training.window is None else min(training.window, layout.length)
    resolved = training if training.window == window else dataclasses.replace(training, window=window)
    return spec.build(layout, window), resolved
