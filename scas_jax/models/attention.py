"""Causal grouped-query attention over packed or right-padded rows.

Which keys a query sees is decided by ``segment_ids [batch, seq]`` alone: a query at
index ``i`` attends key ``j`` iff ``segment_ids[i] == segment_ids[j]`` and ``j <= i``
(and ``i - j < sliding_window`` when set). Padding carries segment id 0; padded
queries then attend only other padding, which keeps every softmax row finite. Masks
are never derived from token ids.

Implementations:

- ``xla``: the dense ``[batch, heads, seq, seq]`` formulation; differentiable; best for
  short rows and for training.
- ``blockwise``: a forward pass alone runs a flash-style online softmax over
  ``block`` x ``block`` tiles, never holding more than ``[batch, heads, block, block]``
  scores; key blocks past the diagonal, before the earliest segment start of a query
  block (packed rows) or outside the sliding window are skipped; it goes row by row on
  each device's own rows when a mesh is in context (each row visits only the blocks its
  own segments reach). Differentiated, it is a custom VJP over static query spans
  (each span against its causal prefix of keys in one product, at most
  ``[batch, heads, span, seq]`` scores) whose backward forms each span's probabilities
  again from the saved log-sum-exp, so training stores no ``[seq, seq]`` residual.
- ``cudnn`` (NVIDIA GPU) and ``splash`` (TPU, Pallas): vendor flash-attention kernels,
  see :mod:`scas_jax.models.attention_kernels`; where one does not apply (float32 on
  cuDNN, an unsupported head dim, a traced window on splash, another backend) the
  call falls back to ``blockwise`` and logs the reason once.
- ``auto``: by backend (:func:`scas_jax.models.attention_kernels.choose_impl`): GPU ->
  ``cudnn`` where it applies, TPU -> ``splash`` where available, otherwise (and on CPU)
  ``blockwise`` when ``seq > DENSE_MAX`` (256), else ``xla``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from scas_jax.models import attention_kernels
from scas_jax.parallel import HEAD_AXIS, auto_batch_axes, row_shards

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
# Query span of a differentiated pass (:func:`_spans`), and the most spans a row is cut
# into (longer rows take longer spans: at most ``[batch, heads, seq / 64, seq]`` scores
# at once). SmolLM2's attention, 30 layers' forward and backward, on the AVX2 machine:
# [4, 512] rows in spans of 32 1.91 s, 64 1.53-1.73 s, 128 1.61-1.98 s, 256 2.06 s, the
# whole row 2.92 s; [4, 1024] rows in spans of 64 6.1-6.4 s, 128 7.3 s
# (docs/benchmarks.md).
BLOCK = 64
MAX_SPANS = 64
# ``auto`` on CPU: the dense path up to this many positions, ``blockwise`` past it.
DENSE_MAX = 256


def forward_block(seq: int) -> int:
    """The tile of a forward pass alone (scoring, prefill) for rows of ``seq`` positions:
    1/32 of the row, between 32 and 256. Short rows hold short packed sequences, where
    small tiles skip the most; a long row may hold one long sequence, where large tiles
    run the fewest loop steps (measurements in docs/benchmarks.md)."""
    return max(32, min(256, (1 << max(0, seq - 1).bit_length()) // 32))


def _allowed(q_seg, k_seg, q_idx, k_idx, sliding_window):
    """Boolean ``[batch, q, k]`` mask from segment ids ``[batch, q]``/``[batch, k]`` and indices."""
    ok = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_idx[None, None, :] <= q_idx[None, :, None])
    if sliding_window is not None:
        ok &= (q_idx[None, :, None] - k_idx[None, None, :]) < sliding_window
    return ok


def _grouped(q, num_kv_heads):
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def xla_attention(q, k, v, segment_ids, sliding_window=None):
    """q ``[batch, seq, heads, head_dim]``, k/v ``[batch, seq, kv_heads, head_dim]``."""
    b, t, h, d = q.shape
    qg = _grouped(q, k.shape[2])
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    idx = jnp.arange(t)
    ok = _allowed(segment_ids, segment_ids, idx, idx, sliding_window)
    scores = jnp.where(ok[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _pad_blocks(q, k, v, segment_ids, block):
    """Pad the sequence axis to a multiple of ``block`` (padding: segment id -1)."""
    t = q.shape[1]
    n = -(-t // block)
    pad = n * block - t
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    return q, k, v, segment_ids, n


def _first_blocks(segment_ids, n, block, sliding_window):
    """``[n]``: the first key block any query of block ``i`` may see (over the batch).

    Key blocks before the earliest segment start of a query block (packed rows), or
    before its sliding window, are fully masked and skipped. A padding position (segment
    id 0 or -1) counts as a segment of its own: nothing reads what padding attends to,
    so a block of padding visits only its diagonal tile (a row's padded tail otherwise
    attends back over the whole tail: a quarter of a half-empty batch's time).
    """
    b = segment_ids.shape[0]
    idx = jnp.arange(n * block)
    boundary = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    boundary |= segment_ids <= 0
    seg_start = jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)
    first = seg_start.reshape(b, n, block).min(axis=(0, 2)) // block
    if sliding_window is not None:
        first = jnp.maximum(first, (jnp.arange(n) * block - sliding_window + 1) // block)
    return jnp.maximum(first, 0)


def _block(x, j, block, axis=1):
    """Block ``j`` (``block`` positions) of ``x`` along its positions ``axis``."""
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=axis)


def _flash_heads(q, k, v, segment_ids, sliding_window, block):
    """The flash forward pass, heads before positions: every tile's two products are
    plain batched matmuls over ``[b, kv_heads, g]`` with nothing moved inside the loop.

    Returns (out ``[b, T, h, d]``, its log-sum-exp ``[b, kvh, g, Tp]``). A forward pass
    alone: differentiated passes take static spans (:func:`_span_forward`)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qp, kp, vp, seg, n = _pad_blocks(q, k, v, segment_ids, block)
    qh = jnp.moveaxis(_grouped(qp, kvh) * jnp.asarray(d**-0.5, q.dtype), 1, 3)  # [b,kvh,g,T,d]
    kh, vh = jnp.moveaxis(kp, 1, 2), jnp.moveaxis(vp, 1, 2)  # [b, kvh, T, d]
    first = _first_blocks(seg, n, block, sliding_window)

    def one_query_block(i):
        q_blk = _block(qh, i, block, 3)
        q_seg, q_idx = _block(seg, i, block), i * block + jnp.arange(block)

        def body(j, carry):
            m, l, acc = carry
            k_blk = _block(kh, j, block, 2)
            v_blk = _block(vh, j, block, 2)
            s = jnp.einsum("bkgtd,bksd->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32)
            ok = _allowed(q_seg, _block(seg, j, block), q_idx, j * block + jnp.arange(block),
                          sliding_window)[:, None, None]
            s = jnp.where(ok, s, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v_blk,
                            preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

        init = (jnp.full((b, kvh, g, block), _NEG, jnp.float32),
                jnp.zeros((b, kvh, g, block), jnp.float32),
                jnp.zeros((b, kvh, g, block, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(first[i], i + 1, body, init)
        return acc / l[..., None], m + jnp.log(l)

    out, lse = jax.lax.map(one_query_block, jnp.arange(n))  # [n,b,kvh,g,block,d], [n,b,kvh,g,block]
    outh = jnp.moveaxis(out, 0, 3).reshape(b, kvh, g, n * block, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, n * block)
    out = jnp.transpose(outh, (0, 3, 1, 2, 4)).reshape(b, n * block, h, d)
    return out[:, :t].astype(q.dtype), lse


def _flash_forward_rows(q, k, v, segment_ids, sliding_window, block):
    """:func:`_flash_heads`' output one row at a time: each row visits only the key
    blocks its own segments reach (all rows together visit the union over the rows).
    Slices the batch axis, so it must only see a device's own rows: see
    :func:`_forward_by_rows`."""
    return jax.lax.map(lambda xs: _flash_heads(*[x[None] for x in xs], sliding_window, block)[0][0],
                       (q, k, v, segment_ids))


def _row_axes(mesh, batch: int, heads: int, kv_heads: int):
    """``(batch axes, head axes)`` of the context mesh for :func:`_forward_by_rows`, or
    None where the rows cannot be split that way (no mesh in context; the batch not a
    multiple of the batch shards)."""
    if row_shards(mesh, batch) is None:
        return None
    tp = mesh.shape.get(HEAD_AXIS, 1)
    head_axis = HEAD_AXIS if tp > 1 and heads % tp == 0 and kv_heads % tp == 0 else None
    return auto_batch_axes(mesh), head_axis


def _forward_by_rows(q, k, v, segment_ids, sliding_window, block):
    """The forward-only pass row by row on each device's own rows: under the context
    mesh (``jax.set_mesh``, which the scorer sets around its compilation) a
    ``shard_map`` hands each device its rows of the batch and the loop over rows runs
    there, so no device gathers another's rows. Without a context mesh (or where the
    batch does not split over its batch axes) all rows go together
    (:func:`_flash_heads`): a loop over a batch axis that XLA has sharded would
    gather the whole batch on every device; except in a process that sees one device
    in all, where nothing can be sharded and the rows go one by one again (the library
    scorer called without a mesh on a CPU host). SmolLM2, packed 4 x 1,024 GSM8K rows, a
    layer's attention (tiles of 32): 18 ms row by row against 32 ms all rows together
    on the AVX-512 build machine (docs/benchmarks.md)."""
    axes = _row_axes(jax.sharding.get_abstract_mesh(), q.shape[0], q.shape[2], k.shape[2])
    if axes is None:
        if jax.device_count() == 1:  # one device in all: nothing is sharded, nothing gathered
            return _flash_forward_rows(q, k, v, segment_ids, sliding_window, block)
        return _flash_heads(q, k, v, segment_ids, sliding_window, block)[0]
    rows, heads = axes
    spec = P(rows, None, heads, None)
    window = () if sliding_window is None else (jnp.asarray(sliding_window),)  # replicated
    return jax.shard_map(
        lambda q, k, v, s, *w: _flash_forward_rows(q, k, v, s, w[0] if w else None, block),
        in_specs=(spec, spec, spec, P(rows, None)) + (P(),) * len(window), out_specs=spec,
        check_vma=False,
    )(q, k, v, segment_ids, *window)


def _spans(seq: int, block: int) -> list[tuple[int, int]]:
    """Query spans ``(start, stop)`` of a differentiated pass: ``block`` positions each
    (the last one shorter), at least ``seq / MAX_SPANS`` so the unrolled code stays
    small."""
    block = max(block, -(-seq // MAX_SPANS))
    return [(a, min(seq, a + block)) for a in range(0, seq, block)]


def _span_mask(segment_ids, a: int, e: int, sliding_window):
    """``[batch, 1, 1, e - a, e]``: what queries ``a:e`` may see of keys ``:e``."""
    idx = jnp.arange(segment_ids.shape[1])
    ok = _allowed(segment_ids[:, a:e], segment_ids[:, :e], idx[a:e], idx[:e], sliding_window)
    return ok[:, None, None]


def _span_forward(q, k, v, segment_ids, sliding_window, block):
    """The differentiated forward pass: the queries in static spans (:func:`_spans`),
    each span against the keys up to its end (the causal prefix) as one dense product,
    so no key past a span's end is read and every shape is static.

    Returns (out ``[b, T, h, d]``, residuals for :func:`_span_backward`: the scaled
    queries ``[b, kvh, g, T, d]``, keys and values ``[b, kvh, T, d]``, the segment ids,
    the output ``[b, kvh, g, T, d]`` (float32) and its log-sum-exp ``[b, kvh, g, T]``).
    Scores held at once: ``[b, h, span, T]`` at most."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qh = jnp.moveaxis(_grouped(q, kvh) * jnp.asarray(d**-0.5, q.dtype), 1, 3)  # [b,kvh,g,T,d]
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [b, kvh, T, d]
    outs, lses = [], []
    for a, e in _spans(t, block):
        s = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, a:e], kh[:, :, :e],
                       preferred_element_type=jnp.float32)
        s = jnp.where(_span_mask(segment_ids, a, e, sliding_window), s, _NEG)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        l = p.sum(-1, keepdims=True)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vh[:, :, :e],
                        preferred_element_type=jnp.float32)
        outs.append(pv / l)
        lses.append((m + jnp.log(l))[..., 0])
    outh, lse = jnp.concatenate(outs, 3), jnp.concatenate(lses, 3)
    out = jnp.transpose(outh, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
    return out.astype(q.dtype), (qh, kh, vh, segment_ids, outh, lse)


def _span_backward(block, res, dout):
    """Flash-attention backward over the forward's spans: each span's probabilities are
    formed again from the saved log-sum-exp (one product), and the queries', keys' and
    values' gradients of the span are dense products over its causal prefix. SmolLM2's
    attention, ``[4, 512]`` rows, 30 layers' forward and backward on the AVX2 machine:
    2.5-2.9 s with 128 x 128 tiles in loops (fori_loops over the visited tiles), 1.5-1.7 s
    in spans of 64; ``[4, 1024]`` rows 9.4-10.5 s against 6.1-6.6 s (docs/benchmarks.md).
    Each key's gradient sums its spans' contributions, padded to the row (a chain of
    in-place updates sends XLA's simplifier round in circles past a few dozen spans)."""
    (qh, kh, vh, seg, outh, lse), sliding_window = res
    b, kvh, g, t, d = outh.shape
    do = jnp.moveaxis(dout.astype(jnp.float32).reshape(b, t, kvh, g, d), 1, 3)  # [b,kvh,g,T,d]
    delta = jnp.sum(do * outh, axis=-1)  # [b, kvh, g, T]
    qf, kf, vf = (x.astype(jnp.float32) for x in (qh, kh, vh))
    dqs, dks, dvs = [], [], []
    for a, e in _spans(t, block or BLOCK):
        q_s, do_s = qf[:, :, :, a:e], do[:, :, :, a:e]
        s = jnp.einsum("bkgtd,bksd->bkgts", q_s, kf[:, :, :e])
        p = jnp.where(_span_mask(seg, a, e, sliding_window), jnp.exp(s - lse[:, :, :, a:e, None]), 0.0)
        ds = p * (jnp.einsum("bkgtd,bksd->bkgts", do_s, vf[:, :, :e]) - delta[:, :, :, a:e, None])
        dqs.append(jnp.einsum("bkgts,bksd->bkgtd", ds, kf[:, :, :e]))
        widths = ((0, 0), (0, 0), (0, t - e), (0, 0))  # the keys past the span's end: none
        dks.append(jnp.pad(jnp.einsum("bkgts,bkgtd->bksd", ds, q_s), widths))
        dvs.append(jnp.pad(jnp.einsum("bkgts,bkgtd->bksd", p, do_s), widths))
    dq = jnp.concatenate(dqs, 3) * d**-0.5
    dk, dv = sum(dks), sum(dvs)
    dq = jnp.transpose(dq, (0, 3, 1, 2, 4)).reshape(b, t, kvh * g, d)
    dk, dv = (jnp.moveaxis(x, 2, 1) for x in (dk, dv))
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


# The window is an ordinary (non-differentiated) argument, not a static one, so a layer
# scan can pass each layer's own window (Gemma 3's local and global layers).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def blockwise_attention(q, k, v, segment_ids, sliding_window=None, block=None):
    """Same result as :func:`xla_attention` in ``O(seq * block)`` score memory, and
    differentiable (flash-attention backward: no ``[seq, seq]`` residual is stored).
    ``block``: the tile size; None: :func:`forward_block` of the row length for a forward
    pass alone, :data:`BLOCK` under differentiation."""
    return _forward_by_rows(q, k, v, segment_ids, sliding_window, block or forward_block(q.shape[1]))


def _vjp_fwd(q, k, v, segment_ids, sliding_window, block):
    out, res = _span_forward(q, k, v, segment_ids, sliding_window, block or BLOCK)
    return out, (res, sliding_window)


blockwise_attention.defvjp(_vjp_fwd, _span_backward)


def attention(q, k, v, segment_ids, sliding_window=None, impl="xla", block=None):
    """Dispatch on ``impl`` (``xla``, ``blockwise``, ``cudnn``, ``splash``, ``auto``);
    shapes as :func:`xla_attention`."""
    if impl in ("auto", "cudnn", "splash"):
        impl = attention_kernels.resolve(impl, q, sliding_window, DENSE_MAX)
    if impl == "cudnn":
        return attention_kernels.cudnn_attention(q, k, v, segment_ids, sliding_window)
    if impl == "splash":
        return attention_kernels.splash_attention(q, k, v, segment_ids, sliding_window)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, sliding_window)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, sliding_window, block)
    raise ValueError(f"unknown attention implementation {impl!r}")
