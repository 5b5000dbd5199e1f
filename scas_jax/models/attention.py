"""Causal grouped-query attention over packed or right-padded rows.

Which keys a query sees is decided by ``segment_ids [batch, seq]`` alone: a query at
index ``i`` attends key ``j`` iff ``segment_ids[i] == segment_ids[j]`` and ``j <= i``
(and ``i - j < sliding_window`` when set). Padding carries segment id 0; padded
queries then attend only other padding, which keeps every softmax row finite. Masks
are never derived from token ids.

Implementations:

- ``xla``: the dense ``[batch, heads, seq, seq]`` formulation; differentiable; best for
  short rows and for training.
- ``blockwise``: flash-style online softmax over ``block`` x ``block`` tiles, never
  holding more than ``[batch, heads, block, block]`` scores; key blocks past the
  diagonal, before the earliest segment start of a query block (packed rows) or
  outside the sliding window are skipped; a forward pass alone goes row by row on each
  device's own rows when a mesh is in context (each row visits only the blocks its own
  segments reach). Differentiable through a flash-attention
  backward (a custom VJP that recomputes each visited tile from the saved
  log-sum-exp), so training at long lengths stores no ``[seq, seq]`` residual either.
- ``cudnn`` (NVIDIA GPU) and ``splash`` (TPU, Pallas): vendor flash-attention kernels,
  see :mod:`scas_jax.models.attention_kernels`; where one does not apply (float32 on
  cuDNN, an unsupported head dim, a traced window on splash, another backend) the
  call falls back to ``blockwise`` and logs the reason once.
- ``auto``: by backend (:func:`scas_jax.models.attention_kernels.choose_impl`): GPU ->
  ``cudnn`` where it applies, TPU -> ``splash`` where available, otherwise (and on CPU)
  ``blockwise`` when ``seq > 2 * block``, else ``xla``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from scas_jax.models import attention_kernels
from scas_jax.parallel import HEAD_AXIS, auto_batch_axes, row_shards

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCK = 128  # measured on CPU: 128 beats 256 and dense attention on packed 1024-token rows


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

    Returns (out ``[b, T, h, d]``, residuals for :func:`_flash_backward`: the scaled
    queries ``[b, kvh, g, Tp, d]``, keys and values ``[b, kvh, Tp, d]``, the padded
    segment ids, the output ``[b, kvh, g, Tp, d]`` (float32), its log-sum-exp
    ``[b, kvh, g, Tp]`` and :func:`_first_blocks`). A forward pass alone drops the
    residuals (XLA removes what is not used)."""
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
    return out[:, :t].astype(q.dtype), (qh, kh, vh, seg, outh, lse, first)


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


def _flash_backward(block, res, dout):
    """Flash-attention backward: probabilities recomputed tile by tile from the saved
    log-sum-exp; only tiles the forward visited are visited. Heads before positions, as
    the forward, and each tile held keys first (``[b, kvh, keys, g * queries]``): the
    products for the keys' and values' gradients then contract the tile's last axis
    and only the queries' gradient reads it transposed (SmolLM2 ``[4, 512]``, a layer's
    forward and backward on the AVX-512 build machine: 53-55 ms with tiles held
    positions first, 35-41 ms so; docs/benchmarks.md)."""
    block = block or BLOCK
    (qh, kh, vh, seg, outh, lse, first), sliding_window = res
    b, kvh, g, tp, d = outh.shape
    t = dout.shape[1]
    n = tp // block
    do = jnp.pad(dout, ((0, 0), (0, tp - t), (0, 0), (0, 0))).astype(jnp.float32)
    do = jnp.moveaxis(do.reshape(b, tp, kvh, g, d), 1, 3)  # [b, kvh, g, Tp, d]
    delta = jnp.sum(do * outh, axis=-1)  # [b, kvh, g, Tp]

    def one_query_block(i, carry):
        dq, dk, dv = carry
        # this block's queries, g heads each, as one axis x = (g, query): [b, kvh, x, ...]
        q_blk = _block(qh, i, block, 3).astype(jnp.float32).reshape(b, kvh, g * block, d)
        do_blk = _block(do, i, block, 3).reshape(b, kvh, g * block, d)
        lse_blk = _block(lse, i, block, 3).reshape(b, kvh, 1, g * block)
        delta_blk = _block(delta, i, block, 3).reshape(b, kvh, 1, g * block)
        q_seg, q_idx = _block(seg, i, block), i * block + jnp.arange(block)

        def body(j, c):
            dq_blk, dk, dv = c
            k_blk, v_blk = (_block(x, j, block, 2).astype(jnp.float32) for x in (kh, vh))
            ok = _allowed(q_seg, _block(seg, j, block), q_idx, j * block + jnp.arange(block),
                          sliding_window)  # [b, queries, keys]
            ok = jnp.broadcast_to(jnp.swapaxes(ok, 1, 2)[:, None, :, None, :],
                                  (b, 1, block, g, block)).reshape(b, 1, block, g * block)
            s = jnp.einsum("bksd,bkxd->bksx", k_blk, q_blk)
            p = jnp.where(ok, jnp.exp(s - lse_blk), 0.0)  # [b, kvh, keys, x]
            dv_blk = jnp.einsum("bksx,bkxd->bksd", p, do_blk)
            ds = p * (jnp.einsum("bksd,bkxd->bksx", v_blk, do_blk) - delta_blk)
            dq_blk = dq_blk + jnp.einsum("bksx,bksd->bkxd", ds, k_blk)
            dk_blk = jnp.einsum("bksx,bkxd->bksd", ds, q_blk)

            def add(x, x_blk):  # x with x_blk added to its block j
                summed = _block(x, j, block, 2) + x_blk
                return jax.lax.dynamic_update_slice_in_dim(x, summed, j * block, 2)

            return dq_blk, add(dk, dk_blk), add(dv, dv_blk)

        dq_blk = jnp.zeros((b, kvh, g * block, d), jnp.float32)
        dq_blk, dk, dv = jax.lax.fori_loop(first[i], i + 1, body, (dq_blk, dk, dv))
        dq_blk = dq_blk.reshape(b, kvh, g, block, d)
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i * block, 3), dk, dv

    zeros_kv = jnp.zeros(kh.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(
        0, n, one_query_block, (jnp.zeros(qh.shape, jnp.float32), zeros_kv, zeros_kv))
    dq = jnp.transpose(dq * d**-0.5, (0, 3, 1, 2, 4)).reshape(b, tp, kvh * g, d)[:, :t]
    dk, dv = (jnp.moveaxis(x, 2, 1)[:, :t] for x in (dk, dv))
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
    out, res = _flash_heads(q, k, v, segment_ids, sliding_window, block or BLOCK)
    return out, (res, sliding_window)


blockwise_attention.defvjp(_vjp_fwd, _flash_backward)


def attention(q, k, v, segment_ids, sliding_window=None, impl="xla", block=None):
    """Dispatch on ``impl`` (``xla``, ``blockwise``, ``cudnn``, ``splash``, ``auto``);
    shapes as :func:`xla_attention`."""
    if impl in ("auto", "cudnn", "splash"):
        impl = attention_kernels.resolve(impl, q, sliding_window, block or BLOCK)
    if impl == "cudnn":
        return attention_kernels.cudnn_attention(q, k, v, segment_ids, sliding_window)
    if impl == "splash":
        return attention_kernels.splash_attention(q, k, v, segment_ids, sliding_window)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, sliding_window)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, sliding_window, block)
    raise ValueError(f"unknown attention implementation {impl!r}")
