"""Content identities: what a scoring run's inputs *are*, independent of where they live.

Resume (:mod:`scas_jax.scoring.journal`) and ``--skip-existing`` both ask "was this made
from the same inputs?". Names, directories and modification times do not answer that
(copying or ``touch``-ing a pool changes them, editing a row in place may not), so
both compare content:

* **Candidate files** (:func:`file_sha256`): the sha256 of every byte of the file,
  read in 1 MiB blocks (a pool of a few hundred MB hashes in well under a second per
  100 MB). The whole file counts, so an edit beyond ``--limit`` also counts as a
  change: sound, at worst one unnecessary rescoring.
* **The student** (:func:`model_identity`): hashing a multi-GB checkpoint on every run
  would cost more than scoring a small pool, so a model is identified by

  - the full bytes of every file up to :data:`SMALL_FILE` (1 MiB): configs,
    ``scas_jax.json`` (model config, parameter dtype), tokenizer files and the chat
    template, Orbax metadata;
  - for each larger file (weights: safetensors, GGUF, Orbax data files): its relative
    name, its size, its first :data:`HEAD_BYTES` (1 MiB: the safetensors header, the
    GGUF header, its tensor index or a large part of it) and :data:`SAMPLES` blocks of
    :data:`SAMPLE_BYTES` at evenly spaced offsets up to its last byte.

  Every file is named relative to the model's root, so a copied checkpoint keeps its
  identity. About ``1 + SAMPLES * SAMPLE_BYTES`` MiB are read per weight file, a few
  milliseconds. Any change of architecture, tokenizer, template, dtype, tensor layout
  or file size is caught, and so is any retraining or fine-tuning, which changes
  virtually every weight and hence every sampled block. What is *not* caught: an edit
  of a few weight bytes that touches none of the sampled blocks, with the file size
  unchanged: score such a model into a new output directory.
* **An already loaded Student** (Python API, :func:`student_identity`): its config,
  parameter dtype, tokenizer (vocabulary, special ids, chat template) and
  :data:`PARAM_SAMPLES` evenly spaced values of every parameter, so a Student trained
  or edited in memory after loading is another student, whatever its ``source`` says.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

BLOCK = 1 << 20
SMALL_FILE = 1 << 20
HEAD_BYTES = 1 << 20
SAMPLES = 16
SAMPLE_BYTES = 1 << 16
PARAM_SAMPLES = 4096


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of every byte of ``path``, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(name relative to root, path)`` of every regular file of ``root``, sorted; a
    file root yields itself under its own name."""
    if root.is_file():
        yield root.name, root
        return
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p.relative_to(root).as_posix(), p


def _sampled_digest(path: Path, size: int) -> str:
    """sha256 of the head and of :data:`SAMPLES` evenly spaced blocks of a large file."""
    h = hashlib.sha256()
    last = max(size - SAMPLE_BYTES, 0)
    offsets = [0] + [last * k // (SAMPLES - 1) for k in range(SAMPLES)]
    with open(path, "rb") as f:
        for n, offset in enumerate(offsets):
            f.seek(offset)
            block = f.read(HEAD_BYTES if n == 0 else SAMPLE_BYTES)
            h.update(b"%d:%d:" % (offset, len(block)) + block)
    return h.hexdigest()


def model_identity(path: str | Path) -> str:
    """sha256 (hex) identifying a model file or directory by content (see the module
    docstring for what is read)."""
    h = hashlib.sha256()
    for name, p in _files(Path(path)):
        size = p.stat().st_size
        digest = file_sha256(p) if size <= SMALL_FILE else _sampled_digest(p, size)
        h.update(f"{name}\0{size}\0{digest}\n".encode("utf-8"))
    return h.hexdigest()


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two records of settings and digests, one phrase each, keys
    in sorted order: ``"lambda_scas 0.3 -> 0.5"``, ``"inputs.a changed"`` (a digest, or
    any value too long to show), ``"limit missing -> 8"``."""
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        elif _short(a) and _short(b):
            out.append(f"{name} {_show(a)} -> {_show(b)}")
        else:
            out.append(f"{name} changed")
    return out


_MISSING = object()


def _short(value) -> bool:
    return value is _MISSING or len(_show(value)) <= 40


def _show(value) -> str:
    return "missing" if value is _MISSING else json.dumps(value, default=str)


def student_identity(student) -> str:
    """sha256 (hex) identifying an already loaded ``scas_jax.loader.Student`` by content:
    its config, parameter dtype, tokenizer (vocabulary, special ids, chat template) and
    :data:`PARAM_SAMPLES` evenly spaced values of every parameter (with its name, shape
    and dtype). A Student changed in memory after loading (trained, edited) is thus
    another student, whatever its ``source`` says."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    h.update(json.dumps([student.cfg.to_dict(), student.param_dtype], sort_keys=True,
                        default=str).encode("utf-8"))
    tok = student.tokenizer
    if tok is not None:
        vocab = sorted(tok.get_vocab().items())
        h.update(json.dumps([vocab, sorted(tok.all_special_ids),
                             getattr(tok, "chat_template", None)], default=str).encode("utf-8"))
    for path, x in jax.tree_util.tree_leaves_with_path(student.params):
        flat = x.reshape(-1)
        step = max(1, flat.shape[0] // PARAM_SAMPLES)
        sample = np.asarray(jax.device_get(flat[::step]))
        h.update(f"{jax.tree_util.keystr(path)}\0{x.shape}\0{x.dtype}\0".encode() + sample.tobytes())
    return h.hexdigest()

