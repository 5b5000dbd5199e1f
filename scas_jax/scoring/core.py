"""The jitted SCAS core: per-sequence sufficient statistics from one forward pass.

``sequence_stats(params, batch)`` runs the student over a packed batch and reduces,
for every packed sequence (segment), what :mod:`scas_jax.scoring.fields` needs:

    q_nll_sum, q_nll_count, a_nll_sum, a_nll_count   [batch, segs]
    q_count, a_count, q_sqnorm_sum, a_sqnorm_sum     [batch, segs]
    q_vec_sum, a_vec_sum                             [batch, segs, d_tap]

Nothing of size ``[seq, seq]`` per sequence or ``[batch, seq, vocab]`` is materialised:
the similarity terms are sums of L2-normalised tap rows (exact O(T d) identities), the
log-softmax runs over sequence chunks (:func:`scas_jax.models.loss.next_token_nll`)
and long rows use blockwise attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import decode
from scas_jax.models.layers import FactoredUp
from scas_jax.models.loss import LOGIT_POSITIONS, VOCAB_TILE, next_token_nll

DEFAULT_TAP = "layers.-1.mlp.up_proj"
BATCH_KEYS = ("tokens", "positions", "segment_ids", "question_mask", "answer_mask",
              "nll_question_mask", "nll_answer_mask")


def l2_normalise(x: jax.Array) -> jax.Array:
    """``x / max(||x||, 1e-12)`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def token_outputs(
    params: dict,
    batch: dict,
    *,
    cfg: ModelConfig,
    tap: str = DEFAULT_TAP,
    dtype=jnp.float32,
    attn_impl: str = "auto",
    vocab_chunk: int = LOGIT_POSITIONS,
) -> tuple[jax.Array, jax.Array]:
    """One forward pass: per-token NLL and the L2-normalised tap rows.

    Args:
      batch: at least ``tokens``, ``positions``, ``segment_ids``, each ``[batch, seq]``.
      vocab_chunk: positions of a device's rows per log-softmax chunk, the vocabulary
        taken :data:`~scas_jax.models.loss.VOCAB_TILE` entries at a time
        (:func:`scas_jax.models.loss.next_token_nll`); no value depends on it.
    Returns:
      ``(nll [batch, seq] float32, unit [batch, seq, d_tap] float32)``: ``nll[b, p]`` is
      the loss of predicting token ``p`` (0 at ``p = 0``; meaningless at the first token
      of a packed sequence, which every mask excludes) and ``unit[b, p]`` is the tap row
      ``x / max(||x||, 1e-12)``.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    hidden, taps = decode(params, cfg, tokens, batch["positions"], seg, (tap,),
                          dtype=dtype, attn_impl=attn_impl)
    nll = next_token_nll(params, cfg, hidden, tokens, vocab_chunk, VOCAB_TILE)  # [B, T] f32
    return nll, l2_normalise(taps[tap])


def segment_onehot(segment_ids: jax.Array, max_segments: int) -> jax.Array:
    """``[batch, seq] -> [batch, seq, max_segments]`` float32; segment ``s`` is column ``s - 1``."""
    return (segment_ids[..., None] == jnp.arange(1, max_segments + 1)).astype(jnp.float32)


def segment_stats(nll: jax.Array, act: jax.Array, batch: dict, *, max_segments: int) -> dict[str, jax.Array]:
    """The per-sequence sufficient statistics from per-token values.

    Args:
      nll: ``[batch, seq]`` token NLLs; act: ``[batch, seq, d]`` unit tap rows (any
        per-token values of these shapes: a variant may pass its own).
      batch: ``segment_ids`` and the four masks, ``[batch, seq]``.
    Returns:
      :data:`scas_jax.scoring.fields.STAT_NAMES`: ``[batch, max_segments]`` scalars and
      ``[batch, max_segments, d]`` vector sums.
    """
    return {**nll_stats(nll, batch, max_segments=max_segments),
            **tap_stats(act, batch, max_segments=max_segments)}


def _per_seg(onehot: jax.Array, mask: jax.Array, values: jax.Array) -> jax.Array:
    """``[B,T,S] x [B,T] x [B,T] -> [B,S]``: sums of ``values`` where ``mask``, per segment."""
    return jnp.einsum("bts,bt->bs", onehot, jnp.where(mask.astype(bool), values, 0.0))


_SIDES = (("q", "question_mask", "nll_question_mask"), ("a", "answer_mask", "nll_answer_mask"))


def nll_stats(nll: jax.Array, batch: dict, *, max_segments: int) -> dict[str, jax.Array]:
    """The NLL sums and the counts of :func:`segment_stats` (``[batch, max_segments]``)."""
    onehot = segment_onehot(batch["segment_ids"], max_segments)  # [B,T,S]
    ones = jnp.ones_like(nll)
    out = {}
    for side, m, nm in _SIDES:
        out[f"{side}_nll_sum"] = _per_seg(onehot, batch[nm], nll)
        out[f"{side}_nll_count"] = _per_seg(onehot, batch[nm], ones)
        out[f"{side}_count"] = _per_seg(onehot, batch[m], ones)
    return out


def tap_stats(act: jax.Array, batch: dict, *, max_segments: int) -> dict[str, jax.Array]:
    """The similarity sums of :func:`segment_stats` from unit tap rows ``act [B, T, d]``:
    ``{q,a}_sqnorm_sum [B, S]`` and ``{q,a}_vec_sum [B, S, d]``."""
    sq = jnp.sum(act * act, axis=-1)  # [B, T]
    onehot = segment_onehot(batch["segment_ids"], max_segments)  # [B,T,S]
    out = {}
    for side, m, _ in _SIDES:
        mask = batch[m].astype(bool)
        out[f"{side}_sqnorm_sum"] = _per_seg(onehot, mask, sq)
        out[f"{side}_vec_sum"] = jnp.einsum(
            "bts,btd->bsd", onehot * mask[..., None], act, precision=jax.lax.Precision.HIGHEST)
    return out


def unit_tap_stats(tap, batch: dict, *, max_segments: int) -> dict[str, jax.Array]:
    """:func:`tap_stats` of the unit rows of ``tap``: an activation ``[B, T, d]`` (unit
    rows by :func:`l2_normalise`), or a :class:`~scas_jax.models.layers.FactoredUp`
    ``x @ w``, whose unit rows are never made: with ``c_t = 1 / max(||x_t w||, 1e-12)``
    a segment's vector sum is ``(sum_t c_t x_t) @ w`` and its squared-norm sum
    ``sum_t ||x_t w||^2 c_t^2`` (the same values to float32 rounding)."""
    if not isinstance(tap, FactoredUp):
        return tap_stats(l2_normalise(tap), batch, max_segments=max_segments)
    sq_norm = tap.sqnorm.astype(jnp.float32)  # [B, T]
    inv = 1.0 / jnp.maximum(jnp.sqrt(sq_norm), 1e-12)
    onehot = segment_onehot(batch["segment_ids"], max_segments)  # [B,T,S]
    x, w = tap.x.astype(jnp.float32), tap.w.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    out = {}
    for side, m, _ in _SIDES:
        mask = batch[m].astype(bool)
        out[f"{side}_sqnorm_sum"] = _per_seg(onehot, mask, sq_norm * inv * inv)
        weighted = jnp.einsum("bts,btd->bsd", onehot * jnp.where(mask, inv, 0.0)[..., None], x,
                              precision=hi)
        # a batched product, one [S, d] @ [d, f] per row: a GEMM's rows depend on how many
        # rows it has, so one product over all rows would change with the devices
        per_row = jnp.broadcast_to(w, (weighted.shape[0],) + w.shape)
        out[f"{side}_vec_sum"] = jnp.einsum("bsd,bdf->bsf", weighted, per_row, precision=hi)
    return out


def sequence_stats(
    params: dict,
    batch: dict,
    *,
    cfg: ModelConfig,
    max_segments: int,
    tap: str = DEFAULT_TAP,
    dtype=jnp.float32,
    attn_impl: str = "auto",
    vocab_chunk: int = LOGIT_POSITIONS,
) -> dict[str, jax.Array]:
    """Sufficient statistics of every packed sequence: :func:`segment_stats` of
    :func:`token_outputs`, with the tap reduced inside its layer (``decode``'s
    ``tap_fn``, :func:`unit_tap_stats`): the unit tap rows ``[batch, seq, d_tap]`` are
    never made (an ``mlp.up_proj`` tap of a SwiGLU MLP: nor the activation), carried or
    returned.

    Args:
      batch: ``BATCH_KEYS`` arrays, each ``[batch, seq]``. Masks are booleans; segment
        ids run 1..``max_segments`` (0 = padding). The nll masks must exclude each
        sequence's first position (nothing predicts it).
    Returns:
      The statistics above; segment ``s`` of row ``b`` is at ``[b, s - 1]``.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    hidden, reduced = decode(
        params, cfg, tokens, batch["positions"], seg, (tap,), dtype=dtype, attn_impl=attn_impl,
        tap_fn=lambda _, a: unit_tap_stats(a, batch, max_segments=max_segments))
    nll = next_token_nll(params, cfg, hidden, tokens, vocab_chunk, VOCAB_TILE)  # [B, T] f32
    return {**nll_stats(nll, batch, max_segments=max_segments), **reduced[tap]}


@functools.lru_cache(maxsize=None)
def compiled_stats(cfg: ModelConfig, max_segments: int, tap: str = DEFAULT_TAP,
                   dtype: str = "float32", attn_impl: str = "auto", vocab_chunk: int = LOGIT_POSITIONS):
    """One jitted ``(params, batch) -> stats`` per static configuration (shared by all
    callers, so the scorer, the training loop and the tests reuse compilations)."""
    fn = functools.partial(sequence_stats, cfg=cfg, max_segments=max_segments, tap=tap,
                           dtype=jnp.dtype(dtype), attn_impl=attn_impl, vocab_chunk=vocab_chunk)
    return jax.jit(fn)
