"""scas_jax.api: per-token costs sum to scas_score, the API's fields are the scorer's, and
the functions compose under jit / vmap / grad.

SmolLM2 rows are packed several to a row (batch_tokens 1024); the tiny model is a random
2-layer Llama with the offline character tokenizer (tests/tiny_tokenizer.py).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_tokenizer
from test_chat import BARE_ANSWER_TEMPLATE
from pool_files import gsm8k
from scas_jax import api
from scas_jax.assets import GSM8K_POOL
from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import init_params
from scas_jax.scoring.fields import ERROR_FIELD, fields_from_batch

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8)
S = 16  # ScoreConfig().max_segments



@pytest.fixture(scope="module")
def tiny():
    return init_params(TINY, jax.random.PRNGKey(0)), tiny_tokenizer.build()


@functools.lru_cache(maxsize=None)
def _costs_fn(cfg):
    return jax.jit(functools.partial(per_segment, cfg))


def per_segment(cfg, params, batch, lam):
    out = api.scas_token_costs(params, batch, cfg=cfg, max_segments=S, lambda_scas=lam)
    return {"cost": out["cost"], "nll": out["nll"], "answer_mask": batch["answer_mask"],
            "segment_ids": batch["segment_ids"], "fields": out["fields"]}


def costs_by_item(params, cfg, tok, rows, lam, scfg):
    """{item: (float64 sum of its token costs, its float32 api fields)} through packed batches."""
    prepared = api.prepare(rows, tok, scfg)
    out = {}
    for plan, batch in api.packed_batches(prepared):
        res = jax.tree.map(np.asarray, _costs_fn(cfg)(params, batch, jnp.float32(lam)))
        for r, row in enumerate(plan.rows):
            for s, item in enumerate(row):
                here = (res["segment_ids"][r] == s + 1) & res["answer_mask"][r]
                assert np.all(res["cost"][r][(res["segment_ids"][r] == s + 1) & ~here] == 0)
                out[item] = (float(np.sum(res["cost"][r][here].astype(np.float64))),
                             {k: float(v[r, s]) for k, v in res["fields"].items()}, int(here.sum()))
    return prepared, out


def check_sums(params, cfg, tok, rows, lam, scfg, min_segments=1):
    want = api.score_rows(params, cfg, tok, rows, scfg)  # the library call behind the CLI
    prepared, got = costs_by_item(params, cfg, tok, rows, lam, scfg)
    assert max(len(r) for p in prepared.plans for r in p.rows) >= min_segments
    for i, w in enumerate(want):
        if ERROR_FIELD in w:
            assert i not in got
            continue
        total, f, n_answer = got[i]
        assert w["scas_score"] != 0 and n_answer >= 1
        assert total == pytest.approx(w["scas_score"], rel=1e-6), (i, total, w["scas_score"])
        for k in api.METRIC_FIELDS:  # the API's float32 fields = the scorer's float64 ones
            assert f[k] == pytest.approx(w[k], rel=2e-5, abs=1e-6), (i, k)
    return want


def test_token_costs_sum_to_scas_score_on_smollm2_packed(smollm2_student):
    st = smollm2_student
    rows = gsm8k("human_reference", 3) + gsm8k("gpt3_175b_verification", 3)
    scfg = api.ScoreConfig(lambda_scas=0.3, batch_tokens=1024, max_length=1024)
    check_sums(st.params, st.cfg, st.tokenizer, rows, 0.3, scfg, min_segments=4)


def test_token_costs_tiny_edge_cases(tiny):
    params, tok = tiny
    rows = gsm8k("human_reference", 2) + [
        {"id": "short", "instruction": "What is 3 + 4?", "teacher_output": "7"},
        {"id": "bad", "instruction": "", "teacher_output": "x"},  # error row: no costs
    ]
    for lam in (0.0, 0.5, 1.0):
        scfg = api.ScoreConfig(lambda_scas=lam, batch_tokens=1024, max_length=1024)
        check_sums(params, TINY, tok, rows, lam, scfg, min_segments=3)
    # one answer token (the template ends right after the answer): its cost is the score
    bare = tiny_tokenizer.build(BARE_ANSWER_TEMPLATE)
    scfg = api.ScoreConfig(batch_tokens=256, max_length=256)
    (w,) = check_sums(params, TINY, bare, rows[2:3], 0.5, scfg)
    assert w["answer_answer_similarity"] == pytest.approx(1.0)


def test_token_costs_without_question_tokens(tiny):
    """No question position (masks cleared by hand): the AQ term vanishes, the sum holds."""
    params, tok = tiny
    prepared = api.prepare(gsm8k("human_reference", 3), tok, api.ScoreConfig(batch_tokens=2048, max_length=1024))
    (plan, batch), = list(api.packed_batches(prepared))[:1]
    batch = {**batch, "question_mask": np.zeros_like(batch["question_mask"]),
             "nll_question_mask": np.zeros_like(batch["nll_question_mask"])}
    out = jax.jit(functools.partial(api.scas_token_costs, cfg=TINY, max_segments=S, lambda_scas=0.5))(params, batch)
    host = fields_from_batch({k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in out["stats"].items()}, 0.5)
    sums = np.asarray(api.segment_sum(out["cost"], batch["segment_ids"], S)).reshape(-1)
    n = sum(len(r) for r in plan.rows)
    assert n == 3
    for r, row in enumerate(plan.rows):
        for s, _ in enumerate(row):
            f = host[r * S + s]
            assert f["answer_question_similarity"] == 0.0 and f["question_mean_nll"] == 0.0
            assert f["scas_score"] > 0
            assert f["scas_score"] == pytest.approx(0.5 * f["answer_answer_block"], rel=1e-12)
            assert sums[r * S + s] == pytest.approx(f["scas_score"], rel=1e-6)


def _example_variant():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "score_variant.py"
    spec = importlib.util.spec_from_file_location("score_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.variant


def test_example_variant_on_a_mesh_equals_the_scorer(tiny):
    """examples/score_variant.py's variant through the packed, sharded path (8 devices):
    its scas_score is the scorer's, its new score a weighted mean of cosines."""
    from scas_jax.parallel import batch_divisor, make_mesh, shard_params

    params, tok = tiny
    rows = gsm8k("human_reference", 4) + gsm8k("human_socratic", 4)
    mesh = make_mesh("data=-1")
    scfg = api.ScoreConfig(batch_tokens=256, max_length=1024)
    prepared = api.prepare(rows, tok, scfg, row_multiple=batch_divisor(mesh))
    variant = functools.partial(_example_variant(), TINY)
    got = api.map_segments(variant, shard_params(params, mesh), prepared, mesh=mesh)
    want = api.score_rows(params, TINY, tok, rows, scfg, mesh=mesh)
    np.testing.assert_allclose([float(g["scas_score"]) for g in got], [w["scas_score"] for w in want], rtol=2e-6)
    cos = np.array([float(g["nll_weighted_cosine"]) for g in got])
    assert np.all((cos > 0) & (cos <= 1 + 1e-6)) and len(set(cos.round(6))) == len(rows)


def test_composes_under_vmap_and_grad(tiny):
    params, tok = tiny
    prepared = api.prepare(gsm8k("human_reference", 2), tok, api.ScoreConfig(batch_tokens=1024, max_length=1024))
    (_, batch), = list(api.packed_batches(prepared))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    nll, unit = jax.jit(functools.partial(api.token_outputs, cfg=TINY))(params, batch)
    stats = api.segment_stats(nll, unit, batch, max_segments=S)
    f = api.fields(stats, 0.5)

    # vmap over lambda: d scas_score / d lambda = AQ block - AA block, by grad too
    lams = jnp.array([0.0, 0.25, 1.0])
    by_lam = jax.vmap(lambda lam: api.fields(stats, lam)["scas_score"][0, :2])(lams)
    for lam, row in zip(lams, by_lam):
        np.testing.assert_allclose(row, api.fields(stats, float(lam))["scas_score"][0, :2], rtol=1e-6)
    dlam = jax.grad(lambda lam: api.token_costs(unit, stats, batch, lam).sum())(0.3)
    want = (f["answer_question_block"] - f["answer_answer_block"])[0, :2].sum()
    assert float(dlam) == pytest.approx(float(want), rel=1e-5)

    # vmap over a stack of batches = each batch alone
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), batch)
    vm = jax.vmap(lambda b: api.sequence_stats(params, b, cfg=TINY, max_segments=S)["a_vec_sum"])(stacked)
    scale = float(jnp.abs(stats["a_vec_sum"]).max())  # sequence_stats sums the factored tap
    for k in (0, 1):
        np.testing.assert_allclose(vm[k], stats["a_vec_sum"], rtol=1e-5, atol=1e-6 * scale)

    # grad w.r.t. the parameters of the summed per-token cost (= the summed score): it
    # matches a central finite difference of the summed score along a random direction
    def total_cost(p):
        n, u = api.token_outputs(p, batch, cfg=TINY)
        return api.token_costs(u, api.segment_stats(n, u, batch, max_segments=S), batch).sum()

    def total_score(p):
        n, u = api.token_outputs(p, batch, cfg=TINY)
        return api.fields(api.segment_stats(n, u, batch, max_segments=S))["scas_score"].sum()

    g = jax.jit(jax.grad(total_cost))(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params)))
    v = jax.tree.unflatten(jax.tree.structure(params),
                           [jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(params))])
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v)))
    v = jax.tree.map(lambda x: x / norm, v)  # a unit direction
    eps, f = 1e-2, jax.jit(total_score)
    fd = (f(jax.tree.map(lambda x, d: x + eps * d, params, v))
          - f(jax.tree.map(lambda x, d: x - eps * d, params, v))) / (2 * eps)
    dd = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    assert float(dd) == pytest.approx(float(fd), rel=2e-2)
