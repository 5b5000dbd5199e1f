"""The real student: SmolLM2-135M-Instruct from the bundled GGUF, against transformers."""

from __future__ import annotations

import json

import jax
import numpy as np

from scas_jax.assets import GSM8K_POOL
from scas_jax.models.decoder import forward


def _rows(n=3):
    with open(GSM8K_POOL / "human_reference.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_config_read_from_gguf(smollm2_student):
    c = smollm2_student.cfg
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0
    assert smollm2_student.tokenizer.chat_template


def test_logits_match_transformers_on_gsm8k_rows(smollm2_student, smollm2_torch_model):
    import torch

    tok = smollm2_student.tokenizer
    seqs = []
    for r in _rows():
        msgs = [{"role": "system", "content": r["system"]},
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["teacher_output"]}]
        seqs.append(tok(tok.apply_chat_template(msgs, tokenize=False))["input_ids"])
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], seg[i, : len(s)] = s, 1
    pos = np.tile(np.arange(t), (len(seqs), 1)) * seg
    ours, _ = jax.jit(forward, static_argnums=(1,))(
        smollm2_student.params, smollm2_student.cfg, ids, pos, seg)
    ours = np.asarray(ours)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = smollm2_torch_model(torch.tensor([s])).logits[0].numpy()
        err = np.abs(ours[i, : len(s)] - ref).max()
        assert err < 1e-3, f"row {i}: max |logit diff| {err}"
        assert (ours[i, : len(s)].argmax(-1) == ref.argmax(-1)).mean() > 0.99
