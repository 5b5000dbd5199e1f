"""SCAS metric fields from per-sequence sufficient statistics (host side, float64).

The jitted core returns, per sequence (shapes without the batch axis):

* ``q_nll_sum, q_nll_count, a_nll_sum, a_nll_count``: sums and counts of token NLLs over
  ``nll_question_mask`` / ``nll_answer_mask`` (position 0 excluded; see ``data/chat.py``);
* ``q_count, a_count``: the number of similarity positions (``question_mask`` /
  ``answer_mask``, position 0 included when not special);
* ``q_vec_sum, a_vec_sum``: ``[d]`` sums of the L2-normalised target-layer rows
  ``x / max(||x||, 1e-12)`` over those positions;
* ``q_sqnorm_sum, a_sqnorm_sum``: sums of the squared norms of the normalised rows
  (1 per row, 0 for an all-zero row).

Exact identities replace the reference's ``T x T`` matrix (method page, step 6):
mean over all pairs ``|sum a|^2 / n^2``; without the diagonal
``(|sum a|^2 - sum |a|^2) / (n^2 - n)`` (0 when n <= 1); ``AQ = (sum a).(sum q) /
(n_a n_q)`` (0 when there is no question position).

Zero rules follow the reference: no answer position -> every metric 0; an error row ->
every metric 0 plus ``scas_scoring_error``. In both cases ``lambda_scas`` and
``answer_answer_weight`` (= 1 - lambda) keep their values, as the reference writes them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from scas_jax.errors import ScasError

STAT_NAMES: tuple[str, ...] = (
    "q_nll_sum",
    "q_nll_count",
    "a_nll_sum",
    "a_nll_count",
    "q_count",
    "a_count",
    "q_vec_sum",
    "a_vec_sum",
    "q_sqnorm_sum",
    "a_sqnorm_sum",
)

# Output order of the reference rows.
SIMILARITY_FIELDS: tuple[str, ...] = (
    "answer_answer_similarity",
    "answer_answer_similarity_no_diag",
    "answer_question_similarity",
    "question_question_similarity",
    "question_question_similarity_no_diag",
)
SCORE_FIELDS: tuple[str, ...] = (
    "lambda_scas",
    "answer_answer_weight",
    "answer_mean_nll",
    "question_mean_nll",
    "answer_nll_weight",
    "answer_question_nll_weight",
    "answer_answer_block",
    "answer_answer_block_no_diag",
    "answer_question_block",
    "question_question_block",
    "scas_score",
    "scas_score_no_diag",
    "nll_weight_score",
    "similarity_score",
    "similarity_score_no_diag",
    "answer_mean_nll_score",
)
METRIC_FIELDS: tuple[str, ...] = SIMILARITY_FIELDS + SCORE_FIELDS
ERROR_FIELD = "scas_scoring_error"


def check_lambda(lambda_scas: float) -> float:
    lambda_scas = float(lambda_scas)
    if not 0.0 <= lambda_scas <= 1.0:
        raise ScasError(f"lambda_scas must be in [0, 1], got {lambda_scas}")
    return lambda_scas


def _div(num, den, xp=np):
    """``num / den`` where ``den > 0``, else 0 (no division by zero is evaluated, so the
    jnp form has finite gradients too)."""
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, 1), 0.0)


def _rowdot(a, b, xp=np):
    """``sum(a * b, -1)``; on numpy through matmul, which is bitwise ``np.dot`` per row."""
    if xp is np:
        return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]
    return xp.sum(a * b, axis=-1)  # elementwise: full precision on every backend


def _combine(aa, aa_nd, aq, qq, qq_nd, nq, na, lam) -> dict:
    """Method page step 8 on scalars or arrays (numpy or jax.numpy, broadcasting)."""
    w = 1.0 - lam
    aa_block, aa_block_nd = na * na * aa, na * na * aa_nd
    aq_block = na * nq * aq
    return {
        "answer_answer_similarity": aa,
        "answer_answer_similarity_no_diag": aa_nd,
        "answer_question_similarity": aq,
        "question_question_similarity": qq,
        "question_question_similarity_no_diag": qq_nd,
        "lambda_scas": lam,
        "answer_answer_weight": w,
        "answer_mean_nll": na,
        "question_mean_nll": nq,
        "answer_nll_weight": na * na,
        "answer_question_nll_weight": na * nq,
        "answer_answer_block": aa_block,
        "answer_answer_block_no_diag": aa_block_nd,
        "answer_question_block": aq_block,
        "question_question_block": nq * nq * qq,
        "scas_score": w * aa_block + lam * aq_block,
        "scas_score_no_diag": w * aa_block_nd + lam * aq_block,
        "nll_weight_score": w * na * na + lam * na * nq,
        "similarity_score": w * aa + lam * aq,
        "similarity_score_no_diag": w * aa_nd + lam * aq,
        "answer_mean_nll_score": na,
    }


def combine(
    *,
    answer_answer_similarity: float,
    answer_answer_similarity_no_diag: float,
    answer_question_similarity: float,
    question_question_similarity: float,
    question_question_similarity_no_diag: float,
    question_mean_nll: float,
    answer_mean_nll: float,
    lambda_scas: float = 0.5,
) -> dict[str, float]:
    """Every metric field (method page step 8) from the similarities and mean NLLs."""
    out = _combine(
        float(answer_answer_similarity), float(answer_answer_similarity_no_diag),
        float(answer_question_similarity), float(question_question_similarity),
        float(question_question_similarity_no_diag), float(question_mean_nll),
        float(answer_mean_nll), check_lambda(lambda_scas))
    return {k: float(v) for k, v in out.items()}


def fields_from_arrays(stats: Mapping[str, Any], lambda_scas: Any = 0.5, xp: Any = np) -> dict[str, Any]:
    """Every SCAS metric field from statistics with any leading shape: the one
    implementation behind :func:`fields_from_stats`, :func:`fields_from_batch` and
    :func:`scas_jax.api.fields`.

    Args:
      stats: :data:`STAT_NAMES` arrays, scalars ``[...]`` and vectors ``[..., d]``, in the
        dtype to compute in (the host path passes float64).
      lambda_scas: a number in [0, 1] (checked) or, with ``xp=jax.numpy``, a traced scalar.
      xp: ``numpy`` or ``jax.numpy``; with ``jax.numpy`` the function is pure and
        composes under ``jit``/``vmap``/``grad``.
    Returns:
      ``{field: [...] array}`` for every name of :data:`METRIC_FIELDS`; zero rules as
      the reference (no answer position -> every metric 0).
    """
    lam = check_lambda(lambda_scas) if isinstance(lambda_scas, (int, float)) else lambda_scas
    n_a, n_q = stats["a_count"], stats["q_count"]
    a_vec, q_vec = stats["a_vec_sum"], stats["q_vec_sum"]
    sa = _rowdot(a_vec, a_vec, xp)
    sq = _rowdot(q_vec, q_vec, xp)
    has_a = n_a > 0
    values = (
        _div(sa, n_a * n_a, xp),  # AA: all ordered pairs
        _div(sa - stats["a_sqnorm_sum"], n_a * n_a - n_a, xp),  # > 0 iff n_a > 1
        _div(_rowdot(a_vec, q_vec, xp), n_a * n_q, xp),  # AQ: 0 without questions
        _div(sq, n_q * n_q, xp),
        _div(sq - stats["q_sqnorm_sum"], n_q * n_q - n_q, xp),
        _div(stats["q_nll_sum"], stats["q_nll_count"], xp),
        _div(stats["a_nll_sum"], stats["a_nll_count"], xp),
    )
    out = _combine(*(xp.where(has_a, v, 0.0) for v in values), lam)
    return {k: xp.broadcast_to(xp.asarray(out[k], dtype=sa.dtype), sa.shape) for k in METRIC_FIELDS}


def zero_fields(lambda_scas: float = 0.5) -> dict[str, float]:
    """All metrics 0 (``lambda_scas`` and ``answer_answer_weight`` keep their values)."""
    return combine(
        answer_answer_similarity=0.0,
        answer_answer_similarity_no_diag=0.0,
        answer_question_similarity=0.0,
        question_question_similarity=0.0,
        question_question_similarity_no_diag=0.0,
        question_mean_nll=0.0,
        answer_mean_nll=0.0,
        lambda_scas=lambda_scas,
    )


def error_fields(message: str, lambda_scas: float = 0.5) -> dict[str, Any]:
    """The fields of a row that cannot be scored: zero metrics plus ``scas_scoring_error``."""
    out: dict[str, Any] = dict(zero_fields(lambda_scas))
    out[ERROR_FIELD] = str(message)
    return out


def fields_from_stats(
    *,
    q_nll_sum: float,
    q_nll_count: float,
    a_nll_sum: float,
    a_nll_count: float,
    q_count: float,
    a_count: float,
    q_vec_sum: np.ndarray,
    a_vec_sum: np.ndarray,
    q_sqnorm_sum: float,
    a_sqnorm_sum: float,
    lambda_scas: float = 0.5,
) -> dict[str, float]:
    """Every SCAS metric field of one sequence; vectors are ``[d]``, the rest scalars."""
    stats = dict(q_nll_sum=q_nll_sum, q_nll_count=q_nll_count, a_nll_sum=a_nll_sum,
                 a_nll_count=a_nll_count, q_count=q_count, a_count=a_count, q_vec_sum=q_vec_sum,
                 a_vec_sum=a_vec_sum, q_sqnorm_sum=q_sqnorm_sum, a_sqnorm_sum=a_sqnorm_sum)
    return fields_from_batch({k: np.asarray(v)[None] for k, v in stats.items()}, lambda_scas)[0]


def fields_from_batch(
    stats: Mapping[str, Any], lambda_scas: float = 0.5
) -> list[dict[str, float]]:
    """``fields_from_stats`` per sequence of a batch: scalars ``[B]``, vectors ``[B, d]``.

    ``stats`` maps every name of :data:`STAT_NAMES` to an array (JAX arrays are fine:
    they are copied to the host as float64).
    """
    missing = [k for k in STAT_NAMES if k not in stats]
    if missing:
        raise KeyError(f"missing statistics: {missing}")
    lam = check_lambda(lambda_scas)
    host = {k: np.asarray(stats[k], dtype=np.float64) for k in STAT_NAMES}
    arrays = fields_from_arrays(host, lam)
    columns = {k: arrays[k].tolist() for k in METRIC_FIELDS}
    return [{k: columns[k][b] for k in METRIC_FIELDS} for b in range(host["a_count"].shape[0])]
