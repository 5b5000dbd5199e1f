"""Real students as YAML presets: ``configs/models/<name>.yaml``.

A preset holds a model's architecture (the Hugging Face ``config.json`` fields that
:func:`scas_jax.models.config.config_from_hf` reads) and suggested run settings for
one target (mesh, dtype, scoring batch, training batch). The format is documented in
``configs/models/README.md``. Nothing here reads weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig, config_from_hf
from scas_jax.models.precision import DTYPE_CHOICES
from scas_jax.data.yaml_file import read_yaml as read_yaml_file

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
TOP_KEYS = {"name", "hf_id", "published_params", "architecture", "run"}
RUN_KEYS = {"hardware", "dtype", "score", "train"}
SCORE_KEYS = {"mesh", "batch_tokens", "max_length", "max_segments"}


def available(directory: Path = PRESET_DIR) -> list[str]:
    """Names of the presets in ``directory`` (file stems), sorted."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def preset_path(name_or_path: str | Path, directory: Path = PRESET_DIR) -> Path | None:
    """The YAML of a preset name (``qwen3-8b``) or a ``.yaml`` path; None when it is neither."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = Path(directory) / f"{name_or_path}.yaml"
    if "/" not in str(name_or_path) and candidate.is_file():
        return candidate
    return None


def is_preset(name_or_path: str | Path) -> bool:
    return preset_path(name_or_path) is not None


def _check_keys(where: str, found: dict, allowed: set[str]) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise ScasError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _check_settings(path: Path, run: Any) -> dict:
    from scas_jax.training.config import FIELDS

    if not isinstance(run, dict):
        raise ScasError(f"{path}: field 'run' must be a mapping")
    _check_keys(f"{path}: run", run, RUN_KEYS)
    if run.get("dtype", "auto") not in DTYPE_CHOICES:
        raise ScasError(f"{path}: run.dtype {run['dtype']!r} is not one of {', '.join(DTYPE_CHOICES)}")
    for section, allowed in (("score", SCORE_KEYS), ("train", set(FIELDS))):
        value = run.get(section, {})
        if not isinstance(value, dict):
            raise ScasError(f"{path}: field 'run.{section}' must be a mapping")
        _check_keys(f"{path}: run.{section}", value, allowed)
    return {"hardware": str(run.get("hardware", "")), "dtype": run.get("dtype", "auto"),
            "score": dict(run.get("score", {})), "train": dict(run.get("train", {}))}


def read_preset(path: str | Path) -> dict:
    """The checked preset file as a dict: ``name``, ``hf_id``, ``published_params``,
    ``architecture`` (HF config fields), ``run`` (settings), ``path``."""
    path = Path(path)
    data = read_yaml_file(path, "model preset")
    if not isinstance(data, dict):
        raise ScasError(f"{path}: expected a mapping with fields {', '.join(sorted(TOP_KEYS))}")
    _check_keys(str(path), data, TOP_KEYS)
    for key in ("name", "architecture", "run"):
        if key not in data:
            raise ScasError(f"{path}: missing field {key!r}")
    if not isinstance(data["architecture"], dict):
        raise ScasError(f"{path}: field 'architecture' must be a mapping of config.json fields")
    published = data.get("published_params")
    if published is not None and not isinstance(published, (int, float)):
        raise ScasError(f"{path}: published_params {published!r} is not a number (write 8.2e+9)")
    return {"name": str(data["name"]), "hf_id": str(data.get("hf_id", "")),
            "published_params": published, "architecture": dict(data["architecture"]),
            "run": _check_settings(path, data["run"]), "path": str(path)}


def load_model_preset(name_or_path: str | Path) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, settings)`` of a preset name (``"qwen3-8b"``) or preset YAML path.

    ``settings`` is the file's ``run`` section (``hardware``, ``dtype``, ``score``,
    ``train``) plus ``name``, ``hf_id``, ``published_params`` and ``path``.
    Raises ScasError listing the available names when ``name_or_path`` is neither.
    """
    path = preset_path(name_or_path)
    if path is None:
        raise ScasError(f"{name_or_path!r} is not a model preset (available in {PRESET_DIR}: "
                        f"{', '.join(available()) or 'none'}; or give a preset .yaml path)")
    preset = read_preset(path)
    cfg = config_from_hf(preset["architecture"], where=f"{path}: architecture")
    settings = dict(preset["run"])
    settings.update({k: preset[k] for k in ("name", "hf_id", "published_params", "path")})
    return cfg, settings
