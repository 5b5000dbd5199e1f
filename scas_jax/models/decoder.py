"""The decoder as pure functions of ``(params, tokens, positions, segment_ids)``.

Parameters are a plain nested dict (Linen's layout), with every decoder layer stacked
on a leading ``[num_layers]`` axis under ``params["layers"]``; layers run under
``jax.lax.scan`` so a 30-layer model compiles one layer body.

Taps name intermediate activations returned from the same pass:
``"layers.{i}.mlp.up_proj"`` (``[batch, seq, d_ff]``) and ``"layers.{i}.residual"``
(the residual stream after layer ``i``, ``[batch, seq, d_model]``); ``i`` may be
negative. Taps are kept from inside the single layer scan by a ``lax.cond`` at their
layer, so a tap costs its own output buffer and nothing else (no second compiled
layer, no per-layer copy).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig
from scas_jax.models.layers import DecoderLayer, embed, layer_xs, norm_for, rope_for_layers, rope_tables

_TAP_RE = re.compile(r"^layers\.(-?\d+)\.(mlp\.up_proj|residual)$")
TAP_KINDS = {"mlp.up_proj": "up_proj", "residual": "residual"}


def parse_tap(name: str, num_layers: int) -> tuple[int, str]:
    """``"layers.-1.mlp.up_proj"`` -> ``(num_layers - 1, "up_proj")``."""
    m = _TAP_RE.match(name)
    if not m:
        raise ScasError(
            f"unknown tap {name!r}: expected 'layers.<i>.mlp.up_proj' or 'layers.<i>.residual'"
        )
    layer = int(m.group(1))
    if layer < 0:
        layer += num_layers
    if not 0 <= layer < num_layers:
        raise ScasError(f"tap {name!r}: layer out of range for a {num_layers}-layer model")
    return layer, TAP_KINDS[m.group(2)]


def init_params(cfg: ModelConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Random parameters (for tests and smoke runs): layers stacked on axis 0."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    t = jnp.zeros((1, 4), jnp.int32)
    x = jnp.zeros((1, 4, cfg.hidden_size), param_dtype)
    cos, sin = rope_tables(cfg, t)
    layer = DecoderLayer(cfg, param_dtype, param_dtype)
    layers = jax.vmap(lambda k: layer.init(k, x, cos, sin, t)["params"])(
        jax.random.split(k_layers, cfg.num_layers)
    )
    params = {
        "embed_tokens": {
            "embedding": (0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size)))
            .astype(param_dtype)
        },
        "layers": layers,
        "norm": {"scale": (jnp.zeros if cfg.norm_offset else jnp.ones)((cfg.hidden_size,), param_dtype)},
    }
    if not cfg.tie_word_embeddings:
        w = 0.02 * jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size))
        params["lm_head"] = {"kernel": w.astype(param_dtype)}
    return params


def _slice_layers(layers: dict, start: int, stop: int) -> dict:
    return jax.tree.map(lambda x: x[start:stop], layers)


def decode(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    taps: Sequence[str] = (),
    *,
    dtype=jnp.float32,
    attn_impl: str = "xla",
    remat: bool = False,
    tap_fn: Callable[[str, jax.Array], Any] | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Run the decoder stack.

    Args:
      tokens, positions, segment_ids: ``[batch, seq]`` int32. ``positions`` restart at
        0 for each packed sequence; ``segment_ids`` are 0 on padding (see attention.py).
      taps: names of activations to return (see module docstring).
      tap_fn: ``(name, activation) -> pytree``, a reduction of a tap (its per-sequence
        sums, say). When given, the dict holds ``tap_fn(name, activation)`` and only that
        is carried through the layer scan: each layer runs under a ``lax.cond``, the
        tapped layer's branch reducing its tap and every other layer's leaving the
        ``mlp.up_proj`` activation unmade (an 8k-token SmolLM2 scoring pass: 219 -> 174
        MiB of XLA scratch). An ``mlp.up_proj`` tap reaches ``tap_fn`` as a
        :class:`~scas_jax.models.layers.FactoredUp` where the MLP is a plain SwiGLU, so
        the tapped layer does not make it either (174 -> 126 MiB), and as the activation
        otherwise; ``tap_fn`` must take both. The reduction sees the whole activation,
        so its result does not depend on how many rows or devices share the batch.
        Forward passes.
    Returns:
      (final normed hidden states ``[batch, seq, d_model]``, {tap name: activation, or
      ``tap_fn``'s value}).
    """
    layer = DecoderLayer(cfg, dtype, params["norm"]["scale"].dtype, attn_impl)
    rope = rope_for_layers(cfg, positions)
    windows, local = layer_xs(cfg, positions)

    def run_one(p, x, window, is_local, factored_up=False):
        cos, sin = rope(is_local)
        return layer.apply({"params": p}, x, cos, sin, segment_ids, window, factored_up)

    if remat:
        run_one = jax.checkpoint(run_one)

    wanted = [(name, *parse_tap(name, cfg.num_layers)) for name in taps]
    x = embed(params, cfg, tokens, dtype)
    b, t = tokens.shape
    width = {"up_proj": cfg.intermediate_size, "residual": cfg.hidden_size}
    if tap_fn is None:
        bufs = {name: jnp.zeros((b, t, width[kind]), dtype) for name, _, kind in wanted}
    else:
        bufs = {name: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda n=name, k=kind: tap_fn(n, jnp.zeros((b, t, width[k]), dtype))))
            for name, _, kind in wanted}

    def keep(i, h, up, bufs, reduce):  # layer i's taps (reduced) into the carried buffers
        new = {}
        for name, idx, kind in wanted:
            val = up if kind == "up_proj" else h
            new[name] = jax.lax.cond(i == idx, lambda v=val, n=name: reduce(n, v),
                                     lambda n=name: bufs[n])
        return new

    # One scan over all layers; a tapped activation is kept by a cond at its layer
    # (one compiled layer body, and no buffers of a second, unrolled layer).
    def body(carry, xs):
        h, bufs = carry
        p, i, window, is_local = xs
        if tap_fn is None or not wanted:
            h, up = run_one(p, h, window, is_local)
            return (h, keep(i, h, up, bufs, lambda n, v: v)), None

        def tapped(h, bufs):  # `up` as a FactoredUp where the MLP allows (tap_fn takes both)
            h, up = run_one(p, h, window, is_local, factored_up=True)
            return h, keep(i, h, up, bufs, tap_fn)

        def plain(h, bufs):  # `up` unused: never made
            return run_one(p, h, window, is_local)[0], bufs

        any_tap = functools.reduce(jnp.logical_or, [i == idx for _, idx, _ in wanted])
        return jax.lax.cond(any_tap, tapped, plain, h, bufs), None

    xs = (params["layers"], jnp.arange(cfg.num_layers), windows, local)
    (x, out), _ = jax.lax.scan(body, (x, bufs), xs)
    x = norm_for(cfg, dtype, params["norm"]["scale"].dtype).apply({"params": params["norm"]}, x)
    return x, out


def lm_head(params: dict, cfg: ModelConfig, dtype) -> tuple[jax.Array, str]:
    """The output projection in ``dtype`` and its einsum spec for ``[..., d_model]``
    inputs. Tied heads contract with the ``[vocab, d_model]`` embedding directly, so no
    transposed copy of it is made."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].astype(dtype), "...d,vd->...v"
    return params["lm_head"]["kernel"].astype(dtype), "...d,dv->...v"


def softcap(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """``cap * tanh(logits / cap)`` when the config sets ``final_logit_softcapping``."""
    cap = cfg.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def logits_from_hidden(params: dict, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """``[batch, seq, d_model]`` -> float32 logits ``[batch, seq, vocab]``."""
    w, spec = lm_head(params, cfg, hidden.dtype)
    return softcap(cfg, jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32))


def forward(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    taps: Sequence[str] = (),
    **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Full logits ``[batch, seq, vocab]`` (float32) and taps. For long rows prefer
    :func:`scas_jax.models.loss.target_logprobs`, which never holds the full logits."""
    hidden, out = decode(params, cfg, tokens, positions, segment_ids, taps, **kwargs)
    return logits_from_hidden(params, cfg, hidden), out

