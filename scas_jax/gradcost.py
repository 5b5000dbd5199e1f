"""The exact per-answer gradient cost that the SCAS score approximates.

For one answer (one tokenized candidate row), with ``L`` the mean token NLL over its
NLL answer positions (``nll_answer_mask``: the loss SFT trains on, as in the method
page step 7):

* ``target``: ``||dL/dW||_F^2`` for one weight matrix ``W``, by default the kernel of
  ``layers.-1.mlp.up_proj`` (the layer whose output the SCAS proxy taps);
* ``all``: ``||dL/dtheta||^2`` over every parameter;
* ``loss``: ``L`` itself (= the scorer's ``answer_mean_nll``).

Each answer gets its own forward and backward pass (``jax.grad`` of a ``[1, T]``
batch; rows are padded to a multiple of ``pad_to`` tokens so few shapes compile);
both norms come from the same gradient, reduced on device (nothing of parameter size
comes back to the host).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scas_jax.data.chat import Encoded
from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import decode
from scas_jax.models.loss import VOCAB_CHUNK, next_token_nll

DEFAULT_TARGET = "layers.-1.mlp.up_proj"


def select_param(tree: dict, name: str, num_layers: int) -> jax.Array:
    """The array named ``name`` in a parameter (or gradient) tree.

    ``layers.<i>.<path>`` (``i`` may be negative) selects layer ``i`` of the stacked
    ``params["layers"][...]`` arrays; a module path ends at its ``kernel`` when it has one
    (``layers.-1.mlp.up_proj`` -> ``params["layers"]["mlp"]["up_proj"]["kernel"][-1]``,
    ``[d_model, d_ff]``). Other names are plain paths (``embed_tokens.embedding``).
    """
    parts = name.split(".")
    layer = None
    if parts[0] == "layers":
        if len(parts) < 3:
            raise ScasError(f"parameter {name!r}: expected layers.<i>.<module path>")
        try:
            layer = int(parts[1])
        except ValueError:
            raise ScasError(f"parameter {name!r}: layer index {parts[1]!r} is not an integer") from None
        if not -num_layers <= layer < num_layers:
            raise ScasError(f"parameter {name!r}: layer out of range for a {num_layers}-layer model")
        node, path = tree["layers"], parts[2:]
    else:
        node, path = tree, parts
    for p in path:
        if not isinstance(node, dict) or p not in node:
            raise ScasError(f"parameter {name!r}: no {p!r} in the parameter tree")
        node = node[p]
    if isinstance(node, dict):
        if "kernel" not in node:
            raise ScasError(f"parameter {name!r} is a module without a kernel: {sorted(node)}")
        node = node["kernel"]
    return node if layer is None else node[layer]


def answer_loss(params: dict, batch: dict, *, cfg: ModelConfig, dtype=jnp.float32,
                attn_impl: str = "xla", vocab_chunk: int = VOCAB_CHUNK) -> jax.Array:
    """Mean token NLL over ``nll_answer_mask`` (0 when empty): a scalar.

    ``batch``: ``tokens``, ``positions``, ``segment_ids``, ``nll_answer_mask``, each
    ``[B, T]``; with several sequences it is the mean over all their answer tokens
    (use one sequence per call for a per-answer cost).
    """
    hidden, _ = decode(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                       dtype=dtype, attn_impl=attn_impl)
    nll = next_token_nll(params, cfg, hidden, batch["tokens"], vocab_chunk)
    mask = batch["nll_answer_mask"].astype(bool)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def grad_cost(params: dict, batch: dict, *, cfg: ModelConfig, target: str = DEFAULT_TARGET,
              dtype=jnp.float32, attn_impl: str = "xla", vocab_chunk: int = VOCAB_CHUNK) -> dict[str, jax.Array]:
    """``{"loss", "target", "all"}`` scalars for the answer(s) of ``batch`` (see module
    docstring); pure, so it composes under ``jit`` and ``vmap``."""
    loss_fn = functools.partial(answer_loss, cfg=cfg, dtype=dtype, attn_impl=attn_impl,
                                vocab_chunk=vocab_chunk)
    loss, g = jax.value_and_grad(loss_fn)(params, batch)
    return {"loss": loss, "target": _sq_norm(select_param(g, target, cfg.num_layers)),
            "all": _sq_norm(g)}


def single_batch(e: Encoded, pad_to: int = 64) -> dict[str, np.ndarray]:
    """One encoded row as a ``[1, T']`` batch, ``T'`` = its length rounded up to
    ``pad_to`` (padding: segment 0, masks off)."""
    n = e.length
    t = -(-n // pad_to) * pad_to
    out = {}
    for k, v in (("tokens", e.ids), ("nll_answer_mask", e.nll_answer_mask),
                 ("answer_mask", e.answer_mask), ("question_mask", e.question_mask),
                 ("nll_question_mask", e.nll_question_mask)):
        a = np.zeros((1, t), np.asarray(v).dtype)
        a[0, :n] = v
        out[k] = a
    out["positions"] = np.zeros((1, t), np.int32)
    out["positions"][0, :n] = np.arange(n)
    out["segment_ids"] = np.zeros((1, t), np.int32)
    out["segment_ids"][0, :n] = 1
    return out


@functools.lru_cache(maxsize=None)
def _compiled(cfg: ModelConfig, target: str, dtype: str, attn_impl: str, vocab_chunk: int):
    return jax.jit(functools.partial(grad_cost, cfg=cfg, target=target, dtype=jnp.dtype(dtype),
                                     attn_impl=attn_impl, vocab_chunk=vocab_chunk))


def grad_costs(params: dict, cfg: ModelConfig, encoded: Iterable[Encoded], *,
               target: str = DEFAULT_TARGET, pad_to: int = 64, dtype: str = "float32",
               attn_impl: str = "xla", vocab_chunk: int = VOCAB_CHUNK) -> list[dict[str, float]]:
    """:func:`grad_cost` of every encoded row, one at a time (one compilation per
    padded length); ``[{"loss", "target", "all"}]`` as Python floats."""
    fn = _compiled(cfg, target, dtype, attn_impl, vocab_chunk)
    out = []
    for e in encoded:
        res = fn(params, single_batch(e, pad_to))
        out.append({k: float(v) for k, v in res.items()})
    return out


def tree_sq_norm(tree: Any) -> float:
    """Host helper: the squared norm of a pytree (tests, checks)."""
    return float(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))


__all__: Sequence[str] = ("DEFAULT_TARGET", "select_param", "answer_loss", "grad_cost",
                          "single_batch", "grad_costs", "tree_sq_norm")
