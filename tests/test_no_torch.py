"""The run-time package works where the test-only packages (torch, accelerate) are absent.

Each check runs in a fresh interpreter started with ``python -S`` whose only site
directory is a copy (symlinks) of this environment's site-packages minus torch and
accelerate: ``.pth`` files (the editable install's included) are processed as usual, and
``importlib`` finds neither package nor its metadata -- as in a fresh venv with only the
run-time dependencies. Every subprocess first asserts that torch cannot be imported, so
no test can pass vacuously.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_ONLY = ("torch", "functorch", "torchgen", "accelerate")

# the prelude every subprocess runs: activate the torch-less site dir, prove torch is gone
_PRELUDE = """
import importlib.metadata, importlib.util, site, sys
site.addsitedir({site_dir!r})
for name in {test_only!r}:
    assert importlib.util.find_spec(name) is None, name + " is importable"
dists = {{(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}}
assert not dists & set({test_only!r}), dists & set({test_only!r})
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("import torch succeeded")
"""


@pytest.fixture(scope="module")
def no_torch_site(tmp_path_factory) -> Path:
    """A directory of symlinks to every site-packages entry except the test-only packages."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    assert (site_packages / "torch").exists(), "the oracle environment should have torch"
    out = tmp_path_factory.mktemp("site_no_torch")
    for entry in site_packages.iterdir():
        if not entry.name.lower().startswith(TEST_ONLY):
            (out / entry.name).symlink_to(entry)
    return out


@pytest.fixture(scope="module")
def run_without_torch(no_torch_site):
    """``run(code, timeout)`` -> CompletedProcess of ``code`` in a torch-less interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    prelude = _PRELUDE.format(site_dir=str(no_torch_site), test_only=TEST_ONLY)

    def run(code: str, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-S", "-c", prelude + code], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=timeout,
        )
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc

    return run


def test_prelude_really_hides_torch(run_without_torch):
    out = run_without_torch("print(sys.flags.no_site, 'torch' in sys.modules)", timeout=60)
    assert out.stdout.split() == ["1", "False"]


def test_help_of_every_command(run_without_torch):
    code = """
import argparse, contextlib, io, json
from scas_jax.cli import build_parser, main
parser = build_parser()
names = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
texts = {}
for argv in [["--help"]] + [[n, "--help"] for n in names]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    texts[" ".join(argv)] = buf.getvalue()
print(json.dumps(texts))
"""
    texts = json.loads(run_without_torch(code, timeout=120).stdout.splitlines()[-1])
    assert "usage: scas-jax" in texts["--help"]
    commands = [k.split()[0] for k in texts if k != "--help"]
    assert {"convert", "export", "pipeline"} <= set(commands)
    for cmd in commands:
        assert f"usage: scas-jax {cmd}" in texts[f"{cmd} --help"]


def test_load_student_and_tokenize(run_without_torch):
    code = """
import json
from scas_jax.loader import load_student
st = load_student("smollm2")
tok = st.tokenizer
msgs = [{"role": "user", "content": "What is 12 + 30?"}]
print(json.dumps({
    "layers": st.cfg.num_layers,
    "ids": tok("Natalia sold 48 clips.")["input_ids"],
    "chat": tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
    "eos": tok.eos_token,
    "cls": type(tok).__name__,
}))
"""
    got = json.loads(run_without_torch(code, timeout=300).stdout.splitlines()[-1])
    assert got["layers"] == 30
    assert len(got["ids"]) > 4 and got["eos"] == "<|im_end|>"
    assert got["chat"].endswith("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n")


def test_readme_pipeline_smallest(run_without_torch, tmp_path):
    out = tmp_path / "run"
    code = f"""
from scas_jax.cli import main
sys.exit(main(["pipeline", "--out", {str(out)!r}, "--questions", "2", "--train-steps", "1",
               "--no-progress"]))
"""
    proc = run_without_torch(code, timeout=900)
    # transformers' "PyTorch was not found" advice does not apply to scas_jax: not shown
    assert "PyTorch was not found" not in proc.stderr + proc.stdout
    assert "[8/8]" in proc.stdout and (out / "effect.json").exists()
    # convert saved the tokenizer beside the student; training exported safetensors
    assert list(out.rglob("tokenizer.json"))
    assert list(out.rglob("*.safetensors"))
