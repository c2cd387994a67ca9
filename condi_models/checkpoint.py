"""Model checkpoints as plain arrays plus JSON: never pickle.

A checkpoint is one ``.npz`` file holding every named tensor of the model (``param/<name>``),
the normalizer (``norm/mean``, ``norm/std``) and a UTF-8 JSON document (``meta``) with the model
config, the dataset description and free-form provenance. It is read with
``allow_pickle=False``, so a hostile file can at worst fail to load. Writes are atomic
(temporary file, fsync, rename): a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condi_models.data.dataset import DatasetInfo, Modality
from condi_models.data.normalize import ChannelNormalizer
from condi_models.nn.config import ModelConfig
from condi_models.nn.model import CondIModel

FORMAT = "condi-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


@dataclass
class Checkpoint:
    """A trained model with what is needed to apply it to new records."""

    model: CondIModel
    normalizer: ChannelNormalizer
    info: DatasetInfo
    meta: dict[str, Any]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    """A dataset description as plain JSON data."""
    return asdict(info)


def info_from_dict(data: dict[str, Any]) -> DatasetInfo:
    """Inverse of :func:`info_to_dict`."""
    return DatasetInfo(
        name=data["name"],
        modalities=tuple(Modality(m["name"], tuple(m["channels"])) for m in data["modalities"]),
        sampling_rate_hz=float(data["sampling_rate_hz"]),
        length=int(data["length"]),
        classes=tuple(data["classes"]),
        task=data["task"],
    )


def save_checkpoint(
    path: Path,
    model: CondIModel,
    normalizer: ChannelNormalizer,
    info: DatasetInfo,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically."""
    arrays = {f"param/{k}": v.numpy() for k, v in model.state_to_named_tensors().items()}
    arrays["norm/mean"] = normalizer.mean
    arrays["norm/std"] = normalizer.std
    doc = {"format": FORMAT, "model": model.cfg.to_dict(), "info": info_to_dict(info), "meta": meta or {}}
    arrays["meta"] = np.frombuffer(json.dumps(doc).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path, device: torch.device | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    try:
        doc = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: checkpoint has no valid meta document ({err})") from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    try:
        model = CondIModel(ModelConfig.from_dict(doc["model"]))
        model.load_named_tensors(
            {k.removeprefix("param/"): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("param/")}
        )
        normalizer = ChannelNormalizer(mean=arrays["norm/mean"], std=arrays["norm/std"])
        info = info_from_dict(doc["info"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {err}") from None
    if device is not None:
        model.to(device)
    model.eval()
    return Checkpoint(model=model, normalizer=normalizer, info=info, meta=doc.get("meta", {}))
