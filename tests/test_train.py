"""Training: config, loss mask, packing, the jitted step (compile once, sharding, grad
accumulation), exact resume after a real kill, export parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.errors import ScasError
from scas_jax.models.config import tiny_config
from scas_jax.models.decoder import forward, init_params
from scas_jax.parallel import make_mesh, param_shardings, shard_params
from scas_jax.training import step as st
from scas_jax.training.config import TrainConfig, load_config
from scas_jax.training.data import (
    BatchStream, example_from_ids, load_examples, pack_rows,
)
from tiny_chat import arithmetic_rows, char_tokenizer, make_student_dir, write_jsonl

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers


def synthetic_stream(n=48, vocab=64, seq_len=64, batch_size=8, seed=0):
    rng = np.random.default_rng(seed)
    exs = [example_from_ids(rng.integers(0, vocab, size=int(t)), int(t) // 2)
           for t in rng.integers(6, 30, size=n)]
    return BatchStream(exs, seq_len, batch_size, 64, seed)


def run_steps(model_cfg, params, tc: TrainConfig, stream, mesh, steps: int):
    opt = st.make_optimizer(tc, steps)
    state = st.init_state(params, opt, mesh)
    fn = st.make_train_step(model_cfg, tc, opt, mesh, st.state_shardings(state, mesh),
                            st.lr_schedule(tc, steps))
    losses = []
    for k in range(steps):
        state, m = fn(state, st.put_batch(st.to_step_batch(stream.batch(k), tc.grad_accum), mesh))
        losses.append(float(m["loss"]))
    return state, np.array(losses), fn


def assert_same_run(want, got):
    """Two ``run_steps`` results: the same losses and parameters (reduction-order rounding)."""
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(want[0].params), jax.tree.leaves(got[0].params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)


def compiled_step_text(run, stream, grad_accum: int, mesh) -> str:
    """The compiled HLO text of a ``run_steps`` result's step on ``stream``'s first batch."""
    state, _, fn = run
    return fn.lower(state, st.put_batch(st.to_step_batch(stream.batch(0), grad_accum), mesh)).compile().as_text()


# ------------------------------------------------------------------ config


def test_config_file_and_overrides(tmp_path):
    cfg = load_config(REPO / "configs/train/default.yaml",
                      ["optim.learning_rate=3e-4", "remat=true", "steps=7", "mesh=data=2,fsdp=4"])
    assert cfg.learning_rate == 3e-4 and cfg.remat is True and cfg.steps == 7
    assert cfg.mesh == "data=2,fsdp=4" and cfg.seq_len == TrainConfig().seq_len
    assert load_config(REPO / "configs/train/default.yaml") == TrainConfig()


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(ScasError, match=r"bad\.yaml.*unknown config key 'optim\.learning_rat'"):
        load_config(bad)
    with pytest.raises(ScasError, match=r"command line.*unknown config key 'bogus'"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ScasError, match="batch_size.*not a valid int"):
        load_config(None, ["batch_size=abc"])
    with pytest.raises(ScasError, match="not a multiple of grad_accum"):
        load_config(None, ["batch_size=6", "grad_accum=4"])
    with pytest.raises(ScasError, match="dynamic_strategy 'best' is not one of min, groups"):
        load_config(None, ["selection=dynamic", "dynamic_strategy=best"])


# ------------------------------------------------------------------ data


def test_loss_mask_on_chat_template_rows(smollm2_tokenizer):
    """Masked targets decode to exactly the answer + the template's end of turn."""
    tok = smollm2_tokenizer
    rows = [json.loads(l) for l in (GSM8K_POOL / "gpt3_6b_finetuning.jsonl").open()][:12]
    path = write_jsonl(Path(os.environ.get("TMPDIR", "/tmp")) / f"mask_{os.getpid()}.jsonl",
                       [{"system": r["system"], "instruction": r["instruction"],
                         "output": r["teacher_output"]} for r in rows])
    try:
        examples, stats = load_examples(path, tok, seq_len=1024)
    finally:
        path.unlink()
    assert stats.examples == 12 and stats.errors == 0 and stats.dropped_long == 0
    for ex, row in zip(examples, rows):
        w = ex.weights.astype(bool)
        # targets[p] = tokens[p + 1]; the mask is one contiguous run ending at the last target
        idx = np.flatnonzero(w)
        assert np.all(np.diff(idx) == 1) and idx[-1] == ex.length - 2
        assert tok.decode(ex.targets[w]) == row["teacher_output"] + "<|im_end|>\n"
        np.testing.assert_array_equal(ex.targets[:-1], ex.tokens[1:])
        assert not ex.weights[-1]
    # packed: every segment keeps its own mask, no cross-sequence target counted
    stream = BatchStream(examples, 1024, 4, 64, seed=0)
    b = stream.batch(0)
    assert b["tokens"].shape == (4, 1024)
    total = sum(float(stream.batch(k)["weights"].sum()) for k in range(len(stream.plan(0))))
    assert total == sum(float(e.weights.sum()) for e in examples)
    seg = b["segment_ids"]
    ends = (seg[:, :-1] != seg[:, 1:]) & (seg[:, :-1] > 0)
    assert not b["weights"][:, :-1][ends].any()  # the last position of a segment predicts nothing


def test_bad_data(tmp_path):
    tok = char_tokenizer(tmp_path / "tok")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ScasError, match="empty"):
        load_examples(empty, tok, 64)
    rows = arithmetic_rows(3) + [{"instruction": "1+1?", "output": ""}, {"instruction": "", "output": "2"}]
    rows.append({"system": "Add.", "instruction": "9" * 80, "output": "x"})
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    exs, stats = load_examples(mixed, tok, seq_len=64)
    assert (stats.examples, stats.errors, stats.dropped_long, stats.rows) == (3, 2, 1, 6)
    with pytest.raises(ScasError, match=r"mixed\.jsonl:6: \d+ tokens exceed seq_len=64"):
        load_examples(mixed, tok, seq_len=64, drop_long=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(ScasError, match="no usable rows.*1 without an answer"):
        load_examples(bad, tok, 64)
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"sel": {"file_name": "mixed.jsonl", "columns": {
        "system": "system", "prompt": "instruction", "response": "output"}}}))
    exs2, _ = load_examples(info, tok, 64)
    assert len(exs2) == 3
    with pytest.raises(ScasError, match="no dataset 'other'"):
        load_examples(info, tok, 64, dataset="other")


def test_packing_deterministic_and_fixed_shape():
    stream = synthetic_stream()
    again = synthetic_stream()
    assert stream.plan(0) == again.plan(0) and stream.plan(0) != stream.plan(1)
    for k in range(len(stream.plan(0)) + 2):
        b = stream.batch(k)
        assert all(v.shape == (8, 64) for v in b.values())
        np.testing.assert_array_equal(b["tokens"], again.batch(k)["tokens"])
    used = sorted(i for p in stream.plan(0) for i in p.items)
    assert used == list(range(48))  # every example once per epoch
    rows = pack_rows([5, 5, 5], [0, 1, 2], seq_len=10, max_segments=64)
    assert rows == [(0, 1), (2,)]


# ------------------------------------------------------------------ step


@pytest.fixture(scope="module")
def small():
    cfg = tiny_config("llama", vocab_size=64)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def test_compile_once_and_loss_decreases(small):
    cfg, params = small
    tc = TrainConfig(batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=2, steps=30)
    mesh = make_mesh("data=1", jax.devices()[:1])
    _, losses, fn = run_steps(cfg, params, tc, synthetic_stream(), mesh, 30)
    assert fn._cache_size() == 1
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.all(np.isfinite(losses))


def test_one_vs_eight_devices(small):
    cfg, params = small
    # Adam's first update is about +-lr on every weight whatever the gradient's size, so
    # reduction-order rounding on near-zero gradients shows at full lr; a 2-step warmup
    # (first update at lr/2) keeps the comparison about sharding, not Adam's sign flips
    tc = TrainConfig(batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=2, steps=4)
    one, l1, _ = run_steps(cfg, params, tc, synthetic_stream(), make_mesh("data=1", jax.devices()[:1]), 4)
    mesh8 = make_mesh("data=2,fsdp=4")
    eight, l8, _ = run_steps(cfg, params, tc, synthetic_stream(), mesh8, 4)
    # fsdp really shards something
    specs = [x.sharding.spec for x in jax.tree.leaves(eight.params)]
    assert any("fsdp" in str(s) for s in specs)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)


def _loops_around(hlo: str, pattern: str) -> list[list[int]]:
    """For each instruction of compiled ``hlo`` text matching ``pattern``: the trip counts
    of the while loops it runs inside, innermost first (loops of one trip left out)."""
    import re

    comps, callers, trips = {}, {}, {}
    for comp in re.split(r"\n(?=\S)", hlo):
        head = re.match(r"(?:ENTRY )?(%[\w.\-]+)", comp)
        if head:
            comps[head.group(1)] = comp
    for name, comp in comps.items():
        for line in comp.splitlines():
            for callee in re.findall(r"(?:body|condition|calls|to_apply)=(%[\w.\-]+)", line):
                callers.setdefault(callee, name)
            if " while(" in line:
                body = re.search(r"body=(%[\w.\-]+)", line).group(1)
                count = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
                trips[body] = int(count.group(1)) if count else -1
    out = []
    for name, comp in comps.items():
        for line in comp.splitlines():
            if re.search(pattern, line):
                chain, at = [], name
                while at in callers:
                    if trips.get(at, 1) != 1:
                        chain.append(trips[at])
                    at = callers[at]
                out.append(chain)
    return out


def test_head_gradient_is_reduced_once_per_tile():
    """The tiled log-softmax backward sums the head's gradient over the sharded rows;
    each batch shard keeps its own sum through the position chunks and the shards' sums
    are reduced once per vocabulary tile (one head gradient's traffic a micro-batch),
    not at every chunk of every tile (which the step did: an all-reduce of each
    ``[tile, d]`` block inside the chunk loop). On a data mesh and on a data x fsdp mesh
    (fsdp shards the head itself); parameters after two steps equal one device's."""
    cfg = tiny_config("llama", vocab_size=4096)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tc = TrainConfig(batch_size=8, seq_len=96, learning_rate=1e-3, warmup_steps=0, steps=2,
                     logits_vocab_tile=512, logits_chunk=32)  # 8 tiles x 3 chunks a micro-batch
    stream = lambda: synthetic_stream(seq_len=96)
    one = run_steps(cfg, params, tc, stream(), make_mesh("data=1", jax.devices()[:1]), 2)
    for spec in ("data=8", "data=2,fsdp=4"):
        mesh = make_mesh(spec)
        many = run_steps(cfg, params, tc, stream(), mesh, 2)
        assert_same_run(one, many)
        hlo = compiled_step_text(many, stream(), 1, mesh)
        d = cfg.hidden_size  # the untied head is [d, vocab]: a tile is [d, 512]
        tile_reduce = rf"= f32\[(1,)*(512,{d}|{d},512)\]\S* all-reduce(-start)?\("
        # the layer scan has 2 trips, the chunk loop 3, the tile loop 8
        assert _loops_around(hlo, tile_reduce) == [[8]], (spec, _loops_around(hlo, tile_reduce))


def test_accumulated_gradients_are_reduced_once(small):
    """With ``grad_accum`` micro-batches on a data mesh, each data shard adds up its own
    gradients through the micro-batches and the step reduces them once (no all-reduce
    inside any loop of the compiled step: not every micro-batch, not every layer); on a
    data x fsdp mesh too, the same values as one device taking the batch whole."""
    cfg, params = small
    base = dict(batch_size=24, seq_len=64, learning_rate=1e-3, warmup_steps=0, steps=2)
    stream = lambda: synthetic_stream(batch_size=24)
    whole = run_steps(cfg, params, TrainConfig(**base, grad_accum=1), stream(),
                      make_mesh("data=1", jax.devices()[:1]), 2)
    tc = TrainConfig(**base, grad_accum=3)  # micro-batches of 8 rows, one a device
    for spec in ("data=8", "data=2,fsdp=4"):
        mesh = make_mesh(spec)
        acc = run_steps(cfg, params, tc, stream(), mesh, 2)
        assert_same_run(whole, acc)
        if spec == "data=8":
            loops = _loops_around(compiled_step_text(acc, stream(), 3, mesh), r"all-reduce(-start)?\(")
            assert loops and all(chain == [] for chain in loops), loops


def test_eval_step_on_a_mesh_equals_one_device(small):
    """The eval step traces under its mesh (the forward attention then takes each
    device's own rows, as the scorer does): the answer NLL sum on 8 devices equals one
    device's, on rows long enough for the blockwise attention."""
    cfg, params = small
    tc = TrainConfig(batch_size=8, seq_len=320)
    batch = st.to_step_batch(synthetic_stream(seq_len=320).batch(0), 1)
    sums = []
    for mesh in (make_mesh("data=1", jax.devices()[:1]), make_mesh("data=2,fsdp=4")):
        fn = st.make_eval_step(cfg, tc, mesh, param_shardings(params, mesh))
        total, tokens = fn(shard_params(params, mesh), st.put_batch(batch, mesh))
        sums.append((float(total), float(tokens)))
    assert sums[0][1] == sums[1][1] > 0
    np.testing.assert_allclose(sums[1][0], sums[0][0], rtol=1e-5)


def test_grad_accumulation_matches_full_batch(small):
    cfg, params = small
    mesh = make_mesh("data=1", jax.devices()[:1])
    base = dict(batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=0, steps=3)
    full, lf, _ = run_steps(cfg, params, TrainConfig(**base, grad_accum=1), synthetic_stream(), mesh, 3)
    acc, la, _ = run_steps(cfg, params, TrainConfig(**base, grad_accum=2), synthetic_stream(), mesh, 3)
    np.testing.assert_allclose(la, lf, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def test_remat_and_bfloat16(small):
    cfg, params = small
    mesh = make_mesh("data=1", jax.devices()[:1])
    base = dict(batch_size=8, seq_len=64, learning_rate=1e-3, warmup_steps=0, steps=2)
    _, l0, _ = run_steps(cfg, params, TrainConfig(**base), synthetic_stream(), mesh, 2)
    _, lr, _ = run_steps(cfg, params, TrainConfig(**base, remat=True), synthetic_stream(), mesh, 2)
    bf, lb, _ = run_steps(cfg, params, TrainConfig(**base, compute_dtype="bfloat16"), synthetic_stream(), mesh, 2)
    np.testing.assert_allclose(lr, l0, rtol=1e-5)
    np.testing.assert_allclose(lb, l0, rtol=2e-2)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf.params))  # master weights


# ------------------------------------------------------------------ loop, resume, export


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "scas_jax", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_exact_resume_after_kill(tmp_path):
    student = make_student_dir(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(96))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    common = ["--student", str(student), "--data", str(data), "--no-progress",
              "steps=40", "batch_size=4", "seq_len=256", "checkpoint_every=5", "warmup_steps=3",
              "learning_rate=1e-2", "mesh=data=-1", "epochs=1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = _cli([*common, "--output-dir", str(ref)], env)
    assert p.wait(timeout=120) == 0, p.stdout.read()

    p = _cli([*common, "--output-dir", str(cut)], env)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        done = [d for d in (cut / "checkpoints").glob("*") if d.name.isdigit()] if (cut / "checkpoints").exists() else []
        if any(int(d.name) >= 10 for d in done):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "final").exists()
    killed_at = max(int(d.name) for d in (cut / "checkpoints").glob("*") if d.name.isdigit())
    assert 10 <= killed_at < 40

    p = _cli([*common, "--output-dir", str(cut), "--resume"], env)
    assert p.wait(timeout=120) == 0, p.stdout.read()
    ref_l, cut_l = _losses(ref), _losses(cut)
    assert sorted(cut_l) == list(range(1, 41))  # each step logged once
    for s in range(killed_at + 1, 41):
        assert cut_l[s] == ref_l[s], (s, cut_l[s], ref_l[s])
    from scas_jax.loader import load_student

    a, b = load_student(ref / "final"), load_student(cut / "final")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a run without --resume refuses to touch existing checkpoints
    p = _cli([*common, "--output-dir", str(cut)], env)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2 and "pass --resume" in out


def test_train_export_parity(tmp_path):
    """Train a few steps in-process on 8 devices, export, compare logits with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from scas_jax.loader import load_student
    from scas_jax.training.loop import train

    student = make_student_dir(tmp_path / "student", seed=1)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40))
    held = write_jsonl(tmp_path / "held.jsonl", arithmetic_rows(8, seed=9))
    summary = train(student, data, tmp_path / "run", None,
                    ["steps=6", "batch_size=8", "seq_len=128", "checkpoint_every=4",
                     "mesh=data=2,fsdp=4", "learning_rate=1e-2", f"eval_data={held}", "eval_every=3"],
                    export_hf=tmp_path / "hf", progress=False)
    assert summary["final_step"] == 6 and summary["eval_loss"] is not None
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert {"lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(rows[0])
    assert list((tmp_path / "run/tensorboard").glob("events.*"))
    trained = load_student(tmp_path / "run/final")
    before = load_student(student)
    assert not np.allclose(np.asarray(trained.params["lm_head"]["kernel"]),
                           np.asarray(before.params["lm_head"]["kernel"]))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, 99, size=(2, 17))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    t = np.broadcast_to(np.arange(17), ids.shape)
    ours, _ = forward(trained.params, trained.cfg, ids, t, np.ones_like(ids))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_sigterm_saves_checkpoint(tmp_path):
    student = make_student_dir(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    p = _cli(["--student", str(student), "--data", str(data), "--output-dir", str(out), "--no-progress",
              "steps=100000", "batch_size=2", "seq_len=128", "checkpoint_every=3"], env)
    deadline = time.time() + 90
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 4:
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    text = p.communicate(timeout=60)[0]
    assert p.returncode == 143, text
    assert "interrupted by SIGTERM" in text
    from scas_jax.training.checkpoints import TrainCheckpoints

    ck = TrainCheckpoints(out / "checkpoints")
    try:
        step = ck.latest_step()
        last_logged = max(_losses(out))
        assert step == last_logged >= 4 and ck.read_meta(step)["data_position"] == step
    finally:
        ck.close()


def test_student_without_chat_template_is_refused(tmp_path):
    """A tokenizer with no chat template: a clear error before any checkpoint is written."""
    from scas_jax.training.loop import train

    from tiny_chat import drop_chat_template

    student = drop_chat_template(make_student_dir(tmp_path / "student"))
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4))
    with pytest.raises(ScasError, match="no chat template"):
        train(student, data, tmp_path / "run", None, ["steps=1", "batch_size=8", "seq_len=64"],
              progress=False)
    assert not (tmp_path / "run").exists()  # a failed start leaves no directory behind


def test_warmup_starts_above_zero():
    from scas_jax.training.step import lr_schedule

    sched = lr_schedule(TrainConfig(learning_rate=1e-4, warmup_steps=4, steps=10), 10)
    lrs = [float(sched(i)) for i in range(10)]
    np.testing.assert_allclose(lrs[:4], [2.5e-5, 5e-5, 7.5e-5, 1e-4], rtol=1e-6)
    assert lrs[4] == pytest.approx(1e-4)  # the cosine part starts at the peak
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # and only decays
    one = lr_schedule(TrainConfig(learning_rate=1e-4, warmup_steps=1, steps=3), 3)
    assert float(one(0)) == pytest.approx(1e-4)


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ScasError, match=r"did you mean `optim\.learning_rate`"):
        load_config(None, ["optim.learnig_rate=1e-4"])
    with pytest.raises(ScasError, match=r"did you mean `warmup_steps`"):
        load_config(None, ["warmup_step=3"])


def test_bad_inputs_fail_before_the_model_loads(tmp_path, monkeypatch):
    """Data, eval data, candidate dir, student path and config are checked before any
    model work, and a failed start leaves no directory."""
    import scas_jax.loader
    from scas_jax.training.loop import train

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(scas_jax.loader, "load_student", no_loading)
    student = make_student_dir(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    run = tmp_path / "run"
    cases = [
        (dict(data=tmp_path / "missing.jsonl"), r"missing\.jsonl: no such file"),
        (dict(data=bad_json), r"bad\.jsonl:2: malformed JSON"),
        (dict(data=data, overrides=[f"eval_data={tmp_path / 'nope.jsonl'}"]), r"nope\.jsonl: no such file"),
        (dict(data=None, candidate_dir=tmp_path / "no_pool"), r"no_pool: no such directory"),
        (dict(data=None), r"nothing to train on: give --data FILE"),
        (dict(data=data, student=tmp_path / "no_student"), r"--student .*no_student: no such file"),
        (dict(data=data, overrides=["optim.learnin_rate=1"]), r"did you mean `optim\.learning_rate`"),
        (dict(data=data, overrides=["batch_size=3", "mesh=data=-1"]), r"multiple of the mesh"),
    ]
    for kw, pattern in cases:
        args = dict(student=student, overrides=["steps=1", "batch_size=2", "seq_len=64"])
        args.update(kw)
        with pytest.raises(ScasError, match=pattern):
            train(args.pop("student"), args.pop("data"), run, None, args.pop("overrides"),
                  progress=False, **args)
        assert not run.exists(), kw


def test_tfds_data_trains_and_resumes_like_its_jsonl(tmp_path):
    """``--data`` a TFDS dataset built from the SFT file (read through Grain): the same
    losses, step for step, as the JSONL file (traced with ``profile``: a trace is written); and a resume from a mid-run checkpoint of
    the dataset run (the later checkpoint, final dir and log lines removed, as a kill
    leaves them) ends on the same weights, with the input position in the meta."""
    import shutil

    from scas_jax.data.tfds_pool import build_sft_dataset
    from scas_jax.loader import load_student
    from scas_jax.training.checkpoints import TrainCheckpoints
    from scas_jax.training.loop import train

    student = make_student_dir(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40))
    built = build_sft_dataset(data, tmp_path / "tfds", "sft")
    settings = ["steps=6", "batch_size=8", "seq_len=128", "checkpoint_every=3", "warmup_steps=2",
                "learning_rate=1e-2", "mesh=data=-1"]
    # the reference run is also traced (--profile): a trace of steps 2..4, same losses
    ref = train(student, data, tmp_path / "ref", None, settings, progress=False, profile=tmp_path / "prof")
    assert list((tmp_path / "prof").glob("plugins/profile/*/*.xplane.pb"))
    run = tmp_path / "run"
    got = train(student, tmp_path / "tfds", run, None, settings, progress=False)
    assert got["data"] == ref["data"] and got["final_step"] == 6
    assert _losses(run) == _losses(tmp_path / "ref")  # bitwise, every step

    ck = TrainCheckpoints(run / "checkpoints")
    try:
        meta = ck.read_meta(3)
    finally:
        ck.close()
    # two batches per epoch here: step 3 is the second batch of epoch 1
    assert (meta["data_position"], meta["data_epoch"], meta["data_step_in_epoch"]) == (3, 1, 1)
    shutil.rmtree(run / "checkpoints" / "6")
    shutil.rmtree(run / "final")
    again = train(student, built, run, None, [], resume=True, progress=False)  # the version dir
    assert again["resumed_from"] == 3 and again["steps_run"] == 3
    assert _losses(run) == _losses(tmp_path / "ref")
    a, b = load_student(tmp_path / "ref" / "final"), load_student(run / "final")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
