"""The decoder's configuration, read from a Hugging Face ``config.json`` dict.

One dataclass covers the four supported families. What differs between them:

- llama:   ``attention_bias`` puts biases on q/k/v/o; optional ``rope_scaling`` (llama3, linear)
- qwen2:   q/k/v always carry a bias, o does not; sliding window only if ``use_sliding_window``
- qwen3:   q/k RMSNorm over ``head_dim`` before RoPE; ``attention_bias`` as llama
- mistral: ``sliding_window`` applies to every layer
- gemma3:  (Hugging Face ``gemma3_text``) RMSNorm scales by ``1 + weight``; q/k norms;
  four norms per layer (``pre_/post_feedforward_layernorm`` around the MLP,
  ``post_attention_layernorm`` on the attention output); embeddings scaled by
  ``sqrt(hidden_size)``; per-layer ``layer_types`` (sliding layers use ``sliding_window``
  and ``rope_local_theta``, full layers ``rope_theta``/``rope_scaling``); attention scores
  scaled by ``query_pre_attn_scalar ** -0.5``; GELU-tanh MLP; optional final logit
  soft-capping. (transformers 5.24 stores ``attn_logit_softcapping`` but never applies
  it in Gemma 3, so neither do we.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from scas_jax.data.jsonl import read_json
from scas_jax.errors import ScasError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
# Hugging Face model_type -> ours
_MODEL_TYPE_ALIASES = {"gemma3_text": "gemma3"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only student. Hashable, so it can be a static jit argument."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope scaling as a sorted tuple of (key, value) pairs, hashable; () for none.
    rope_scaling: tuple = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    # Gemma 3 (defaults: every other family)
    layer_types: tuple = ()  # per layer "sliding" / "full"; () = every layer alike
    rope_local_theta: float | None = None  # RoPE base of the sliding layers
    query_pre_attn_scalar: float | None = None  # attention scale ** -2; None: head_dim
    final_logit_softcapping: float | None = None
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # pre/post feed-forward norms, post-attention norm on the output

    @property
    def per_layer(self) -> bool:
        """True when layers differ (sliding vs full): window and RoPE are scanned per layer."""
        return bool(self.layer_types)

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = tuple(sorted((d.get("rope_scaling") or {}).items()))
        d["layer_types"] = tuple(d.get("layer_types") or ())
        return cls(**d)


def _rope_from_hf(hf: dict, where: str) -> tuple[float, tuple]:
    """(rope_theta, rope_scaling) from either the transformers<5 or >=5 config layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ScasError(
            f"{where}: rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), ()
    keep = {"rope_type": rope_type, "factor": float(merged["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            keep[key] = float(merged[key])
        keep["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return float(theta), tuple(sorted(keep.items()))


def _gemma3_from_hf(hf: dict, where: str) -> dict:
    """The Gemma 3 fields: layer types, the two RoPE bases, scaling, soft-capping."""
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ScasError(f"{where}: layer_types must list {n} of 'sliding_attention'/'full_attention'")
    if hf.get("use_bidirectional_attention"):
        raise ScasError(f"{where}: use_bidirectional_attention is not supported")
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers >= 5
        full = dict(params.get("full_attention") or {"rope_theta": 1_000_000.0})
        local = dict(params.get("sliding_attention") or {"rope_theta": 10_000.0})
    else:  # transformers < 5: rope_theta, rope_scaling (global) and rope_local_base_freq
        full = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    theta, scaling = _rope_from_hf({"rope_parameters": full}, f"{where} (full_attention rope)")
    local_theta, local_scaling = _rope_from_hf({"rope_parameters": local}, f"{where} (sliding_attention rope)")
    if local_scaling:
        raise ScasError(f"{where}: rope scaling on the sliding layers is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ScasError(f"{where}: hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    cap = hf.get("final_logit_softcapping")
    return dict(
        layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in types),
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=float(cap) if cap else None,
        norm_offset=1.0, embed_scale=True, sandwich_norms=True, qk_norm=True,
        hidden_act="gelu_tanh", tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=int(hf.get("sliding_window") or 4096),
    )


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config dict. ``where`` names the source in error messages."""
    model_type = _MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
    if model_type == "gemma3" and "text_config" in hf:
        raise ScasError(f"{where}: a multimodal Gemma 3 config; only the text model "
                        "(model_type 'gemma3_text', Gemma3ForCausalLM) is supported")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ScasError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "silu")
    if model_type != "gemma3" and act not in ("silu", "swish"):
        raise ScasError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        gemma = _gemma3_from_hf(hf, where) if model_type == "gemma3" else {}
        theta, scaling = (None, ()) if gemma else _rope_from_hf(hf, where)
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            sliding = None
        fields = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            hidden_act="silu",
        )
        fields.update(gemma)
        return ModelConfig(**fields)
    except KeyError as e:
        raise ScasError(f"{where}: missing field {e.args[0]!r}") from None


def read_hf_config(path: str | Path) -> dict:
    return read_json(path)


def tiny_config(model_type: str = "llama", **overrides: Any) -> ModelConfig:
    """A tiny random-init preset for tests and smoke runs."""
    base = ModelConfig(model_type=model_type)
    if model_type == "qwen2":
        base = dataclasses.replace(base, qkv_bias=True)
    if model_type == "qwen3":
        base = dataclasses.replace(base, qk_norm=True)
    if model_type == "gemma3":
        base = dataclasses.replace(
            base, qk_norm=True, num_kv_heads=1, layer_types=("sliding", "full"), sliding_window=5,
            rope_local_theta=10000.0, rope_theta=1_000_000.0, query_pre_attn_scalar=24.0,
            norm_offset=1.0, embed_scale=True, sandwich_norms=True, hidden_act="gelu_tanh",
            tie_word_embeddings=True)
    return dataclasses.replace(base, **overrides)
