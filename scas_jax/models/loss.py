"""Per-token log-probabilities without holding ``[batch, seq, vocab]`` in float32.

The sequence is cut into chunks of ``chunk`` positions; each chunk's logits
``[batch, chunk, vocab]`` are formed, reduced to ``logsumexp`` and the target's logit,
and dropped. Under ``jax.checkpoint`` the backward pass recomputes a chunk's logits
instead of storing them, so training memory is bounded the same way. With a vocabulary
tile, a chunk's logits are formed a tile at a time (a running logsumexp), and the
backward pass (a custom VJP) goes over the same tiles from the saved logsumexp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import lm_head, softcap
from scas_jax.parallel import auto_batch_axes, batch_shards, local_rows

# Positions of a row per log-softmax chunk (a chunk's logits: ``[batch, chunk, vocab]``
# float32; training and the gradient check). 128 against 256: the same values bit for
# bit, half the buffer, no slower (docs/benchmarks.md).
VOCAB_CHUNK = 128
# Forward passes (scoring): positions of a device's rows per chunk, and the vocabulary
# in tiles of VOCAB_TILE with a running logsumexp, so a tile's logits ``[1024, 1024]``
# (4 MiB) stay in cache. SmolLM2's log-softmax over 4 x 1,024 positions on the build
# machine (docs/benchmarks.md): one piece 0.95 s; 512 x 4,096 tiles 0.56-0.62 s, and
# 1.84-1.97 s with the AVX2 cap (benchmarks/avx2_cap.sh: XLA's dots on oneDNN's AVX2
# GEMM); 1,024 x 1,024 tiles 0.56-0.62 s and 1.12 s capped.
LOGIT_POSITIONS = 1024
VOCAB_TILE = 1024


def target_logprobs(
    params: dict, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, chunk: int = VOCAB_CHUNK,
    vocab_tile: int | None = None,
) -> jax.Array:
    """``log softmax(hidden[b, t] @ W)[targets[b, t]]`` as float32 ``[batch, seq]``.

    ``hidden [batch, seq, d_model]`` is the final normed hidden state at the position
    that *predicts* ``targets [batch, seq]`` (shift before calling). ``chunk`` positions
    of each row at a time; with ``vocab_tile``, each chunk's logits are formed
    ``vocab_tile`` columns at a time under a running max and sum (the logsumexp of the
    tiles, equal to the one-piece value to float32 rounding), so no ``[chunk, vocab]``
    buffer is made, and the gradient (:func:`_tiled_bwd`) goes over the same tiles:
    each tile's logits are formed again, turned into ``g * (onehot - softmax)`` and
    contracted into the hidden states' and the head's gradients at once.
    """
    b, t, d = hidden.shape
    w, spec = lm_head(params, cfg, hidden.dtype)
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk)
    h, y = jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)  # [n, b, chunk, ...]
    if vocab_tile is None:
        def whole(hc, yc):
            logits = _logits(cfg, spec, hc, w)
            lse = jax.nn.logsumexp(logits, axis=-1)
            tgt = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
            return tgt - lse

        one = jax.checkpoint(whole)
        out = jax.lax.map(lambda xs: one(*xs), (h, y))
    else:
        out = _tiled(cfg, spec, vocab_tile, h, w, y)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :t]


def _tiles(w: jax.Array, spec: str, tile: int) -> tuple[int, int, int, int]:
    """``(vocabulary axis of w, vocabulary size, tile, number of tiles)``; the last tile
    ends at the vocabulary's end (:func:`_tile_start`) and masks the columns it repeats."""
    axis = spec.split("->")[0].split(",")[1].index("v")
    vocab = w.shape[axis]
    tile = min(tile, vocab)
    return axis, vocab, tile, -(-vocab // tile)


def _tile_start(j, tile: int, vocab: int):
    """First column of tile ``j`` and the mask ``[tile]`` of its columns not seen before."""
    start = jnp.minimum(j * tile, vocab - tile)
    return start, start + jnp.arange(tile) >= j * tile


def _logits(cfg: ModelConfig, spec: str, hc: jax.Array, wk: jax.Array) -> jax.Array:
    """Float32 logits of ``hc`` against the head (or a tile of it) ``wk``, soft-capped."""
    return softcap(cfg, jnp.einsum(spec, hc, wk, preferred_element_type=jnp.float32))


def _chunk_forward(cfg: ModelConfig, spec: str, tile: int, w: jax.Array, hc: jax.Array,
                   yc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``hc [batch, c, d]``, ``yc [batch, c]`` -> ``(target logit, logsumexp)``, each
    ``[batch, c]`` float32, the head read ``tile`` vocabulary entries at a time."""
    axis, vocab, tile, k = _tiles(w, spec, tile)

    def step(carry, j):
        m, s, tgt = carry
        start, fresh = _tile_start(j, tile, vocab)
        logits = _logits(cfg, spec, hc, jax.lax.dynamic_slice_in_dim(w, start, tile, axis))
        logits = jnp.where(fresh, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        idx = yc - start
        got = jnp.take_along_axis(logits, jnp.clip(idx, 0, tile - 1)[..., None], axis=-1)[..., 0]
        tgt = jnp.where((yc >= j * tile) & (idx < tile), got, tgt)
        return (m_new, s, tgt), None

    init = (jnp.full(yc.shape, -jnp.inf, jnp.float32), jnp.zeros(yc.shape, jnp.float32),
            jnp.zeros(yc.shape, jnp.float32))
    (m, s, tgt), _ = jax.lax.scan(step, init, jnp.arange(k))
    return tgt, m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tiled(cfg: ModelConfig, spec: str, tile: int, h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """``h [n, batch, c, d]``, ``y [n, batch, c]`` -> target log-probabilities ``[n, batch, c]``,
    chunk by chunk (``n``), the head ``w`` in tiles of ``tile`` vocabulary entries."""
    return _tiled_fwd(cfg, spec, tile, h, w, y)[0]


def _tiled_fwd(cfg, spec, tile, h, w, y):
    tgt, lse = jax.lax.map(lambda xs: _chunk_forward(cfg, spec, tile, w, *xs), (h, y))
    return tgt - lse, (h, w, y, lse)


def _tiled_bwd(cfg, spec, tile, res, g):
    """``d lp / d logits = onehot(target) - softmax``, tile by tile: each tile's logits
    are formed again from the saved logsumexp and pulled back through the tile's
    product (and the soft cap) into ``dh`` and the tile's columns of ``dw``.

    The vocabulary tiles are the outer loop and the position chunks the inner one, so
    each tile's ``dw`` columns are complete when its inner loop ends. They sum over rows,
    and the rows are sharded: each batch shard of the context mesh keeps its own sum
    through the inner loop (``[shards, d, tile]``, its rows a vmapped slice,
    :func:`scas_jax.parallel.batch_shards`), and the shards' sums are reduced once per
    tile, which is one head gradient's worth of traffic a micro-batch. Summed inside the
    inner loop, XLA would reduce every tile at every chunk (``chunks`` times the traffic,
    each reduction waited for in turn)."""
    h, w, y, lse = res
    axis, vocab, tile, k = _tiles(w, spec, tile)
    n, b = h.shape[:2]
    s = batch_shards(b)

    def on_batch(x, at):  # axis ``at`` of x over the mesh's batch axes, the others left to XLA
        if s == 1:
            return x
        free = P.UNCONSTRAINED
        axes = auto_batch_axes(jax.sharding.get_abstract_mesh())
        return jax.lax.with_sharding_constraint(x, P(*[(axes if i == at else free) for i in range(x.ndim)]))

    def split(x):  # [n, b, ...] -> [n, s, b / s, ...]
        return on_batch(x.reshape(n, s, b // s, *x.shape[2:]), 1)

    hs, ys, ls, gs = split(h), split(y), split(lse), split(g.astype(jnp.float32))
    # each chunk's rows as [d, positions], made once: the head's gradient of a tile is
    # then a plain [d, positions] @ [positions, tile] product (accumulated as [d, vocab]),
    # where pulling back through the tied head's einsum wrote a transposed copy of every
    # tile's [positions, tile] gradient (2 ms of 10.7 a tile on SmolLM2, AVX-512)
    d = h.shape[-1]
    hts = jnp.swapaxes(hs.reshape(n, s, -1, d), -1, -2)  # [n, s, d, positions of a shard]
    tied = axis == 0  # the head is [vocab, d] (tied) or [d, vocab]
    cap = cfg.final_logit_softcapping

    def pull_rows(wk, start, fresh, hc, ht, yc, lc, gc):
        """One shard's rows ``hc [b / s, c, d]`` (``ht``: as ``[d, positions]``) ->
        their ``dh`` and the tile's head gradient as ``[d, tile]``."""
        logits = _logits(cfg, spec, hc, wk)
        cols = start + jnp.arange(tile)
        p = jnp.where(fresh, jnp.exp(logits - lc[..., None]), 0.0)
        hit = fresh & (yc[..., None] == cols)
        dl = gc[..., None] * (hit.astype(jnp.float32) - p)
        if cap is not None:  # d (cap tanh(x / cap)) / dx = 1 - (capped / cap)^2
            dl = dl * (1.0 - jnp.square(logits / cap))
        dl = dl.reshape(-1, tile).astype(hc.dtype)
        dh = jnp.einsum("pv,vd->pd" if tied else "pv,dv->pd", dl, wk, preferred_element_type=jnp.float32)
        dwt = jnp.einsum("dp,pv->dv", ht, dl, preferred_element_type=jnp.float32)
        return dh.reshape(hc.shape), dwt

    def vocab_tile(carry, j):
        dh, dwt = carry  # dwt: the head's gradient as [d, vocab]
        start, fresh = _tile_start(j, tile, vocab)
        wk = jax.lax.dynamic_slice_in_dim(w, start, tile, axis)

        def chunk(inner, i):
            dh, dwt_k = inner
            at = lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
            dh_c, dwt_c = jax.vmap(pull_rows, in_axes=(None, None, None, 0, 0, 0, 0, 0))(
                wk, start, fresh, at(hs), at(hts), at(ys), at(ls), at(gs))
            dh = jax.lax.dynamic_update_index_in_dim(dh, at(dh) + dh_c, i, 0)
            return (dh, dwt_k + dwt_c), None

        dwt_k = on_batch(jnp.zeros((s, d, tile), jnp.float32), 0)
        (dh, dwt_k), _ = jax.lax.scan(chunk, (dh, dwt_k), jnp.arange(n))
        dwt = jax.lax.dynamic_update_slice_in_dim(
            dwt, jax.lax.dynamic_slice_in_dim(dwt, start, tile, 1) + jnp.sum(dwt_k, axis=0), start, 1)
        return (dh, dwt), None

    init = (jnp.zeros(hs.shape, jnp.float32), jnp.zeros((d, vocab), jnp.float32))
    (dh, dwt), _ = jax.lax.scan(vocab_tile, init, jnp.arange(k))
    dw = dwt.T if tied else dwt
    return dh.reshape(h.shape).astype(h.dtype), dw.astype(w.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def next_token_nll(
    params: dict, cfg: ModelConfig, hidden: jax.Array, tokens: jax.Array, chunk: int = VOCAB_CHUNK,
    vocab_tile: int | None = None,
) -> jax.Array:
    """``nll[b, p] = -log p(tokens[b, p] | tokens[b, :p])`` for ``p >= 1``; ``nll[:, 0] = 0``.

    Packed rows: a position whose predecessor belongs to another sequence gets a
    meaningless value, so callers mask it (the first token of every sequence). With
    ``vocab_tile`` (forward passes: :data:`LOGIT_POSITIONS`, :data:`VOCAB_TILE`) a
    device's rows are taken about ``chunk`` positions at a time (position ranges of each
    row: ``chunk`` over the rows it holds, :func:`scas_jax.parallel.local_rows`) and the
    vocabulary in tiles (:func:`target_logprobs`); each position's value depends on
    neither.
    """
    b, t, d = hidden.shape
    if vocab_tile is None:
        lp = target_logprobs(params, cfg, hidden[:, :-1], tokens[:, 1:], chunk)
    else:
        # Every position of a device's rows, ``chunk`` of them at a time as position
        # ranges of each row (a range of the flattened batch would gather a sharded batch
        # on every device); the last position predicts nothing (target 0, dropped), which
        # spares a copy of ``hidden`` without it.
        per_row = max(1, chunk // local_rows(b))
        targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        lp = target_logprobs(params, cfg, hidden, targets, per_row, vocab_tile)[:, :-1]
    return jnp.pad(-lp, ((0, 0), (1, 0)))
