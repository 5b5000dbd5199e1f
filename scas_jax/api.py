"""The functional research API: SCAS as pure functions of ``(params, batch)``.

Stable names (documented in ``docs/api.md``). Every array function below is pure, has
static shapes, and composes under ``jax.jit``, ``jax.vmap``, ``jax.grad`` and sharded
inputs; none materialises ``[seq, seq]`` per sequence or ``[batch, seq, vocab]``.
Shapes: ``B`` rows of a packed batch, ``T`` tokens per row, ``S = max_segments``
sequences (segments) per row at most, ``d`` the tap width.

A *packed batch* is a dict of ``[B, T]`` arrays (:data:`BATCH_KEYS`): ``tokens``,
``positions`` (restarting at 0 per sequence), ``segment_ids`` (1..S, 0 on padding),
``question_mask`` / ``answer_mask`` (similarity positions) and ``nll_question_mask`` /
``nll_answer_mask`` (NLL positions: the same without each sequence's first token).
Segment ``s`` of row ``b`` is at index ``[b, s - 1]`` of every per-segment array.

Forward pass and statistics (the scorer's own code, :mod:`scas_jax.scoring.core`):

* :func:`token_outputs` -> ``(nll [B, T], unit [B, T, d])``; :func:`token_nll`;
  :func:`taps` (raw activations, any tap);
* :func:`segment_stats` -> the sufficient statistics (:data:`STAT_NAMES`), ``[B, S]`` and
  ``[B, S, d]``; :func:`sequence_stats` = both steps;
* :func:`fields` -> every SCAS field (:data:`METRIC_FIELDS`) as ``[B, S]`` arrays, the same
  code as the scorer's host fields (:func:`scas_jax.scoring.fields.fields_from_arrays`);
* :func:`token_costs` -> the per-token SCAS cost ``[B, T]`` whose sum over a sequence's
  answer tokens is its ``scas_score``; :func:`scas_token_costs` does the whole pass.

Segment helpers: :func:`segment_sum`, :func:`segment_dot`, :func:`segment_gather`.

Rows to batches (the CLI's code, re-exported): :class:`ChatEncoder`, :class:`ScoreConfig`,
:func:`prepare`, :func:`plan_batches`, :func:`materialise`, :func:`packed_batches`; and
running a per-segment function over them, packed and sharded: :func:`map_segments`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scas_jax.data.chat import ChatEncoder, Encoded
from scas_jax.data.packing import BatchPlan, materialise, plan_batches
from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import decode
from scas_jax.models.loss import LOGIT_POSITIONS, VOCAB_TILE, next_token_nll
from scas_jax.scoring.core import (
    BATCH_KEYS,
    DEFAULT_TAP,
    l2_normalise,
    segment_onehot,
    segment_stats,
    sequence_stats,
    token_outputs,
)
from scas_jax.scoring.fields import METRIC_FIELDS, STAT_NAMES, _div, fields_from_arrays
from scas_jax.scoring.scorer import Prepared, ScoreConfig, prepare, score_rows

__all__ = [
    "BATCH_KEYS", "DEFAULT_TAP", "METRIC_FIELDS", "STAT_NAMES",
    "token_outputs", "token_nll", "taps", "l2_normalise",
    "segment_stats", "sequence_stats", "fields", "token_costs", "scas_token_costs",
    "segment_onehot", "segment_sum", "segment_dot", "segment_gather",
    "ChatEncoder", "Encoded", "ScoreConfig", "Prepared", "BatchPlan", "prepare", "plan_batches",
    "materialise", "packed_batches", "map_segments", "score_rows",
]  # fmt: skip

_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- forward pass


def token_nll(params: dict, batch: dict, *, cfg: ModelConfig, dtype=jnp.float32,
              attn_impl: str = "auto", vocab_chunk: int = LOGIT_POSITIONS) -> jax.Array:
    """Per-token NLL ``[B, T]`` float32 (no tap kept): ``nll[b, p] = -log p(tokens[b, p] |
    tokens[b, :p])`` for ``p >= 1``, 0 at ``p = 0``. The first token of every packed
    sequence gets a meaningless value: use it under the ``nll_*_mask`` only."""
    hidden, _ = decode(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                       dtype=dtype, attn_impl=attn_impl)
    return next_token_nll(params, cfg, hidden, batch["tokens"], vocab_chunk, VOCAB_TILE)


def taps(params: dict, batch: dict, names: Sequence[str] = (DEFAULT_TAP,), *, cfg: ModelConfig,
         dtype=jnp.float32, attn_impl: str = "auto") -> dict[str, jax.Array]:
    """Raw (not normalised) activations ``{name: [B, T, width]}`` of the named taps
    (``layers.<i>.mlp.up_proj`` or ``layers.<i>.residual``, ``i`` may be negative)."""
    _, out = decode(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                    tuple(names), dtype=dtype, attn_impl=attn_impl)
    return out


# ---------------------------------------------------------------- segment helpers


def segment_sum(values: jax.Array, segment_ids: jax.Array, max_segments: int,
                mask: jax.Array | None = None) -> jax.Array:
    """``[B, T]`` per-token values -> ``[B, S]`` per-sequence sums (over ``mask`` if given)."""
    if mask is not None:
        values = jnp.where(mask.astype(bool), values, 0.0)
    return jnp.einsum("bts,bt->bs", segment_onehot(segment_ids, max_segments), values,
                      precision=_HI)


def segment_gather(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, S, ...]`` per-sequence values -> ``[B, T, ...]``: each token gets its own
    sequence's value (0 on padding)."""
    onehot = segment_onehot(segment_ids, values.shape[1])
    return jnp.einsum("bts,bs...->bt...", onehot, values, precision=_HI)


def segment_dot(rows: jax.Array, vectors: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``rows [B, T, d]``, ``vectors [B, S, d]`` -> ``[B, T]``: ``rows[b, t] .
    vectors[b, seg(b, t) - 1]`` (0 on padding), through ``[B, T, S]``, never ``[B, T, S, d]``."""
    proj = jnp.einsum("btd,bsd->bts", rows, vectors, precision=_HI)
    return jnp.sum(proj * segment_onehot(segment_ids, vectors.shape[1]), axis=-1)


# ---------------------------------------------------------------- fields and costs


def fields(stats: dict, lambda_scas: Any = 0.5) -> dict[str, jax.Array]:
    """Every SCAS field (:data:`METRIC_FIELDS`) from :func:`segment_stats`, as arrays of
    the statistics' leading shape (``[B, S]``), in their dtype (float32 on device; the
    scorer runs the same function on the host in float64). ``lambda_scas`` may be traced."""
    return fields_from_arrays(stats, lambda_scas, xp=jnp)


def token_costs(unit: jax.Array, stats: dict, batch: dict, lambda_scas: Any = 0.5) -> jax.Array:
    """Per-token SCAS cost ``[B, T]``, 0 outside ``answer_mask``.

    For answer token ``i`` of a sequence with unit tap rows ``a_i``, answer set A
    (``n_A = a_count``), question set Q (``n_Q = q_count``), ``S_A = a_vec_sum``,
    ``S_Q = q_vec_sum`` and mean NLLs ``NA``, ``NQ``::

        c_i = (1 - lam) NA^2 (a_i . S_A) / n_A^2 + lam NA NQ (a_i . S_Q) / (n_A n_Q)

    (the second term 0 when ``n_Q = 0``), so that ``sum_i c_i = scas_score``: the first
    terms sum to ``(1 - lam) NA^2 |S_A|^2 / n_A^2`` (the AA block), the second to
    ``lam NA NQ S_A . S_Q / (n_A n_Q)`` (the AQ block).

    Args:
      unit: ``[B, T, d]`` the unit rows :func:`segment_stats` was given.
      stats: :func:`segment_stats` of the same batch (``[B, S]``, ``[B, S, d]``).
      batch: ``segment_ids`` and ``answer_mask``.
    """
    seg = batch["segment_ids"]
    na = _div(stats["a_nll_sum"], stats["a_nll_count"], jnp)
    nq = _div(stats["q_nll_sum"], stats["q_nll_count"], jnp)
    n_a, n_q = stats["a_count"], stats["q_count"]
    k_aa = (1.0 - lambda_scas) * _div(na * na, n_a * n_a, jnp)  # [B, S]
    k_aq = lambda_scas * _div(na * nq, n_a * n_q, jnp)
    k = segment_gather(jnp.stack([k_aa, k_aq], axis=-1), seg)  # [B, T, 2]
    cost = (k[..., 0] * segment_dot(unit, stats["a_vec_sum"], seg)
            + k[..., 1] * segment_dot(unit, stats["q_vec_sum"], seg))
    return jnp.where(batch["answer_mask"].astype(bool), cost, 0.0)


def scas_token_costs(params: dict, batch: dict, *, cfg: ModelConfig, max_segments: int,
                     tap: str = DEFAULT_TAP, lambda_scas: Any = 0.5, dtype=jnp.float32,
                     attn_impl: str = "auto", vocab_chunk: int = LOGIT_POSITIONS) -> dict[str, Any]:
    """One forward pass -> ``{"nll": [B, T], "cost": [B, T], "stats": {...},
    "fields": {...}}`` (fields ``[B, S]`` in float32)."""
    nll, unit = token_outputs(params, batch, cfg=cfg, tap=tap, dtype=dtype, attn_impl=attn_impl,
                              vocab_chunk=vocab_chunk)
    stats = segment_stats(nll, unit, batch, max_segments=max_segments)
    return {"nll": nll, "cost": token_costs(unit, stats, batch, lambda_scas), "stats": stats,
            "fields": fields(stats, lambda_scas)}


# ---------------------------------------------------------------- rows -> batches


def _seqs(prepared: Prepared) -> dict[int, dict]:
    from scas_jax.scoring.scorer import _as_seq

    return {i: _as_seq(e) for i, e in enumerate(prepared.encoded) if not isinstance(e, str)}


def packed_batches(prepared: Prepared, mesh=None) -> Iterator[tuple[BatchPlan, dict]]:
    """``(plan, batch)`` for every planned batch of :func:`prepare`'s output, in plan order:
    host arrays, or arrays sharded over ``mesh``'s batch axes (one process; prepare with
    ``row_multiple=scas_jax.parallel.batch_divisor(mesh)``)."""
    from scas_jax.scoring.scorer import _SEQ_KEYS

    seqs = _seqs(prepared)
    for plan in prepared.plans:
        batch = materialise(plan, seqs, _SEQ_KEYS)
        if mesh is not None:
            from scas_jax.parallel import shard_batch

            batch = shard_batch(mesh, batch)
        yield plan, batch


@functools.lru_cache(maxsize=64)
def _jit(fn: Callable) -> Callable:
    return jax.jit(fn)


def map_segments(fn: Callable[[dict, dict], Any], params: dict, prepared: Prepared,
                 mesh=None) -> list[Any]:
    """Run ``fn(params, batch) -> pytree of [B, S, ...]`` over every packed batch (jitted
    once per batch shape, sharded over ``mesh`` when given) and return one value per
    row given to :func:`prepare`: the pytree of that row's ``[...]`` slices as numpy, or
    None for an error row (``prepared.encoded[i]`` is then the message)."""
    from scas_jax.scoring.scorer import executable

    jitted = _jit(fn)
    out: list[Any] = [None] * len(prepared.encoded)
    for plan, batch in packed_batches(prepared, mesh):
        res = jax.tree.map(np.asarray, executable(jitted, params, batch)(params, batch))
        for r, row in enumerate(plan.rows):
            for s, item in enumerate(row):
                out[item] = jax.tree.map(lambda v: v[r, s], res)
    return out
