"""Read a YAML config file, with ``file:line`` in every error (train configs, model
presets, experiment configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from scas_jax.errors import ScasError


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """The YAML value of a whole file (None for an empty one); ScasError naming the file
    when it is missing (``no such <what>``) and ``file:line`` when it is not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScasError(f"{path}: no such {what}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ScasError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
