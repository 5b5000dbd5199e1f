"""The decoder with a key/value cache: prefill and one-token decode steps for generation.

The cache is one pair of arrays holding every layer (the layer scan's stacked axis
first), so the decode step runs the same ``lax.scan`` over layers as
:func:`scas_jax.models.decoder.decode`::

    cache["k"], cache["v"]: [num_layers, batch, max_len, num_kv_heads, head_dim]

A call writes the keys/values of its ``T`` new tokens at slots ``index .. index+T-1``
of every row (in place: the cache is the scan's carry and each layer updates its own
slice) and attends over all ``max_len`` slots. Which slots a query at slot ``q`` sees is
decided by ``kv_valid [batch, max_len]`` (False on left padding) and the slot order:

    key slot s is visible  iff  kv_valid[b, s]  and  s <= q  and  (q - s < sliding_window)

Rows are left-padded, so every row's real tokens occupy consecutive slots and slot
differences equal position differences: the sliding window (Mistral) needs no
positions. RoPE positions are given per token (``positions [batch, T]``, from the
padding mask), and q/k norms (Qwen3) and biases (Qwen2, Llama ``attention_bias``) are
the same Linen parameters as the uncached layer's: the modules here reuse
:mod:`scas_jax.models.layers`' blocks and parameter names, so one parameter tree runs
both paths.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from scas_jax.models.attention import _NEG
from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import logits_from_hidden
from scas_jax.models.layers import MLP, RMSNorm, _dense, apply_rope, rope_tables


def cache_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """``(num_layers, batch, max_len, num_kv_heads, head_dim)``."""
    return (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed ``{"k", "v"}`` of :func:`cache_shape`."""
    shape = cache_shape(cfg, batch, max_len)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> int:
    """Bytes of one cache (keys and values)."""
    n = 1
    for d in cache_shape(cfg, batch, max_len):
        n *= d
    return 2 * n * jnp.dtype(dtype).itemsize


def cached_attention_weights(q, k_all, v_all, kv_valid, index, sliding_window):
    """Attention of ``T`` new queries over every cache slot.

    q ``[batch, T, heads, head_dim]`` (queries at slots ``index + arange(T)``),
    k_all/v_all ``[batch, max_len, kv_heads, head_dim]``, kv_valid ``bool[batch, max_len]``.
    Returns ``[batch, T, heads, head_dim]``.
    """
    b, t, h, d = q.shape
    s, kvh = k_all.shape[1], k_all.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_all, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    q_slot = index + jnp.arange(t)
    k_slot = jnp.arange(s)
    ok = kv_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
    if sliding_window is not None:
        ok &= (q_slot[None, :, None] - k_slot[None, None, :]) < sliding_window
    scores = jnp.where(ok[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_all, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


class CachedAttention(nn.Module):
    """The parameters of :class:`scas_jax.models.layers.Attention`, run against a cache."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, layer, index, kv_valid):
        """``x [batch, T, d_model]``; caches ``[layers, batch, max_len, kv_heads, head_dim]``.

        Returns (``[batch, T, d_model]``, k_cache, v_cache) with this layer's slots
        ``index .. index+T-1`` written."""
        c, b, t = self.cfg, x.shape[0], x.shape[1]
        dense = lambda n, f, bias: _dense(f, bias, self.dtype, self.param_dtype, n)  # noqa: E731
        q = dense("q_proj", c.num_heads * c.head_dim, c.qkv_bias)(x)
        k = dense("k_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(x)
        v = dense("v_proj", c.num_kv_heads * c.head_dim, c.qkv_bias)(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        at = (layer, 0, index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
        k_all = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False).astype(self.dtype)
        v_all = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False).astype(self.dtype)
        out = cached_attention_weights(q, k_all, v_all, kv_valid, index, c.sliding_window)
        out = out.reshape(b, t, c.num_heads * c.head_dim)
        return dense("o_proj", c.hidden_size, c.o_bias)(out), k_cache, v_cache


class CachedDecoderLayer(nn.Module):
    """:class:`scas_jax.models.layers.DecoderLayer` (same parameter names) with a cache."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, layer, index, kv_valid):
        c = self.cfg
        norm = lambda n: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=n)  # noqa: E731
        attn = CachedAttention(c, self.dtype, self.param_dtype, name="self_attn")
        a, k_cache, v_cache = attn(norm("input_layernorm")(x), cos, sin, k_cache, v_cache, layer,
                                   index, kv_valid)
        h = x + a
        mlp_out, _ = MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
        return h + mlp_out, k_cache, v_cache


def decode_with_cache(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: dict,
    index: jax.Array,
    kv_valid: jax.Array,
    *,
    dtype=jnp.float32,
) -> tuple[jax.Array, dict]:
    """Run ``T`` new tokens per row through the stack, reading and writing the cache.

    Args:
      tokens, positions: ``[batch, T]`` int32 (RoPE positions of the new tokens).
      cache: ``{"k", "v"}`` ``[layers, batch, max_len, kv_heads, head_dim]``.
      index: int32 scalar, the cache slot of the first new token (same for every row:
        rows are left-padded to a common length).
      kv_valid: ``bool[batch, max_len]``, False on the slots of left padding.
    Returns:
      (final normed hidden states ``[batch, T, d_model]``, the updated cache).
    """
    layer = CachedDecoderLayer(cfg, dtype, params["norm"]["scale"].dtype)
    cos, sin = rope_tables(cfg, positions)
    x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)

    def body(carry, xs):
        h, k_cache, v_cache = carry
        p, i = xs
        h, k_cache, v_cache = layer.apply({"params": p}, h, cos, sin, k_cache, v_cache, i, index,
                                          kv_valid)
        return (h, k_cache, v_cache), None

    (x, k_cache, v_cache), _ = jax.lax.scan(
        body, (x, cache["k"], cache["v"]), (params["layers"], jnp.arange(cfg.num_layers)))
    x = RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": params["norm"]}, x)
    return x, {"k": k_cache, "v": v_cache}


def next_token_logits(
    params: dict, cfg: ModelConfig, tokens, positions, cache, index, kv_valid, *, dtype=jnp.float32
) -> tuple[jax.Array, dict]:
    """float32 logits ``[batch, vocab]`` of the token after the *last* new token of each
    row, and the updated cache (see :func:`decode_with_cache`)."""
    hidden, cache = decode_with_cache(params, cfg, tokens, positions, cache, index, kv_valid,
                                      dtype=dtype)
    return logits_from_hidden(params, cfg, hidden[:, -1:])[:, 0], cache
