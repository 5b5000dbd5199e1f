"""Flax (Linen) building blocks of the decoder: RMSNorm, RoPE, attention, MLP, one layer.

Parameter names follow Hugging Face's module names (``self_attn.q_proj``,
``mlp.up_proj``, ``input_layernorm`` ...), so checkpoint conversion is a transpose.
Kernels are ``[in, out]``; RoPE uses Hugging Face's split-half layout, so no q/k
permutation is ever needed for safetensors checkpoints.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scas_jax.models.attention import attention
from scas_jax.models.config import ModelConfig


class RMSNorm(nn.Module):
    """``x / rms(x) * scale``, computed in float32 and cast back as Hugging Face does."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    scaling = cfg.rope_scaling_dict
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


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[batch, seq, head_dim]`` (float32) for integer positions ``[batch, seq]``."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` (split-half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _dense(features: int, bias: bool, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        """``x [batch, seq, d_model]`` -> ``[batch, seq, d_model]``."""
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
        out = attention(
            q, k, v, segment_ids, sliding_window=c.sliding_window, impl=self.attn_impl
        )
        out = out.reshape(b, t, c.num_heads * c.head_dim)
        return dense("o_proj", c.hidden_size, c.o_bias)(out)


@jax.custom_vjp
def swiglu(x, w_gate, w_up, w_down):
    """``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` and the ``up`` activation.

    ``x [..., d_model]``, ``w_gate``/``w_up [d_model, d_ff]``, ``w_down [d_ff, d_model]``.
    The custom VJP writes the weight gradients as plain ``[d_in, tokens] @ [tokens, d_out]``
    products of row-major operands: XLA's CPU autodiff of the same expression transposes
    the ``[tokens, d_ff]`` gradients through slow strided fusions (1.5x slower here).
    """
    up = x @ w_up
    return (nn.silu(x @ w_gate) * up) @ w_down, up


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
    def __call__(self, x):
        """``x [batch, seq, d_model]`` -> (out ``[batch, seq, d_model]``, up ``[batch, seq, d_ff]``)."""
        c = self.cfg
        d, f = c.hidden_size, c.intermediate_size
        if c.mlp_bias:
            gate = _dense(f, True, self.dtype, self.param_dtype, "gate_proj")(x)
            up = _dense(f, True, self.dtype, self.param_dtype, "up_proj")(x)
            return _dense(d, True, self.dtype, self.param_dtype, "down_proj")(nn.silu(gate) * up), up
        ws = [_Kernel(shape, self.param_dtype, name=n)().astype(self.dtype)
              for n, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d)))]
        return swiglu(x.astype(self.dtype), *ws)


class DecoderLayer(nn.Module):
    """Pre-norm block. Returns the new residual stream and the ``mlp.up_proj`` output."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        c = self.cfg
        norm = lambda n: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=n)  # noqa: E731
        attn = Attention(c, self.dtype, self.param_dtype, self.attn_impl, name="self_attn")
        h = x + attn(norm("input_layernorm")(x), cos, sin, segment_ids)
        mlp_out, up = MLP(c, self.dtype, self.param_dtype, name="mlp")(
            norm("post_attention_layernorm")(h)
        )
        return h + mlp_out, up
