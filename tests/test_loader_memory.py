"""The loader's memory-saving paths give what the plain paths gave (issue 13, item 4).

* ``checkpoint.restore_params`` restores one leaf at a time: same values, dtypes and
  shardings as one whole-tree Orbax restore, with or without a mesh, and a cast while
  restoring equals a cast afterwards.
* ``student_io.load_tokenizer`` builds the generic fast tokenizer by its own class when
  ``AutoTokenizer`` would build exactly that: the same tokenizer either way, and no
  PyTorch import on the way (a fresh interpreter, with torch installed, checks it).
* The CLI bounds glibc's malloc arenas before a command that runs JAX
  (``host_memory.limit_arenas``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


# ---- restore ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """(config, params, params dir) of a random tiny qwen3 student saved with Orbax."""
    from scas_jax.convert import checkpoint
    from scas_jax.models.config import tiny_config
    from scas_jax.models.decoder import init_params

    cfg = tiny_config("qwen3")
    params = init_params(cfg, jax.random.PRNGKey(3))
    where = tmp_path_factory.mktemp("ckpt") / "params"
    checkpoint.save_params(where, params)
    return cfg, params, where


def _whole(where, abstract):
    import orbax.checkpoint as ocp

    from scas_jax.convert import checkpoint

    return ocp.StandardCheckpointer().restore(checkpoint.orbax_path(where), abstract)


@pytest.mark.parametrize("mesh_spec", [None, "fsdp=-1", "data=2,fsdp=2,tp=2"])
def test_restore_per_leaf_equals_whole_tree(saved_tiny, mesh_spec):
    from scas_jax.convert import checkpoint
    from scas_jax.parallel import make_mesh

    cfg, params, where = saved_tiny
    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    abstract = checkpoint.abstract_with_shardings(cfg, np.float32, mesh)
    got = checkpoint.restore_params(where, abstract)
    want = _whole(where, abstract)
    assert jax.tree.structure(got) == jax.tree.structure(want) == jax.tree.structure(params)
    for g, w, p, a in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params),
                          jax.tree.leaves(abstract)):
        assert g.dtype == w.dtype == a.dtype and g.shape == w.shape == a.shape
        assert g.sharding == w.sharding == a.sharding
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(p))


def test_restore_casts_leaf_by_leaf_like_a_cast_afterwards(saved_tiny):
    from scas_jax.convert import checkpoint

    cfg, _, where = saved_tiny
    abstract = checkpoint.abstract_with_shardings(cfg, np.float32, None)
    got = checkpoint.restore_params(where, abstract, "bfloat16")
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _whole(where, abstract))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))
    same = checkpoint.restore_params(where, abstract, "float32")  # the stored dtype: no cast
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(same))


def test_load_student_converted_bf16_matches(tiny_hf_dirs, tmp_path):
    """A float32 conversion loaded as bfloat16 equals the float32 load cast afterwards."""
    from scas_jax.convert.commands import convert
    from scas_jax.loader import load_student

    out = convert(tiny_hf_dirs["llama_tied_bias"], tmp_path / "conv")
    f32 = load_student(out, with_tokenizer=False)
    b16 = load_student(out, dtype="bfloat16", with_tokenizer=False)
    assert b16.param_dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(b16.params)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))


# ---- tokenizer ----------------------------------------------------------------------


def _same_tokenizer(a, b) -> None:
    assert type(a) is type(b)
    assert a.init_kwargs == b.init_kwargs
    assert a.special_tokens_map == b.special_tokens_map
    assert a.chat_template == b.chat_template
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    text = "Natalia sold 48 clips in April, and half as many in May. 12 + 30?"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42."}]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)


def _tokenizer_dirs(tiny_hf_dirs, root: Path) -> dict[str, Path]:
    """Every tiny family's config beside the tiny ChatML tokenizer, and SmolLM2's config
    beside the tokenizer its GGUF yields (what ``convert`` saves)."""
    import tiny_tokenizer

    from scas_jax.convert.sources import open_source
    from scas_jax.convert.student_io import bundled_smollm2

    dirs = {}
    for name, src in tiny_hf_dirs.items():
        d = root / name
        d.mkdir()
        shutil.copy(Path(src) / "config.json", d / "config.json")
        tiny_tokenizer.save(d)
        dirs[name] = d
    source = open_source(bundled_smollm2())
    d = root / "smollm2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(source.hf_config, default=str))
    source.load_tokenizer().save_pretrained(str(d))
    dirs["smollm2"] = d
    return dirs


def test_load_tokenizer_same_as_autotokenizer(tiny_hf_dirs, tmp_path):
    from transformers import AutoTokenizer

    from scas_jax.convert.student_io import _generic_fast_tokenizer, load_tokenizer

    dirs = _tokenizer_dirs(tiny_hf_dirs, tmp_path)
    fast = {name for name, d in dirs.items() if _generic_fast_tokenizer(d)}
    # every family but qwen2 (whose hub class AutoTokenizer overrides) takes the fast path
    assert fast == set(dirs) - {"qwen2_bias"}, fast
    for name, d in dirs.items():
        _same_tokenizer(load_tokenizer(d), AutoTokenizer.from_pretrained(str(d)))


def test_generic_fast_tokenizer_refuses_what_autotokenizer_may_remap(tiny_hf_dirs, tmp_path):
    from scas_jax.convert.student_io import _generic_fast_tokenizer

    d = _tokenizer_dirs(tiny_hf_dirs, tmp_path)["llama_tied_bias"]
    assert _generic_fast_tokenizer(d)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    for edit in ({"tokenizer_class": "LlamaTokenizer"}, {"auto_map": {"AutoTokenizer": ["x.Y", None]}}):
        (d / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, **edit}))
        assert not _generic_fast_tokenizer(d), edit
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (d / "tokenizer.json").rename(d / "moved.json")
    assert not _generic_fast_tokenizer(d)


def test_load_tokenizer_does_not_import_torch(tiny_hf_dirs, tmp_path):
    """torch is installed here, so AutoTokenizer would import it (transformers' config
    machinery does when it can): the converted student's tokenizer must not."""
    d = _tokenizer_dirs(tiny_hf_dirs, tmp_path)["smollm2"]
    code = (
        "import sys\n"
        "from scas_jax.convert.student_io import load_tokenizer\n"
        f"tok = load_tokenizer({str(d)!r})\n"
        "assert tok is not None\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False"


# ---- host heap ----------------------------------------------------------------------


def test_cli_bounds_malloc_arenas_before_jax_commands(monkeypatch):
    """``scas-jax <command that runs JAX>`` bounds glibc's malloc arenas (one per core)
    before the command runs; other commands leave the heap alone; on glibc the call
    takes."""
    import argparse
    import platform

    from scas_jax import cli, host_memory

    if platform.libc_ver()[0] == "glibc":
        assert host_memory.limit_arenas() is True
    events = []
    monkeypatch.setattr(host_memory, "limit_arenas", lambda count=None: events.append("arenas") or True)
    monkeypatch.setattr(cli.distributed, "initialize_from_args", lambda args: None)
    for command, want in (("select", ["run"]), ("score", ["arenas", "run"])):
        events.clear()
        ns = argparse.Namespace(command=command, func=lambda args: events.append("run") or 0)
        monkeypatch.setattr(cli, "build_parser", lambda ns=ns: argparse.Namespace(parse_args=lambda argv: ns))
        assert cli.main([command]) == 0
        assert events == want, command
