"""What ``condi predict`` is asked to do: sampler settings and missingness simulated for demonstration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from condi_models.nn.sampling import SamplingOptions

HIDE_PATTERNS = ("points", "blocks", "drop")


@dataclass(frozen=True)
class HideSpec:
    """Simulated missingness for demonstration: ``pattern`` over a ``fraction`` of each channel's steps.

    ``drop`` removes the listed channels whole. ``channels`` None means every channel.
    """

    pattern: str
    fraction: float = 0.0
    channels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.pattern not in HIDE_PATTERNS:
            raise ValueError(f"hide pattern must be one of {list(HIDE_PATTERNS)}, got {self.pattern!r}")
        if self.pattern != "drop" and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"hide fraction must lie strictly between 0 and 1, got {self.fraction}")
        if self.pattern == "drop" and not self.channels:
            raise ValueError(
                "hide 'drop' needs a list of channels: dropping every channel leaves nothing observed"
            )

    @classmethod
    def parse(cls, text: str, channels: Sequence[str] | None = None) -> HideSpec:
        """``points:0.3``, ``blocks:0.5`` or ``drop``, optionally limited to ``channels``."""
        pattern, _, value = text.partition(":")
        if pattern == "drop" and not value:
            return cls("drop", 1.0, tuple(channels) if channels else None)
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(
                f"--hide {text!r}: expected points:<fraction>, blocks:<fraction> or drop (e.g. blocks:0.5)"
            ) from None
        return cls(pattern, fraction, tuple(channels) if channels else None)

    def describe(self) -> str:
        where = ", ".join(self.channels) if self.channels else "every channel"
        if self.pattern == "drop":
            return f"dropped {where}"
        return f"{self.pattern} {self.fraction:.0%} of {where}"


@dataclass(frozen=True)
class PredictOptions:
    """How to predict: sampler settings, seed, simulated missingness, device and window batch size.

    ``batch_size`` windows go to the model per call (several records' windows, see
    ``condi_models.predict.engine``), ``workers`` calls at once (None: one per torch thread on a
    CPU, one on a GPU); ``read_workers`` processes read records ahead (0: none); ``figures`` off
    leaves record.png out, which costs more CPU than a one-draw imputation.
    """

    n_samples: int = 5
    steps: int = 10
    method: str = "ddim"
    antithetic: bool = True
    seed: int = 0
    hide: HideSpec | None = None
    quantiles: tuple[float, float] = (0.05, 0.95)
    batch_size: int = 16
    device: str = "auto"
    read_workers: int = 1
    workers: int | None = None
    figures: bool = True

    def __post_init__(self) -> None:
        self.sampling()  # validates sampler fields with SamplingOptions' own messages
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        lo, hi = self.quantiles
        if not 0.0 < lo < 0.5 < hi < 1.0:
            raise ValueError(
                f"quantiles must be a lower level below 0.5 and an upper above, got {self.quantiles}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.read_workers < 0:
            raise ValueError(f"read_workers must be >= 0, got {self.read_workers}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 or None, got {self.workers}")

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            n_samples=self.n_samples, method=self.method, steps=self.steps, quantiles=self.quantiles,
            antithetic=self.antithetic,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.n_samples,
            "steps": self.steps,
            "method": self.method,
            "draws": "antithetic" if self.antithetic else "independent",
            "seed": self.seed,
            "quantiles": list(self.quantiles),
            "hide": None if self.hide is None else self.hide.describe(),
        }
