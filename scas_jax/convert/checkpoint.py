"""Converted checkpoint directories: Orbax parameters + config + tokenizer, all a stage needs.

Layout of a converted directory::

    DIR/scas_jax.json   {"format", "model_config", "param_dtype", "source"}
    DIR/config.json     the Hugging Face config (for export)
    DIR/tokenizer*.json, chat template ...   the student's tokenizer, saved by transformers
    DIR/params/         Orbax checkpoint of the parameter tree
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from scas_jax.convert.keymap import abstract_params
from scas_jax.data.jsonl import read_json
from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig, read_hf_config
from scas_jax.parallel import param_shardings

FORMAT = "scas_jax.converted/1"
MARKER = "scas_jax.json"


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def orbax_path(path):
    """The path Orbax gets: an ``etils.epath.Path``; a URL such as ``gs://bucket/run`` is
    kept as written (``pathlib`` would fold its ``//``), a local path is made absolute."""
    from etils import epath

    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def save_params(path, params) -> None:
    """Write ``params`` with Orbax (blocking). Orbax itself commits atomically.

    Collective: with several processes every one calls it (each writes the shards its
    devices hold) with the same ``path``."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(orbax_path(path), params)
    ckptr.wait_until_finished()


def restore_params(path, abstract, dtype=None) -> dict:
    """Read the Orbax tree at ``path`` into the shardings named by ``abstract``'s leaves
    (every process calls it: each reads what its devices hold); ``dtype``: cast each
    leaf to it once read.

    One process reads one leaf at a time (an Orbax partial restore per leaf, each cast
    as soon as it is read), so the transient buffers of a read (tensorstore's decoded
    chunk, the host copy placed on the device) exist for one tensor, not for the whole
    tree: on SmolLM2 (538 MB of float32) the peak above the restored weights fell from
    about 300 MB to about 50 MB (docs/benchmarks.md). Several processes restore the
    whole tree in one collective call, as before.
    """
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    def cast(x):
        return x if dtype is None or x.dtype == jnp.dtype(dtype) else x.astype(jnp.dtype(dtype))

    if jax.process_count() > 1:
        return jax.tree.map(cast, ocp.StandardCheckpointer().restore(orbax_path(path), abstract))
    where = orbax_path(path)
    ckptr = ocp.PyTreeCheckpointer()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for keypath, leaf in leaves:
        keys = [_key_of(k) for k in keypath]
        item = leaf
        for k in reversed(keys):  # the one-leaf tree {k0: {k1: ... leaf}}
            item = {k: item}
        args = ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)
        restore_args = jax.tree.map(lambda _, a=args: a, item)
        got = ckptr.restore(where, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
        for k in keys:
            got = got[k]
        out.append(cast(got))
        del got
    return jax.tree_util.tree_unflatten(treedef, out)


def _key_of(entry) -> str:
    """The dict key of one step of a key path (parameter trees are nested dicts)."""
    if not isinstance(entry, jax.tree_util.DictKey):
        raise ScasError(f"internal error: parameter tree step {entry!r} is not a dict key")
    return entry.key


def _sync(name: str) -> None:
    """A barrier over all processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def shared_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a converted directory that every process writes into (Orbax saves are
    collective), published at ``out`` only when the block succeeded everywhere.

    One process: :func:`scas_jax.io_utils.atomic_dir`. Several: process 0 prepares the
    temp sibling ``.<name>.partial`` (one name all processes agree on), every process
    runs the block (Orbax writes; only process 0 should write other files), then process
    0 renames it onto ``out``; barriers order the steps. A process that fails exits
    (``distributed.abandon``) and its peers stop when its heartbeat does.
    """
    from scas_jax.io_utils import atomic_dir, refuse_non_empty

    if jax.process_count() == 1:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            yield tmp
        return
    out = Path(out).absolute()
    if not overwrite:
        refuse_non_empty(out)
    tmp = out.parent / f".{out.name}.partial"
    main = jax.process_index() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _sync(f"scas_jax:{out}:prepared")
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync(f"scas_jax:{out}:written")
    if main:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    _sync(f"scas_jax:{out}:published")


def write_meta(out: Path, cfg: ModelConfig, hf_config: dict, param_dtype: str, source: str) -> None:
    meta = {
        "format": FORMAT,
        "model_config": cfg.to_dict(),
        "param_dtype": param_dtype,
        "source": source,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, default=str) + "\n")


def read_meta(path: str | Path) -> dict:
    p = Path(path) / MARKER
    meta = read_json(p)
    if meta.get("format") != FORMAT:
        raise ScasError(f"{p}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def abstract_with_shardings(cfg: ModelConfig, dtype, mesh) -> dict:
    abstract = abstract_params(cfg, dtype)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
    shardings = param_shardings(abstract, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def np_dtype(name: str):
    import jax.numpy as jnp

    if name not in ("float32", "bfloat16", "float16"):
        raise ScasError(f"unsupported dtype {name!r} (float32, bfloat16 or float16)")
    return np.dtype(jnp.dtype(name))


def read_hf_config_of(path: str | Path) -> dict:
    return read_hf_config(Path(path) / "config.json")
