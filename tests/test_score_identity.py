"""Content identities of candidate files and students (scas_jax.scoring.identity)."""

from __future__ import annotations

import os
import shutil

import pytest

from scas_jax.scoring import identity
from scas_jax.scoring.identity import differences, file_sha256, model_identity


def test_file_sha256_streams_every_byte(tmp_path):
    import hashlib

    data = os.urandom(3 * identity.BLOCK + 17)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def _model_dir(root):
    """A fake checkpoint: a small config and a 5 MiB 'weights' file."""
    root.mkdir()
    (root / "config.json").write_text('{"num_layers": 2}')
    (root / "sub").mkdir()
    (root / "sub" / "weights.bin").write_bytes(os.urandom(5 << 20))
    return root


def test_model_identity_is_content_not_place(tmp_path):
    a = _model_dir(tmp_path / "a")
    base = model_identity(a)
    b = tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copyfile)  # other place, other mtimes
    assert model_identity(b) == base
    os.utime(b / "sub" / "weights.bin", ns=(1, 1))
    assert model_identity(b) == base
    assert model_identity(a / "sub" / "weights.bin") == model_identity(b / "sub" / "weights.bin")

    (b / "config.json").write_text('{"num_layers": 3}')  # a small file: every byte counts
    assert model_identity(b) != base
    shutil.copyfile(a / "config.json", b / "config.json")
    weights = b / "sub" / "weights.bin"
    original = weights.read_bytes()
    data = bytearray(original)
    last = len(data) - identity.SAMPLE_BYTES  # samples start at last * k / (SAMPLES - 1)
    gap = (last * 7 // (identity.SAMPLES - 1) + identity.SAMPLE_BYTES + last * 8 // (identity.SAMPLES - 1)) // 2
    data[gap] ^= 1  # a single byte between two sampled blocks: unseen,
    weights.write_bytes(bytes(data))  # the documented limit of sampling
    assert model_identity(b) == base
    data[::4096] = bytes(x ^ 1 for x in data[::4096])  # retrained: every region changes
    weights.write_bytes(bytes(data))
    assert model_identity(b) != base
    weights.write_bytes(bytes(data) + b"\0")  # another size
    assert model_identity(b) != base
    (b / "sub" / "weights.bin").rename(b / "weights.bin")  # another layout
    assert model_identity(b) != model_identity(a)


@pytest.fixture(scope="module")
def tiny_llama_student(tiny_hf_dirs):
    import dataclasses

    import tiny_tokenizer
    from scas_jax.loader import load_student

    st = load_student(tiny_hf_dirs["llama_tied_bias"])
    return dataclasses.replace(st, tokenizer=tiny_tokenizer.build())


def test_student_identity_sees_in_memory_changes(tiny_llama_student):
    import dataclasses

    import jax

    st = tiny_llama_student
    base = identity.student_identity(st)
    assert identity.student_identity(dataclasses.replace(st)) == base
    moved = dataclasses.replace(st, params=jax.tree.map(lambda x: x + 1e-3, st.params))
    assert identity.student_identity(moved) != base
    assert identity.student_identity(dataclasses.replace(st, param_dtype="bfloat16")) != base
    assert identity.student_identity(dataclasses.replace(st, tokenizer=None)) != base


def test_differences_names_what_changed():
    old = {"lambda_scas": 0.5, "inputs": {"a": "f" * 64}, "dtype": "float32"}
    new = {"lambda_scas": 0.3, "inputs": {"a": "e" * 64}, "dtype": "float32", "limit": 4}
    assert differences(old, new) == ["inputs.a changed", "lambda_scas 0.5 -> 0.3",
                                     "limit missing -> 4"]
    assert differences(new, new) == []
