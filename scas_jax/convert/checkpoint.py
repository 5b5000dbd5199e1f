"""Converted checkpoint directories: Orbax parameters + config + tokenizer, all a stage needs.

Layout of a converted directory::

    DIR/scas_jax.json   {"format", "model_config", "param_dtype", "source"}
    DIR/config.json     the Hugging Face config (for export)
    DIR/tokenizer*.json, chat template ...   the student's tokenizer, saved by transformers
    DIR/params/         Orbax checkpoint of the parameter tree
"""

from __future__ import annotations

import json
from pathlib import Path

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


def save_params(path: str | Path, params) -> None:
    """Write ``params`` with Orbax (blocking). Orbax itself commits atomically."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(path).absolute(), params)
    ckptr.wait_until_finished()


def restore_params(path: str | Path, abstract) -> dict:
    """Read the Orbax tree at ``path`` into the shardings named by ``abstract``'s leaves."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(Path(path).absolute(), abstract)


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
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
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
