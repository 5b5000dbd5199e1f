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


def _permuted(devices):
    """The devices in an order unlike jax's: reversed, then pairs swapped."""
    d = list(reversed(devices))
    return [d[i ^ 1] for i in range(len(d))]


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4"])
def test_global_rows_land_at_their_global_index(spec):
    """Each device holds the rows its sharding index names, whatever the device order;
    build() runs once per distinct block, and to_host reads rows back in global order."""
    mesh = parallel.make_mesh(spec, devices=_permuted(jax.devices()))
    host = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    calls = []

    def build(rows):
        calls.append((rows.start, rows.stop))
        return {"x": host[rows], "y": host[rows].astype(np.float32) / 2}

    out = parallel.global_rows(mesh, 16, build)
    assert sorted(calls) == [(2 * i, 2 * i + 2) for i in range(8)]
    for shard in out["x"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    np.testing.assert_array_equal(parallel.to_host(out)["x"], host)
    np.testing.assert_array_equal(parallel.to_host(out)["y"], host / 2)
    # rows on a later axis ([grad_accum, micro, seq] training batches)
    three = np.arange(2 * 16 * 4).reshape(2, 16, 4)
    placed = parallel.put_rows(mesh, {"t": three}, axis=1)["t"]
    assert placed.sharding.spec == P(None, parallel.BATCH_AXES)
    np.testing.assert_array_equal(parallel.to_host(placed), three)


def test_permuted_mesh_scores_and_trains_identically(tmp_path):
    """Scores and training steps do not depend on the order of the mesh's devices."""
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig, score_rows
    from scas_jax.training import step as st
    from scas_jax.training.config import TrainConfig
    from scas_jax.training.data import BatchStream, load_examples
    from tiny_chat import arithmetic_rows, make_student_dir, write_jsonl

    student = load_student(make_student_dir(tmp_path / "student"))
    rows = [{**r, "teacher_output": r.pop("output")} for r in arithmetic_rows(24)]
    cfg = ScoreConfig(batch_tokens=256, max_length=256)

    def score(mesh):
        params = parallel.shard_params(student.params, mesh)
        return score_rows(params, student.cfg, student.tokenizer, rows, cfg, mesh=mesh)

    ordered = score(parallel.make_mesh("data=8"))
    assert ordered == score(parallel.make_mesh("data=8", devices=reversed(jax.devices())))
    assert all(f.get("scas_scoring_error") is None for f in ordered)

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    examples, _ = load_examples(data, student.tokenizer, 128)
    tc = TrainConfig(batch_size=8, seq_len=128, learning_rate=1e-2, warmup_steps=1, steps=3)

    def train(mesh):
        opt = st.make_optimizer(tc, 3)
        state = st.init_state(parallel.shard_params(student.params, mesh), opt, mesh)
        fn = st.make_train_step(student.cfg, tc, opt, mesh, st.state_shardings(state, mesh),
                                st.lr_schedule(tc, 3))
        stream = BatchStream(examples, 128, 8, 16, 0)
        tokens = []
        for k in range(3):
            state, m = fn(state, st.put_batch(st.to_step_batch(stream.batch(k), 1), mesh))
            tokens.append(float(m["tokens"]))
        return state, tokens

    a, ta = train(parallel.make_mesh("data=2,fsdp=4"))
    b, tb = train(parallel.make_mesh("data=2,fsdp=4", devices=_permuted(jax.devices())))
    assert ta == tb and min(ta) > 0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


def test_orbax_gets_url_paths_unchanged(monkeypatch, tmp_path):
    """gs://... checkpoint and parameter paths reach Orbax as epath URLs (no pathlib
    folding of '//', no absolute()); local paths become absolute. Nothing is saved."""
    import orbax.checkpoint as ocp
    from etils import epath

    from scas_jax.convert import checkpoint
    from scas_jax.training.checkpoints import TrainCheckpoints
    from scas_jax.training.loop import _join

    seen = []

    class Recorder:
        def __init__(self, directory=None, *a, **kw):
            seen.append(directory)

        def save(self, path, *a, **kw):
            seen.append(path)

        def wait_until_finished(self):
            pass

    monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
    monkeypatch.setattr(ocp, "StandardCheckpointer", Recorder)
    url = _join("gs://bucket/run/", "checkpoints")
    assert url == "gs://bucket/run/checkpoints"
    TrainCheckpoints(url).manager
    checkpoint.save_params("gs://bucket/run/final/params", {})
    local = TrainCheckpoints("rel/checkpoints").directory
    assert [str(p) for p in seen if p is not None] == ["gs://bucket/run/checkpoints",
                                                       "gs://bucket/run/final/params"]
    assert all(isinstance(p, epath.Path) for p in seen if p is not None)
    assert all(p.as_uri().startswith("gs://") for p in seen if p is not None)
    assert isinstance(local, epath.Path) and local.is_absolute()
