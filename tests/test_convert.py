"""Conversion errors are clear and leave nothing half-written; the CLI wraps them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from scas_jax.cli import main
from scas_jax.convert.commands import convert
from scas_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from scas_jax.errors import ScasError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, edit):
    """Rewrite d/model.safetensors with ``edit(dict name->array)`` applied."""
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    edit(tensors)
    write_safetensors(d / "model.safetensors",
                      [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])


def _assert_untouched(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_unsupported_model_type(tiny_hf_dirs, tmp_path):
    d = _copy(tiny_hf_dirs["qwen2_bias"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScasError, match=r"config.json: model_type 'gpt2' is not supported"):
        convert(d, tmp_path / "out")
    _assert_untouched(tmp_path / "out")


def test_missing_tensor(tiny_hf_dirs, tmp_path):
    d = _copy(tiny_hf_dirs["qwen2_bias"], tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ScasError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        convert(d, tmp_path / "out")
    _assert_untouched(tmp_path / "out")


def test_wrong_shape_names_expected_and_found(tiny_hf_dirs, tmp_path):
    d = _copy(tiny_hf_dirs["llama_tied_bias"], tmp_path / "m")

    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)

    _rewrite(d, edit)
    with pytest.raises(ScasError) as e:
        convert(d, tmp_path / "out")
    msg = str(e.value)
    assert "'model.layers.0.mlp.up_proj.weight'" in msg
    assert "shape [100, 64]" in msg and "expected [112, 64]" in msg
    _assert_untouched(tmp_path / "out")


def test_path_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(ScasError, match="no such file or directory"):
        convert(tmp_path / "nope", tmp_path / "out")
    assert main(["convert", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    _assert_untouched(tmp_path / "out")


def test_refuses_non_empty_out(tiny_hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ScasError, match="exists and is not empty"):
        convert(tiny_hf_dirs["qwen2_bias"], out)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_convert_bf16_then_load(tiny_hf_dirs, tmp_path):
    import jax.numpy as jnp

    from scas_jax.loader import load_student

    out = tmp_path / "bf16"
    assert main(["convert", "--hf", str(tiny_hf_dirs["qwen3_qknorm_tied"]), "--out", str(out),
                 "--dtype", "bfloat16"]) == 0
    st = load_student(out)
    assert st.param_dtype == "bfloat16"
    assert st.params["layers"]["self_attn"]["q_norm"]["scale"].dtype == jnp.bfloat16
    assert st.params["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 112)
