"""Tensor sources: read one tensor at a time, by Hugging Face name, from safetensors or GGUF.

A source exposes ``names`` (the Hugging Face tensor names it holds), ``get(name)``
returning a numpy array in Hugging Face layout, ``hf_config`` (the config dict) and
``tokenizer_dir`` / ``load_tokenizer()``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from scas_jax.convert.gguf_meta import GGUFMetadata, hf_config, hf_tokenizer
from scas_jax.convert.safetensors_io import SafetensorsFile
from scas_jax.errors import ScasError
from scas_jax.models.config import read_hf_config

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3: "ffn_norm" is the pre-feed-forward norm; two more norms per layer
_GGUF_TO_HF_GEMMA3 = {
    **_GGUF_TO_HF,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class SafetensorsSource:
    """A Hugging Face model directory: ``config.json`` and single or sharded safetensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config_where = str(self.path / "config.json")
        self.hf_config = read_hf_config(self.path / "config.json")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ScasError(f"{self.path}: no *.safetensors files")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
        self._where: dict[str, Path] = {}
        self._handles = {}
        for f in files:
            if not f.exists():
                raise ScasError(f"{index}: names shard {f.name}, which does not exist")
            h = SafetensorsFile(f)
            self._handles[f] = h
            for name in h.keys():
                self._where[name] = f
        self.names = set(self._where)
        self.tokenizer_dir = self.path

    def get(self, name: str) -> np.ndarray:
        return self._handles[self._where[name]].get(name)

    def describe(self) -> str:
        return str(self.path)


def _reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> Hugging Face split-half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A GGUF file; quantised tensors are dequantised to float32 as they are read.

    The config and tokenizer are rebuilt from the metadata by :mod:`gguf_meta`.
    """

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the gguf package raises plain ValueError/OSError
            raise ScasError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.meta = GGUFMetadata(self._reader, self.path)
        self.arch = self.meta.architecture()
        self._tensors = {}
        layer_map = _GGUF_TO_HF_GEMMA3 if self.arch == "gemma3" else _GGUF_TO_HF
        for t in self._reader.tensors:
            self._tensors[self._hf_name(t.name, layer_map)] = t
        self.names = set(self._tensors)
        self.config_where = str(self.path)
        self.hf_config = hf_config(self.meta)
        self.tokenizer_dir = None

    @staticmethod
    def _hf_name(name: str, layer_map: dict = _GGUF_TO_HF) -> str:
        if name in _GGUF_TOP:
            return _GGUF_TOP[name]
        m = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if m and m.group(2) in layer_map:
            return f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
        return f"gguf:{name}"

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.hf_config["num_attention_heads"]
            if "k_proj" in name:
                heads = self.hf_config.get("num_key_value_heads") or heads
            w = _reverse_llama_permute(w, heads)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's RMSNorm weights with the +1 already added; the
            # Hugging Face layout (and ours, which adds 1 in the forward pass) has w
            w = w - np.float32(1.0)
        return w

    def load_tokenizer(self):
        """The tokenizer the metadata describes (a ``PreTrainedTokenizerFast``)."""
        return hf_tokenizer(self.meta)

    def describe(self) -> str:
        return str(self.path)


def find_gguf(path: Path) -> Path | None:
    """``path`` itself if it is a .gguf file, or the single .gguf inside a directory."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ScasError(f"{path}: holds several GGUF files ({', '.join(f.name for f in found)}); name one")
        if found:
            return found[0]
    return None


def open_source(path: str | Path):
    """A tensor source for a Hugging Face directory or a GGUF file (or a directory with one)."""
    path = Path(path)
    if not path.exists():
        raise ScasError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "config.json").exists() and list(path.glob("*.safetensors")):
        return SafetensorsSource(path)
    gguf_path = find_gguf(path)
    if gguf_path is not None:
        return GGUFSource(gguf_path)
    raise ScasError(
        f"{path}: not a Hugging Face model directory (config.json + *.safetensors) or a GGUF file"
    )
