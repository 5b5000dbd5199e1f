"""The mesh, the sharding rule table, and a sharded forward equal to the single-device one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from scas_jax import parallel
from scas_jax.errors import ScasError
from scas_jax.models.config import tiny_config
from scas_jax.models.decoder import forward, init_params


def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "spec,sizes",
    [("data=-1", (8, 1, 1)), ("data=2,fsdp=4", (2, 4, 1)), ("fsdp=-1,tp=2", (1, 4, 2)), ("", (8, 1, 1))],
)
def test_mesh_spec(spec, sizes):
    mesh = parallel.make_mesh(spec)
    assert tuple(mesh.shape[a] for a in parallel.AXES) == sizes


@pytest.mark.parametrize("spec", ["data=3", "gpu=8", "data=-1,fsdp=-1", "data=x", "data"])
def test_bad_mesh_spec(spec):
    with pytest.raises(ScasError, match="mesh spec"):
        parallel.make_mesh(spec)


def test_rule_table():
    mesh = parallel.make_mesh("data=2,fsdp=2,tp=2")
    # kernel [layers, d_model, d_ff]: tp on the mlp dim, fsdp on the largest other dim
    assert parallel.param_spec("layers/mlp/up_proj/kernel", (4, 512, 1024), mesh) == P(None, "fsdp", "tp")
    assert parallel.param_spec("embed_tokens/embedding", (4096, 512), mesh) == P("tp", "fsdp")
    # small tensors are replicated
    assert parallel.param_spec("layers/input_layernorm/scale", (4, 512), mesh) == P(None, None)
    with pytest.raises(ScasError, match="matches no sharding rule"):
        parallel.param_spec("layers/mlp/new_proj/kernel", (4, 512, 512), mesh)


@pytest.mark.parametrize("spec", ["data=-1", "data=2,fsdp=4", "data=2,fsdp=2,tp=2"])
def test_sharded_forward_equals_single_device(spec):
    cfg = tiny_config("qwen2", vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_heads=4, num_kv_heads=2, head_dim=32)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, size=(8, 16)).astype(np.int32)
    seg = np.ones_like(ids)
    seg[3, 10:] = 0
    pos = np.tile(np.arange(16), (8, 1)) * seg
    fwd = jax.jit(forward, static_argnums=(1, 5))
    single, taps1 = fwd(params, cfg, ids, pos, seg, ("layers.-1.mlp.up_proj",))

    mesh = parallel.make_mesh(spec)
    sp = parallel.shard_params(params, mesh)
    assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(sp))
    batch = parallel.shard_batch(mesh, {"ids": ids, "pos": pos, "seg": seg})
    sharded, taps8 = fwd(sp, cfg, batch["ids"], batch["pos"], batch["seg"], ("layers.-1.mlp.up_proj",))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(taps8["layers.-1.mlp.up_proj"]), np.asarray(taps1["layers.-1.mlp.up_proj"]),
        atol=1e-5, rtol=0)
