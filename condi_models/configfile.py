"""Load a YAML file into a typed, validated config, with errors that name the file and the key.

Every config in the project (site.yaml, federation.yaml, experiment.yaml) is a pydantic model
with ``extra="forbid"`` read through :func:`load_config`, so an unknown key, a wrong type or a
missing file is reported the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and what is wrong."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _key_path(loc: tuple, data: object) -> str:
    """The error location as the file's key path, e.g. ``data.path`` or ``silos[2]``.

    Tagged unions add their tag value (``synthetic_ecg``) as a location element that names no
    key of the file; walking the parsed input tells those apart and drops them.
    """
    parts: list[str] = []
    node = data
    for i, item in enumerate(loc):
        is_last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(item, str) and item not in node and not is_last:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(("." if parts else "") + item)
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key",
    "unexpected_keyword_argument": "unknown key",
    "missing": "required key is missing",
    "missing_argument": "required key is missing",
}


def describe_validation_error(source: str, err: ValidationError, data: object = None) -> str:
    """One line per problem: ``FILE: key.path: what was expected``."""
    return "\n".join(
        f"{source}: {_key_path(e['loc'], data)}: {_PLAIN_MESSAGES.get(e['type'], e['msg'])}" for e in err.errors()
    )


def parse_config(data: object, model: type[M], source: str) -> M:
    """Validate already-parsed YAML ``data`` against ``model``; ``source`` names it in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(source, err, data)) from None


def load_config(path: str | Path, model: type[M]) -> M:
    """Read ``path`` as YAML and validate it against ``model``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_config(data, model, str(path))


def resolve_path(value: str | Path, base_dir: Path) -> Path:
    """A path from a config, relative to ``base_dir`` unless absolute (``~`` expanded)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p)
