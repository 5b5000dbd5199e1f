"""The decoder with a key/value cache: prefill and one-token decode steps for generation.

Two layouts of the same cache, chosen by backend (:func:`default_layout`):

- ``"stacked"`` (accelerators): one pair of arrays holding every layer (the layer
  scan's stacked axis first), and a step runs the same ``lax.scan`` over layers as
  :func:`scas_jax.models.decoder.decode`::

      cache["k"], cache["v"]: [num_layers, batch, num_kv_heads, max_len, head_dim]

- ``"per_layer"`` (CPU): one buffer per layer (``cache["k"][i]``: ``[batch,
  num_kv_heads, max_len, head_dim]``), the layers unrolled, with their parameters
  unstacked once (:func:`unstack_layers`). On XLA's CPU backend every layer's slice of
  a stacked array (weights and cache) is copied out before a dot reads it; a decode
  step is bound by reading the weights and the cache once, so those copies cost a
  third of the step. Here nothing is sliced: a decode step writes the new key/value
  into the layer's own buffer first (in place, the old buffer has no other reader)
  and attends over the buffer.

A call with ``T`` new tokens per row (the prompt in the prefill, one token per decode
step) attends over the cached slots before ``index`` and over the new tokens
themselves, with one softmax over both; the layer scan only *reads* the cache, and the
new keys/values of every layer are written afterwards at slots ``index .. index+T-1``
with one in-place update. (Writing inside the scan, into the scan's carry, measured
slower on CPU: each layer then copied its cache slice before attending.) Which slots a
query at slot ``q`` sees is decided by ``kv_valid [batch, max_len]`` (False on left
padding), ``new_valid [batch, T]`` and the slot order:

    key slot s is visible  iff  valid[b, s]  and  s <= q  and  (q - s < sliding_window)

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
from scas_jax.models.layers import (MLP, NO_WINDOW, _dense, embed, layer_xs, norm_for, project_qkv,
                                   rope_for_layers)

LAYOUTS = ("stacked", "per_layer")


def default_layout(backend: str | None = None) -> str:
    """``"per_layer"`` on CPU, ``"stacked"`` elsewhere (see the module docstring)."""
    return "per_layer" if (backend or jax.default_backend()) == "cpu" else "stacked"


def unstack_layers(params: dict) -> dict:
    """``params`` with ``"layers"`` as a tuple of per-layer trees (a copy of the layer
    weights; the ``"per_layer"`` layout's parameters)."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n))}


def cache_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """``(num_layers, batch, num_kv_heads, max_len, head_dim)`` (per layer: without the first)."""
    return (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, layout: str = "stacked") -> dict:
    """Zeroed ``{"k", "v"}``: arrays of :func:`cache_shape` (``"stacked"``) or tuples of
    ``num_layers`` arrays of ``cache_shape[1:]`` (``"per_layer"``)."""
    shape = cache_shape(cfg, batch, max_len)
    if layout == "per_layer":
        return {n: tuple(jnp.zeros(shape[1:], dtype) for _ in range(shape[0])) for n in ("k", "v")}
    if layout != "stacked":
        raise ValueError(f"unknown cache layout {layout!r}; one of {LAYOUTS}")
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> int:
    """Bytes of one cache (keys and values; the same in both layouts)."""
    n = 1
    for d in cache_shape(cfg, batch, max_len):
        n *= d
    return 2 * n * jnp.dtype(dtype).itemsize


def cached_attention(q, k_new, v_new, k_cache, v_cache, kv_valid, new_valid, index, sliding_window,
                     use_cache: bool = True):
    """Attention of ``T`` new queries over the cached slots and the new tokens themselves.

    q ``[batch, T, heads, head_dim]``; k_new/v_new ``[batch, kv_heads, T, head_dim]``
    (the new tokens, at slots ``index .. index+T-1``); k_cache/v_cache ``[batch,
    kv_heads, max_len, head_dim]`` (one layer, before this call's writes: slots
    ``>= index`` hold stale values and are masked); kv_valid ``bool[batch, max_len]``;
    new_valid ``bool[batch, T]``. ``use_cache=False`` (the prefill, ``index == 0``)
    skips the cached part. One softmax over both parts. Returns ``[batch, T, heads, head_dim]``.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[1]
    qg = jnp.moveaxis(q.reshape(b, t, kvh, h // kvh, d), 1, 3) * jnp.asarray(d**-0.5, q.dtype)  # b k g t d
    new_pos = jnp.arange(t)
    ok_new = new_valid[:, None, :] & (new_pos[None, None, :] <= new_pos[None, :, None])  # b t j
    if sliding_window is not None:
        ok_new &= (new_pos[None, :, None] - new_pos[None, None, :]) < sliding_window
    s_new = jnp.einsum("bkgtd,bkjd->bkgtj", qg, k_new, preferred_element_type=jnp.float32)
    s_new = jnp.where(ok_new[:, None, None], s_new, _NEG)
    if use_cache:
        slots = jnp.arange(k_cache.shape[2])
        q_slot = index + new_pos
        ok_old = kv_valid[:, None, :] & (slots[None, None, :] < index)  # b t s
        if sliding_window is not None:
            ok_old &= (q_slot[None, :, None] - slots[None, None, :]) < sliding_window
        s_old = jnp.einsum("bkgtd,bksd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
        s_old = jnp.where(ok_old[:, None, None], s_old, _NEG)
        m = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
        p_old, p_new = jnp.exp(s_old - m), jnp.exp(s_new - m)
        denom = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
        out = (jnp.einsum("bkgts,bksd->bkgtd", p_old.astype(v_cache.dtype), v_cache,
                          preferred_element_type=jnp.float32)
               + jnp.einsum("bkgtj,bkjd->bkgtd", p_new.astype(v_new.dtype), v_new,
                            preferred_element_type=jnp.float32)) / denom
    else:
        probs = jax.nn.softmax(s_new, axis=-1).astype(v_new.dtype)
        out = jnp.einsum("bkgtj,bkjd->bkgtd", probs, v_new, preferred_element_type=jnp.float32)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q.dtype)


def attend_cache(q, k_cache, v_cache, kv_valid, index, sliding_window):
    """Attention of ``T`` queries at slots ``index .. index+T-1`` over a cache that
    already holds their own keys and values.

    q ``[batch, T, heads, head_dim]``; k_cache/v_cache ``[batch, kv_heads, max_len,
    head_dim]``; kv_valid ``bool[batch, max_len]``. Returns ``[batch, T, heads, head_dim]``.
    """
    b, t, h, d = q.shape
    kvh = k_cache.shape[1]
    qg = jnp.moveaxis(q.reshape(b, t, kvh, h // kvh, d), 1, 3) * jnp.asarray(d**-0.5, q.dtype)  # b k g t d
    slots = jnp.arange(k_cache.shape[2])
    q_slot = index + jnp.arange(t)
    ok = kv_valid[:, None, :] & (slots[None, None, :] <= q_slot[None, :, None])  # b t s
    if sliding_window is not None:
        ok &= (q_slot[None, :, None] - slots[None, None, :]) < sliding_window
    s = jnp.einsum("bkgtd,bksd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(ok[:, None, None], s, _NEG), axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_cache, preferred_element_type=jnp.float32)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q.dtype)


class CachedAttention(nn.Module):
    """The parameters of :class:`scas_jax.models.layers.Attention`, run against a cache."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    use_cache: bool = True
    write_first: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, index, kv_valid, new_valid, window=None,
                 packing=None):
        """``x [batch, T, d_model]``; this layer's caches ``[batch, kv_heads, max_len, head_dim]``.
        Returns (``[batch, T, d_model]``, k, v): the new keys and values ``[batch,
        kv_heads, T, head_dim]`` for the caller to write at ``index`` (the caches are only
        read), or with ``write_first`` the caches with them written at ``index`` (the
        attention then reads the updated caches).

        ``packing`` (a packed prefill, :func:`pack_prompts`): ``x [1, N, d_model]`` holds
        every row's prompt back to back; the projections run on the ``N`` packed tokens,
        the attention on the padded ``[batch, T]`` layout gathered from them
        (``packing["rows_index"]``), and its output is gathered back
        (``packing["packed_index"]``): returns ``[1, N, d_model]`` and k, v ``[batch,
        kv_heads, T, head_dim]`` (T: the padded prompt width)."""
        c = self.cfg
        q, k, v = project_qkv(c, x, cos, sin, self.dtype, self.param_dtype)
        if packing is not None:
            rows = packing["rows_index"]  # [batch, T] -> packed token
            q, k, v = q[0][rows], k[0][rows], v[0][rows]
        b, t = q.shape[0], q.shape[1]
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, kv_heads, T, head_dim]
        window = c.sliding_window if window is None else window
        if self.write_first:
            at = (0, 0, index, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
            out = attend_cache(q, k.astype(self.dtype), v.astype(self.dtype), kv_valid, index, window)
        else:
            out = cached_attention(q, k, v, k_cache.astype(self.dtype), v_cache.astype(self.dtype), kv_valid,
                                   new_valid, index, window, self.use_cache)
        out = out.reshape(b, t, c.num_heads * c.head_dim)
        if packing is not None:
            out = out.reshape(b * t, -1)[packing["packed_index"]][None]  # [1, N, heads * head_dim]
        return _dense(c.hidden_size, c.o_bias, self.dtype, self.param_dtype, "o_proj")(out), k, v


class CachedDecoderLayer(nn.Module):
    """:class:`scas_jax.models.layers.DecoderLayer` (same parameter names) with a cache."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    use_cache: bool = True
    write_first: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, index, kv_valid, new_valid, window=None,
                 packing=None):
        c = self.cfg
        norm = lambda n: norm_for(c, self.dtype, self.param_dtype, n)  # noqa: E731
        attn = CachedAttention(c, self.dtype, self.param_dtype, self.use_cache, self.write_first,
                               name="self_attn")
        a, k, v = attn(norm("input_layernorm")(x), cos, sin, k_cache, v_cache, index, kv_valid, new_valid,
                       window, packing)
        mlp = MLP(c, self.dtype, self.param_dtype, name="mlp")
        if c.sandwich_norms:  # Gemma 3
            h = x + norm("post_attention_layernorm")(a)
            mlp_out, _ = mlp(norm("pre_feedforward_layernorm")(h))
            return h + norm("post_feedforward_layernorm")(mlp_out), k, v
        h = x + a
        mlp_out, _ = mlp(norm("post_attention_layernorm")(h))
        return h + mlp_out, k, v


def decode_with_cache(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: dict,
    index: jax.Array,
    kv_valid: jax.Array,
    new_valid: jax.Array | None = None,
    *,
    prefill: bool = False,
    dtype=jnp.float32,
    packing: dict | None = None,
) -> tuple[jax.Array, dict]:
    """Run ``T`` new tokens per row through the stack, reading and writing the cache.

    Args:
      tokens, positions: ``[batch, T]`` int32 (RoPE positions of the new tokens).
      cache: ``{"k", "v"}`` ``[layers, batch, kv_heads, max_len, head_dim]``.
      index: int32 scalar, the cache slot of the first new token (same for every row:
        rows are left-padded to a common length).
      kv_valid: ``bool[batch, max_len]``, False on the slots of left padding.
      new_valid: ``bool[batch, T]`` (default: all True), False on padding among the new
        tokens (the prefill's left padding).
      prefill: static; True when nothing is cached yet (``index == 0``): the cached
        slots are not read at all.
      packing: a packed prefill (:func:`pack_prompts`; ``prefill`` and ``index == 0``
        only): ``tokens``/``positions`` are ``[1, N]``, every row's prompt back to back;
        ``new_valid`` is the padded ``[batch, T]`` mask; the hidden states come back
        packed, ``[1, N, d_model]``.
    Returns:
      (final normed hidden states ``[batch, T, d_model]``, the cache with the new
      tokens' keys and values written at slots ``index .. index+T-1`` of every layer).
    """
    layer = CachedDecoderLayer(cfg, dtype, params["norm"]["scale"].dtype, not prefill)
    rope = rope_for_layers(cfg, positions)
    windows, local = layer_xs(cfg, positions)
    x = embed(params, cfg, tokens, dtype)
    if new_valid is None:
        new_valid = jnp.ones(tokens.shape, bool)

    # The layer scan only reads the cache; the new keys/values of all layers come out
    # stacked and are written with one update after it, in place in the donated cache.
    def body(h, xs):
        p, k_cache, v_cache, window, is_local = xs
        cos, sin = rope(is_local)
        h, k, v = layer.apply({"params": p}, h, cos, sin, k_cache, v_cache, index, kv_valid, new_valid,
                              window, packing)
        return h, (k, v)

    xs = (params["layers"], cache["k"], cache["v"], windows, local)
    x, (k_new, v_new) = jax.lax.scan(body, x, xs)
    at = (0, 0, 0, index, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), at),
             "v": jax.lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), at)}
    x = norm_for(cfg, dtype, params["norm"]["scale"].dtype).apply({"params": params["norm"]}, x)
    return x, cache


def decode_per_layer(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: dict,
    index: jax.Array,
    kv_valid: jax.Array,
    new_valid: jax.Array | None = None,
    *,
    prefill: bool = False,
    dtype=jnp.float32,
    packing: dict | None = None,
) -> tuple[jax.Array, dict]:
    """:func:`decode_with_cache` for the ``"per_layer"`` layout: ``params`` from
    :func:`unstack_layers`, ``cache`` from ``init_cache(..., layout="per_layer")``; the
    layers are unrolled (each layer's window and RoPE table are static). The prefill
    attends over the prompt alone and then writes it; a decode step writes first and
    attends over the layer's buffer (no buffer is copied)."""
    norm_dtype = params["norm"]["scale"].dtype
    layer = CachedDecoderLayer(cfg, dtype, norm_dtype, use_cache=not prefill, write_first=not prefill)
    rope = rope_for_layers(cfg, positions)
    x = embed(params, cfg, tokens, dtype)
    if new_valid is None:
        new_valid = jnp.ones(tokens.shape, bool)
    ks, vs = list(cache["k"]), list(cache["v"])
    for i, p in enumerate(params["layers"]):
        local = cfg.per_layer and cfg.layer_types[i] == "sliding"
        window = ((cfg.sliding_window or NO_WINDOW) if local else NO_WINDOW) if cfg.per_layer else None
        cos, sin = rope(local)
        x, k, v = layer.apply({"params": p}, x, cos, sin, ks[i], vs[i], index, kv_valid, new_valid, window,
                              packing)
        if prefill:
            k = jax.lax.dynamic_update_slice(ks[i], k.astype(ks[i].dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(vs[i], v.astype(vs[i].dtype), (0, 0, index, 0))
        ks[i], vs[i] = k, v
    x = norm_for(cfg, dtype, norm_dtype).apply({"params": params["norm"]}, x)
    return x, {"k": tuple(ks), "v": tuple(vs)}


def next_token_logits(
    params: dict, cfg: ModelConfig, tokens, positions, cache, index, kv_valid, new_valid=None, *,
    prefill: bool = False, dtype=jnp.float32, layout: str = "stacked", packing: dict | None = None,
) -> tuple[jax.Array, dict]:
    """float32 logits ``[batch, vocab]`` of the token after the *last* new token of each
    row, and the updated cache (:func:`decode_with_cache`, or :func:`decode_per_layer`
    for ``layout="per_layer"``). With ``packing`` (a packed prefill) the last token of
    row ``b`` is the packed token ``packing["last_index"][b]``."""
    run = decode_per_layer if layout == "per_layer" else decode_with_cache
    hidden, cache = run(params, cfg, tokens, positions, cache, index, kv_valid, new_valid,
                        prefill=prefill, dtype=dtype, packing=packing)
    last = hidden[:, -1:] if packing is None else hidden[0][packing["last_index"]][:, None]
    return logits_from_hidden(params, cfg, last)[:, 0], cache


def pack_prompts(prompts, width: int, rows: int, packed_len: int, pad_id: int = 0) -> dict:
    """Host-side index arrays of a packed prefill (numpy).

    ``prompts``: at most ``rows`` lists of token ids (each 1..``width`` long; rows past
    them are one ``pad_id`` token), laid out back to back in ``packed_len`` >= their
    total tokens (the tail is ``pad_id`` at position 0). Row ``b``'s padded layout is
    left-padded to ``width`` as in the unpacked prefill. Returns int32 ``tokens [N]``,
    ``positions [N]`` (0.. within the row), ``rows_index [rows, width]`` (the packed
    token at each padded slot; padding points at the row's first token, masked),
    ``packed_index [N]`` (the padded slot ``b * width + s`` of each packed token; 0 for
    the tail), ``last_index [rows]`` (each row's last packed token) and bool ``valid
    [rows, width]``.
    """
    import numpy as np

    lengths = [len(p) for p in prompts] + [1] * (rows - len(prompts))
    total = sum(lengths)
    if total > packed_len:
        raise ValueError(f"{total} prompt tokens do not fit a packed prefill of {packed_len}")
    tokens = np.full(packed_len, pad_id, np.int32)
    positions = np.zeros(packed_len, np.int32)
    rows_index = np.zeros((rows, width), np.int32)
    packed_index = np.zeros(packed_len, np.int32)
    last_index = np.zeros(rows, np.int32)
    valid = np.zeros((rows, width), bool)
    off = 0
    for b, n in enumerate(lengths):
        if b < len(prompts):
            tokens[off:off + n] = np.asarray(prompts[b], np.int32)
        start = width - n
        positions[off:off + n] = np.arange(n)
        rows_index[b, :] = off
        rows_index[b, start:] = off + np.arange(n)
        packed_index[off:off + n] = b * width + start + np.arange(n)
        last_index[b] = off + n - 1
        valid[b, start:] = True
        off += n
    return {"tokens": tokens, "positions": positions, "rows_index": rows_index,
            "packed_index": packed_index, "last_index": last_index, "valid": valid}
