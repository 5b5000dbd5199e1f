"""scas_jax.gradcost: the exact per-answer gradient cost against finite differences, the
scorer's answer_mean_nll, padding and vmap (tiny random Llama, character tokenizer)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_tokenizer
from scas_jax import api, gradcost
from scas_jax.assets import GSM8K_POOL
from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig
from scas_jax.models.decoder import init_params

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def setup():
    params = init_params(TINY, jax.random.PRNGKey(3))
    tok = tiny_tokenizer.build()
    with open(GSM8K_POOL / "human_reference.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in list(f)[:2]]
    rows[1] = {**rows[1], "teacher_output": rows[1]["teacher_output"][:60]}
    encoded = api.ChatEncoder(tok).encode_rows(rows)
    return params, tok, rows, encoded


def test_select_param_paths_and_errors(setup):
    params = setup[0]
    k = gradcost.select_param(params, "layers.-1.mlp.up_proj", TINY.num_layers)
    assert k.shape == (32, 48) and np.array_equal(k, params["layers"]["mlp"]["up_proj"]["kernel"][1])
    assert gradcost.select_param(params, "embed_tokens.embedding", 2).shape == (96, 32)
    for name, msg in (("layers.2.mlp.up_proj", "out of range"), ("layers.x.mlp", "not an integer"),
                      ("layers.0.mlp.nope", "no 'nope'"), ("layers.0.mlp", "without a kernel")):
        with pytest.raises(ScasError, match=msg):
            gradcost.select_param(params, name, 2)


def _loss(params, batch):
    return gradcost.answer_loss(params, batch, cfg=TINY)


def test_grad_cost_matches_finite_differences(setup):
    params, _, _, encoded = setup
    batch = {k: jnp.asarray(v) for k, v in gradcost.single_batch(encoded[1], pad_to=16).items()}
    cost = jax.jit(functools.partial(gradcost.grad_cost, cfg=TINY))(params, batch)
    g = jax.grad(_loss)(params, batch)
    loss = jax.jit(_loss)
    assert float(cost["all"]) == pytest.approx(gradcost.tree_sq_norm(g), rel=1e-5)

    def fd(direction, eps=2e-3):  # central difference of the loss along a unit direction
        plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
        minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
        return float((loss(plus, batch) - loss(minus, batch)) / (2 * eps))

    # along the gradient's own direction, the derivative is its norm: sqrt(cost)
    norm = np.sqrt(float(cost["all"]))
    assert fd(jax.tree.map(lambda x: x / norm, g)) == pytest.approx(norm, rel=1e-2)
    # only the target kernel moves: the derivative is the target gradient's norm
    gt = gradcost.select_param(g, gradcost.DEFAULT_TARGET, TINY.num_layers)
    tnorm = np.sqrt(float(cost["target"]))
    assert 0 < float(cost["target"]) < float(cost["all"])
    only = jax.tree.map(jnp.zeros_like, params)
    only["layers"]["mlp"]["up_proj"]["kernel"] = only["layers"]["mlp"]["up_proj"]["kernel"].at[-1].set(gt / tnorm)
    assert fd(only) == pytest.approx(tnorm, rel=1e-2)
    # a random unit direction: <grad, v> = the finite difference
    leaves = jax.tree.leaves(params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    v = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    n = np.sqrt(sum(float(jnp.vdot(x, x)) for x in v))
    v = jax.tree.unflatten(jax.tree.structure(params), [x / n for x in v])
    dd = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    assert fd(v) == pytest.approx(dd, rel=2e-2, abs=1e-4)


def test_loss_is_the_scorers_answer_mean_nll_padding_and_vmap(setup):
    params, tok, rows, encoded = setup
    got = gradcost.grad_costs(params, TINY, encoded)
    want = api.score_rows(params, TINY, tok, rows, api.ScoreConfig(max_length=1024))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["answer_mean_nll"], rel=1e-5)
        assert g["all"] > g["target"] > 0
    # vmapped over answers padded to the longest one (other padding than pad_to=64, and
    # the shorter answer is padded here): the same per-answer costs
    t = max(e.length for e in encoded)
    stacked = {k: np.stack([gradcost.single_batch(e, pad_to=t)[k] for e in encoded])
               for k in gradcost.single_batch(encoded[0], t)}
    vm = jax.jit(jax.vmap(functools.partial(gradcost.grad_cost, cfg=TINY), in_axes=(None, 0)))(params, stacked)
    for i, g in enumerate(got):
        for k in ("loss", "target", "all"):
            assert float(vm[k][i]) == pytest.approx(g[k], rel=1e-4)
