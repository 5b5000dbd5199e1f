"""Hugging Face tensor names <-> our parameter paths, and filling params tensor by tensor.

Our layout mirrors Hugging Face's module tree, so the map is mechanical:

    model.embed_tokens.weight                 embed_tokens/embedding
    model.layers.{i}.self_attn.q_proj.weight  layers/self_attn/q_proj/kernel[i]   (transposed)
    model.layers.{i}.self_attn.q_proj.bias    layers/self_attn/q_proj/bias[i]
    model.layers.{i}.input_layernorm.weight   layers/input_layernorm/scale[i]
    model.norm.weight                         norm/scale
    lm_head.weight                            lm_head/kernel                      (transposed)
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import init_params

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def abstract_params(cfg: ModelConfig, dtype=np.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


def iter_leaves(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, dict):
            yield from iter_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """Our path (with the layer index for stacked leaves) -> the Hugging Face tensor name."""
    leaf = _LEAF_TO_HF[path[-1]]
    if path[0] == "lm_head":
        return f"lm_head.{leaf}"
    if path[0] == "layers":
        return f"model.layers.{layer}.{'.'.join(path[1:-1])}.{leaf}"
    return f"model.{'.'.join(path[:-1])}.{leaf}"


def is_transposed(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def params_from_tensors(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray],
    available: set[str],
    dtype=np.float32,
    where: str = "checkpoint",
    place: Callable[[tuple[str, ...], np.ndarray], object] = lambda path, x: x,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Build our parameter tree by reading one Hugging Face tensor at a time.

    ``get(name)`` returns a tensor in Hugging Face layout; each of our leaves is filled
    into one host buffer and handed to ``place`` (e.g. ``jax.device_put`` with its
    sharding) before the next leaf is read, so at most one full copy of the model plus
    one leaf is ever held. Missing tensors and shape mismatches raise ``ScasError``
    naming the tensor and the expected and found shapes.
    """
    params: dict = {}
    for path, leaf in iter_leaves(abstract_params(cfg)):
        stacked = path[0] == "layers"
        buf = np.empty(leaf.shape, dtype=dtype)
        for i in range(cfg.num_layers) if stacked else [None]:
            name = hf_name(path, i)
            if name not in available:
                raise ScasError(f"{where}: missing tensor {name!r}")
            t = np.asarray(get(name))
            if is_transposed(path):
                t = t.T
            want = leaf.shape[1:] if stacked else leaf.shape
            if tuple(t.shape) != tuple(want):
                hf_want = tuple(reversed(want)) if is_transposed(path) else tuple(want)
                hf_found = tuple(reversed(t.shape)) if is_transposed(path) else tuple(t.shape)
                raise ScasError(
                    f"{where}: tensor {name!r} has shape {list(hf_found)}, expected {list(hf_want)}"
                )
            if stacked:
                buf[i] = t
            else:
                buf[...] = t
            if progress:
                progress(1)
        set_leaf(params, path, place(path, buf))
        del buf
    return params


def hf_tensor_specs(cfg: ModelConfig, params: dict):
    """``(hf_name, hf_shape, dtype, load)`` for every tensor; ``load()`` materialises one
    tensor in Hugging Face layout (used to stream exports)."""
    specs = []
    for path, leaf in iter_leaves(params):
        layers = range(cfg.num_layers) if path[0] == "layers" else [None]
        for i in layers:
            shape = tuple(leaf.shape[1:] if i is not None else leaf.shape)
            if is_transposed(path):
                shape = tuple(reversed(shape))

            def load(leaf=leaf, i=i, t=is_transposed(path)):
                x = np.asarray(leaf[i] if i is not None else leaf)
                return x.T if t else x

            specs.append((hf_name(path, i), shape, np.dtype(leaf.dtype), load))
    return specs
