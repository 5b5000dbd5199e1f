"""Every kind of model path that generation and evaluation accept, resolved before loading.

* whatever :func:`scas_jax.loader.load_student` takes: a converted directory, a Hugging
  Face directory, a GGUF file (or a directory holding one), ``smollm2``;
* a training output directory ``OUT`` (``scas-jax train --output-dir``): its ``final/``
  checkpoint when training finished, else its latest training checkpoint;
* ``OUT/checkpoints`` (the latest step) or one step ``OUT/checkpoints/<step>``: the
  float32 parameters of the Orbax ``state`` item (the optimiser state is not read) and
  the model config from its ``meta``. The tokenizer comes from ``OUT/final`` when it
  exists, else from ``tokenizer`` (any path ``load_student`` accepts, e.g. the student
  the run started from).

Resolving reads only small files, so a wrong path fails before any tensor is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from scas_jax.errors import ScasError


def _is_step_dir(path: Path) -> bool:
    return (path / "state").is_dir() and (path / "meta").is_dir()


def _latest_step(checkpoints: Path) -> Path | None:
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit() and _is_step_dir(p)] \
        if checkpoints.is_dir() else []
    return max(steps, key=lambda p: int(p.name)) if steps else None


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """``path``: what is read; ``kind``: ``"student"`` (``load_student``) or
    ``"train_checkpoint"`` (one step directory); ``tokenizer``: where a checkpoint's
    tokenizer comes from; ``given``: the path as the user wrote it."""

    path: Path
    kind: str
    given: str
    tokenizer: Path | None = None

    def describe(self) -> str:
        return str(self.path) if str(self.path) == self.given else f"{self.given} -> {self.path}"

    def load(self, dtype: str = "float32", mesh=None):
        """A :class:`scas_jax.loader.Student` (parameters on ``mesh`` when given)."""
        from scas_jax.loader import load_student

        if self.kind == "student":
            return load_student(self.path, dtype=dtype, mesh=mesh)
        return _load_train_checkpoint(self, dtype, mesh)


def resolve_model(path: str | Path, tokenizer: str | Path | None = None) -> ResolvedModel:
    """See the module docstring; ScasError for a path that is none of those."""
    from scas_jax.convert import checkpoint
    from scas_jax.loader import resolve_path

    given = str(path)
    p = resolve_path(path)
    if not p.exists():
        raise ScasError(f"{given}: no such file or directory")
    if p.is_dir() and not checkpoint.is_converted(p):
        final = p / "final"
        if checkpoint.is_converted(final):
            return ResolvedModel(final, "student", given)
        ckpts = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        step = p if _is_step_dir(p) else _latest_step(ckpts)
        if step is not None:
            run_dir = step.parent.parent
            tok = run_dir / "final" if checkpoint.is_converted(run_dir / "final") else None
            if tok is None and tokenizer is not None:
                tok = resolve_path(tokenizer)
            if tok is None:
                raise ScasError(
                    f"{given}: a training checkpoint holds no tokenizer and {run_dir / 'final'} does "
                    "not exist: pass --tokenizer with the student the run started from")
            return ResolvedModel(step, "train_checkpoint", given, tok)
    return ResolvedModel(p, "student", given)


def model_path_identity(resolved: ResolvedModel) -> str:
    """A content identity of what ``resolved`` reads (weights sampled, small files whole)."""
    from scas_jax.scoring.identity import model_identity

    ident = model_identity(resolved.path)
    if resolved.tokenizer is not None:
        ident += "+" + model_identity(resolved.tokenizer)[:16]
    return ident


def _load_train_checkpoint(resolved: ResolvedModel, dtype: str, mesh) -> Any:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from scas_jax.convert import checkpoint
    from scas_jax.data.jsonl import read_json
    from scas_jax.loader import Student
    from scas_jax.models.config import ModelConfig

    meta = read_json(resolved.path / "meta" / "metadata", "checkpoint meta")
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise ScasError(f"{resolved.path / 'meta'}: no model_config in the checkpoint's meta")
    cfg = ModelConfig.from_dict(meta["model_config"])
    target = {"params": checkpoint.abstract_with_shardings(cfg, np.float32, mesh)}
    state = ocp.PyTreeCheckpointer().restore(
        checkpoint.orbax_path(resolved.path / "state"),
        args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    params = state["params"]
    if dtype != "float32":
        params = jax.tree.map(lambda x: x.astype(jax.numpy.dtype(dtype)), params)
    tok, hf = _tokenizer_and_config(resolved.tokenizer)
    return Student(cfg, params, tok, hf, str(resolved.path), dtype)


def _tokenizer_and_config(path: Path) -> tuple[Any, dict]:
    """The tokenizer and Hugging Face config dict of a student path, without its tensors."""
    from scas_jax.convert import checkpoint
    from scas_jax.convert.sources import open_source
    from scas_jax.convert.student_io import load_tokenizer

    if checkpoint.is_converted(path):
        return load_tokenizer(path), checkpoint.read_hf_config_of(path)
    source = open_source(path)
    return load_tokenizer(path if path.is_dir() else path.parent, source), dict(source.hf_config)
