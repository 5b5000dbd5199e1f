"""Flax (Linen) building blocks of the decoder: RMSNorm, RoPE, attention, MLP, one layer.

Parameter names follow Hugging Face's module names (``self_attn.q_proj``,
``mlp.up_proj``, ``input_layernorm`` ...), so checkpoint conversion is a transpose.
Kernels are ``[in, out]``; RoPE uses Hugging Face's split-half layout, so no q/k
permutation is ever needed for safetensors checkpoints.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scas_jax.models.attention import attention
from scas_jax.models.config import ModelConfig
from scas_jax.parallel import local_rows


class RMSNorm(nn.Module):
    """``x / rms(x) * scale``, computed in float32 and cast back as Hugging Face does.

    ``offset`` (Gemma: 1.0) multiplies by ``offset + scale`` instead, in float32 before
    the cast (Gemma's order); the stored ``scale`` is the checkpoint's weight as is.
    """

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def norm_for(cfg: ModelConfig, dtype, param_dtype, name: str | None = None) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, cfg.norm_offset, name=name)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` with linear or llama3 scaling applied.
    ``local``: those of the sliding layers (Gemma 3's ``rope_local_theta``, unscaled)."""
    dim = cfg.head_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    scaling = {} if local else cfg.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(cfg: ModelConfig, positions: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[batch, seq, head_dim]`` (float32) for integer positions ``[batch, seq]``."""
    inv = jnp.asarray(rope_inv_freq(cfg, local))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# A window no row reaches: "no sliding window" for a scanned per-layer window.
NO_WINDOW = 2**30


def layer_xs(cfg: ModelConfig, positions: jax.Array) -> tuple:
    """What varies per layer, stacked on a leading ``[num_layers]`` axis for the layer scan.

    Models whose layers are alike get ``(None, None)`` (the window is static and one
    RoPE table is shared). Gemma 3 gets (``window [L]`` int32, ``local [L]`` bool): the
    scanned layer picks its RoPE table and sliding window from these, so local and
    global layers share one compiled body.
    """
    if not cfg.per_layer:
        return None, None
    local = np.array([t == "sliding" for t in cfg.layer_types])
    window = np.where(local, cfg.sliding_window or NO_WINDOW, NO_WINDOW).astype(np.int32)
    return jnp.asarray(window), jnp.asarray(local)


def rope_for_layers(cfg: ModelConfig, positions: jax.Array):
    """``(cos, sin)`` shared by every layer, or for per-layer models a function of the
    scanned ``local`` flag choosing between the global and the local tables."""
    cos, sin = rope_tables(cfg, positions)
    if not cfg.per_layer:
        return lambda local: (cos, sin)
    cos_l, sin_l = rope_tables(cfg, positions, local=True)
    return lambda local: (jnp.where(local, cos_l, cos), jnp.where(local, sin_l, sin))


def query_prescale(cfg: ModelConfig) -> float | None:
    """Factor on q turning the attention's ``head_dim ** -0.5`` into
    ``query_pre_attn_scalar ** -0.5`` (None when they agree)."""
    if cfg.query_pre_attn_scalar is None or cfg.query_pre_attn_scalar == cfg.head_dim:
        return None
    return float(cfg.head_dim**0.5 * cfg.query_pre_attn_scalar**-0.5)


def embed(params: dict, cfg: ModelConfig, tokens: jax.Array, dtype) -> jax.Array:
    """Token embeddings in ``dtype``; Gemma's ``sqrt(hidden_size)`` factor is applied in
    the embedding's own dtype, as transformers does."""
    table = params["embed_tokens"]["embedding"]
    x = jnp.take(table, tokens, axis=0)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size**0.5, table.dtype)
    return x.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` (split-half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _dense(features: int, bias: bool, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)


def project_qkv(c: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array, dtype, param_dtype):
    """The attention inputs of one layer, inside its compact ``__call__`` (the projections
    are created as its ``q_proj``/``k_proj``/``v_proj`` and ``q_norm``/``k_norm``).

    ``x [batch, T, d_model]`` -> ``q [batch, T, heads, head_dim]`` (rotated, pre-scaled),
    ``k [batch, T, kv_heads, head_dim]`` (rotated), ``v [batch, T, kv_heads, head_dim]``.
    """
    b, t = x.shape[0], x.shape[1]
    q = _dense(c.num_heads * c.head_dim, c.qkv_bias, dtype, param_dtype, "q_proj")(x)
    k = _dense(c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, param_dtype, "k_proj")(x)
    v = _dense(c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, param_dtype, "v_proj")(x)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q = norm_for(c, dtype, param_dtype, "q_norm")(q)
        k = norm_for(c, dtype, param_dtype, "k_norm")(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if (f := query_prescale(c)) is not None:
        q = q * jnp.asarray(f, q.dtype)
    return q, k, v


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, window=None):
        """``x [batch, seq, d_model]`` -> ``[batch, seq, d_model]``. ``window``: this
        layer's sliding window (a scanned value for per-layer models), else the config's."""
        c = self.cfg
        q, k, v = project_qkv(c, x, cos, sin, self.dtype, self.param_dtype)
        out = attention(
            q, k, v, segment_ids, sliding_window=c.sliding_window if window is None else window,
            impl=self.attn_impl,
        )
        out = out.reshape(*x.shape[:2], c.num_heads * c.head_dim)
        return _dense(c.hidden_size, c.o_bias, self.dtype, self.param_dtype, "o_proj")(out)


# Tokens per chunk of the forward-only SwiGLU (below: one piece).
MLP_TOKEN_CHUNK = 1024


def _swiglu_plain(x, w_gate, w_up, w_down):
    up = x @ w_up
    return (nn.silu(x @ w_gate) * up) @ w_down, up


@jax.custom_vjp
def swiglu(x, w_gate, w_up, w_down):
    """``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` and the ``up`` activation.

    ``x [..., seq, d_model]``, ``w_gate``/``w_up [d_model, d_ff]``, ``w_down [d_ff, d_model]``.
    Forward only (scoring, prefill), more than :data:`MLP_TOKEN_CHUNK` tokens of a
    device's rows run in pieces of about that many (:func:`_by_token_chunks`), so the
    ``gate`` and ``silu(gate) * up`` buffers are a piece's (``[chunk, d_ff]``), not
    ``[tokens, d_ff]`` each; ``up`` is returned whole, and where
    nothing uses it XLA does not make it (an 8k-token SmolLM2 layer: 151 -> 105 MiB of
    scratch). Each row is the same product either way. The custom VJP (training) runs
    unchunked and writes the weight gradients as plain ``[d_in, tokens] @ [tokens,
    d_out]`` products of row-major operands: XLA's CPU autodiff of the same expression
    transposes the ``[tokens, d_ff]`` gradients through slow strided fusions (1.5x
    slower here).
    """
    return _by_token_chunks(lambda xc: _swiglu_plain(xc, w_gate, w_up, w_down), x)


def _by_token_chunks(fn, x):
    """``fn`` of ``x [..., seq, d]`` about :data:`MLP_TOKEN_CHUNK` tokens of each device's
    rows at a time (one piece when they hold no more): ``fn`` maps ``[tokens, d]`` to a
    tuple of ``[tokens, ...]`` arrays, and each comes back as ``[..., seq, ...]`` over all
    of ``x``'s tokens.

    The pieces are position ranges of every row (``[rows, c]`` with ``c =
    MLP_TOKEN_CHUNK // rows a device holds``, :func:`scas_jax.parallel.local_rows`),
    never ranges of the flattened batch: a loop over a batch axis that is sharded would
    gather the whole batch on every device, and each device would compute every row
    (the MLP of a 2-device scoring run did, before). The last piece ends at the last
    position and recomputes the few positions it shares with the one before, so nothing
    is padded."""
    if x.ndim < 2:
        raise ValueError(f"_by_token_chunks: x needs [..., seq, d], got shape {x.shape}")
    lead, t, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    rows = math.prod(lead)
    xr = x.reshape(rows, t, d)
    c = max(1, MLP_TOKEN_CHUNK // local_rows(rows))
    if t <= c:
        return tuple(y.reshape(*lead, t, *y.shape[1:]) for y in fn(xr.reshape(rows * t, d)))
    k = -(-t // c)

    def piece(i):
        start = jnp.minimum(i * c, t - c)
        xc = jax.lax.dynamic_slice_in_dim(xr, start, c, axis=1)
        return start, [y.reshape(rows, c, *y.shape[1:]) for y in fn(xc.reshape(rows * c, d))]

    shapes = jax.eval_shape(lambda: piece(0)[1])
    init = [jnp.zeros((rows, t, *s.shape[2:]), s.dtype) for s in shapes]

    def body(i, outs):
        start, ys = piece(i)
        return [jax.lax.dynamic_update_slice_in_dim(o, y, start, axis=1) for o, y in zip(outs, ys)]

    outs = jax.lax.fori_loop(0, k, body, init)
    return tuple(o.reshape(*lead, t, *o.shape[2:]) for o in outs)


class FactoredUp(NamedTuple):
    """The ``mlp.up_proj`` activation ``x @ w`` left unmade: the layer's MLP input ``x
    [..., d_model]``, the kernel ``w [d_model, d_ff]`` and every row's squared norm
    ``sqnorm [...]`` (float32, from the product itself). A reduction that scales each
    row by a function of its norm and sums rows (the SCAS tap's unit-row sums) is
    ``(sum_t c_t x_t) @ w``, with no ``[tokens, d_ff]`` buffer."""

    x: jax.Array
    w: jax.Array
    sqnorm: jax.Array


def swiglu_up_norms(x, w_gate, w_up, w_down):
    """:func:`swiglu`'s output and ``||x @ w_up||^2`` per token (float32) instead of the
    ``up`` activation, chunked the same way, so no ``[tokens, d_ff]`` buffer is made
    (the SCAS tap of an 8k-token SmolLM2 pass: 48 MiB less scratch). Forward only."""
    def piece(xc):
        out, up = _swiglu_plain(xc, w_gate, w_up, w_down)
        u = up.astype(jnp.float32)
        return out, jnp.sum(u * u, axis=-1)

    return _by_token_chunks(piece, x)


def _swiglu_fwd(x, w_gate, w_up, w_down):
    gate, up = x @ w_gate, x @ w_up
    return ((nn.silu(gate) * up) @ w_down, up), (x, gate, up, w_gate, w_up, w_down)


def _swiglu_bwd(res, cotangents):
    x, gate, up, w_gate, w_up, w_down = res
    dy, d_up_out = cotangents
    sig = jax.nn.sigmoid(gate)
    act = gate * sig
    d_model, d_ff = x.shape[-1], gate.shape[-1]
    dh = dy @ w_down.T
    d_up = dh * act + d_up_out
    d_gate = dh * up * (sig * (1 + gate * (1 - sig)))
    x_t = x.reshape(-1, d_model).T
    dw_gate = (x_t @ d_gate.reshape(-1, d_ff)).astype(w_gate.dtype)
    dw_up = (x_t @ d_up.reshape(-1, d_ff)).astype(w_up.dtype)
    dw_down = ((act * up).reshape(-1, d_ff).T @ dy.reshape(-1, d_model)).astype(w_down.dtype)
    dx = (d_gate @ w_gate.T + d_up @ w_up.T).astype(x.dtype)
    return dx, dw_gate, dw_up, dw_down


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class _Kernel(nn.Module):
    """Just a ``kernel [in, out]`` parameter, laid out as ``nn.Dense`` lays it out."""

    shape: tuple[int, int]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.lecun_normal(), self.shape, self.param_dtype)


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, factored_up: bool = False):
        """``x [batch, seq, d_model]`` -> (out ``[batch, seq, d_model]``, up ``[batch, seq,
        d_ff]``); with ``factored_up`` (forward passes), the plain SwiGLU MLP gives a
        :class:`FactoredUp` in place of ``up`` (the others still give ``up``)."""
        c = self.cfg
        d, f = c.hidden_size, c.intermediate_size
        if c.hidden_act == "gelu_tanh":  # Gemma: gelu_pytorch_tanh(gate) * up
            gate = _dense(f, c.mlp_bias, self.dtype, self.param_dtype, "gate_proj")(x)
            up = _dense(f, c.mlp_bias, self.dtype, self.param_dtype, "up_proj")(x)
            out = _dense(d, c.mlp_bias, self.dtype, self.param_dtype, "down_proj")(
                nn.gelu(gate, approximate=True) * up)
            return out, up
        if c.mlp_bias:
            gate = _dense(f, True, self.dtype, self.param_dtype, "gate_proj")(x)
            up = _dense(f, True, self.dtype, self.param_dtype, "up_proj")(x)
            return _dense(d, True, self.dtype, self.param_dtype, "down_proj")(nn.silu(gate) * up), up
        ws = [_Kernel(shape, self.param_dtype, name=n)().astype(self.dtype)
              for n, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d)))]
        x = x.astype(self.dtype)
        if factored_up:
            out, sqnorm = swiglu_up_norms(x, *ws)
            return out, FactoredUp(x, ws[1], sqnorm)
        return swiglu(x, *ws)


class DecoderLayer(nn.Module):
    """Pre-norm block. Returns the new residual stream and the ``mlp.up_proj`` output."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, window=None, factored_up: bool = False):
        c = self.cfg
        norm = lambda n: norm_for(c, self.dtype, self.param_dtype, n)  # noqa: E731
        attn = Attention(c, self.dtype, self.param_dtype, self.attn_impl, name="self_attn")
        a = attn(norm("input_layernorm")(x), cos, sin, segment_ids, window)
        mlp = MLP(c, self.dtype, self.param_dtype, name="mlp")
        if c.sandwich_norms:  # Gemma: norms on both sides of the attention and of the MLP
            h = x + norm("post_attention_layernorm")(a)
            mlp_out, up = mlp(norm("pre_feedforward_layernorm")(h), factored_up)
            return h + norm("post_feedforward_layernorm")(mlp_out), up
        h = x + a
        mlp_out, up = mlp(norm("post_attention_layernorm")(h), factored_up)
        return h + mlp_out, up
