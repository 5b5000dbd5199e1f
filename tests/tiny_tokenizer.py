"""A tiny offline ChatML tokenizer (lower-cased characters, < 96 ids) for the tiny HF models.

``build()`` returns a ``transformers.PreTrainedTokenizerFast`` whose ids all fit the
vocabulary of ``tests/hf_tiny.py`` (96): ``[UNK]`` = 0, ``<|im_start|>`` = 1,
``<|im_end|>`` = 2, then one id per character of :data:`CHARS`. Every character outside
that set is ``[UNK]``. ``save(dir)`` writes it beside a model so ``--student DIR`` works.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ("[UNK]", "<|im_start|>", "<|im_end|>")
CHARS = string.ascii_lowercase + string.digits + " \n.,?!:;'\"$%+-*/=()<>|_&#@"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(chat_template: str = CHATML):
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) < 96, len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                  additional_special_tokens=list(SPECIALS[1:]))
    tok.chat_template = chat_template
    return tok


def save(directory: str | Path):
    """Write the tokenizer files into ``directory`` (e.g. beside a tiny model)."""
    tok = build()
    tok.save_pretrained(str(directory))
    return tok


def student_dir(model_dir: str | Path, directory: str | Path) -> Path:
    """A copy of the tiny HF model ``model_dir`` at ``directory`` with these tokenizer
    files beside it: a complete ``--student DIR``."""
    import shutil

    shutil.copytree(model_dir, directory)
    save(directory)
    return Path(directory)
