"""A Hugging Face config dict and tokenizer from a GGUF file's metadata, with no torch.

A GGUF file carries no ``config.json`` or ``tokenizer.json``: llama.cpp writes both as
metadata. This module reads them back with the ``gguf`` package alone:

- :func:`hf_config` -> a ``config.json``-style dict (what
  :func:`scas_jax.models.config.config_from_hf` reads, and what ``export`` writes out);
- :func:`hf_tokenizer` -> a ``transformers.PreTrainedTokenizerFast`` over a
  ``tokenizers.Tokenizer``, with its special tokens and chat template: byte-level BPE
  (``tokenizer.ggml.model == "gpt2"``), or Gemma's SentencePiece vocabulary
  (``"llama"`` in a ``gemma3`` file: BPE with byte fallback over ``▁``-spelled
  text, merges rebuilt from the token order, as transformers does).

Both follow transformers' own GGUF reading, so ids and config values agree with it.
Anything this module does not understand is a :class:`ScasError` naming the file and key.
"""

from __future__ import annotations

from pathlib import Path

from scas_jax.errors import ScasError

# general.architecture -> Hugging Face model_type. llama.cpp writes Mistral models as
# "llama" (same layout, no sliding window in the metadata), so they load as llama.
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (gguf.TokenType)

# tokenizer.ggml.pre -> the split regex applied before byte-level BPE; None: GPT-2's own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": None,
    "gpt2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class GGUFMetadata:
    """The key/value metadata of an open ``gguf.GGUFReader``, with errors naming the file."""

    def __init__(self, reader, path: str | Path):
        self.path = Path(path)
        self._fields = reader.fields
        self.tensor_names = frozenset(t.name for t in reader.tensors)

    def get(self, key: str, default=None):
        f = self._fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        f = self._fields.get(key)
        if f is None:
            raise ScasError(f"{self.path}: GGUF metadata has no {key!r}")
        return f.contents()

    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in MODEL_TYPES:
            raise ScasError(
                f"{self.path}: general.architecture {arch!r} is not supported "
                f"(supported: {', '.join(MODEL_TYPES)})"
            )
        return arch


def _rope_scaling(meta: GGUFMetadata, arch: str) -> dict | None:
    """``rope_scaling`` in the transformers<5 layout, or None for plain RoPE."""
    if "rope_freqs.weight" in meta.tensor_names:
        raise ScasError(
            f"{meta.path}: RoPE frequencies stored as tensor 'rope_freqs.weight' (llama3 scaling) "
            "are not supported; convert from the Hugging Face directory instead"
        )
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if factor is None:
        raise ScasError(f"{meta.path}: GGUF metadata has no {arch + '.rope.scaling.factor'!r}")
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def hf_config(meta: GGUFMetadata) -> dict:
    """The Hugging Face config dict the metadata describes.

    Keys: ``model_type``, ``vocab_size`` (``<arch>.vocab_size``, else the token list's
    length), sizes, head counts, ``head_dim`` (``attention.key_length``, else
    ``rope.dimension_count``, else hidden/heads), ``rms_norm_eps``, ``rope_theta``,
    ``rope_scaling`` when set, ``max_position_embeddings``, ``tie_word_embeddings`` (True
    when the file has no ``output.weight``), biases from the tensors present, and the
    bos/eos/pad token ids the tokenizer metadata names.
    """
    arch = meta.architecture()

    def key(name: str):
        return meta.require(f"{arch}.{name}")

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ScasError(f"{meta.path}: per-layer {arch}.attention.head_count_kv is not supported")
    head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(meta.require("tokenizer.ggml.tokens"))
    cfg = {
        "model_type": MODEL_TYPES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim) if head_dim is not None else hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in meta.tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in meta.tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in meta.tensor_names,
    }
    scaling = _rope_scaling(meta, arch)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    if arch == "gemma3":
        _gemma3_config(meta, cfg)
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            cfg[name] = int(value)
    return cfg


def _gemma3_config(meta: GGUFMetadata, cfg: dict) -> None:
    """The Gemma 3 keys llama.cpp does not store, as transformers' own GGUF loading sets
    them (its ``Gemma3TextConfig`` defaults, which llama.cpp also hard-codes): every 6th
    layer global, local RoPE base 10000, ``query_pre_attn_scalar`` 256, GELU-tanh, no
    soft-capping; the sliding window from ``gemma3.attention.sliding_window``."""
    del cfg["hidden_act"], cfg["attention_bias"], cfg["mlp_bias"]
    window = meta.get("gemma3.attention.sliding_window")
    if window is None:
        raise ScasError(f"{meta.path}: GGUF metadata has no 'gemma3.attention.sliding_window'")
    if cfg.pop("rope_scaling", None) is not None:
        raise ScasError(f"{meta.path}: gemma3.rope.scaling.* is not supported")
    n = cfg["num_hidden_layers"]
    cfg.update(
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=int(window),
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")},
        },
        query_pre_attn_scalar=256,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )


def _byte_spelling() -> list[str]:
    """GPT-2's printable character for each byte 0..255 (byte-level BPE's alphabet):
    printable Latin-1 bytes stand for themselves, the rest map to chr(256 + n) in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spelling, extra = [], 256
    for b in range(256):
        if b in printable:
            spelling.append(chr(b))
        else:
            spelling.append(chr(extra))
            extra += 1
    return spelling


def hf_tokenizer(meta: GGUFMetadata):
    """The byte-level BPE tokenizer of ``tokenizer.ggml.*`` as a ``PreTrainedTokenizerFast``.

    Tokens typed CONTROL become special added tokens, USER_DEFINED ones plain added tokens
    (both matched whole); bos/eos/unk/pad come from their ``*_token_id`` keys,
    ``add_bos_token``/``add_eos_token`` from the file's flags (default off), and
    ``chat_template`` from ``tokenizer.chat_template``.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.require("tokenizer.ggml.model")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []
    if kind == "gpt2":
        backend, in_vocab = _byte_level_backend(meta, tokens)
    elif kind == "llama" and meta.architecture() == "gemma3":
        backend, in_vocab = _gemma_backend(meta, tokens)
    else:
        raise ScasError(
            f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', "
            "byte-level BPE, and 'llama' in a gemma3 file); convert from the Hugging Face "
            "directory instead"
        )
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types) if ty == _CONTROL and in_vocab(t, True)
    ])
    backend.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and in_vocab(t, False)
    ])

    def special(gguf_key: str) -> tuple[str, int] | None:
        i = meta.get(f"tokenizer.ggml.{gguf_key}")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise ScasError(f"{meta.path}: tokenizer.ggml.{gguf_key} {i} is outside the "
                            f"vocabulary of {len(tokens)} tokens")
        return tokens[int(i)], int(i)

    bos, eos = special("bos_token_id"), special("eos_token_id")
    unk, pad = special("unknown_token_id"), special("padding_token_id")
    # llama.cpp adds bos to a SentencePiece vocabulary whose file does not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    for flag, tok, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if flag and tok is None:
            raise ScasError(f"{meta.path}: tokenizer.ggml.add_{name}_token is set but "
                            f"tokenizer.ggml.{name}_token_id is missing")
    # bos/eos added around every sequence as the file's flags say (transformers 5 derives
    # the same from add_bos_token/add_eos_token; older versions read only this)
    around = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]

    def template(*seqs: str) -> str:
        parts = []
        for type_id, seq in enumerate(seqs):
            parts += [f"{bos[0]}:{type_id}"] if add_bos else []
            parts += [f"${seq}:{type_id}"]
            parts += [f"{eos[0]}:{type_id}"] if add_eos else []
        return " ".join(parts)

    backend.post_processor = processors.TemplateProcessing(
        single=template("A"), pair=template("A", "B"), special_tokens=around)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos and bos[0],
        eos_token=eos and eos[0],
        unk_token=unk and unk[0],
        pad_token=pad and pad[0],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=meta.get("tokenizer.chat_template"),
        # Gemma's <mask> is a special token of transformers' GemmaTokenizer
        **({"mask_token": "<mask>"} if kind == "llama" and "<mask>" in tokens[:8] else {}),
    )


def _byte_level_backend(meta: GGUFMetadata, tokens: list[str]):
    """Byte-level BPE (``gpt2``) and which tokens may be added whole: a CONTROL token
    outside the byte alphabet is a mislabel by llama.cpp (adding it would grow the
    vocabulary past the embedding), so it stays an ordinary entry."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ScasError(
            f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    merges = meta.require("tokenizer.ggml.merges")
    spelling = _byte_spelling()
    alphabet = set(spelling)

    def spelled(token: str) -> str:
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
    )
    backend = Tokenizer(bpe)
    split = PRE_TOKENIZERS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, lambda t, control: set(t) <= alphabet if control else t in vocab


def _gemma_backend(meta: GGUFMetadata, tokens: list[str]):
    """Gemma's SentencePiece vocabulary as a ``tokenizers`` BPE model.

    Text is spelled with ``▁`` for spaces (no prefix space), unknown characters fall
    back to ``<0xNN>`` byte tokens. The file has no merges; the scores do not give
    Gemma's merge order, the token order does: each token, in file order, contributes
    its splits into two tokens of the vocabulary, longer left part first. Whitespace-only
    tokens containing a space are stored with real spaces; they are renamed to ``▁``
    runs of their length first (as transformers does).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = []
    for t in spelled:
        for cut in range(len(t) - 1, 0, -1):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
        unk_token=tokens[int(unk)] if unk is not None else None,
    ))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, lambda t, control: control or t in vocab
