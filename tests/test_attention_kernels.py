"""Accelerator attention kernels, tested on CPU.

- ``choose_impl``: the backend-aware ``auto`` rule and the fallbacks, for every backend.
- cuDNN: the mask/layout translation fed to ``jax.nn.dot_product_attention`` is run
  through its ``xla`` implementation and must equal our attention (packed segments,
  padding, static and traced sliding windows, GQA, an odd length), gradients too.
- splash: the Pallas kernel in interpret mode (runs on CPU) against our attention.
- On CPU an explicit ``cudnn``/``splash`` request falls back to ``blockwise`` (same
  numbers) and logs why, once.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scas_jax.models import attention as A
from scas_jax.models import attention_kernels as K


def _operands(b=2, t=13, h=4, kvh=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kvh, d)), jnp.float32)
    # row 0: two packed segments then padding; row 1: one segment then padding
    seg = np.zeros((b, t), np.int32)
    seg[0, :5], seg[0, 5:t - 2] = 1, 2
    seg[1, :t - 3] = 1
    return q, k, v, jnp.asarray(seg)


# ------------------------------------------------------------------ choose_impl


@pytest.mark.parametrize("backend,dtype,head_dim,seq,want", [
    ("cpu", "bfloat16", 64, 100, "xla"),
    ("cpu", "float32", 64, 1000, "blockwise"),
    ("gpu", "bfloat16", 64, 100, "cudnn"),
    ("cuda", "float16", 128, 4096, "cudnn"),
    ("gpu", "bfloat16", 256, 512, "cudnn"),
    ("gpu", "float32", 64, 1000, "blockwise"),  # cuDNN takes no float32: the CPU rule
    ("gpu", "float32", 64, 100, "xla"),
    ("gpu", "bfloat16", 60, 1000, "blockwise"),  # head dim not a multiple of 8
    ("gpu", "bfloat16", 320, 100, "xla"),  # head dim over 256
    ("rocm", "bfloat16", 64, 1000, "blockwise"),  # no cuDNN on AMD
    ("tpu", "bfloat16", 64, 100, "splash"),
    ("tpu", "float32", 256, 5000, "splash"),
])
def test_choose_impl_auto(backend, dtype, head_dim, seq, want):
    impl, _ = K.choose_impl(backend, seq, jnp.dtype(dtype), head_dim, block=128)
    assert impl == want


def test_choose_impl_fallbacks_and_reasons():
    # Pre-Hopper GPUs: head dim 256 is over cuDNN's limit of 128
    impl, why = K.choose_impl("gpu", 100, jnp.bfloat16, 256, cudnn_head_dim_max=128)
    assert impl == "xla" and "head dim" in why
    # TPU: kernel missing, or a traced (per-layer) window
    assert K.choose_impl("tpu", 1000, jnp.bfloat16, 64, splash_available=False)[0] == "blockwise"
    impl, why = K.choose_impl("tpu", 100, jnp.bfloat16, 64, static_window=False)
    assert impl == "xla" and "window" in why
    impl, why = K.choose_impl("tpu", 1000, jnp.bfloat16, 64, devices=4)
    assert impl == "blockwise" and "device" in why
    # explicit requests fall back to blockwise, with a reason
    for req, backend in (("cudnn", "cpu"), ("cudnn", "tpu"), ("splash", "gpu"), ("splash", "cpu")):
        impl, why = K.choose_impl(backend, 10, jnp.bfloat16, 64, requested=req)
        assert impl == "blockwise" and why
    impl, why = K.choose_impl("gpu", 10, jnp.float32, 64, requested="cudnn")
    assert (impl, "float32" in why) == ("blockwise", True)
    assert K.choose_impl("gpu", 10, jnp.bfloat16, 64, requested="cudnn") == ("cudnn", None)
    assert K.choose_impl("tpu", 10, jnp.bfloat16, 64, requested="splash") == ("splash", None)
    # xla/blockwise are honoured on every backend; no fallback reason
    for backend in ("cpu", "gpu", "tpu"):
        assert K.choose_impl(backend, 10, jnp.bfloat16, 64, requested="xla") == ("xla", None)
        assert K.choose_impl(backend, 10, jnp.bfloat16, 64, requested="blockwise") == ("blockwise", None)
    with pytest.raises(ValueError):
        K.choose_impl("cpu", 10, jnp.bfloat16, 64, requested="flash")


def test_cpu_auto_unchanged():
    q, k, v, seg = _operands()
    assert K.resolve("auto", q, None, 128, backend="cpu") == "xla"
    q = jnp.zeros((1, 300, 4, 8))
    assert K.resolve("auto", q, None, 128, backend="cpu") == "blockwise"


def test_explicit_kernel_falls_back_on_cpu_and_logs_once(caplog):
    q, k, v, seg = _operands()
    ref = A.blockwise_attention(q, k, v, seg, 3)  # the tile a forward pass takes by default
    K._logged.clear()
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        for impl in ("cudnn", "cudnn", "splash"):
            out = A.attention(q, k, v, seg, sliding_window=3, impl=impl)
            np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    msgs = [r.getMessage() for r in caplog.records if r.name == K.__name__]
    assert len(msgs) == 2 and all("blockwise" in m for m in msgs), msgs


# ------------------------------------------------------------------ cuDNN translation


@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("t", [13, 12])
def test_cudnn_translation_matches_xla_attention(window, t):
    q, k, v, seg = _operands(t=t)
    ref = A.xla_attention(q, k, v, seg, window)
    out = K.cudnn_attention(q, k, v, seg, window, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


def test_cudnn_translation_traced_window_and_mqa():
    q, k, v, seg = _operands(kvh=1)
    f = jax.jit(lambda q, k, v, w: K.cudnn_attention(q, k, v, seg, w, implementation="xla"))
    for w in (2, 5):
        ref = A.xla_attention(q, k, v, seg, w)
        np.testing.assert_allclose(np.asarray(f(q, k, v, jnp.int32(w))), np.asarray(ref), atol=2e-6)


def test_cudnn_translation_gradients():
    q, k, v, seg = _operands()
    wt = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * wt), argnums=(0, 1, 2))(q, k, v)

    ref = grads(lambda q, k, v: A.xla_attention(q, k, v, seg, 4))
    got = grads(lambda q, k, v: K.cudnn_attention(q, k, v, seg, 4, implementation="xla"))
    traced = jax.jit(lambda w: grads(
        lambda q, k, v: K.cudnn_attention(q, k, v, seg, w, implementation="xla")))(jnp.int32(4))
    for a, b, c in zip(ref, got, traced):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=2e-5)


def test_segment_mask_with_causal_is_the_module_mask():
    _, _, _, seg = _operands()
    t = seg.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    for w in (None, 3):
        m = np.asarray(K.segment_mask(seg, None if w is None else jnp.int32(w)))[:, 0]
        if w is not None:  # static windows go to local_window_size; traced ones into the mask
            m = m & ((np.arange(t)[:, None] - np.arange(t)[None, :]) < w)
        np.testing.assert_array_equal(m & causal, K.reference_mask_np(np.asarray(seg), w))


# ------------------------------------------------------------------ splash (interpret mode)


def test_splash_geometry():
    assert K.splash_geometry(13) == (128, 128, None)
    assert K.splash_geometry(1000, 64) == (1024, 512, (63, 0))
    assert K.splash_geometry(384) == (384, 128, None)
    seg = K.splash_segment_ids(jnp.ones((2, 5), jnp.int32), 128)
    assert seg.dtype == jnp.int32 and seg.shape == (2, 128) and int(seg[0, 5]) == -1


@pytest.mark.skipif(not K.splash_available(), reason="jax.experimental.pallas splash kernel not importable")
def test_splash_interpret_matches_xla_attention():
    q, k, v, seg = _operands()
    for w in (None, 3):
        ref = A.xla_attention(q, k, v, seg, w)
        out = K.splash_attention(q, k, v, seg, w, interpret=True)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    wt = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * wt), argnums=(0, 1, 2))(q, k, v)

    ref = grads(lambda q, k, v: A.xla_attention(q, k, v, seg, 3))
    got = grads(lambda q, k, v: K.splash_attention(q, k, v, seg, 3, interpret=True))
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


# ------------------------------------------------------------------ whole model, simulated backends


def test_resolve_sees_a_traced_window(monkeypatch):
    monkeypatch.setattr(K, "splash_available", lambda: True)
    monkeypatch.setattr(K, "device_count", lambda: 1)
    q = jnp.zeros((1, 16, 4, 8), jnp.bfloat16)
    got = {}

    def probe(w):
        got["tpu"] = K.resolve("auto", q, w, 128, backend="tpu")
        got["gpu"] = K.resolve("auto", q, w, 128, backend="gpu")
        return w

    jax.jit(probe)(jnp.int32(4))
    assert got == {"tpu": "xla", "gpu": "cudnn"}
    assert K.resolve("auto", q, 4, 128, backend="tpu") == "splash"


@pytest.mark.parametrize("model_type,backend", [("gemma3", "gpu"), ("llama", "tpu")])
def test_model_dispatch_on_simulated_backend(model_type, backend, monkeypatch):
    """``attn_impl="auto"`` through the decoder as a GPU/TPU would trace it, with the
    vendor call replaced by its CPU-runnable twin (cuDNN: the same translation through
    the ``xla`` implementation; splash: interpret mode). Gemma 3 on the GPU: its scanned
    per-layer window is folded into the cuDNN mask. Llama on the TPU: splash inside the
    layer scan. Packed rows and padding; the loss equals ``xla``'s (gradients: in the
    kernel tests above, kept out of here for time)."""
    from scas_jax.models.config import tiny_config
    from scas_jax.models.decoder import decode, init_params
    from scas_jax.models.loss import next_token_nll

    cfg = tiny_config(model_type, num_layers=2)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    t = 24
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, t)))
    seg = np.ones((2, t), np.int32)
    seg[0, 11:] = 2
    seg[1, 19:] = 0
    pos = np.concatenate([np.arange(11), np.arange(t - 11)])[None].repeat(2, 0)
    pos[1] = np.arange(t) * (seg[1] > 0)
    pos, seg = jnp.asarray(pos, jnp.int32), jnp.asarray(seg)

    def loss(p):
        h, _ = decode(p, cfg, ids, pos, seg, attn_impl="auto")
        return jnp.sum(next_token_nll(p, cfg, h, ids) * (seg > 0))

    want = loss(params)  # CPU: xla at this length
    seen = []
    monkeypatch.setattr(K, "cudnn_unsupported", lambda *a, **k: None)  # f32 allowed here
    monkeypatch.setattr(K, "splash_available", lambda: True)
    monkeypatch.setattr(K, "device_count", lambda: 1)  # the tests run on 8 CPU devices
    monkeypatch.setattr(K, "current_backend", lambda: backend)
    orig_cudnn, orig_splash = K.cudnn_attention, K.splash_attention

    def cudnn_twin(*a, **k):
        seen.append("cudnn")
        return orig_cudnn(*a, implementation="xla", **k)

    def splash_twin(*a, **k):
        seen.append("splash")
        return orig_splash(*a, interpret=True, **k)

    monkeypatch.setattr(K, "cudnn_attention", cudnn_twin)
    monkeypatch.setattr(K, "splash_attention", splash_twin)
    got = loss(params)
    assert seen and set(seen) == {"cudnn" if backend == "gpu" else "splash"}, seen
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_blockwise_forward_keeps_rows_on_their_devices():
    """Without a mesh in context, the forward-only blockwise pass over a batch sharded on
    8 devices compiles without gathering the batch: its key-block loop runs over every
    row of the local shard at once (a loop over rows would slice the sharded axis, and
    XLA would gather it on every device)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    q = jax.ShapeDtypeStruct((8, 256, 4, 8), jnp.float32, sharding=rows)
    kv = jax.ShapeDtypeStruct((8, 256, 2, 8), jnp.float32, sharding=rows)
    seg = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=rows)
    hlo = jax.jit(lambda q, k, v, s: A.blockwise_attention(q, k, v, s, None),
                  out_shardings=rows).lower(q, kv, kv, seg).compile().as_text()
    assert "all-gather" not in hlo


def _packed_rows(b=8, t=256, h=4, kvh=2, d=8, seed=1):
    """Rows packed with sequences of different lengths (each row's own segment starts)
    and a padded tail of its own length."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, s = 0, 1
        while pos < t - 20 - 5 * r:
            n = int(rng.integers(9, 80))
            seg[r, pos:pos + n] = s
            pos, s = pos + n, s + 1
        seg[r, t - 20 - 5 * r:] = 0
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return f(b, t, h, d), f(b, t, kvh, d), f(b, t, kvh, d), jnp.asarray(seg)


@pytest.mark.parametrize("axes,window", [
    ({"data": 8}, None), ({"data": 2, "fsdp": 2, "tp": 2}, None), ({"data": 4, "tp": 2}, 40)])
def test_blockwise_forward_row_by_row_under_the_mesh(axes, window):
    """Under a context mesh (as the scorer compiles) the forward pass runs row by row on
    each device's own rows (``shard_map``; heads split over ``tp`` too): the same values
    as all rows together and the dense reference at every real position, a traced
    sliding window included, and the compiled program moves nothing between devices."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from scas_jax.parallel import BATCH_AXES, make_mesh, mesh_context

    spec = ",".join(f"{k}={v}" for k, v in axes.items())
    mesh = make_mesh(spec)
    q, k, v, seg = _packed_rows()
    rows = NamedSharding(mesh, P(BATCH_AXES))
    q, k, v, seg = (jax.device_put(x, rows) for x in (q, k, v, seg))
    win = None if window is None else jnp.int32(window)
    fn = jax.jit(lambda q, k, v, s, w: A.blockwise_attention(q, k, v, s, w, 16))
    with mesh_context(seg):
        compiled = fn.lower(q, k, v, seg, win).compile()
    hlo = compiled.as_text()
    assert "/shard_map/" in hlo  # the row loop ran (op metadata names its shard_map)
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert op not in hlo, op
    got = np.asarray(compiled(q, k, v, seg, win))
    together = np.asarray(A._flash_heads(q, k, v, seg, win, 16)[0])
    dense = np.asarray(A.xla_attention(q, k, v, seg, window))
    real = np.asarray(seg) > 0
    np.testing.assert_array_equal(got[real], together[real])
    np.testing.assert_allclose(got[real], dense[real], atol=2e-6, rtol=2e-5)


def test_blockwise_forward_rows_fall_back_when_the_batch_does_not_split():
    """A batch that is not a multiple of the mesh's batch shards goes through all rows
    together (same values); so does a call with no mesh in context."""
    from scas_jax.parallel import make_mesh

    q, k, v, seg = _packed_rows(b=3)
    assert A._row_axes(make_mesh("data=8").abstract_mesh, 3, 4, 2) is None
    assert A._row_axes(jax.sharding.get_abstract_mesh(), 3, 4, 2) is None
    assert A._row_axes(make_mesh("data=4,tp=2").abstract_mesh, 8, 4, 2) == (("data", "fsdp"), "tp")
    assert A._row_axes(make_mesh("data=4,tp=2").abstract_mesh, 8, 4, 1) == (("data", "fsdp"), None)
    with jax.set_mesh(make_mesh("data=8")):
        got = jax.jit(lambda *a: A.blockwise_attention(*a, None, 16))(q, k, v, seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(A._flash_heads(q, k, v, seg, None, 16)[0]))


def test_blockwise_forward_row_by_row_on_a_single_device_without_a_mesh():
    """A process with one device and no mesh in context (``score_rows`` without a mesh on
    a CPU host) runs the forward pass row by row too: the values of all rows together
    and of the dense reference (another program: to float32 rounding). Run in a fresh
    interpreter (this one has 8 devices)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        import jax, numpy as np
        sys.path.insert(0, {tests!r})
        from test_attention_kernels import _packed_rows
        import scas_jax.models.attention as A
        assert jax.device_count() == 1
        calls = []
        rows = A._flash_forward_rows
        A._flash_forward_rows = lambda *a: calls.append(1) or rows(*a)
        q, k, v, seg = _packed_rows()
        got = jax.jit(lambda *a: A.blockwise_attention(*a, None, 16))(q, k, v, seg)
        together = jax.jit(lambda *a: A._flash_heads(*a, None, 16)[0])(q, k, v, seg)
        dense = A.xla_attention(q, k, v, seg, None)
        real = np.asarray(seg) > 0
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(together)[real], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(dense)[real], atol=2e-6, rtol=2e-5)
        assert calls, "not row by row"
        print("ok")
    """).format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
