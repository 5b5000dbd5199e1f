"""Config and tokenizer rebuilt from GGUF metadata (no torch) agree with transformers' own
GGUF reading (which needs torch: the oracle here), on the bundled SmolLM2 file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.convert.gguf_meta import GGUFMetadata, hf_config, hf_tokenizer
from scas_jax.convert.sources import open_source
from scas_jax.convert.student_io import bundled_smollm2
from scas_jax.errors import ScasError
from scas_jax.models.config import _rope_from_hf, config_from_hf

# every key scas_jax.models.config.config_from_hf reads (rope keys compared via _rope_from_hf)
CONFIG_KEYS = (
    "model_type", "hidden_act", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "sliding_window", "use_sliding_window",
)
TEXTS = [
    "Hello world",
    " leading space, then  two  and\ttab\n\nnewlines\r\n",
    "I have 123 apples and 4.5 kg of 1,000,000 pears; 3/4 = 0.75",
    "héllo wörld — 世界 🙂 ünïcödé",
    "<|im_start|>user\nhi<|im_end|> literal <|endoftext|>specials<repo_name>",
    "don't you'll we're I'M",
    "",
]


def _gsm8k_rows(n: int = 20) -> list[dict]:
    with open(GSM8K_POOL / "human_reference.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def meta():
    import gguf

    path = bundled_smollm2()
    return GGUFMetadata(gguf.GGUFReader(str(path)), path)


@pytest.fixture(scope="module")
def ours(meta):
    return hf_tokenizer(meta)


@pytest.fixture(scope="module")
def ref_config():
    from transformers import AutoConfig

    path = bundled_smollm2()
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()


def test_config_matches_transformers(meta, ref_config):
    cfg = hf_config(meta)
    for key in CONFIG_KEYS:
        assert cfg.get(key) == ref_config.get(key), key
    assert _rope_from_hf(cfg, "ours") == _rope_from_hf(ref_config, "transformers")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == ref_config[key], key
    assert config_from_hf(cfg) == config_from_hf(ref_config)


def test_config_loads_in_transformers_as_theirs(meta, ref_config):
    """export writes this dict as config.json: transformers must read it as its own."""
    from transformers import AutoConfig

    loaded = AutoConfig.for_model(**hf_config(meta)).to_dict()
    for key in CONFIG_KEYS + ("rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert loaded.get(key) == ref_config.get(key), key


def test_ids_match_on_plain_texts(ours, smollm2_tokenizer):
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == smollm2_tokenizer(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == smollm2_tokenizer.decode(
                ids, skip_special_tokens=skip), text


def test_ids_match_on_gsm8k_rows(ours, smollm2_tokenizer):
    rows = _gsm8k_rows()
    texts = [r[k] for r in rows for k in ("system", "instruction", "teacher_output")]
    assert ours(texts)["input_ids"] == smollm2_tokenizer(texts)["input_ids"]


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_outputs_match(ours, smollm2_tokenizer, generation_prompt):
    for r in _gsm8k_rows(5):
        msgs = [{"role": "system", "content": r["system"]},
                {"role": "user", "content": r["instruction"]}]
        if not generation_prompt:
            msgs.append({"role": "assistant", "content": r["teacher_output"]})
        for tokenize in (False, True):
            a = ours.apply_chat_template(msgs, add_generation_prompt=generation_prompt,
                                         tokenize=tokenize)
            b = smollm2_tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt,
                                                      tokenize=tokenize)
            assert a == b


def test_special_tokens_and_template_match(ours, smollm2_tokenizer):
    ref = smollm2_tokenizer
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        ref.eos_token_id, ref.bos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.chat_template == ref.chat_template
    assert len(ours) == len(ref) == 49152
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())


def test_save_pretrained_round_trip(ours, tmp_path):
    from transformers import AutoTokenizer

    ours.save_pretrained(str(tmp_path))
    back = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = TEXTS + [r["teacher_output"] for r in _gsm8k_rows(5)]
    assert back(texts)["input_ids"] == ours(texts)["input_ids"]
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    for gp in (False, True):
        assert back.apply_chat_template(msgs, add_generation_prompt=gp) == ours.apply_chat_template(
            msgs, add_generation_prompt=gp)
    assert back.all_special_ids == ours.all_special_ids
    assert back.eos_token == ours.eos_token and back.chat_template == ours.chat_template


# ---- files this module must refuse, with the file and key named ---------------------


def _write_gguf(path, arch="llama", drop=(), tokenizer_model="gpt2", tensors=("token_embd.weight",),
                add_bos=None):
    """A small GGUF: llama-style metadata for a 2-layer model and a 6-token byte-level vocab."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    ints = {"block_count": 2, "context_length": 128, "embedding_length": 16,
            "feed_forward_length": 32, "attention.head_count": 4, "attention.head_count_kv": 2}
    for k, v in ints.items():
        if k not in drop:
            w.add_uint32(f"{arch}.{k}", v)
    if "attention.layer_norm_rms_epsilon" not in drop:
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", tokenizer_model)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "ab", "Ġ"])
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1])
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    if add_bos is not None:
        w.add_uint32("tokenizer.ggml.bos_token_id", 0)
        w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    for name in tensors:
        w.add_tensor(name, np.zeros((6, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_small_gguf_config_and_tokenizer(tmp_path):
    src = open_source(_write_gguf(tmp_path / "m.gguf", tensors=("token_embd.weight", "output.weight")))
    assert src.hf_config["head_dim"] == 4 and src.hf_config["vocab_size"] == 6
    assert src.hf_config["tie_word_embeddings"] is False
    assert "bos_token_id" not in src.hf_config and src.hf_config["eos_token_id"] == 1
    tok = src.load_tokenizer()
    assert tok("ab a</s>")["input_ids"] == [4, 5, 2, 1]
    assert tok.eos_token == "</s>" and tok.bos_token is None


def test_small_gguf_add_bos_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = _write_gguf(tmp_path / "m.gguf", add_bos=True)
    tok = open_source(path).load_tokenizer()
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert tok("ab a")["input_ids"] == [0, 4, 5, 2]
    for text, pair in (("ab a", None), ("b", "a ab"), ("", None)):
        ours, theirs = (t(text, pair, return_token_type_ids=True) for t in (tok, ref))
        assert ours["input_ids"] == theirs["input_ids"], (text, pair)
        assert ours["token_type_ids"] == theirs["token_type_ids"], (text, pair)
    assert tok.bos_token == ref.bos_token == "<s>" and tok.all_special_ids == ref.all_special_ids


@pytest.mark.parametrize("key", ["embedding_length", "attention.layer_norm_rms_epsilon", "block_count"])
def test_missing_key_names_file_and_key(tmp_path, key):
    path = _write_gguf(tmp_path / "m.gguf", drop=(key,))
    with pytest.raises(ScasError, match=rf"m\.gguf: GGUF metadata has no 'llama\.{key}'"):
        open_source(path)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ScasError, match=r"m\.gguf: general\.architecture 'gpt2' is not supported"):
        open_source(_write_gguf(tmp_path / "m.gguf", arch="gpt2"))


def test_unsupported_tokenizer_model(tmp_path):
    src = open_source(_write_gguf(tmp_path / "m.gguf", tokenizer_model="llama"))
    with pytest.raises(ScasError, match=r"m\.gguf: tokenizer\.ggml\.model 'llama' is not supported"):
        src.load_tokenizer()


def test_llama3_rope_tensor_refused(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", tensors=("token_embd.weight", "rope_freqs.weight"))
    with pytest.raises(ScasError, match=r"m\.gguf: .*'rope_freqs\.weight'"):
        open_source(path)

