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
    with pytest.raises(ScasError, match="exists and is not empty: pass --overwrite"):
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


# ---- safetensors files are input too: every malformed layout is a ScasError -----------


def _raw_safetensors(path, header: dict, data: bytes, header_len: int | None = None):
    """Write a safetensors file byte by byte (header length overridable)."""
    import struct

    blob = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def _two_tensors():
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}


def test_safetensors_valid_file_reads_back(tmp_path):
    import ml_dtypes

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, -2, 0.5, 3], dtype=ml_dtypes.bfloat16)
    f = SafetensorsFile(_raw_safetensors(tmp_path / "ok.safetensors", _two_tensors(),
                                         a.tobytes() + b.tobytes()))
    assert f.keys() == ["a", "b"]
    np.testing.assert_array_equal(f.get("a"), a)
    assert f.get("b").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(f.get("b"), b)


def test_safetensors_truncated(tmp_path):
    p = _raw_safetensors(tmp_path / "t.safetensors", _two_tensors(), bytes(32))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(ScasError, match=r"t\.safetensors: tensor 'b': data_offsets \[24, 32\] run past "
                                        r"the data section \(27 bytes\)"):
        SafetensorsFile(p)
    p.write_bytes(p.read_bytes()[:20])  # now the header itself is cut
    with pytest.raises(ScasError, match=r"t\.safetensors: header length \d+ exceeds the file \(20 bytes\)"):
        SafetensorsFile(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ScasError, match=r"t\.safetensors: not a safetensors file \(2 bytes"):
        SafetensorsFile(p)


def test_safetensors_corrupted_header(tmp_path):
    blob = json.dumps(_two_tensors()).encode()
    p = _raw_safetensors(tmp_path / "c.safetensors", blob[:10] + b"\xff" + blob[11:], bytes(32))
    with pytest.raises(ScasError, match=r"c\.safetensors: header is not valid JSON"):
        SafetensorsFile(p)
    p = _raw_safetensors(tmp_path / "c.safetensors", b"[1, 2]", b"")
    with pytest.raises(ScasError, match=r"c\.safetensors: header is not a JSON object"):
        SafetensorsFile(p)


def test_safetensors_oversized_header_length(tmp_path):
    p = _raw_safetensors(tmp_path / "o.safetensors", _two_tensors(), bytes(32), header_len=2**62)
    with pytest.raises(ScasError, match=r"o\.safetensors: header length 4611686018427387904 exceeds "
                                        r"the 104857600-byte limit"):
        SafetensorsFile(p)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["a"].update(shape=[2, 4]),
     r"tensor 'a': data_offsets \[0, 24\] hold 24 bytes but F32 shape \[2, 4\] needs 32"),
    (lambda h: h["b"].update(data_offsets=[20, 28]), r"tensors 'a' and 'b' overlap"),
    (lambda h: h["a"].update(data_offsets=[24, 0]), r"tensor 'a': data_offsets \[24, 0\] is not \[begin, end\]"),
    (lambda h: h["b"].update(shape=[-4]), r"tensor 'b': shape \[-4\] is not a list"),
    (lambda h: h["b"].update(shape=[2], data_offsets=[24, 28]),
     r"the tensors cover 28 bytes but the data section holds 32"),
])
def test_safetensors_offsets_inconsistent_with_shape(tmp_path, edit, message):
    header = _two_tensors()
    edit(header)
    p = _raw_safetensors(tmp_path / "s.safetensors", header, bytes(32))
    with pytest.raises(ScasError, match=r"s\.safetensors: " + message):
        SafetensorsFile(p)


def test_safetensors_unknown_dtype(tmp_path):
    header = _two_tensors()
    header["b"]["dtype"] = "F8_E4M3"
    p = _raw_safetensors(tmp_path / "d.safetensors", header, bytes(32))
    with pytest.raises(ScasError, match=r"d\.safetensors: tensor 'b': unsupported dtype 'F8_E4M3'"):
        SafetensorsFile(p)


def test_convert_refuses_truncated_checkpoint(tiny_hf_dirs, tmp_path):
    d = _copy(tiny_hf_dirs["qwen2_bias"], tmp_path / "m")
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ScasError, match=r"model\.safetensors: .*truncated file\?"):
        convert(d, tmp_path / "out")
    _assert_untouched(tmp_path / "out")
