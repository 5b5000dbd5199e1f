"""The ``auto`` compute dtype and the float32 matmul precision (models/precision.py)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from scas_jax.errors import ScasError
from scas_jax.models.precision import matmul_precision, resolve_dtype


def test_auto_resolves_by_backend():
    assert resolve_dtype("auto", "gpu") == "bfloat16"
    assert resolve_dtype("auto", "tpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float32", "tpu") == "float32"  # explicit wins
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ScasError, match="float16"):
        resolve_dtype("float16")


def test_auto_is_float32_on_cpu_and_configs_record_it():
    from scas_jax.scoring.scorer import ScoreConfig
    from scas_jax.training.config import TrainConfig, load_config

    assert jax.default_backend() == "cpu"
    assert resolve_dtype("auto") == "float32"
    assert ScoreConfig().dtype == "float32"
    tc = TrainConfig()
    assert tc.compute_dtype == "float32" and tc.score_dtype == "float32"
    assert tc.to_dict()["compute_dtype"] == "float32"  # what train_config.yaml records
    assert load_config(None, ["compute_dtype=bfloat16"]).compute_dtype == "bfloat16"


def _dot_precisions(text: str) -> set[str]:
    return set(re.findall(r"dot_general.*precision = \[(\w+), \w+\]", text))


def test_float32_steps_trace_with_highest_precision():
    """Every matmul of the train step (forward, autodiff and the hand-written VJPs) and of
    the scoring step is HIGHEST under float32; bfloat16 keeps the default."""
    from scas_jax.models.config import tiny_config
    from scas_jax.models.decoder import init_params
    from scas_jax.parallel import make_mesh
    from scas_jax.scoring.core import compiled_stats
    from scas_jax.training import step as st
    from scas_jax.training.config import TrainConfig

    cfg = tiny_config("qwen3")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    for dtype in ("float32", "bfloat16"):
        tc = TrainConfig(batch_size=2, seq_len=256, compute_dtype=dtype, attn_impl="blockwise")
        opt = st.make_optimizer(tc, 10)
        state = jax.eval_shape(lambda p: st.TrainState(jnp.zeros((), jnp.int32), p, opt.init(p)),
                               params)
        step = st.make_train_step(cfg, tc, opt, mesh, st.state_shardings(state, mesh),
                                  st.lr_schedule(tc, 10))
        batch = {k: jnp.zeros((1, 2, 256), jnp.float32 if k == "weights" else jnp.int32)
                 for k in st.BATCH_FIELDS}
        with matmul_precision(dtype):
            train_text = step.lower(state, batch).as_text()
        score = compiled_stats(cfg, 4, dtype=dtype)
        sbatch = {k: jnp.zeros((2, 256), jnp.bool_ if "mask" in k else jnp.int32)
                  for k in ("tokens", "positions", "segment_ids", "question_mask",
                            "answer_mask", "nll_question_mask", "nll_answer_mask")}
        with matmul_precision(dtype):
            score_text = score.lower(params, sbatch).as_text()
        for text in (train_text, score_text):
            found = _dot_precisions(text)
            if dtype == "float32":
                assert found == {"HIGHEST"}, found
            else:
                assert "DEFAULT" in found, found
