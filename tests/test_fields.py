"""SCAS fields from sufficient statistics (scas_jax.scoring.fields) vs brute force and the oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.data.chat import ChatEncoder, Encoded
from scas_jax.errors import ScasError
from scas_jax.scoring.fields import (
    ERROR_FIELD,
    METRIC_FIELDS,
    STAT_NAMES,
    error_fields,
    fields_from_batch,
    fields_from_stats,
    zero_fields,
)

PAGE_FIELDS = {  # method page, steps 6-8
    "answer_answer_similarity", "answer_answer_similarity_no_diag", "answer_question_similarity",
    "question_question_similarity", "question_question_similarity_no_diag", "question_mean_nll",
    "answer_mean_nll", "answer_nll_weight", "answer_question_nll_weight", "answer_answer_block",
    "answer_answer_block_no_diag", "answer_question_block", "question_question_block", "scas_score",
    "scas_score_no_diag", "nll_weight_score", "similarity_score", "similarity_score_no_diag",
    "answer_mean_nll_score", "answer_answer_weight", "lambda_scas",
}  # fmt: skip


def unit_rows(rng, n, d=6):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stats_of(q, a, q_nll, a_nll):
    return dict(
        q_nll_sum=float(np.sum(q_nll)), q_nll_count=len(q_nll),
        a_nll_sum=float(np.sum(a_nll)), a_nll_count=len(a_nll),
        q_count=len(q), a_count=len(a),
        q_vec_sum=q.sum(0), a_vec_sum=a.sum(0),
        q_sqnorm_sum=float((q * q).sum()), a_sqnorm_sum=float((a * a).sum()),
    )  # fmt: skip


def brute(mat):
    n = mat.shape[0]
    return mat.mean(), (mat.sum() - np.trace(mat)) / (n * n - n) if n > 1 else 0.0


def test_field_names_are_the_pages():
    assert set(METRIC_FIELDS) == PAGE_FIELDS and len(METRIC_FIELDS) == len(PAGE_FIELDS)
    assert set(fields_from_stats(**stats_of(np.ones((1, 2)), np.ones((1, 2)), [1.0], [1.0]))) == PAGE_FIELDS


def test_identities_match_brute_force_pairs():
    rng = np.random.default_rng(0)
    q, a = unit_rows(rng, 7), unit_rows(rng, 5)
    q_nll, a_nll = rng.uniform(0, 3, 6), rng.uniform(0, 3, 5)
    lam = 0.3
    f = fields_from_stats(**stats_of(q, a, q_nll, a_nll), lambda_scas=lam)
    aa, aa_nd = brute(a @ a.T)
    qq, qq_nd = brute(q @ q.T)
    aq = (a @ q.T).mean()
    na, nq = a_nll.mean(), q_nll.mean()
    expected = {
        "answer_answer_similarity": aa, "answer_answer_similarity_no_diag": aa_nd,
        "answer_question_similarity": aq, "question_question_similarity": qq,
        "question_question_similarity_no_diag": qq_nd, "answer_mean_nll": na, "question_mean_nll": nq,
        "answer_nll_weight": na**2, "answer_question_nll_weight": na * nq,
        "answer_answer_block": na**2 * aa, "answer_answer_block_no_diag": na**2 * aa_nd,
        "answer_question_block": na * nq * aq, "question_question_block": nq**2 * qq,
        "scas_score": 0.7 * na**2 * aa + 0.3 * na * nq * aq,
        "scas_score_no_diag": 0.7 * na**2 * aa_nd + 0.3 * na * nq * aq,
        "nll_weight_score": 0.7 * na**2 + 0.3 * na * nq,
        "similarity_score": 0.7 * aa + 0.3 * aq, "similarity_score_no_diag": 0.7 * aa_nd + 0.3 * aq,
        "answer_mean_nll_score": na, "answer_answer_weight": 0.7, "lambda_scas": 0.3,
    }  # fmt: skip
    assert set(expected) == PAGE_FIELDS
    for key, value in expected.items():
        assert f[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_zero_row_counts_zero_sqnorm():
    rng = np.random.default_rng(1)
    a = np.vstack([unit_rows(rng, 3), np.zeros((1, 6))])  # one all-zero activation row
    f = fields_from_stats(**stats_of(unit_rows(rng, 2), a, [1.0], [1.0, 2.0]))
    aa, aa_nd = brute(a @ a.T)
    assert f["answer_answer_similarity"] == pytest.approx(aa, rel=1e-12)
    assert f["answer_answer_similarity_no_diag"] == pytest.approx(aa_nd, rel=1e-12)


def test_zero_rules():
    rng = np.random.default_rng(2)
    q = unit_rows(rng, 4)
    none = fields_from_stats(**stats_of(q, np.zeros((0, 6)), [1.0, 2.0], []), lambda_scas=0.25)
    assert none == zero_fields(0.25)
    assert none["lambda_scas"] == 0.25 and none["answer_answer_weight"] == 0.75
    assert all(none[k] == 0.0 for k in PAGE_FIELDS - {"lambda_scas", "answer_answer_weight"})

    one = fields_from_stats(**stats_of(q[:1], unit_rows(rng, 1), [], [2.0]))
    assert one["answer_answer_similarity"] == pytest.approx(1.0)
    assert one["answer_answer_similarity_no_diag"] == 0.0
    assert one["question_question_similarity"] == pytest.approx(1.0)
    assert one["question_question_similarity_no_diag"] == 0.0
    assert one["question_mean_nll"] == 0.0 and one["answer_mean_nll"] == 2.0  # empty NLL set -> 0
    assert one["scas_score"] == pytest.approx(0.5 * 4.0 * 1.0 + 0.0)

    no_q = fields_from_stats(**stats_of(np.zeros((0, 6)), unit_rows(rng, 3), [], [1.0, 1.0]))
    for key in ("answer_question_similarity", "question_question_similarity", "question_question_similarity_no_diag"):
        assert no_q[key] == 0.0


def test_error_fields_and_lambda_check():
    e = error_fields("boom", lambda_scas=0.5)
    assert e[ERROR_FIELD] == "boom" and set(e) == PAGE_FIELDS | {ERROR_FIELD}
    assert e["scas_score"] == 0.0 and e["lambda_scas"] == 0.5
    with pytest.raises(ScasError):
        zero_fields(1.5)
    with pytest.raises(ScasError):
        fields_from_stats(**stats_of(np.ones((1, 2)), np.ones((1, 2)), [1.0], [1.0]), lambda_scas=-0.1)


def test_batch_equals_single():
    rng = np.random.default_rng(3)
    singles = [stats_of(unit_rows(rng, 3 + i), unit_rows(rng, 2 + i), rng.uniform(size=2), rng.uniform(size=2 + i)) for i in range(3)]
    batch = {k: np.stack([np.asarray(s[k], dtype=np.float32) for s in singles]) for k in STAT_NAMES}
    got = fields_from_batch(batch, lambda_scas=0.6)
    for g, s in zip(got, singles):
        want = fields_from_stats(**{k: np.asarray(v, dtype=np.float32) for k, v in s.items()}, lambda_scas=0.6)
        assert g == want


# ---------------------------------------------------------------- real student, torch oracle


def torch_stats(out: dict, enc: Encoded) -> dict:
    """Sufficient statistics from one torch forward (``reference_forward``'s output), with
    chat.py's masks (float64 sums)."""
    act = out["act"]  # float32 [T, d]
    unit = (act / act.norm(dim=1, keepdim=True).clamp_min(1e-12)).double().numpy()
    nll = out["nll"].double().numpy()  # [T], nll[0] = nan (never selected)
    sq = (unit * unit).sum(1)
    qm, am, nq, na = enc.question_mask, enc.answer_mask, enc.nll_question_mask, enc.nll_answer_mask
    return dict(
        q_nll_sum=nll[nq].sum(), q_nll_count=nq.sum(), a_nll_sum=nll[na].sum(), a_nll_count=na.sum(),
        q_count=qm.sum(), a_count=am.sum(), q_vec_sum=unit[qm].sum(0), a_vec_sum=unit[am].sum(0),
        q_sqnorm_sum=sq[qm].sum(), a_sqnorm_sum=sq[am].sum(),
    )  # fmt: skip


def oracle_cases(tokenizer):
    from test_chat import BARE_ANSWER_TEMPLATE, MISMATCH_TEMPLATE, PLAIN_TEMPLATE, with_template

    cases = []
    for name, index in (("human_reference", 0), ("gpt3_175b_verification", 1), ("human_socratic", 2)):
        with open(GSM8K_POOL / f"{name}.jsonl") as f:
            cases.append((f"{name}[{index}]", tokenizer, [json.loads(line) for line in f][index]))
    short = {"instruction": "What is 3 + 4?", "teacher_output": "7"}
    cases.append(("one-token answer", with_template(tokenizer, BARE_ANSWER_TEMPLATE), short))
    cases.append(("plain template", with_template(tokenizer, PLAIN_TEMPLATE), {**short, "system": ""}))
    cases.append(("prompt not a prefix", with_template(tokenizer, MISMATCH_TEMPLATE), {**short, "system": ""}))
    return cases


@pytest.mark.slow
def test_fields_match_torch_oracle(smollm2_torch_model, smollm2_tokenizer):
    import torch

    from scas_reference import reference_forward, reference_metrics

    for label, tok, row in oracle_cases(smollm2_tokenizer):
        enc = ChatEncoder(tok).encode(row)
        forward = reference_forward(smollm2_torch_model, torch.from_numpy(enc.ids.astype(np.int64)))
        stats = torch_stats(forward, enc)
        for lambda_scas in (0.5, 0.2):
            # the oracle re-tokenizes the row itself and checks the forward is over its ids
            want = reference_metrics(smollm2_torch_model, tok, row, lambda_scas=lambda_scas, forward=forward)
            got = fields_from_stats(**stats, lambda_scas=lambda_scas)
            assert set(got) == set(want) == PAGE_FIELDS, label
            for key in PAGE_FIELDS:
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (label, key, got[key], want[key])
            assert got["answer_mean_nll"] > 0.1 and got["scas_score"] > 0, label  # real values
        if label == "one-token answer":
            assert enc.n_answer == 1 and got["answer_answer_similarity"] == pytest.approx(1.0)
            assert got["answer_answer_similarity_no_diag"] == 0.0
        if label == "plain template":
            assert enc.question_mask[0]  # position 0 counts for similarity, not for NLL


def test_error_row_matches_oracle():
    from scas_reference import reference_metrics

    want = reference_metrics(None, None, {"id": 1, "instruction": "q"}, lambda_scas=0.4)
    assert error_fields(want[ERROR_FIELD], lambda_scas=0.4) == want
