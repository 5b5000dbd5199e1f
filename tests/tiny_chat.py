"""Tiny chat fixtures for the training tests: a character-level ChatML tokenizer, a
converted tiny llama that uses it, and arithmetic SFT rows."""

from __future__ import annotations

import json
import string
from pathlib import Path

import jax
import numpy as np

from scas_jax.models.config import config_from_hf
from scas_jax.models.decoder import init_params


def char_tokenizer(out: Path):
    """A character-level fast tokenizer with a ChatML template (vocab 99)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(str(out))
    return tok


TINY_HF = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
               tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def make_student_dir(out: Path, seed: int = 0) -> Path:
    """A converted tiny llama (vocab 128) with the char tokenizer."""
    from scas_jax.convert import checkpoint

    out.mkdir(parents=True)
    cfg = config_from_hf(TINY_HF)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    checkpoint.save_params(out / "params", params)
    checkpoint.write_meta(out, cfg, dict(TINY_HF), "float32", "test")
    char_tokenizer(out)
    return out


def drop_chat_template(student: Path) -> Path:
    """Remove a student directory's chat template (it becomes a base model's)."""
    for f in student.glob("chat_template.*"):
        f.unlink()
    cfg_file = student / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    return student


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, size=2))
        rows.append({"id": i, "system": "Add.", "instruction": f"{a}+{b}?", "output": f"{a + b}"})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
