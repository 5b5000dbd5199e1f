"""The KV-cache sampler: parity with transformers' greedy ``generate`` (SmolLM2 and a tiny
model of every family), with the uncached forward pass, batch invariance, bounded
compilations, sampling keys, stop tokens and sharding."""

from __future__ import annotations

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scas_jax.generation.sampler import PREFILLS, Sampler, stop_token_ids
from scas_jax.generation.sampling import SamplingConfig
from scas_jax.loader import load_student
from scas_jax.models.decoder import forward
from scas_jax.models.kv_cache import LAYOUTS, default_layout

FAMILIES = sorted(hf_tiny.FAMILIES)
GSM8K = "scas_jax/assets/gsm8k/human_reference.jsonl"
_fwd = jax.jit(forward, static_argnums=(1,))


def _hf_eos(hf) -> list[int]:
    eos = hf.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _with_stop(g) -> list[int]:
    return list(g.tokens) + ([g.stop_token] if g.stop_token is not None else [])


# ------------------------------------------------------------------ SmolLM2


def test_smollm2_greedy_equals_transformers(smollm2_student, smollm2_torch_model):
    """Three GSM8K questions, 64 new tokens, fp32: token for token, in one left-padded batch."""
    import torch

    from scas_jax.generation.prompts import prompt_ids, read_questions

    tok = smollm2_student.tokenizer
    questions = read_questions(GSM8K, limit=3)
    prompts = prompt_ids(tok, questions)
    assert len({len(p) for p in prompts}) == 3  # real left padding inside the batch
    stops = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    sampler = Sampler(smollm2_student.params, smollm2_student.cfg, batch_size=4)
    gens = sampler.generate(prompts, max_new_tokens=64, stop_ids=stops)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = smollm2_torch_model.generate(ids, attention_mask=mask, max_new_tokens=64,
                                           do_sample=False, eos_token_id=list(stops), pad_token_id=0)
    for row, g in zip(out[:, width:].tolist(), gens):
        ref = row[:row.index(g.stop_token) + 1] if g.stop_token is not None else row
        assert _with_stop(g) == ref
        assert g.truncated == (g.stop_token is None) and len(ref) <= 64
    assert "16" in tok.decode(gens[0].tokens)  # it reads the question (Janet's 16 eggs)


# ------------------------------------------------------------------ tiny families


@pytest.fixture(scope="module")
def tiny(tiny_hf_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for name, d in tiny_hf_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        out[name] = (hf, load_student(d, with_tokenizer=False))
    return out


PROMPTS = [[5, 17, 33], [3, 9, 4, 60, 61, 62, 7, 8, 90, 11, 12, 13], [44], [8, 8, 8, 8, 8, 8, 21]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_greedy_equals_transformers_and_full_forward(tiny, name, layout):
    """Every family (Qwen2 biases, Qwen3 q/k norms, Mistral's 5-token window over 28-token
    sequences, llama3 rope scaling, tied heads), both cache layouts: each row of a
    left-padded batch equals transformers' greedy generate of that prompt alone, and
    every generated token is the argmax of a full uncached forward pass over the
    sequence so far."""
    import torch

    hf, st = tiny[name]
    stops = _hf_eos(hf)
    sampler = Sampler(st.params, st.cfg, batch_size=4, buckets=(16,), layout=layout)
    gens = sampler.generate(PROMPTS, max_new_tokens=16, stop_ids=stops)
    for p, g in zip(PROMPTS, gens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=stops or None,
                              pad_token_id=0)
        assert _with_stop(g) == out[0, len(p):].tolist()
        seq = np.asarray([p + _with_stop(g)], np.int32)
        logits, _ = _fwd(st.params, st.cfg, seq, np.arange(seq.shape[1])[None], np.ones_like(seq))
        argmax = np.asarray(jnp.argmax(logits[0], -1))[len(p) - 1:-1]
        assert argmax.tolist() == _with_stop(g)


@pytest.fixture(scope="module")
def qwen3(tiny):
    return tiny["qwen3_qknorm_tied"][1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_left_padded_batch_equals_each_row_alone(qwen3, layout):
    """Greedy and sampled: a row's tokens do not depend on the other rows of its batch
    (row keys come from row ids, positions from the padding mask)."""
    batch = Sampler(qwen3.params, qwen3.cfg, batch_size=4, buckets=(16,), layout=layout)
    alone = Sampler(qwen3.params, qwen3.cfg, batch_size=1, buckets=(16,), layout=layout)
    hot = SamplingConfig(temperature=1.0)
    for sc in (SamplingConfig(), hot):
        together = batch.generate(PROMPTS, max_new_tokens=10, sampling=sc, seed=3, row_ids=[7, 8, 9, 10])
        for i, p in enumerate(PROMPTS):
            (one,) = alone.generate([p], max_new_tokens=10, sampling=sc, seed=3, row_ids=[7 + i])
            assert one == together[i]


def test_compilations_bounded_by_buckets(qwen3):
    """Prompts of 1..30 tokens, batches of 4, buckets 8/16/32: one compilation per bucket,
    none on a second call."""
    sampler = Sampler(qwen3.params, qwen3.cfg, batch_size=4, buckets=(8, 16, 32))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 90, size=n)) for n in range(1, 31)]
    gens = sampler.generate(prompts, max_new_tokens=4)
    assert sampler.compilations == 3
    packed_shapes = sampler.prefill_compilations
    assert 3 <= packed_shapes <= 8 * 3  # packed prefills: at most 8 lengths per bucket
    assert sampler.generate(prompts, max_new_tokens=4) == gens
    assert sampler.compilations == 3 and sampler.prefill_compilations == packed_shapes
    assert sorted({s[3] for s in sampler.cache_shapes}) == [8 + 4, 16 + 4, 32 + 4]


def test_sampling_keys_seeds_and_top_k(qwen3):
    sampler = Sampler(qwen3.params, qwen3.cfg, batch_size=4, buckets=(16,))
    greedy = sampler.generate(PROMPTS, max_new_tokens=12)
    hot = SamplingConfig(temperature=1.5, top_p=0.95)
    a = sampler.generate(PROMPTS, max_new_tokens=12, sampling=hot, seed=1)
    assert sampler.generate(PROMPTS, max_new_tokens=12, sampling=hot, seed=1) == a
    b = sampler.generate(PROMPTS, max_new_tokens=12, sampling=hot, seed=2)
    assert a != b and a != greedy
    top1 = SamplingConfig(temperature=0.7, top_k=1)
    assert sampler.generate(PROMPTS, max_new_tokens=12, sampling=top1, seed=5) == greedy


def test_stop_tokens_end_rows_and_truncation_is_flagged(qwen3):
    sampler = Sampler(qwen3.params, qwen3.cfg, batch_size=4, buckets=(16,))
    free = sampler.generate(PROMPTS, max_new_tokens=12)
    assert all(g.truncated and g.stop_token is None and len(g.tokens) == 12 for g in free)
    stop = free[0].tokens[4]
    gens = sampler.generate(PROMPTS, max_new_tokens=12, stop_ids=[stop])
    first = free[0].tokens.index(stop)
    assert gens[0].tokens == free[0].tokens[:first] and gens[0].stop_token == stop
    assert not gens[0].truncated
    for g, f in zip(gens, free):  # the other rows: their own prefix up to the stop, if any
        cut = f.tokens.index(stop) if stop in f.tokens else len(f.tokens)
        assert g.tokens == f.tokens[:cut] and g.truncated == (stop not in f.tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_over_the_mesh_equals_one_device(qwen3, layout):
    from scas_jax.parallel import make_mesh, shard_params

    mesh = make_mesh("data=4,fsdp=2")
    sharded = Sampler(shard_params(qwen3.params, mesh), qwen3.cfg, mesh=mesh, batch_size=3,
                      buckets=(16,), layout=layout)
    assert sharded.batch_size == 8  # rounded up to the 8 batch shards
    plain = Sampler(qwen3.params, qwen3.cfg, batch_size=8, buckets=(16,), layout="stacked")
    hot = SamplingConfig(temperature=1.0, top_k=20)
    for sc in (SamplingConfig(), hot):
        assert (sharded.generate(PROMPTS, max_new_tokens=8, sampling=sc)
                == plain.generate(PROMPTS, max_new_tokens=8, sampling=sc))
    (_, cache), = [sharded._cache]
    for k in jax.tree.leaves(cache["k"]):
        assert len(k.sharding.device_set) == 8


def test_layouts_agree_and_cpu_defaults_to_per_layer(qwen3):
    """The two cache layouts give the same tokens (greedy and sampled) and the same cache
    contents; the CPU backend picks the per-layer one."""
    assert default_layout("cpu") == "per_layer" and default_layout("gpu") == "stacked"
    assert Sampler(qwen3.params, qwen3.cfg).layout == "per_layer"
    runs = {}
    for layout in LAYOUTS:
        s = Sampler(qwen3.params, qwen3.cfg, batch_size=4, buckets=(16,), layout=layout)
        runs[layout] = (s.generate(PROMPTS, max_new_tokens=8),
                        s.generate(PROMPTS, max_new_tokens=8, sampling=SamplingConfig(temperature=1.0), seed=5),
                        s._cache[1])
    (g1, h1, c1), (g2, h2, c2) = runs["stacked"], runs["per_layer"]
    assert g1 == g2 and h1 == h2
    for n in ("k", "v"):
        np.testing.assert_allclose(np.stack([np.asarray(x) for x in c2[n]]), np.asarray(c1[n]), atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_prefill_equals_padded(tiny, name, layout):
    """Every family, both layouts: the packed prefill (prompts back to back) gives the
    tokens and cache contents of the left-padded one, greedy and sampled; a padded
    width well past the prompts (Mistral's window, Gemma's local layers) included."""
    st = tiny[name][1]
    runs = {}
    for prefill in PREFILLS:
        s = Sampler(st.params, st.cfg, batch_size=4, buckets=(32,), layout=layout, prefill=prefill)
        runs[prefill] = (s.generate(PROMPTS, max_new_tokens=8),
                         s.generate(PROMPTS, max_new_tokens=8, sampling=SamplingConfig(temperature=1.0), seed=2),
                         s._cache[1])
    (g1, h1, c1), (g2, h2, c2) = runs["padded"], runs["packed"]
    assert g1 == g2 and h1 == h2
    width = 32  # slots before a row's prompt hold padding (masked, and different)
    lengths = sorted(map(len, PROMPTS))  # the sampler's batch is sorted by prompt length
    used = np.array([[s >= width - n for s in range(width + 8)] for n in lengths])
    for n in ("k", "v"):
        for a, b in zip(jax.tree.leaves(c1[n]), jax.tree.leaves(c2[n])):
            lead = a.ndim - 4  # 1 for the stacked layout's layer axis
            pick = lambda x: np.moveaxis(np.asarray(x), -2, lead + 1)[(slice(None),) * lead + (used,)]  # noqa: E731
            np.testing.assert_allclose(pick(b), pick(a), atol=1e-5)


def test_pack_prompts_layout():
    """Index arrays of a packed prefill, by hand: two prompts and one dummy row."""
    from scas_jax.generation.sampler import packed_length
    from scas_jax.models.kv_cache import pack_prompts

    n = packed_length(3 + 2 + 1, rows=3, width=4)
    assert n == 12  # steps of max(16, 3 * 4 / 8) tokens, never past the padded 3 * 4
    h = pack_prompts([[11, 12, 13], [21, 22]], width=4, rows=3, packed_len=n, pad_id=0)
    assert h["tokens"][:7].tolist() == [11, 12, 13, 21, 22, 0, 0]
    assert h["positions"][:6].tolist() == [0, 1, 2, 0, 1, 0]
    assert h["valid"].tolist() == [[False, True, True, True], [False, False, True, True],
                                   [False, False, False, True]]
    assert h["rows_index"].tolist() == [[0, 0, 1, 2], [3, 3, 3, 4], [5, 5, 5, 5]]
    assert h["packed_index"][:6].tolist() == [1, 2, 3, 6, 7, 11]
    assert h["last_index"].tolist() == [2, 4, 5]
    with pytest.raises(ValueError, match="do not fit"):
        pack_prompts([[1, 2, 3, 4]] * 3, width=4, rows=3, packed_len=8)
    assert packed_length(1000, rows=16, width=144) == 1152 and packed_length(2304, 16, 144) == 2304


# ------------------------------------------------------------------ scas-jax generate


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A converted tiny llama with a character-level ChatML tokenizer (EOS <|im_end|>)."""
    import tiny_chat

    return tiny_chat.make_student_dir(tmp_path_factory.mktemp("gen") / "student")


def _questions(path, n=4, **extra):
    import json

    rows = [{"id": f"q{i}", "instruction": f"What is {i} + {i}?", "reference_answer": str(2 * i),
             "teacher_output": "ignored", **extra} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_output_is_a_pool_that_verify_score_select_take(tiny_student, tmp_path):
    import json

    from scas_jax.generation.commands import generate
    from scas_jax.judging.verify import TRUNCATED_REASON, verify
    from scas_jax.scoring.commands import score
    from scas_jax.selection.api import select

    q = _questions(tmp_path / "q.jsonl")
    m = generate(tiny_student, q, tmp_path / "pool", "tiny", max_new_tokens=6, mesh="data=4,fsdp=2",
                 batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "pool" / "tiny.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"] and m["rows"] == 4
    assert all(r["teacher_name"] == "tiny" and r["reference_answer"] == str(2 * i) and r["teacher_output"]
               and r["system"] is None and "sample_index" not in r for i, r in enumerate(rows))
    assert sum(r["truncated"] for r in rows) == m["truncated"] > 0  # a random model rarely stops
    assert not (tmp_path / "pool" / ".generate_journal").exists()

    vm = verify(tmp_path / "pool", tmp_path / "verified")
    verified = [json.loads(line) for line in (tmp_path / "verified" / "tiny.jsonl").read_text().splitlines()]
    for r in verified:
        if r["truncated"]:
            assert r["teacher_correct"] is None and r["judge_reason"] == TRUNCATED_REASON
    assert vm["teachers"]["tiny"]["rows"] == 4
    sm = score(tiny_student, tmp_path / "verified", tmp_path / "scored", progress=False)
    assert sm["teachers"]["tiny"]["rows"] == 4
    sel = select(tmp_path / "scored", tmp_path / "selected", "min")
    assert sel["selected_rows"] == 4


def test_generate_samples_resume_and_settings(tiny_student, tmp_path):
    """K = 2 sampled answers per question: ids '<id>#<k>'; a run interrupted after two
    questions (journal with a torn last line) continues to the same bytes; other
    settings are an error naming them; a finished run is not redone."""
    import json

    from scas_jax.errors import ScasError
    from scas_jax.generation.commands import generate

    q = _questions(tmp_path / "q.jsonl")
    kw = dict(samples=2, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=7, batch_size=4)
    m = generate(tiny_student, q, tmp_path / "a", "s", **kw)
    text = (tmp_path / "a" / "s.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows[:4]] == ["q0#0", "q0#1", "q1#0", "q1#1"]
    assert [(r["question_id"], r["sample_index"]) for r in rows[:2]] == [("q0", 0), ("q0", 1)]
    assert len({r["teacher_output"] for r in rows}) > 4  # samples differ

    journal = tmp_path / "b" / ".generate_journal" / "s.jsonl"
    journal.parent.mkdir(parents=True)
    lines = [json.dumps({"journal": 1, "settings": m["settings"]})]
    lines += [json.dumps({"key": json.dumps(f"q{i}"), "rows": rows[2 * i:2 * i + 2]}) for i in range(2)]
    journal.write_text("\n".join(lines) + "\n" + '{"key": "torn')
    m2 = generate(tiny_student, q, tmp_path / "b", "s", **kw)
    assert m2["resumed_questions"] == 2 and (tmp_path / "b" / "s.jsonl").read_text() == text

    with pytest.raises(ScasError, match=r"temperature 1\.0 -> 0\.5.*--teacher-name"):
        generate(tiny_student, q, tmp_path / "b", "s", **{**kw, "temperature": 0.5})
    assert generate(tiny_student, q, tmp_path / "b", "s", **kw)["already_complete"]


def test_generate_bad_questions_fail_before_the_model_loads(tmp_path):
    import json

    from scas_jax.errors import ScasError
    from scas_jax.generation.commands import generate

    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"id": 1, "instruction": "a"}) + "\n" + json.dumps({"id": 2}) + "\n")
    with pytest.raises(ScasError, match=rf"{bad}:2: missing or empty field 'instruction'"):
        generate(tmp_path / "no-model", bad, tmp_path / "out", "t")
    bad.write_text("\n".join(json.dumps({"id": i % 2, "instruction": "a"}) for i in range(3)) + "\n")
    with pytest.raises(ScasError, match=rf"{bad}:3: duplicate id 0 \(first at line 1\)"):
        generate(tmp_path / "no-model", bad, tmp_path / "out", "t")
    assert not (tmp_path / "out").exists()


def test_judge_leaves_truncated_generations_undecided():
    from scas_jax.judging.verify import TRUNCATED_REASON, judge_row

    row = {"teacher_output": "9 * 2 = 18\n#### 18", "reference_answer": "18"}
    assert judge_row(row).correct is True
    assert judge_row({**row, "truncated": False}).correct is True
    v = judge_row({**row, "truncated": True})
    assert v.correct is None and v.reason == TRUNCATED_REASON and v.answer == "18"


# ------------------------------------------------------------------ --chat-template


def _bare_student(path):
    """The tiny char-level student with its chat template removed (a base model)."""
    import tiny_chat

    return tiny_chat.drop_chat_template(tiny_chat.make_student_dir(path))


def _spy_sampler(monkeypatch) -> list[dict]:
    """Records the prompt ids and stop ids every ``Sampler.generate`` call receives."""
    from scas_jax.generation import sampler as sampler_mod

    calls: list[dict] = []
    original = sampler_mod.Sampler.generate

    def spy(self, prompts, **kw):
        calls.append({"prompts": [list(map(int, p)) for p in prompts], "stop_ids": tuple(kw.get("stop_ids", ()))})
        return original(self, prompts, **kw)

    monkeypatch.setattr(sampler_mod.Sampler, "generate", spy)
    return calls


PLAIN_PROMPT = "You are a helpful assistant.\n\nQuestion: {}\nAnswer:\n"
CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")


def test_generate_chat_template_builds_the_prompts_and_is_recorded(tmp_path, monkeypatch):
    """A student without a template: the default is an error naming --chat-template;
    ``plain`` / ``chatml`` prompts are those templates' texts, the template is recorded
    in the manifest and settings, and another template never resumes the old run (neither
    a finished file nor a journal)."""
    import json

    from transformers import AutoTokenizer

    from scas_jax.cli import main
    from scas_jax.errors import ScasError
    from scas_jax.generation.commands import generate

    student = _bare_student(tmp_path / "student")
    tok = AutoTokenizer.from_pretrained(str(student))
    assert not tok.chat_template
    q = _questions(tmp_path / "q.jsonl", n=2)
    with pytest.raises(ScasError, match="has no chat template; name one with --chat-template"):
        generate(student, q, tmp_path / "none", "t", max_new_tokens=2)

    calls = _spy_sampler(monkeypatch)
    kw = {"max_new_tokens": 3, "batch_size": 2}
    m = generate(student, q, tmp_path / "a", "t", chat_template="plain", **kw)
    texts = [PLAIN_PROMPT.format(f"What is {i} + {i}?") for i in range(2)]
    assert calls[0]["prompts"] == [list(ids) for ids in tok(texts)["input_ids"]]
    assert calls[0]["stop_ids"] == (tok.convert_tokens_to_ids("<|im_end|>"),)  # plain stops at EOS
    saved = json.loads((tmp_path / "a" / "t.generate.json").read_text())
    assert m["chat_template"] == saved["chat_template"] == saved["settings"]["chat_template"] == "plain"

    with pytest.raises(ScasError, match=r"chat_template \"plain\" -> \"chatml\".*--teacher-name"):
        generate(student, q, tmp_path / "a", "t", chat_template="chatml", **kw)
    journal = tmp_path / "b" / ".generate_journal" / "t.jsonl"  # an interrupted plain run
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps({"journal": 1, "settings": m["settings"]}) + "\n")
    with pytest.raises(ScasError, match=r"chat_template \"plain\" -> \"chatml\""):
        generate(student, q, tmp_path / "b", "t", chat_template="chatml", **kw)
    assert len(calls) == 1  # nothing was generated by the refused reruns

    assert main(["generate", "--model", str(student), "--questions", str(q), "--output-dir",
                 str(tmp_path / "b"), "--teacher-name", "u", "--max-new-tokens", "3", "--batch-size", "2",
                 "--chat-template", "chatml"]) == 0
    texts = [CHATML_PROMPT.format(f"What is {i} + {i}?") for i in range(2)]
    assert calls[1]["prompts"] == [list(ids) for ids in tok(texts)["input_ids"]]
    saved = json.loads((tmp_path / "b" / "u.generate.json").read_text())
    assert saved["chat_template"] == saved["settings"]["chat_template"] == "chatml"


def test_chat_template_stop_tokens_and_prompt_errors(tmp_path):
    """gemma's <end_of_turn> and chatml's <|im_end|> stop generation (an error naming the
    flag when the tokenizer lacks them as one token); plain stops at EOS; a tokenizer
    without a template and no --chat-template is an error naming the flag."""
    import tiny_chat

    from scas_jax.errors import ScasError
    from scas_jax.generation.prompts import (
        generation_stop_ids,
        prompt_texts,
        read_questions,
    )
    from scas_jax.generation.sampler import stop_token_ids

    tok = tiny_chat.char_tokenizer(tmp_path / "tok")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert generation_stop_ids(tok, "plain") == generation_stop_ids(tok, None) == stop_token_ids(tok) == (eos,)
    assert generation_stop_ids(tok, "chatml") == (eos,)
    with pytest.raises(ScasError, match=r"--chat-template gemma: the tokenizer has no single token '<end_of_turn>'"):
        generation_stop_ids(tok, "gemma")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    assert tok.convert_tokens_to_ids("<end_of_turn>") in generation_stop_ids(tok, "gemma")

    qs = read_questions(_questions(tmp_path / "q.jsonl", n=1))
    assert prompt_texts(tok, qs, "gemma") == [
        "<start_of_turn>user\nYou are a helpful assistant.\n\nWhat is 0 + 0?<end_of_turn>\n<start_of_turn>model\n"]
    tok.chat_template = None
    with pytest.raises(ScasError, match=r"no chat template; name one with --chat-template chatml\|gemma\|plain"):
        prompt_texts(tok, qs)
