"""Helpers shared by benchmarks/imputation.py and benchmarks/paper_grid.py.

Model size presets, target checks printed as met / missed, markdown tables, machine details and
atomic JSON writes. Nothing here trains or evaluates a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# ``default`` is the library's own PTB-XL sizing (ModelConfig.for_dataset with nothing overridden);
# ``tiny`` is the size of examples/sim-tiny.yaml, for smoke runs.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {
        "embed_dim": 32,
        "cond_dim": 32,
        "denoiser": {"hidden": 48, "n_blocks": 3, "n_heads": 4},
        "context": {"stem_dim": 24, "expert_hidden": 48, "out_dim": 24},
        "classifier": {"hidden": 48, "n_blocks": 2, "n_heads": 4, "head_hidden": 96},
    },
    "tiny": {
        "embed_dim": 16,
        "cond_dim": 16,
        "denoiser": {"hidden": 32, "n_blocks": 2, "n_heads": 2},
        "context": {"stem_dim": 16, "expert_hidden": 32, "out_dim": 16},
        "classifier": {"hidden": 32, "n_blocks": 1, "n_heads": 2, "head_hidden": 64},
    },
}


@dataclass(frozen=True)
class Target:
    """One target of the issue: ``value`` must be at most (``max``) or at least (``min``) ``bound``.

    ``value`` is None when the run had nothing to compute it from (the check is then "n/a").
    """

    name: str
    value: float | None
    bound: float
    kind: Literal["max", "min"]
    unit: str = ""
    show_ratio: bool = True  # off for differences, where value / bound means nothing

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.bound if self.kind == "max" else self.value >= self.bound

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}

    def row(self) -> list[str]:
        sign = "<=" if self.kind == "max" else ">="
        status = {True: "met", False: "missed", None: "n/a"}[self.met]
        value = "n/a" if self.value is None else f"{self.value:.3f}{self.unit}"
        ratio = ""
        if self.show_ratio and self.value is not None and self.bound != 0:
            ratio = f"{self.value / self.bound:.2f}x of bound"
        return [self.name, value, f"{sign} {self.bound:g}{self.unit}", status, ratio]


def targets_table(targets: list[Target]) -> str:
    """The targets as a markdown table: value, bound, met / missed, value over bound."""
    return markdown_table(["target", "measured", "bound", "status", "ratio"], [t.row() for t in targets])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; None (not computed) as an en dash."""
    return "–" if value is None else f"{value:.{digits}f}"


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_average_1m"] = os.getloadavg()[0]
    return info


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object at ``path``, or {} when the file does not exist yet."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file, then rename), so a killed run leaves a valid file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
