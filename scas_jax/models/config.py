"""The decoder's configuration, read from a Hugging Face ``config.json`` dict.

One dataclass covers the four supported families. What differs between them:

- llama:   ``attention_bias`` puts biases on q/k/v/o; optional ``rope_scaling`` (llama3, linear)
- qwen2:   q/k/v always carry a bias, o does not; sliding window only if ``use_sliding_window``
- qwen3:   q/k RMSNorm over ``head_dim`` before RoPE; ``attention_bias`` as llama
- mistral: ``sliding_window`` applies to every layer
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from scas_jax.data.jsonl import read_json
from scas_jax.errors import ScasError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
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


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config dict. ``where`` names the source in error messages."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ScasError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ScasError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        theta, scaling = _rope_from_hf(hf, where)
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            sliding = None
        return ModelConfig(
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
    return dataclasses.replace(base, **overrides)
