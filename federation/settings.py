"""The run's and each round's settings as JSON, written by the coordinator and read by the silo.

``JoinReply.model_config_json`` carries :class:`RunSettings` (the built model config, local
training, evaluation and the data layout every silo must have); ``Task.round_config_json`` carries
:class:`RoundSettings` (the seeds and the splits to evaluate). Both sides use these classes, so
the documents are written and read in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from condi_models.checkpoint import info_from_dict, info_to_dict
from condi_models.data.dataset import DatasetInfo
from condi_models.evaluation import EvalOptions
from condi_models.nn.config import ModelConfig
from condi_models.training import LocalTrainingConfig
from federation.statistics import PooledStatistics, StatisticsError

EVAL_SPLITS = ("val", "test")
# What a secure sum may carry.
SECURE_CONTENTS = ("update", "metrics", "statistics")


class SettingsError(ValueError):
    """A settings document that cannot be used; the message names the field."""


def _object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{what}: expected a JSON object")
    return data


@dataclass(frozen=True)
class RunSettings:
    """What every silo of a run trains and evaluates with."""

    model: ModelConfig
    training: LocalTrainingConfig
    evaluation: EvalOptions
    layout: DatasetInfo

    def to_json(self) -> str:
        """The JSON document of JoinReply.model_config_json."""
        return json.dumps(
            {
                "model": self.model.to_dict(),
                "training": asdict(self.training),
                "evaluation": asdict(self.evaluation),
                "layout": info_to_dict(self.layout),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RunSettings:
        """Parse and check a JoinReply.model_config_json document."""
        data = _object(text, "run settings")
        missing = sorted({"model", "training", "evaluation", "layout"} - set(data))
        if missing:
            raise SettingsError(f"run settings: missing {missing}")
        try:
            model = ModelConfig.from_dict(data["model"])
            training = LocalTrainingConfig(**data["training"])
            evaluation = EvalOptions(**data["evaluation"])
            layout = info_from_dict(data["layout"])
        except (TypeError, ValueError, KeyError) as exc:
            raise SettingsError(f"run settings: {exc}") from exc
        return cls(model=model, training=training, evaluation=evaluation, layout=layout)


@dataclass(frozen=True)
class SecureSettings:
    """How a silo encodes its vector for the secure sum.

    ``content`` says what is summed: ``"update"``, the weighted update of
    condi_models.aggregation.SecureLayout, ``"metrics"``, the evaluation sums of
    federation.secure_metrics.MetricsLayout, or ``"statistics"``, the training-data sums of
    federation.statistics.StatisticsLayout.
    """

    clip_bound: float
    frac_bits: int
    ring_bits: int
    weight_unit: float
    vector_length: int
    content: str = "update"

    @classmethod
    def from_dict(cls, data: object) -> SecureSettings:
        """Check the ``secagg`` object of a round settings document."""
        fields = ("clip_bound", "frac_bits", "ring_bits", "weight_unit", "vector_length", "content")
        if not isinstance(data, dict) or sorted(data) != sorted(fields):
            raise SettingsError(f"round settings: secagg must be an object with exactly {list(fields)}")
        for key in ("frac_bits", "ring_bits", "vector_length"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise SettingsError(f"round settings: secagg.{key} must be a positive integer")
        for key in ("clip_bound", "weight_unit"):
            if not isinstance(data[key], int | float) or isinstance(data[key], bool) or not data[key] > 0:
                raise SettingsError(f"round settings: secagg.{key} must be a positive number")
        if data["content"] not in SECURE_CONTENTS:
            raise SettingsError(f"round settings: secagg.content must be one of {list(SECURE_CONTENTS)}")
        return cls(
            clip_bound=float(data["clip_bound"]),
            frac_bits=data["frac_bits"],
            ring_bits=data["ring_bits"],
            weight_unit=float(data["weight_unit"]),
            vector_length=data["vector_length"],
            content=data["content"],
        )


@dataclass(frozen=True)
class RoundSettings:
    """What one task needs beyond its stage: seeds, which local splits to evaluate, the secure encoding."""

    train_seed: int | None = None
    eval_seed: int | None = None
    eval_splits: tuple[str, ...] = ()
    secagg: SecureSettings | None = None
    # The round's learning-rate factor (condi_models.training.round_lr_scale), for training tasks.
    lr_scale: float = 1.0
    # The federation's pooled normalizer and class counts, once summed before round 0.
    statistics: PooledStatistics | None = None

    def to_json(self) -> str:
        """The JSON document of Task.round_config_json."""
        doc: dict[str, Any] = {
            "train_seed": self.train_seed,
            "eval_seed": self.eval_seed,
            "eval_splits": list(self.eval_splits),
            "lr_scale": self.lr_scale,
        }
        if self.secagg is not None:
            doc["secagg"] = asdict(self.secagg)
        if self.statistics is not None:
            doc["statistics"] = self.statistics.to_dict()
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> RoundSettings:
        """Parse and check a Task.round_config_json document (empty text means no settings)."""
        if not text:
            return cls()
        data = _object(text, "round settings")
        unknown = sorted(set(data) - {"train_seed", "eval_seed", "eval_splits", "secagg", "lr_scale", "statistics"})
        if unknown:
            raise SettingsError(f"round settings: unknown keys {unknown}")
        splits = data.get("eval_splits", [])
        if not isinstance(splits, list) or any(s not in EVAL_SPLITS for s in splits):
            raise SettingsError(f"round settings: eval_splits must be a list drawn from {list(EVAL_SPLITS)}")
        seeds = {}
        for key in ("train_seed", "eval_seed"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SettingsError(f"round settings: {key} must be a non-negative integer")
            seeds[key] = value
        lr_scale = data.get("lr_scale", 1.0)
        if not isinstance(lr_scale, int | float) or isinstance(lr_scale, bool) or not 0.0 < lr_scale <= 1.0:
            raise SettingsError("round settings: lr_scale must be a number in (0, 1]")
        secure = SecureSettings.from_dict(data["secagg"]) if data.get("secagg") is not None else None
        statistics = None
        if data.get("statistics") is not None:
            try:
                statistics = PooledStatistics.from_dict(data["statistics"], "round settings: statistics")
            except StatisticsError as exc:
                raise SettingsError(str(exc)) from None
        return cls(
            eval_splits=tuple(splits), secagg=secure, lr_scale=float(lr_scale), statistics=statistics, **seeds
        )
