"""Parity of the Flax decoder with transformers on random tiny models of every family."""

from __future__ import annotations

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scas_jax.loader import load_student
from scas_jax.models.decoder import forward

FAMILIES = sorted(hf_tiny.FAMILIES)


@pytest.fixture(scope="module")
def loaded(tiny_hf_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for name, d in tiny_hf_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        out[name] = (hf, load_student(d, with_tokenizer=False))
    return out


def _hf_logits(hf, ids, attention_mask=None):
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return hf(torch.tensor(ids), **kw).logits.numpy()


_fwd = jax.jit(forward, static_argnums=(1, 5))


@pytest.mark.parametrize("name", FAMILIES)
def test_right_padded_batch_matches_transformers(loaded, name):
    hf, st = loaded[name]
    rng = np.random.default_rng(1)
    lengths = [13, 7, 10]
    t = max(lengths)
    ids = rng.integers(0, hf_tiny.VOCAB, size=(len(lengths), t))
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int64)
    seg = mask.astype(np.int32)
    pos = np.tile(np.arange(t), (len(lengths), 1)) * mask
    ours, _ = _fwd(st.params, st.cfg, ids, pos, seg, ())
    ours = np.asarray(ours)
    for b, n in enumerate(lengths):  # each row alone through HF: no padding involved at all
        ref = _hf_logits(hf, ids[b : b + 1, :n])[0]
        np.testing.assert_allclose(ours[b, :n], ref, atol=1e-4, rtol=0)
    # and HF's own padded batch agrees on the valid positions
    ref = _hf_logits(hf, ids, mask)
    np.testing.assert_allclose(ours[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_batch_matches_transformers(loaded, name):
    """Three sequences packed into one row (plus padding): no attention across them."""
    hf, st = loaded[name]
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, hf_tiny.VOCAB, size=n) for n in (6, 9, 4)]
    t = 22
    ids = np.zeros((1, t), np.int64)
    seg = np.zeros((1, t), np.int32)
    pos = np.zeros((1, t), np.int32)
    o = 0
    for i, s in enumerate(seqs):
        ids[0, o : o + len(s)], seg[0, o : o + len(s)] = s, i + 1
        pos[0, o : o + len(s)] = np.arange(len(s))
        o += len(s)
    ours, _ = _fwd(st.params, st.cfg, ids, pos, seg, ())
    ours = np.asarray(ours)[0]
    o = 0
    for s in seqs:
        ref = _hf_logits(hf, s[None])[0]
        np.testing.assert_allclose(ours[o : o + len(s)], ref, atol=1e-4, rtol=0)
        o += len(s)


@pytest.mark.parametrize("name", ["llama_rope_scaling_untied", "qwen3_qknorm_tied", "gemma3_local_global"])
@pytest.mark.parametrize("layer", [0, -1])
def test_taps_match_torch_hooks(loaded, name, layer):
    import torch

    hf, st = loaded[name]
    ids = np.random.default_rng(3).integers(0, hf_tiny.VOCAB, size=(1, 11))
    got = {}
    mod = hf.model.layers[layer]
    h1 = mod.mlp.up_proj.register_forward_hook(lambda m, i, o: got.__setitem__("up", o))
    h2 = mod.register_forward_hook(
        lambda m, i, o: got.__setitem__("res", o[0] if isinstance(o, tuple) else o)
    )
    try:
        with torch.no_grad():
            hf(torch.tensor(ids))
    finally:
        h1.remove()
        h2.remove()
    taps = (f"layers.{layer}.mlp.up_proj", f"layers.{layer}.residual")
    seg = np.ones_like(ids, dtype=np.int32)
    _, out = _fwd(st.params, st.cfg, ids, np.arange(11)[None], seg, taps)
    np.testing.assert_allclose(np.asarray(out[taps[0]]), got["up"].numpy(), atol=1e-5, rtol=0)
    # residuals grow large in Gemma (embeddings times sqrt(d_model)): tolerance relative to their scale
    ref = got["res"].numpy()
    np.testing.assert_allclose(np.asarray(out[taps[1]]), ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_blockwise_attention_equals_dense(loaded):
    """The long-sequence attention path gives the dense path's logits (packed + padded) at
    every real position (what a padding position attends to is read by nothing: the
    blockwise path lets it see its own tile only)."""
    from scas_jax.models.decoder import decode

    _, st = loaded["mistral_window"]
    rng = np.random.default_rng(4)
    t = 40
    ids = rng.integers(0, hf_tiny.VOCAB, size=(2, t))
    seg = np.ones((2, t), np.int32)
    seg[0, 17:] = 2
    seg[1, 31:] = 0
    pos = np.concatenate([np.arange(17), np.arange(t - 17)])[None].repeat(2, 0)
    pos[1] = np.arange(t) * (seg[1] > 0)
    dense, _ = decode(st.params, st.cfg, ids, pos, seg, attn_impl="xla")

    from scas_jax.models import attention as attn_mod

    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32)
    for window in (None, 5):
        a = attn_mod.xla_attention(q, k, v, jnp.asarray(seg), window)
        b = attn_mod.blockwise_attention(q, k, v, jnp.asarray(seg), window, block=8)
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_allclose(np.asarray(a)[seg > 0], np.asarray(b)[seg > 0], atol=1e-5, rtol=0)
    old = attn_mod.BLOCK, attn_mod.forward_block
    try:
        attn_mod.BLOCK = 8
        attn_mod.forward_block = lambda seq: 8
        blk, _ = decode(st.params, st.cfg, ids, pos, seg, attn_impl="blockwise")
    finally:
        attn_mod.BLOCK, attn_mod.forward_block = old
    np.testing.assert_allclose(np.asarray(blk)[seg > 0], np.asarray(dense)[seg > 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_to_ours_to_hf_roundtrip(loaded, tiny_hf_dirs, tmp_path, name):
    import torch
    from transformers import AutoModelForCausalLM

    from scas_jax.convert.commands import convert, export

    hf, _ = loaded[name]
    conv = convert(tiny_hf_dirs[name], tmp_path / "conv")
    back = export(conv, tmp_path / "hf")
    hf2 = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ids = np.random.default_rng(5).integers(0, hf_tiny.VOCAB, size=(2, 9))
    np.testing.assert_allclose(_hf_logits(hf2, ids), _hf_logits(hf, ids), atol=1e-5, rtol=0)
    assert hf2.config.tie_word_embeddings == hf.config.tie_word_embeddings


@pytest.mark.parametrize("window,block", [(None, 8), (5, 8), (None, 16)])
def test_blockwise_attention_gradients_equal_dense(window, block):
    """The flash-style custom VJP gives the dense path's gradients (packed + padded rows;
    tiles of 16 pad the 40 positions to 48)."""
    from scas_jax.models import attention as attn_mod

    rng = np.random.default_rng(6)
    b, t, h, kvh, d = 2, 40, 4, 2, 8
    q, k, v, w = (jnp.asarray(rng.normal(size=s), jnp.float32)
                  for s in ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d), (b, t, h, d)))
    seg = np.ones((b, t), np.int32)
    seg[0, 17:] = 2
    seg[1, 31:] = 0
    seg = jnp.asarray(seg)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    dense = jax.grad(loss(lambda q, k, v: attn_mod.xla_attention(q, k, v, seg, window)), (0, 1, 2))
    flash = jax.jit(jax.grad(
        loss(lambda q, k, v: attn_mod.blockwise_attention(q, k, v, seg, window, block)), (0, 1, 2)))
    for a, b_ in zip(dense(q, k, v), flash(q, k, v)):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), atol=1e-5, rtol=0)


def test_swiglu_custom_vjp_equals_autodiff():
    """The MLP's hand-written backward equals autodiff of the plain expression, including
    a gradient flowing into the tapped ``up`` activation."""
    import flax.linen as nn

    from scas_jax.models.layers import swiglu

    rng = np.random.default_rng(7)
    x, wg, wu, wd = (jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
                     for s in ((2, 5, 8), (8, 12), (8, 12), (12, 8)))
    cy, cu = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 8), (2, 5, 12)))

    def plain(x, wg, wu, wd):
        up = x @ wu
        return jnp.sum(((nn.silu(x @ wg) * up) @ wd) * cy) + jnp.sum(up * cu)

    def custom(x, wg, wu, wd):
        y, up = swiglu(x, wg, wu, wd)
        return jnp.sum(y * cy) + jnp.sum(up * cu)

    np.testing.assert_allclose(custom(x, wg, wu, wd), plain(x, wg, wu, wd), rtol=1e-6)
    for a, b in zip(jax.grad(plain, (0, 1, 2, 3))(x, wg, wu, wd),
                    jax.grad(custom, (0, 1, 2, 3))(x, wg, wu, wd)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_swiglu_forward_in_token_chunks_equals_one_piece(monkeypatch):
    """Forward only, more than MLP_TOKEN_CHUNK tokens run in chunks (the last one padded):
    the same rows as one product."""
    import flax.linen as nn

    from scas_jax.models import layers

    monkeypatch.setattr(layers, "MLP_TOKEN_CHUNK", 4)
    rng = np.random.default_rng(8)
    x, wg, wu, wd = (jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
                     for s in ((2, 5, 8), (8, 12), (8, 12), (12, 8)))
    y, up = layers.swiglu(x, wg, wu, wd)  # 10 tokens: chunks of 4, 4 and 2 (+2 padding)
    want_up = x @ wu
    np.testing.assert_allclose(np.asarray(up), np.asarray(want_up), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), np.asarray((nn.silu(x @ wg) * want_up) @ wd),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama_rope_scaling_untied", "qwen3_qknorm_tied", "gemma3_local_global"])
@pytest.mark.parametrize("layer", [1, -1])
def test_tap_fn_reduces_the_tap_inside_its_layer(loaded, monkeypatch, name, layer):
    """``decode(..., tap_fn=)`` (each layer under a cond, the MLP in token chunks): the
    reduced taps equal the same reduction of the returned taps and the hidden states are
    those of the plain pass (another compiled program: equal to float32 rounding)."""
    from scas_jax.models import decoder, layers

    monkeypatch.setattr(layers, "MLP_TOKEN_CHUNK", 8)  # 48 tokens: 6 MLP chunks
    _, st = loaded[name]
    b, t = 2, 24
    ids = np.random.default_rng(4).integers(0, hf_tiny.VOCAB, size=(b, t))
    pos = np.tile(np.arange(t), (b, 1))
    seg = np.ones((b, t), np.int32)
    w = jnp.asarray(np.random.default_rng(5).normal(size=(t,)), jnp.float32)
    taps = (f"layers.{layer}.mlp.up_proj", f"layers.{layer}.residual")

    def reduce(a):  # [b, t, width] -> per-row sums
        return {"sum": a.sum(1), "weighted": jnp.einsum("btd,t->bd", a, w)}

    kinds = set()

    def reduce_either(a):  # a SwiGLU layer's up_proj tap comes factored: x @ w
        kinds.add(type(a).__name__)
        return reduce(a.x @ a.w if isinstance(a, layers.FactoredUp) else a)

    hidden, full = jax.jit(lambda p: decoder.decode(p, st.cfg, ids, pos, seg, taps))(st.params)
    got_h, got = jax.jit(lambda p: decoder.decode(p, st.cfg, ids, pos, seg, taps,
                                                  tap_fn=lambda n, a: reduce_either(a)))(st.params)
    swiglu_mlp = st.cfg.hidden_act != "gelu_tanh" and not st.cfg.mlp_bias
    assert ("FactoredUp" in kinds) == swiglu_mlp
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(hidden), atol=1e-5, rtol=1e-5)
    for name_ in taps:
        want = jax.jit(reduce)(full[name_])
        scale = max(1.0, float(np.abs(np.asarray(full[name_])).max()))  # Gemma's residuals are large
        for k in ("sum", "weighted"):
            np.testing.assert_allclose(np.asarray(got[name_][k]), np.asarray(want[k]),
                                       atol=1e-5 * scale, rtol=1e-5)


def test_swiglu_up_norms_is_swiglu_without_the_up_activation(monkeypatch):
    """The factored tap's pieces: the same output as :func:`layers.swiglu` and each row's
    squared ``up`` norm, in one piece and in token chunks."""
    from scas_jax.models import layers

    r = np.random.default_rng(6)
    x = jnp.asarray(r.normal(size=(2, 20, 16)), jnp.float32)
    wg, wu = (jnp.asarray(r.normal(size=(16, 40)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(r.normal(size=(40, 16)), jnp.float32)
    for chunk in (1024, 8):  # one piece; 5 chunks with a padded last one
        monkeypatch.setattr(layers, "MLP_TOKEN_CHUNK", chunk)
        out, up = layers.swiglu(x, wg, wu, wd)
        got, sq = layers.swiglu_up_norms(x, wg, wu, wd)
        np.testing.assert_allclose(np.asarray(got), np.asarray(out), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sq), np.asarray(jnp.sum(up * up, -1)), rtol=1e-6)
        assert sq.shape == (2, 20) and sq.dtype == jnp.float32


@pytest.mark.parametrize("name", ["llama_rope_scaling_untied", "qwen3_qknorm_tied", "gemma3_local_global"])
@pytest.mark.parametrize("tile", [32, 40, 96])
def test_vocab_tiles_give_the_whole_log_softmax(loaded, name, tile):
    """The forward log-softmax over vocabulary tiles with a running logsumexp (tiles of 32
    dividing the 96 entries, of 40 with the last one overlapping, one whole tile), positions
    flattened across rows in chunks, equals the one-piece log-softmax; tied and untied
    heads, Gemma's soft cap."""
    from scas_jax.models.loss import next_token_nll

    _, st = loaded[name]
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.normal(size=(3, 17, st.cfg.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, hf_tiny.VOCAB, size=(3, 17)), jnp.int32)
    whole = next_token_nll(st.params, st.cfg, hidden, tokens, 5)
    tiled = next_token_nll(st.params, st.cfg, hidden, tokens, 7, tile)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(whole), atol=1e-5, rtol=1e-6)
    assert float(jnp.abs(whole[:, 1:]).min()) > 0  # real values, not the padding's zeros


@pytest.mark.parametrize("name", ["llama_rope_scaling_untied", "qwen3_qknorm_tied", "gemma3_local_global"])
@pytest.mark.parametrize("tile", [32, 40])
def test_vocab_tiles_give_the_whole_log_softmax_gradient(loaded, name, tile):
    """The tiled log-softmax's own backward (each tile's logits formed again and pulled
    back into the hidden states and that tile's head columns) gives the gradient of the
    one-piece log-softmax: weighted per-token log-probabilities, gradients with respect
    to the hidden states and every parameter (the tied embedding, the untied head, through
    Gemma's soft cap), with dividing and overlapping tiles."""
    from scas_jax.models.loss import target_logprobs

    _, st = loaded[name]
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(3, 17, st.cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, hf_tiny.VOCAB, size=(3, 17)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)

    def loss(params, h, tile_):
        return jnp.sum(weights * target_logprobs(params, st.cfg, h, targets, 6, tile_))

    want_v, want_g = jax.jit(jax.value_and_grad(lambda p, h: loss(p, h, None), argnums=(0, 1)))(st.params, hidden)
    got_v, got_g = jax.jit(jax.value_and_grad(lambda p, h: loss(p, h, tile), argnums=(0, 1)))(st.params, hidden)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-6)
    flat_want, flat_got = jax.tree.leaves(want_g), jax.tree.leaves(got_g)
    assert len(flat_want) == len(flat_got)
    for a, b in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=2e-5)
    head = st.params["embed_tokens"]["embedding"] if st.cfg.tie_word_embeddings else st.params["lm_head"]["kernel"]
    g_head = got_g[0]["embed_tokens"]["embedding"] if st.cfg.tie_word_embeddings else got_g[0]["lm_head"]["kernel"]
    assert g_head.shape == head.shape and float(jnp.abs(g_head).max()) > 0
